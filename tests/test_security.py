"""Per-role credentials against a real nats-server started with the generated config.

Each role can do its job and is refused, with the server's own permissions violation, what
belongs to another role. Denied publishes surface in nats-py as an ``error_cb`` call (the server
sends ``-ERR 'Permissions Violation ...'``) while the request itself times out.
"""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import ObjectStoreConfig

from ops.security import ROLES, SecurityError, role_credentials, write_server_config
from streams import policy
from streams.topology import (
    LAKE_TASKS,
    LAKE_TRAIN,
    LAKE_TRAJ,
    LEARNER,
    POLICY_BUCKET,
    REWARD,
    ROLLOUT,
    ensure,
    subject,
)
from tests.factories import (
    BROKER_RUN,
    DENY_TIMEOUT_S,
    Broker,
    Session,
    assert_denied,
    login,
    serve_sandbox_create,
)

RUN = BROKER_RUN  # the run the broker fixture wrote credentials for


@pytest.fixture
async def sessions(broker: Broker) -> AsyncIterator[dict[str, Session]]:
    """One connection per role, after ops has run ensure()."""
    out = {role: await login(broker, role) for role in ROLES}
    await ensure(out["ops"].js, RUN)
    yield out
    for s in out.values():
        await s.nc.close()


async def pull_one(session: Session, spec: Any) -> bytes:
    sub = await session.js.pull_subscribe_bind(durable=spec.durable(RUN), stream=spec.stream)
    [msg] = await sub.fetch(1, timeout=3)
    await msg.ack_sync(timeout=3)
    return bytes(msg.data)


# -- authentication --------------------------------------------------------------------------------


async def test_anonymous_connection_is_refused(broker: Broker) -> None:
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(
            broker.server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
        )


async def test_wrong_password_is_refused(broker: Broker) -> None:
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(
            broker.server.url,
            user="rollout",
            password="guess",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )


def test_credentials_are_private_files_and_stable(broker: Broker) -> None:
    for role in ROLES:
        path = broker.creds_dir / f"{role}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["user"] == role
    assert stat.S_IMODE(broker.conf.stat().st_mode) == 0o600
    before = (broker.creds_dir / "rollout.json").read_text()
    write_server_config(broker.conf, broker.creds_dir, run=RUN)
    assert (broker.creds_dir / "rollout.json").read_text() == before
    assert "no_auth_user" not in broker.conf.read_text()


def test_missing_credentials_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match=r"rollout\.json.*python -m ops\.security"):
        role_credentials(tmp_path, "rollout")


# -- each role does its job ------------------------------------------------------------------------


async def test_pipeline_roles_each_do_their_job(sessions: dict[str, Session]) -> None:
    producer, rollout, reward, learner, lake = (
        sessions[r] for r in ("producer", "rollout", "reward", "learner", "lake")
    )
    await serve_sandbox_create(sessions["sandboxd"])

    # producer: publish a task, keep its cursor in KV, read the rollout backlog
    await producer.js.publish(subject("tasks", RUN), b"task", headers={"Nats-Msg-Id": "task-1"})
    kv = await producer.js.key_value(POLICY_BUCKET)
    await kv.put(f"{RUN}.producer_cursor", b"1")
    assert (await kv.get(f"{RUN}.producer_cursor")).value == b"1"
    assert (await producer.js.consumer_info(ROLLOUT.stream, ROLLOUT.durable(RUN))).num_pending == 1

    # learner: weights to the object store, then the version to KV
    record = await policy.publish_weights(learner.js, RUN, 1, b"w" * 300_000, step=1)

    # rollout: take the task, read latest and the weights, create a sandbox, publish the trajectory
    assert await pull_one(rollout, ROLLOUT) == b"task"
    latest = await policy.latest(rollout.js, RUN)
    assert latest == record
    assert await policy.fetch_weights(rollout.js, latest) == b"w" * 300_000
    reply = await rollout.nc.request("rs.sandbox.create", b"env", timeout=3)
    assert reply.data == b"created:env"
    await rollout.js.publish(subject("raw", RUN), b"raw", headers={"Nats-Msg-Id": "raw:traj-1"})

    # reward: take it, publish the scored record
    assert await pull_one(reward, REWARD) == b"raw"
    await reward.js.publish(subject("scored", RUN), b"scored", headers={"Nats-Msg-Id": "scored:traj-1"})

    # learner: train on it, log, dead-letter to its own subject
    assert await pull_one(learner, LEARNER) == b"scored"
    await learner.js.publish(subject("train", RUN), b"log", headers={"Nats-Msg-Id": "log-1"})
    await learner.js.publish(subject("dlq.learner", RUN), b"poison")

    # lake: all three of its consumers
    assert await pull_one(lake, LAKE_TASKS) == b"task"
    assert await pull_one(lake, LAKE_TRAJ) == b"scored"
    assert await pull_one(lake, LAKE_TRAIN) == b"log"

    for role, s in sessions.items():
        assert await s.permission_errors() == [], role


async def test_ops_administers_streams_and_answers_scale_requests(sessions: dict[str, Session]) -> None:
    ops = sessions["ops"]
    await ensure(ops.js, RUN)  # idempotent, allowed
    await ensure(ops.js, "other-run")
    assert (await ops.js.consumer_info(REWARD.stream, REWARD.durable("other-run"))).name == "reward-other-run"

    async def answer(msg: Any) -> None:
        await msg.respond(b"scaled")

    await ops.nc.subscribe(f"rs.ops.scale.{RUN}", cb=answer)
    assert (await ops.nc.request(f"rs.ops.scale.{RUN}", b"{}", timeout=3)).data == b"scaled"
    assert await ops.permission_errors() == []


# -- and nothing else ------------------------------------------------------------------------------


async def test_rollout_cannot_move_the_policy_write_weights_or_score(sessions: dict[str, Session]) -> None:
    rollout = sessions["rollout"]
    kv = await rollout.deny_js.key_value(POLICY_BUCKET)
    await assert_denied(
        rollout, kv.put(f"{RUN}.latest", b"forged"), "Publish", f"$KV.{POLICY_BUCKET}.{RUN}.latest"
    )
    obs = await rollout.deny_js.object_store("rs_weights")
    await assert_denied(
        rollout, obs.put(f"{RUN}/v999999.safetensors", b"forged"), "Publish", "$O.rs_weights.C."
    )
    await assert_denied(
        rollout, rollout.deny_js.publish(subject("scored", RUN), b"x"), "Publish", subject("scored", RUN)
    )


async def test_workers_cannot_create_streams_or_consumers(sessions: dict[str, Session]) -> None:
    for role in ("producer", "rollout", "reward", "learner", "lake"):
        s = sessions[role]
        await assert_denied(s, ensure(s.deny_js, RUN), "Publish", "$JS.API.STREAM.INFO.RS_TASKS")
    learner = sessions["learner"]
    await assert_denied(
        learner,
        learner.deny_js.create_object_store("evil", ObjectStoreConfig()),
        "Publish",
        "$JS.API.STREAM.CREATE.OBJ_evil",
    )


async def test_reward_cannot_publish_tasks(sessions: dict[str, Session]) -> None:
    reward = sessions["reward"]
    await assert_denied(
        reward, reward.deny_js.publish(subject("tasks", RUN), b"x"), "Publish", subject("tasks", RUN)
    )


async def test_rollout_cannot_steal_from_another_groups_consumer(sessions: dict[str, Session]) -> None:
    rollout = sessions["rollout"]
    sub = await rollout.deny_js.pull_subscribe_bind(durable=LAKE_TASKS.durable(RUN), stream=LAKE_TASKS.stream)
    next_subj = f"$JS.API.CONSUMER.MSG.NEXT.{LAKE_TASKS.stream}.{LAKE_TASKS.durable(RUN)}"
    await assert_denied(rollout, sub.fetch(1, timeout=DENY_TIMEOUT_S), "Publish", next_subj)


async def test_lake_publishes_nothing_but_acks_and_its_dead_letters(sessions: dict[str, Session]) -> None:
    lake = sessions["lake"]
    await lake.js.publish(subject("dlq.lake", RUN), b"poison")  # its own dead letters: allowed
    for kind in ("tasks", "raw", "scored", "train", "dlq.rollout"):
        await assert_denied(
            lake, lake.deny_js.publish(subject(kind, RUN), b"x"), "Publish", subject(kind, RUN)
        )
    await assert_denied(
        lake,
        lake.nc.request("rs.sandbox.create", b"x", timeout=DENY_TIMEOUT_S),
        "Publish",
        "rs.sandbox.create",
    )
    await assert_denied(
        lake, lake.deny_js.key_value(POLICY_BUCKET), "Publish", f"$JS.API.STREAM.INFO.KV_{POLICY_BUCKET}"
    )


async def test_roles_cannot_read_other_subjects_or_inboxes(sessions: dict[str, Session]) -> None:
    for role, subj in (
        ("lake", "rs.>"),
        ("rollout", "_INBOX.>"),
        ("rollout", "_INBOX.reward.>"),
        ("reward", "rs.sandbox.create"),
        ("producer", "$KV.rs_policy.>"),
    ):
        s = sessions[role]
        await s.nc.subscribe(subj)
        await s.nc.flush()
        violations = await s.permission_errors()
        assert any(f'subscription to "{subj.lower()}"' in v for v in violations), (role, violations)


async def test_only_the_reward_roles_may_verify_or_inspect_a_sandbox(sessions: dict[str, Session]) -> None:
    # verify and inspect need no capability token (they run the caller's commands as the verifier /
    # as root), so the broker is their authorisation: rollout's credentials cannot send them.
    sandboxd = sessions["sandboxd"]

    async def reply(msg: Any) -> None:
        await msg.respond(b"ok:" + msg.subject.encode())

    await sandboxd.nc.subscribe("rs.sandbox.sbx-1.*", cb=reply)
    await sandboxd.nc.flush()
    rollout = sessions["rollout"]
    assert (
        await rollout.nc.request("rs.sandbox.sbx-1.exec", b"x", timeout=3)
    ).data == b"ok:rs.sandbox.sbx-1.exec"
    await assert_denied(
        rollout,
        rollout.nc.request("rs.sandbox.sbx-1.verify", b"x", timeout=DENY_TIMEOUT_S),
        "Publish",
        "rs.sandbox.sbx-1.verify",
    )
    await assert_denied(
        rollout,
        rollout.nc.request("rs.sandbox.sbx-1.inspect", b"x", timeout=DENY_TIMEOUT_S),
        "Publish",
        "rs.sandbox.sbx-1.inspect",
    )
    await assert_denied(
        rollout,
        rollout.nc.request("rs.sandbox.sbx-1.ping", b"x", timeout=DENY_TIMEOUT_S),
        "Publish",
        "rs.sandbox.sbx-1.ping",
    )
    for role in ("reward", "learner"):
        for op in ("verify", "inspect"):
            answer = await sessions[role].nc.request(f"rs.sandbox.sbx-1.{op}", b"x", timeout=3)
            assert answer.data == f"ok:rs.sandbox.sbx-1.{op}".encode()
        assert await sessions[role].permission_errors() == []
