"""The model socket: the one route out of a sandbox that asks for it (``CreateRequest.model_socket``).

sandboxd makes a host directory per such sandbox under ``sandboxd.model_socket_root`` and
bind-mounts it read-only at ``/run/rollstream``; the agent runner's model proxy (on the same host)
listens on a unix socket in it. The container keeps ``NetworkMode=none``: no interface but
loopback, so that socket is all it can reach outside (tests/test_agent_runner.py checks). The
directory goes with the sandbox.
"""

from __future__ import annotations

import functools
import os
import shutil

import anyio

from sandboxd.settings import SandboxdSettings

MOUNT = "/run/rollstream"


def socket_dir(settings: SandboxdSettings, short_id: str) -> str:
    """The host directory of sandbox ``short_id``'s model socket."""
    return os.path.join(settings.model_socket_root, f"{settings.scope}-{short_id}")


def make(settings: SandboxdSettings, short_id: str) -> list[str]:
    """Create the directory (blocking; small) and return the container's ``Binds`` for it."""
    path = socket_dir(settings, short_id)
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, 0o755)  # the agent uid inside may reach the socket, not write the directory
    return [f"{path}:{MOUNT}:ro"]


async def release(settings: SandboxdSettings, sandbox_id: str) -> None:
    """Remove sandbox ``sandbox_id``'s directory, if sockets are on (it may never have had one)."""
    if settings.model_socket_root:
        path = socket_dir(settings, sandbox_id.split(":")[-1])
        await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, path, ignore_errors=True))
