"""Which subjects each worker kind uses: the one table the broker's authorisation is generated from.

``USES[role]`` says what a role publishes (records, KV puts, acks), requests (JetStream API calls,
sandboxd operations; a request is a publish whose reply comes back on the role's private inbox)
and subscribes to (what it serves). Templates hold ``{run}`` and ``{durable[<group>]}``;
``grants(role, run)`` fills them in for one run (or, with ``run=None``, for any run: ``*``).
``ops.security`` writes the nats-server config from ``grants``; ``tests/test_permissions.py`` checks
that every subject the code uses is in this table and that every entry is used.

Why each role needs what it has:

- Only ``ops`` (the supervisor, status, scale, replay and resample CLI) may call JetStream admin
  APIs; it runs ``streams.topology.ensure()``. Workers only use the durable consumers it created.
- A consumer role pulls from and acks its own durable consumers only, reads their info, and
  dead-letters to ``rs.dlq.<its stage>.<run>``.
- The task registry (KV ``rs_tasks``, keys ``<run>.<hash>``): the producer writes it, the reward
  group reads it by subject (direct gets), and nobody else touches it.
- Sandboxes: everyone who runs agents (rollout, reward's re-runs, the learner's warm start, the
  producer's GEM family, which observes each task's first state in a sandbox) may create and act;
  only the roles whose output is the reward may verify and inspect.
- Every role publishes its health (``rs.ops.health.<run>``: its error tally, ``ops.health``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from streams.topology import (
    CONSUMERS,
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

API = "$JS.API"
KV_STREAM = f"KV_{POLICY_BUCKET}"
OBJ_STREAM = f"OBJ_{WEIGHTS_BUCKET}"
HEALTH = "rs.ops.health.{run}"


@dataclass(frozen=True)
class Uses:
    """The subjects one worker kind publishes, requests and subscribes to (templates)."""

    publish: tuple[str, ...] = ()
    request: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    allow_responses: bool = False  # it answers requests (reply subjects are other roles' inboxes)


@dataclass
class Grants:
    """Subjects one role may publish to and subscribe to, for one run (or any)."""

    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    allow_responses: bool = False


def pull(spec: ConsumerSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(requests, publishes) of pulling from one durable consumer: fetch and info; acks."""
    d = f"{{durable[{spec.group}]}}"
    return (
        (f"{API}.CONSUMER.MSG.NEXT.{spec.stream}.{d}", f"{API}.CONSUMER.INFO.{spec.stream}.{d}"),
        (f"$JS.ACK.{spec.stream}.{d}.>",),
    )


def kv_read(key: str) -> tuple[str, ...]:
    # rs_policy is created without allow_direct, so nats-py reads through STREAM.MSG.GET, whose
    # request body (not subject) names the key: any key of rs_policy is readable, none writable.
    return (
        f"{API}.STREAM.INFO.{KV_STREAM}",
        f"{API}.STREAM.MSG.GET.{KV_STREAM}",
        f"{API}.DIRECT.GET.{KV_STREAM}.$KV.{POLICY_BUCKET}.{key}",
    )


# Weights: get_info reads the meta message by subject; the chunks arrive through an ordered push
# consumer (ephemeral, unnamed) with flow control; nats-py finds the stream through STREAM.NAMES.
WEIGHTS_READ = (
    f"{API}.STREAM.INFO.{OBJ_STREAM}",
    f"{API}.STREAM.NAMES",
    f"{API}.STREAM.MSG.GET.{OBJ_STREAM}",
    f"{API}.CONSUMER.CREATE.{OBJ_STREAM}",
    f"$JS.FC.{OBJ_STREAM}.>",
)
WEIGHTS_WRITE = (*WEIGHTS_READ, f"{API}.STREAM.PURGE.{OBJ_STREAM}", f"$O.{WEIGHTS_BUCKET}.>")
# Sandbox operations by subject (rs.sandbox.<owner>.<op>; sandboxd refuses a request whose kind is
# not its subject's op): create and act with the tokens one holds; verify and inspect need no
# token, so they are granted only to the roles whose output is the reward.
SANDBOX_OPS = ("exec", "close", "keepalive", "write", "read", "session")
SANDBOX_CALLS = ("rs.sandbox.create", *(f"rs.sandbox.*.{op}" for op in SANDBOX_OPS))
VERIFY_CALLS = ("rs.sandbox.*.verify", "rs.sandbox.*.inspect")
REGISTRY_INFO = f"{API}.STREAM.INFO.{TASKS_KV.stream}"
REGISTRY_KEYS = f"$KV.{TASKS_KV.bucket}.{{run}}.>"

_ROLLOUT_PULL, _ROLLOUT_ACK = pull(ROLLOUT)
_REWARD_PULL, _REWARD_ACK = pull(REWARD)
_LEARNER_PULL, _LEARNER_ACK = pull(LEARNER)
_LAKE = [pull(spec) for spec in (LAKE_TASKS, LAKE_TRAJ, LAKE_TRAIN, LAKE_CHUNKS)]
# Durable episodes (consumers.durable), rollout only: publish chunks as they are made, keep each
# episode's sandbox handle in KV rs_episodes (its run's keys), read an episode's chunks back on
# resume (STREAM.MSG.GET names the subject in its body, so any RS_TRAJ message is readable).
EPISODE_KEYS = f"$KV.{EPISODES_KV.bucket}.{{run}}.>"
EPISODES_PUBLISH = ("rs.traj.chunks.{run}.>", EPISODE_KEYS)
EPISODES_REQUEST = (
    f"{API}.STREAM.INFO.{EPISODES_KV.stream}",
    f"{API}.DIRECT.GET.{EPISODES_KV.stream}.{EPISODE_KEYS}",
    f"{API}.STREAM.MSG.GET.{TRAJ.name}",
)

USES: dict[str, Uses] = {
    "producer": Uses(
        publish=("rs.tasks.{run}", f"$KV.{POLICY_BUCKET}.{{run}}.producer_cursor", REGISTRY_KEYS, HEALTH),
        request=(
            *kv_read("{run}.producer_cursor"),
            # version-aware admission (main, issue 17) counts the samples in every stage
            *(
                f"{API}.CONSUMER.INFO.{spec.stream}.{{durable[{spec.group}]}}"
                for spec in (ROLLOUT, REWARD, LEARNER)
            ),
            REGISTRY_INFO,
            *SANDBOX_CALLS,
        ),
    ),
    "rollout": Uses(
        publish=("rs.traj.raw.{run}", "rs.dlq.rollout.{run}", *_ROLLOUT_ACK, *EPISODES_PUBLISH, HEALTH),
        request=(
            *_ROLLOUT_PULL,
            *kv_read("{run}.latest"),
            *WEIGHTS_READ,
            *SANDBOX_CALLS,
            *EPISODES_REQUEST,
        ),
    ),
    "reward": Uses(
        publish=("rs.traj.scored.{run}", "rs.dlq.reward.{run}", *_REWARD_ACK, HEALTH),
        request=(
            *_REWARD_PULL,
            *SANDBOX_CALLS,
            *VERIFY_CALLS,
            REGISTRY_INFO,
            f"{API}.DIRECT.GET.{TASKS_KV.stream}.{REGISTRY_KEYS}",
        ),
    ),
    # The warm start (learner.warmstart) seeds the lake first: scripted-expert episodes in
    # sandboxes, published scored, as the reward stage would.
    "learner": Uses(
        publish=(
            "rs.train.log.{run}",
            "rs.dlq.learner.{run}",
            "rs.traj.scored.{run}",
            f"$KV.{POLICY_BUCKET}.{{run}}.latest",
            *_LEARNER_ACK,
            HEALTH,
        ),
        request=(*_LEARNER_PULL, *kv_read("{run}.latest"), *WEIGHTS_WRITE, *SANDBOX_CALLS, *VERIFY_CALLS),
    ),
    "lake": Uses(
        publish=("rs.dlq.lake.{run}", *(a for _, acks in _LAKE for a in acks), HEALTH),
        request=tuple(r for reqs, _ in _LAKE for r in reqs),
    ),
    # The OpenAI-compatible proxy generates like rollout and publishes finished sessions raw (or
    # scored, when the client reports a reward).
    "proxy": Uses(
        publish=("rs.traj.raw.{run}", "rs.traj.scored.{run}", HEALTH),
        request=(*kv_read("{run}.latest"), *WEIGHTS_READ),
    ),
    # Serves create in queue group sandboxd and its own rs.sandbox.<owner>.<op>; the reaper pings
    # other owners. Replies go to the requesters' inboxes via allow_responses.
    "sandboxd": Uses(
        publish=(HEALTH,),
        request=("rs.sandbox.*.ping",),
        subscribe=("rs.sandbox.create sandboxd", "rs.sandbox.*.*"),
        allow_responses=True,
    ),
    # The background evaluator reads checkpoints from disk and runs its own broker and sandboxd.
    "eval": Uses(publish=(HEALTH,)),
    # The supervisor and the CLI: JetStream admin (ensure), every rollstream subject, the buckets;
    # it answers rs.ops.scale.<run> and listens to every worker's health.
    "ops": Uses(
        publish=("rs.>", f"$KV.{POLICY_BUCKET}.>", f"$KV.{TASKS_KV.bucket}.>", f"$O.{WEIGHTS_BUCKET}.>"),
        request=(f"{API}.>", "$JS.ACK.>", "$JS.FC.>"),
        subscribe=("rs.>",),
        allow_responses=True,
    ),
}
ROLES = tuple(USES)


def inbox_prefix(role: str) -> str:
    """The reply-inbox prefix a role must connect with (``nats.connect(inbox_prefix=...)``)."""
    return f"_INBOX.{role}"


def grants(role: str, run: str | None, table: Mapping[str, Uses] = USES) -> Grants:
    """The subjects ``role`` may use in ``run`` (None: any run, with wildcard durables)."""
    if role not in table:
        raise KeyError(f"unknown role {role!r}; choose one of {', '.join(table)}")
    uses = table[role]
    r = check_run(run) if run else "*"
    durable = {spec.group: spec.durable(run) if run else "*" for spec in CONSUMERS}
    fill = [t.format(run=r, durable=durable) for t in (*uses.publish, *uses.request)]
    subs = [t.format(run=r, durable=durable) for t in uses.subscribe]
    return Grants(list(dict.fromkeys(fill)), [*subs, f"{inbox_prefix(role)}.>"], uses.allow_responses)
