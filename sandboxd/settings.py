"""Settings of one sandboxd instance (decoded once, passed down; never read from the environment)."""

from __future__ import annotations

from typing import Annotated

import msgspec


class SandboxdSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits and defaults of one sandboxd instance and of the containers it creates."""

    instance: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^([A-Za-z0-9_-]+)?$",
            description="Owner name of this instance (NATS token); empty picks `sbx-<6 hex>`.",
        ),
    ] = ""
    scope: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z0-9_.-]+$",
            description="Reaper scope (label `rollstream.scope`): a reaper judges only containers of its "
            "own scope, so separate NATS deployments (e.g. test runs) can share one Docker host.",
        ),
    ] = "default"
    max_sandboxes: Annotated[
        int,
        msgspec.Meta(
            ge=1, description="Live sandboxes this instance holds at most; more fail with `capacity`."
        ),
    ] = 32
    default_ttl_s: Annotated[
        float,
        msgspec.Meta(
            gt=0, description="Seconds a sandbox lives without keepalive when the request gives none."
        ),
    ] = 900.0
    reaper_interval_s: Annotated[
        float,
        msgspec.Meta(gt=0, description="Seconds between reaper passes (expired and orphaned containers)."),
    ] = 10.0
    default_memory_mb: Annotated[
        int, msgspec.Meta(ge=16, description="Memory (and memory+swap) limit of a sandbox in MiB.")
    ] = 512
    default_pids: Annotated[int, msgspec.Meta(ge=8, description="Process limit of a sandbox.")] = 256
    default_cpus: Annotated[float, msgspec.Meta(gt=0, description="CPU quota of a sandbox, in cores.")] = 1.0
    scratch_mb: Annotated[
        int, msgspec.Meta(ge=1, description="Size of each tmpfs scratch mount (/work and /tmp) in MiB.")
    ] = 256
    nofile: Annotated[
        int, msgspec.Meta(ge=64, description="Open-file limit (ulimit nofile) in a sandbox.")
    ] = 1024
    read_only_rootfs: Annotated[
        bool, msgspec.Meta(description="Mount the image read-only; only /work and /tmp are writable.")
    ] = True
    ping_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="Seconds the reaper waits for another owner's ping reply.")
    ] = 2.0
    shutdown_budget_s: Annotated[
        float, msgspec.Meta(gt=0, description="Seconds allowed to remove this instance's containers on exit.")
    ] = 30.0
    max_concurrent_requests: Annotated[
        int, msgspec.Meta(ge=1, description="Requests this instance handles at once; more wait.")
    ] = 256
    warm_pool: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="Started containers kept ready per warm environment, so `create` is nearly free "
            "(requests with default limits and no env take one; Docker cannot relabel a container, so a "
            "pooled sandbox keeps the caller's labels in sandboxd's registry only). 0 disables the pool.",
        ),
    ] = 2
    warm_environments: Annotated[
        tuple[str, ...], msgspec.Meta(description="Environments whose images get a warm pool (if built).")
    ] = ("base",)
    exec_via_session: Annotated[
        bool,
        msgspec.Meta(
            description="Run `exec` through a per-sandbox session (a fork in a resident shell, ~1 ms) "
            "instead of a fresh `docker exec` (~40-90 ms); same semantics either way."
        ),
    ] = True
    max_sessions: Annotated[
        int,
        msgspec.Meta(
            ge=1, description="Open sessions one sandbox may have at once; more fail with `capacity`."
        ),
    ] = 8
    runtime: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[A-Za-z0-9_.-]+$",
            description="OCI runtime of sandbox containers: `runc`, or `runsc` (gVisor) where the Docker "
            "engine has it configured (see docs/security.md).",
        ),
    ] = "runc"
    # -- server-side upper bounds of what a request may ask for (a larger value is refused) --
    max_memory_mb: Annotated[int, msgspec.Meta(ge=16, description="Most memory a create may ask, MiB.")] = (
        8192
    )
    max_pids: Annotated[int, msgspec.Meta(ge=8, description="Most processes a create may ask.")] = 4096
    max_cpus: Annotated[float, msgspec.Meta(gt=0, description="Most CPU cores a create may ask.")] = 8.0
    max_ttl_s: Annotated[
        float, msgspec.Meta(gt=0, description="Longest TTL a create or keepalive may ask, seconds.")
    ] = 86400.0
    max_timeout_s: Annotated[
        float, msgspec.Meta(gt=0, description="Longest timeout a command (exec, session, verify) may ask.")
    ] = 3600.0
    max_output_bytes: Annotated[
        int,
        msgspec.Meta(
            ge=1024,
            description="Most output bytes per stream a command may ask (replies must fit the broker).",
        ),
    ] = 1 << 20
    max_file_bytes: Annotated[
        int, msgspec.Meta(ge=1024, description="Most bytes a write_file may send or a read_file may ask.")
    ] = 4 << 20
    allowed_images: Annotated[
        tuple[str, ...],
        msgspec.Meta(
            description="Glob patterns of image names a create may name besides the images rollstream "
            "builds (`rollstream-env/<name>:<hash>`, `rollstream-task:<hash>`); empty: those only."
        ),
    ] = ()
    model_socket_root: Annotated[
        str,
        msgspec.Meta(
            description="Host directory for the model sockets of sandboxes that ask for one (an agent "
            "program inside reaches the proxy there, nothing else; sandboxd/model_socket.py); empty: refused."
        ),
    ] = ""
    # -- task sandboxes (sandboxd/rootfs.py) --
    max_work_mb: Annotated[
        int, msgspec.Meta(ge=1, description="Largest /work scratch mount (MiB) a create may ask (`work_mb`).")
    ] = 2048
    rootfs_mb: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="Size limit (MiB) of a writable root's layer; a sandbox past it is removed.",
        ),
    ] = 1024
    rootfs_check_s: Annotated[
        float, msgspec.Meta(gt=0, description="Seconds between measurements of writable roots.")
    ] = 2.0
