"""Per-role broker credentials and a nats-server config that lets each role do its job and nothing else.

One user per role (producer, rollout, reward, learner, lake, sandboxd, ops). Passwords are random,
stored in plain text in ``<creds_dir>/<role>.json`` (mode 0600, directory 0700) and in the server
config (also 0600): nats-server accepts plain passwords, and bcrypt hashes would add a dependency
while the config file must stay private anyway. There is no ``no_auth_user``, so anonymous
connections are refused.

What each role may do is generated from one table, ``streams.permissions.USES`` (which subjects
each worker kind publishes, requests and subscribes to; its docstring says why each role needs
what it has). Replies come back on a private inbox prefix per role (``_INBOX.<role>``), so no role
can subscribe to another's replies; sandboxd answers with ``allow_responses``.

Run as ``python -m ops.security <conf> <creds_dir> [--run RUN]`` to write both.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from streams.permissions import ROLES, USES, Grants, Uses, grants, inbox_prefix

MAX_PAYLOAD = "8MB"
ROUTE_USER = "route"  # cluster routes; not a client role
__all__ = ["ROLES", "Grants", "SecurityError", "inbox_prefix", "role_credentials", "role_grants"]


class SecurityError(RuntimeError):
    """Credentials or the server config cannot be written or read."""


def role_grants(role: str, run: str | None, table: Mapping[str, Uses] = USES) -> Grants:
    """The subjects ``role`` needs for ``run`` (None: any run), from ``streams.permissions.USES``."""
    try:
        return grants(role, run, table)
    except KeyError:
        raise SecurityError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}") from None


# -- credentials -----------------------------------------------------------------------------------


def _creds_file(creds_dir: Path, role: str) -> Path:
    return creds_dir / f"{role}.json"


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _read_creds(path: Path) -> tuple[str, str]:
    try:
        data = json.loads(path.read_bytes())
        return str(data["user"]), str(data["password"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SecurityError(
            f"credentials file {path} is malformed ({exc}); delete it and rerun `just up`."
        ) from None


def ensure_credentials(creds_dir: Path) -> dict[str, tuple[str, str]]:
    """Each role's (user, password), creating ``<creds_dir>/<role>.json`` (0600) where missing."""
    creds_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(creds_dir, 0o700)
    out: dict[str, tuple[str, str]] = {}
    for role in ROLES:
        path = _creds_file(creds_dir, role)
        if not path.exists():
            body = {"user": role, "password": secrets.token_urlsafe(32)}
            _write_private(path, json.dumps(body).encode())
        out[role] = _read_creds(path)
    return out


def role_credentials(creds_dir: Path | str, role: str) -> tuple[str, str]:
    """(user, password) of ``role`` from ``<creds_dir>/<role>.json`` (``nats.creds_dir``)."""
    if role not in ROLES:
        raise SecurityError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    path = _creds_file(Path(creds_dir), role)
    if not path.exists():
        raise SecurityError(
            f"credentials file {path} does not exist: generate the per-role credentials with "
            f"`python -m ops.security <server.conf> {creds_dir}` (the supervisor does this when it "
            "starts the broker) or set nats.creds_dir to the directory that holds them."
        )
    return _read_creds(path)


# -- server config ---------------------------------------------------------------------------------


def _q(s: str) -> str:
    return json.dumps(s)  # a double-quoted string is valid in the nats-server config syntax


def _user_block(user: str, password: str, grants: Grants) -> str:
    pub = ", ".join(_q(s) for s in grants.publish)
    sub = ", ".join(_q(s) for s in grants.subscribe)
    lines = [
        f"    {{ user: {_q(user)}, password: {_q(password)}, permissions: {{",
        f"        publish: {{ allow: [{pub}] }}",
        f"        subscribe: {{ allow: [{sub}] }}",
    ]
    if grants.allow_responses:
        lines.append("        allow_responses: true")
    lines.append("    } }")
    return "\n".join(lines)


def authorization_block(
    creds: dict[str, tuple[str, str]], *, run: str | None = None, table: Mapping[str, Uses] = USES
) -> str:
    """The ``authorization { users: [...] }`` block: every role's user and its grants.

    A cluster must carry the same block on every server (permissions are checked where a client
    connects), so ``ops.cluster`` writes this text verbatim into each server's config."""
    users = "\n".join(_user_block(*creds[role], role_grants(role, run, table)) for role in ROLES)
    return f"authorization {{\n  users: [\n{users}\n  ]\n}}\n"


def server_config(
    creds: dict[str, tuple[str, str]],
    *,
    run: str | None = None,
    extra: str = "",
    table: Mapping[str, Uses] = USES,
) -> str:
    """The nats-server config text for these credentials (JetStream itself is enabled by flag);
    ``table`` replaces ``streams.permissions.USES`` (tests narrow a role to provoke a violation)."""
    return (
        "# Written by rollstream ops.security; holds plain passwords: keep it 0600.\n"
        f"max_payload: {MAX_PAYLOAD}\n"
        f"{authorization_block(creds, run=run, table=table)}"
        f"{extra}\n"
    )


def route_credentials(creds_dir: Path) -> tuple[str, str]:
    """The (user, password) cluster routes authenticate with, from ``<creds_dir>/route.json`` (0600).

    Only the servers need it: it is kept apart from the roles' files so that worker hosts never
    receive it."""
    creds_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(creds_dir, 0o700)
    path = _creds_file(creds_dir, ROUTE_USER)
    if not path.exists():
        body = {"user": ROUTE_USER, "password": secrets.token_urlsafe(32)}
        _write_private(path, json.dumps(body).encode())
    return _read_creds(path)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (server configs hold passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, text.encode())


def write_server_config(
    path: Path,
    creds_dir: Path,
    *,
    extra: str = "",
    run: str | None = None,
    table: Mapping[str, Uses] = USES,
) -> None:
    """Write the server config to ``path`` (0600), creating any missing credentials in ``creds_dir``.

    ``run`` narrows every role to that run's subjects and durable consumers; without it a role may
    use the consumer of its stage in any run (``<stream>.*`` durables). ``extra`` is appended verbatim.
    """
    creds = ensure_credentials(creds_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, server_config(creds, run=run, extra=extra, table=table).encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.security", description=__doc__.split("\n")[0])
    ap.add_argument("conf", type=Path, help="nats-server config file to write")
    ap.add_argument("creds_dir", type=Path, help="directory of per-role credentials")
    ap.add_argument("--run", default=None, help="narrow permissions to this run")
    args = ap.parse_args(argv)
    write_server_config(args.conf, args.creds_dir, run=args.run)


if __name__ == "__main__":
    main()
