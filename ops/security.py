"""Per-role broker credentials and a nats-server config that lets each role do its job and nothing else.

One user per role (producer, rollout, reward, learner, lake, sandboxd, ops). Passwords are random,
stored in plain text in ``<creds_dir>/<role>.json`` (mode 0600, directory 0700) and in the server
config (also 0600): nats-server accepts plain passwords, and bcrypt hashes would add a dependency
while the config file must stay private anyway. There is no ``no_auth_user``, so anonymous
connections are refused.

Least privilege, in subjects:

- Only ``ops`` (the supervisor, status and scale CLI) may call JetStream admin APIs; it runs
  ``streams.topology.ensure()``. Workers only use the durable consumers ``ensure()`` created.
- A consumer role may pull from and ack its own durable consumers only
  (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>``, ``$JS.ACK.<stream>.<durable>.>``), read their
  info, and dead-letter to ``rs.dlq.<its stage>.<run>``.
- Each role publishes records to the one subject its stage feeds, reads KV ``rs_policy`` keys it
  needs through direct gets, and only the learner writes ``<run>.latest`` and the weights objects.
- The task registry (KV ``rs_tasks``, keys ``<run>.<hash>``): the producer (and ops, which runs
  ``rollstream resample``) writes it, the reward group reads it by subject (direct gets), and
  nobody else touches it: the rollout role cannot change the task a trajectory is verified with.
- Replies come back on a private inbox prefix per role (``_INBOX.<role>``, see ``inbox_prefix``),
  so no role can subscribe to another's replies; sandboxd answers with ``allow_responses``.

Run as ``python -m ops.security <conf> <creds_dir> [--run RUN]`` to write both.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from streams.topology import (
    EPISODES_KV,
    LAKE_CHUNKS,
    LAKE_TASKS,
    LAKE_TRAIN,
    LAKE_TRAJ,
    LEARNER,
    POLICY_BUCKET,
    REWARD,
    ROLLOUT,
    TASKS_KV,
    TRAJ,
    WEIGHTS_BUCKET,
    ConsumerSpec,
    check_run,
)

ROLES = ("producer", "rollout", "reward", "learner", "lake", "sandboxd", "proxy", "ops", "eval")
API = "$JS.API"
KV_STREAM = f"KV_{POLICY_BUCKET}"
OBJ_STREAM = f"OBJ_{WEIGHTS_BUCKET}"
MAX_PAYLOAD = "8MB"
ROUTE_USER = "route"  # cluster routes; not a client role


class SecurityError(RuntimeError):
    """Credentials or the server config cannot be written or read."""


def inbox_prefix(role: str) -> str:
    """The reply-inbox prefix a role must connect with (``nats.connect(inbox_prefix=...)``)."""
    return f"_INBOX.{role}"


@dataclass
class Grants:
    """Subjects one role may publish to and subscribe to."""

    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    allow_responses: bool = False


# -- what each role needs --------------------------------------------------------------------------


def _pull(spec: ConsumerSpec, run: str | None) -> list[str]:
    """Pull from, ack, and read the info of one durable consumer (any run's if ``run`` is None)."""
    durable = spec.durable(run) if run else "*"
    return [
        f"{API}.CONSUMER.MSG.NEXT.{spec.stream}.{durable}",
        f"{API}.CONSUMER.INFO.{spec.stream}.{durable}",
        f"$JS.ACK.{spec.stream}.{durable}.>",
    ]


def _kv_read(key: str) -> list[str]:
    # The bucket is created without allow_direct, so nats-py reads through STREAM.MSG.GET, whose
    # request body (not subject) names the key: any key of rs_policy is readable, none writable.
    # With KeyValueConfig(direct=True) in topology the MSG.GET grant could go.
    return [
        f"{API}.STREAM.INFO.{KV_STREAM}",
        f"{API}.STREAM.MSG.GET.{KV_STREAM}",
        f"{API}.DIRECT.GET.{KV_STREAM}.$KV.{POLICY_BUCKET}.{key}",
    ]


def _weights_read() -> list[str]:
    # get_info reads the meta message by subject; the chunks arrive through an ordered push
    # consumer (ephemeral, created unnamed) with flow control; nats-py finds its stream by subject
    # through STREAM.NAMES (read-only, lists stream names).
    return [
        f"{API}.STREAM.INFO.{OBJ_STREAM}",
        f"{API}.STREAM.NAMES",
        f"{API}.STREAM.MSG.GET.{OBJ_STREAM}",
        f"{API}.CONSUMER.CREATE.{OBJ_STREAM}",
        f"$JS.FC.{OBJ_STREAM}.>",
    ]


def _weights_write() -> list[str]:
    return [*_weights_read(), f"{API}.STREAM.PURGE.{OBJ_STREAM}", f"$O.{WEIGHTS_BUCKET}.>"]


# Sandbox operations by subject (rs.sandbox.<owner>.<op>; sandboxd refuses a request whose kind is
# not its subject's op). Everyone who runs agents may create and act with the tokens they hold;
# only the roles whose output is the reward may verify and inspect (which need no token: this is
# their grant).
SANDBOX_CALLS = [
    "rs.sandbox.create",
    *(f"rs.sandbox.*.{op}" for op in ("exec", "close", "keepalive", "write", "read", "session")),
]
VERIFY_CALLS = ["rs.sandbox.*.verify", "rs.sandbox.*.inspect"]


def _episode_grants(r: str) -> list[str]:
    """Durable episodes (consumers.durable), rollout only: publish chunks as they are made, keep
    each episode's sandbox handle in KV rs_episodes (its run's keys), and read an episode's chunks
    back on resume (STREAM.MSG.GET names the subject in its body, so any RS_TRAJ message is readable)."""
    keys = f"$KV.{EPISODES_KV.bucket}.{r}.>"
    return [
        f"rs.traj.chunks.{r}.>",
        f"{API}.STREAM.INFO.{EPISODES_KV.stream}",
        keys,
        f"{API}.DIRECT.GET.{EPISODES_KV.stream}.{keys}",
        f"{API}.STREAM.MSG.GET.{TRAJ.name}",
    ]


def _registry_grants(role: str, run: str | None) -> list[str]:
    """The task registry: producers write their run's keys, the reward group reads them."""
    r = check_run(run) if run else "*"
    keys = f"$KV.{TASKS_KV.bucket}.{r}.>"
    info = f"{API}.STREAM.INFO.{TASKS_KV.stream}"
    if role == "producer":
        return [info, keys]
    if role == "reward":
        return [info, f"{API}.DIRECT.GET.{TASKS_KV.stream}.{keys}"]
    return []


def role_grants(role: str, run: str | None) -> Grants:
    """The subjects ``role`` needs for ``run`` (None: any run, with per-stream consumer wildcards)."""
    grants = _stage_grants(role, run)
    grants.publish += _registry_grants(role, run)
    return grants


def _stage_grants(role: str, run: str | None) -> Grants:
    """What ``role`` needs for its stage of the pipeline (streams, consumers, policy, sandboxes)."""
    r = check_run(run) if run else "*"
    inbox = f"{inbox_prefix(role)}.>"
    if role == "producer":
        cursor = f"{r}.producer_cursor"
        pub = [
            f"rs.tasks.{r}",
            f"$KV.{POLICY_BUCKET}.{cursor}",
            *_kv_read(cursor),
            # version-aware admission counts the samples in every stage of the pipeline
            *(
                f"{API}.CONSUMER.INFO.{spec.stream}.{spec.durable(run) if run else '*'}"
                for spec in (ROLLOUT, REWARD, LEARNER)
            ),
        ]
        return Grants(pub, [inbox])
    if role == "rollout":
        pub = [
            *_pull(ROLLOUT, run),
            f"rs.traj.raw.{r}",
            f"rs.dlq.rollout.{r}",
            *_kv_read(f"{r}.latest"),
            *_weights_read(),
            *SANDBOX_CALLS,
            *_episode_grants(r),
        ]
        return Grants(pub, [inbox])
    if role == "reward":
        return Grants(
            [*_pull(REWARD, run), f"rs.traj.scored.{r}", f"rs.dlq.reward.{r}", *SANDBOX_CALLS, *VERIFY_CALLS],
            [inbox],
        )
    if role == "learner":
        # The warm start (learner.warmstart) seeds the lake first: scripted-expert episodes in
        # sandboxes, published scored, as the reward stage would.
        pub = [
            *_pull(LEARNER, run),
            f"rs.train.log.{r}",
            f"rs.dlq.learner.{r}",
            *_kv_read(f"{r}.latest"),
            f"$KV.{POLICY_BUCKET}.{r}.latest",
            *_weights_write(),
            f"rs.traj.scored.{r}",
            *SANDBOX_CALLS,
            *VERIFY_CALLS,
        ]
        return Grants(pub, [inbox])
    if role == "lake":
        pub = [*_pull(LAKE_TASKS, run), *_pull(LAKE_TRAJ, run), *_pull(LAKE_TRAIN, run), f"rs.dlq.lake.{r}"]
        pub += _pull(LAKE_CHUNKS, run)
        return Grants(pub, [inbox])
    if role == "proxy":
        # The OpenAI-compatible proxy: generates like rollout, publishes finished sessions raw
        # (or scored, when the client reports a reward).
        pub = [f"rs.traj.raw.{r}", f"rs.traj.scored.{r}", *_kv_read(f"{r}.latest"), *_weights_read()]
        return Grants(pub, [inbox])
    if role == "sandboxd":
        # Serves create in queue group sandboxd and its own rs.sandbox.<owner>.<op>; the reaper
        # pings other owners. Replies go to the requesters' inboxes via allow_responses.
        return Grants(
            ["rs.sandbox.*.ping"],
            ["rs.sandbox.create sandboxd", "rs.sandbox.*.*", inbox],
            allow_responses=True,
        )
    if role == "eval":
        # The background evaluator reads checkpoints from disk and runs its own broker and sandboxd:
        # on the run's broker it needs nothing but its inbox.
        return Grants([], [inbox])
    if role == "ops":
        # The supervisor, status and scale CLI: JetStream admin (ensure), every rollstream subject,
        # the KV bucket and the object store; it answers rs.ops.scale.<run> requests.
        pub = [
            f"{API}.>",
            "rs.>",
            f"$KV.{POLICY_BUCKET}.>",
            f"$KV.{TASKS_KV.bucket}.>",
            f"$O.{WEIGHTS_BUCKET}.>",
            "$JS.ACK.>",
            "$JS.FC.>",
        ]
        return Grants(pub, ["rs.>", inbox], allow_responses=True)
    raise SecurityError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")


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


def authorization_block(creds: dict[str, tuple[str, str]], *, run: str | None = None) -> str:
    """The ``authorization { users: [...] }`` block: every role's user and its grants.

    A cluster must carry the same block on every server (permissions are checked where a client
    connects), so ``ops.cluster`` writes this text verbatim into each server's config."""
    users = "\n".join(_user_block(*creds[role], role_grants(role, run)) for role in ROLES)
    return f"authorization {{\n  users: [\n{users}\n  ]\n}}\n"


def server_config(creds: dict[str, tuple[str, str]], *, run: str | None = None, extra: str = "") -> str:
    """The nats-server config text for these credentials (JetStream itself is enabled by flag)."""
    return (
        "# Written by rollstream ops.security; holds plain passwords: keep it 0600.\n"
        f"max_payload: {MAX_PAYLOAD}\n"
        f"{authorization_block(creds, run=run)}"
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


def write_server_config(path: Path, creds_dir: Path, *, extra: str = "", run: str | None = None) -> None:
    """Write the server config to ``path`` (0600), creating any missing credentials in ``creds_dir``.

    ``run`` narrows every role to that run's subjects and durable consumers; without it a role may
    use the consumer of its stage in any run (``<stream>.*`` durables). ``extra`` is appended verbatim.
    """
    creds = ensure_credentials(creds_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, server_config(creds, run=run, extra=extra).encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.security", description=__doc__.split("\n")[0])
    ap.add_argument("conf", type=Path, help="nats-server config file to write")
    ap.add_argument("creds_dir", type=Path, help="directory of per-role credentials")
    ap.add_argument("--run", default=None, help="narrow permissions to this run")
    args = ap.parse_args(argv)
    write_server_config(args.conf, args.creds_dir, run=args.run)


if __name__ == "__main__":
    main()
