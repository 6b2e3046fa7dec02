"""The model socket: the one route out of a sandbox that asks for it (``CreateRequest.model_socket``).

sandboxd makes a host directory per such sandbox under ``sandboxd.model_socket_root`` and
bind-mounts it read-only at ``/run/rollstream``; the agent runner's model proxy (on the same host)
listens on a unix socket in it. The container keeps ``NetworkMode=none``: no interface but
loopback, so that socket is all it can reach outside (tests/test_agent_runner.py checks). The
directory goes with the sandbox.
"""

from __future__ import annotations

import os
import shutil

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


def remove(settings: SandboxdSettings, short_id: str) -> None:
    """Remove the directory, if the sandbox had one (blocking)."""
    if settings.model_socket_root:
        shutil.rmtree(socket_dir(settings, short_id), ignore_errors=True)
