"""Server-side validation of every request field: names, paths and upper bounds.

The client is not trusted (a rollout's broker credentials are enough to send any request), so each
field a request can carry is checked here against this instance's settings; a bad field is refused
with one sentence naming the field, the bound and the setting that holds it.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Mapping

from sandboxd.errors import SandboxBadRequest
from sandboxd.settings import SandboxdSettings
from schemas.sandbox import CreateRequest, InspectRequest, VerifyRequest

ENVIRONMENT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
# Images rollstream builds itself, content-addressed: EnvHub environments and task environments.
ROLLSTREAM_IMAGE_RE = re.compile(
    r"rollstream-env/[a-z0-9][a-z0-9_.-]*:[0-9a-f]{12}|rollstream-task:[0-9a-f]{16}"
)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 64  # environment names
MAX_ENV_ENTRIES = 64
MAX_ENV_VALUE = 8192
MAX_LABELS = 32
MAX_LABEL_KEY, MAX_LABEL_VALUE = 128, 256
MAX_COMMAND_BYTES = 256 * 1024
MAX_PATH = 4096
MAX_VERIFY_COMMANDS = 64
MAX_VERIFY_FILES = 256  # test files a verify request may place
MAX_VERIFY_CLEAR = 8  # directories a verify request may empty


def _above(field: str, value: float, bound: float, setting: str) -> SandboxBadRequest:
    return SandboxBadRequest(f"`{field}` = {value:g} is above this sandboxd's bound of {bound:g} ({setting})")


def check_create(req: CreateRequest, s: SandboxdSettings) -> None:
    """Refuse a create whose environment, image, limits, env or labels are out of bounds."""
    if len(req.environment) > MAX_NAME or not ENVIRONMENT_RE.fullmatch(req.environment):
        raise SandboxBadRequest(
            f"`environment` = {req.environment[:80]!r} is not an environment name "
            "(lower-case letters, digits, `_.-`, starting with a letter or digit; no paths)"
        )
    if req.image and not image_allowed(req.image, s):
        raise SandboxBadRequest(
            f"`image` = {req.image[:120]!r} is not an image rollstream built (rollstream-env/<name>:<hash>, "
            "rollstream-task:<hash>) nor allowed by sandboxd.allowed_images; name an `environment` instead"
        )
    if req.model_socket and not s.model_socket_root:
        raise SandboxBadRequest("`model_socket` is off on this sandboxd: set sandboxd.model_socket_root")
    for field, value, bound, setting in (
        ("memory_mb", req.memory_mb, s.max_memory_mb, "sandboxd.max_memory_mb"),
        ("pids", req.pids, s.max_pids, "sandboxd.max_pids"),
        ("cpus", req.cpus, s.max_cpus, "sandboxd.max_cpus"),
        ("ttl_s", req.ttl_s, s.max_ttl_s, "sandboxd.max_ttl_s"),
        ("work_mb", req.work_mb, s.max_work_mb, "sandboxd.max_work_mb"),
    ):
        if value > bound:
            raise _above(field, value, bound, setting)
    if req.work_mb < 0:
        raise SandboxBadRequest(f"`work_mb` = {req.work_mb} must be >= 0 (0: the default size of /work)")
    check_env(req.env, "env")
    if len(req.labels) > MAX_LABELS:
        raise SandboxBadRequest(f"`labels` has {len(req.labels)} entries; at most {MAX_LABELS} are allowed")
    for key, text in req.labels.items():
        if len(key) > MAX_LABEL_KEY or len(text) > MAX_LABEL_VALUE:
            raise SandboxBadRequest(
                f"label {key[:40]!r} is too long (keys up to {MAX_LABEL_KEY}, values up to {MAX_LABEL_VALUE})"
            )


def image_allowed(image: str, s: SandboxdSettings) -> bool:
    allowed = any(fnmatch.fnmatchcase(image, p) for p in s.allowed_images)
    return allowed or bool(ROLLSTREAM_IMAGE_RE.fullmatch(image))


def check_env(env: Mapping[str, str], field: str) -> None:
    """Environment variables: shell-identifier names, bounded count and values."""
    if len(env) > MAX_ENV_ENTRIES:
        raise SandboxBadRequest(f"`{field}` has {len(env)} entries; at most {MAX_ENV_ENTRIES} are allowed")
    if bad := [k for k in env if not ENV_NAME_RE.fullmatch(k)]:
        raise SandboxBadRequest(f"`{field}` names must be shell identifiers, got {bad[:5]!r}")
    if long := [k for k, v in env.items() if len(v) > MAX_ENV_VALUE]:
        raise SandboxBadRequest(
            f"`{field}` values are limited to {MAX_ENV_VALUE} bytes; {long[:5]!r} exceed it"
        )


def check_command(command: str, timeout_s: float, max_output_bytes: int, s: SandboxdSettings) -> None:
    """A command's text, timeout and output cap."""
    if len(command) > MAX_COMMAND_BYTES:
        raise SandboxBadRequest(f"`command` is {len(command)} bytes; at most {MAX_COMMAND_BYTES} are allowed")
    if not 0 < timeout_s <= s.max_timeout_s:
        raise SandboxBadRequest(
            f"`timeout_s` = {timeout_s:g} must be > 0 and at most {s.max_timeout_s:g} "
            "(sandboxd.max_timeout_s)"
        )
    if not 2 <= max_output_bytes <= s.max_output_bytes:
        raise SandboxBadRequest(
            f"`max_output_bytes` = {max_output_bytes} must be >= 2 and at most {s.max_output_bytes} "
            "(sandboxd.max_output_bytes)"
        )


def check_verify(req: VerifyRequest, s: SandboxdSettings) -> None:
    if len(req.commands) > MAX_VERIFY_COMMANDS:
        raise SandboxBadRequest(f"`commands` has {len(req.commands)} entries; at most {MAX_VERIFY_COMMANDS}")
    for command in req.commands:
        check_command(command, req.timeout_s, req.max_output_bytes, s)
    check_env(req.env, "env")
    absolute_path(req.cwd, "cwd")
    if req.result_path:
        absolute_path(req.result_path, "result_path")
    if len(req.clear) > MAX_VERIFY_CLEAR:
        raise SandboxBadRequest(f"`clear` has {len(req.clear)} entries; at most {MAX_VERIFY_CLEAR}")
    if len(req.files) > MAX_VERIFY_FILES:
        raise SandboxBadRequest(f"`files` has {len(req.files)} entries; at most {MAX_VERIFY_FILES}")
    check_file_size(sum(len(data) for data in req.files.values()), "files (all bytes)", s)
    for path in [*req.clear, *req.files]:
        if absolute_path(path, "clear/files") == "/":
            raise SandboxBadRequest("`clear` and `files` may not name `/`")


def check_inspect(req: InspectRequest, s: SandboxdSettings) -> None:
    check_command(req.command, req.timeout_s, req.max_output_bytes, s)


def check_file_size(size: int, field: str, s: SandboxdSettings) -> None:
    if not 0 <= size <= s.max_file_bytes:
        raise SandboxBadRequest(
            f"`{field}` = {size} must be at most {s.max_file_bytes} bytes (sandboxd.max_file_bytes)"
        )


def absolute_path(path: str, field: str = "path") -> str:
    """``path`` normalised; it must be absolute, without NUL bytes and not absurdly long.
    (Where it may point is the agent uid's file permissions' business: file operations run as it.)"""
    if not path.startswith("/") or "\0" in path or len(path) > MAX_PATH:
        raise SandboxBadRequest(f"`{field}` must be an absolute path without NUL bytes, got {path[:120]!r}")
    return posixpath.normpath(path)
