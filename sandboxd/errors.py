"""The sandbox exception tree; each error carries the sandbox id (if any) and a message."""

from __future__ import annotations

from schemas.sandbox import ErrorKind


class SandboxError(Exception):
    """A sandbox operation failed."""

    def __init__(self, message: str, *, sandbox_id: str = "") -> None:
        super().__init__(f"{sandbox_id}: {message}" if sandbox_id else message)
        self.message = message
        self.sandbox_id = sandbox_id


class SandboxTimeout(SandboxError):
    """An operation (not a command: a timed-out command returns ``ExecResult.timed_out``) ran out of time."""


class SandboxOOM(SandboxError):
    """The sandbox ran out of memory and died."""


class SandboxNotFound(SandboxError):
    """No such sandbox: never created, closed, expired, or its container died."""


class SandboxCapacity(SandboxError):
    """The sandboxd instance already holds its maximum number of sandboxes."""


class SandboxStartupFailed(SandboxError):
    """The container could not be created or started (missing image, bad limits...)."""


class SandboxUnavailable(SandboxError):
    """No sandboxd answered: no responders, or the request timed out."""


class SandboxBadRequest(SandboxError):
    """The request was invalid (bad path, missing file, bad sandbox id...)."""


class SandboxForbidden(SandboxError):
    """The request lacks the sandbox's capability token, or is not allowed on its subject."""


class EnvHubError(SandboxError):
    """An environment spec is invalid or its image could not be built."""


FAULT_ERRORS: dict[ErrorKind, type[SandboxError]] = {
    "timeout": SandboxTimeout,
    "oom": SandboxOOM,
    "not_found": SandboxNotFound,
    "capacity": SandboxCapacity,
    "startup_failed": SandboxStartupFailed,
    "bad_request": SandboxBadRequest,
    "forbidden": SandboxForbidden,
    "internal": SandboxError,
}
