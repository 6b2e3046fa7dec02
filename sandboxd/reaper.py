"""Garbage collection of sandbox containers.

A pass removes (1) containers whose owner instance does not answer a ping on
``rs.sandbox.<owner>.ping`` and (2) this instance's own containers past their expiry, or unknown
to it (left by an earlier run under the same name, or by a create cut short). A reaper judges
liveness only for containers labelled with its own ``rollstream.scope``; of other scopes it removes
only orphans: (3) a container whose owner does not answer and whose ``rollstream.expires`` passed
more than ``ORPHAN_GRACE_S`` ago. Otherwise a scope whose last sandboxd was killed hard (a one-off
benchmark or test scope) would keep its containers forever, since no later reaper owns that scope.
"""

from __future__ import annotations

import re
import time
from typing import Any, Protocol

import anyio
import nats.errors
import structlog
from nats.aio.client import Client as NATS

from sandboxd.commands import Sandbox
from sandboxd.docker_ops import LABEL_EXPIRES, LABEL_OWNER, LABEL_SCOPE, DockerOps

OWNER_RE = re.compile(r"^[A-Za-z0-9_-]+$")
UNKNOWN_GRACE_S = 120.0  # an own container unknown for this long was not a create in flight
# Keepalives extend a sandbox's life in its owner's registry, not on its label: allow an hour.
ORPHAN_GRACE_S = 3600.0

log = structlog.get_logger()


class Registry(Protocol):
    """What the reaper needs from the daemon's table of live sandboxes."""

    def expiry_of(self, container_id: str) -> float | None: ...

    def forget(self, container_id: str) -> None: ...


async def owner_alive(nc: NATS, owner: str, timeout_s: float) -> bool:
    """True if sandboxd instance ``owner`` answers its ping in time."""
    if not OWNER_RE.match(owner):
        return False
    try:
        await nc.request(f"rs.sandbox.{owner}.ping", b"", timeout=timeout_s)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


def _own_container_is_stale(info: dict[str, Any], registry: Registry, *, startup: bool, now: float) -> bool:
    known = registry.expiry_of(info["Id"])
    if known is not None:
        return now > known
    if startup:
        return True
    return now - float(info.get("Created", now)) > UNKNOWN_GRACE_S


async def reap_once(
    ops: DockerOps,
    nc: NATS,
    registry: Registry,
    *,
    owner: str,
    scope: str,
    ping_timeout_s: float = 2.0,
    startup: bool = False,
) -> list[str]:
    """One pass over the containers of ``scope``; returns the ids of the containers it removed."""
    now = time.time()
    doomed: list[tuple[str, str]] = []  # (container id, reason)
    others: dict[str, list[str]] = {}
    for info in await ops.list_sandboxes(scope=scope):
        labels = info.get("Labels") or {}
        who = labels.get(LABEL_OWNER, "")
        if who == owner:
            if _own_container_is_stale(info, registry, startup=startup, now=now):
                doomed.append((info["Id"], "expired" if registry.expiry_of(info["Id"]) else "unknown"))
        else:
            others.setdefault(who, []).append(info["Id"])
    for who, ids in others.items():
        if not await owner_alive(nc, who, ping_timeout_s):
            doomed += [(cid, f"owner {who or '?'} is dead") for cid in ids]
    doomed += await _orphans_of_other_scopes(ops, nc, scope=scope, ping_timeout_s=ping_timeout_s, now=now)
    for cid, reason in doomed:
        registry.forget(cid)
        if await ops.remove(cid):
            log.info("sandbox.reaped", container=cid[:12], reason=reason)
    return [cid for cid, _ in doomed]


async def _orphans_of_other_scopes(
    ops: DockerOps, nc: NATS, *, scope: str, ping_timeout_s: float, now: float
) -> list[tuple[str, str]]:
    """Containers of other scopes, long past expiry, whose owner does not answer."""
    candidates: dict[str, list[str]] = {}
    for info in await ops.list_sandboxes():
        labels = info.get("Labels") or {}
        if labels.get(LABEL_SCOPE) == scope:
            continue
        try:
            expires = float(labels.get(LABEL_EXPIRES, "inf"))
        except ValueError:
            continue
        if now > expires + ORPHAN_GRACE_S:
            candidates.setdefault(labels.get(LABEL_OWNER, ""), []).append(info["Id"])
    doomed: list[tuple[str, str]] = []
    for who, ids in candidates.items():
        if not await owner_alive(nc, who, ping_timeout_s):
            doomed += [(cid, f"orphan of dead owner {who or '?'}, long expired") for cid in ids]
    return doomed


async def run_reaper(
    ops: DockerOps,
    nc: NATS,
    registry: Registry,
    *,
    owner: str,
    scope: str,
    interval_s: float,
    ping_timeout_s: float,
) -> None:
    """Reap every ``interval_s`` until cancelled; a failed pass is logged and retried next time."""
    while True:
        await anyio.sleep(interval_s)
        try:
            await reap_once(ops, nc, registry, owner=owner, scope=scope, ping_timeout_s=ping_timeout_s)
        except Exception:
            log.exception("reaper.pass_failed", owner=owner)


LEASE_CHECK_S = 1.0  # how often lapsed leases are looked for (an in-memory scan, no Docker call)


class Leased(Protocol):
    """What ``expire_leases`` needs from the daemon: its live sandboxes and how to close one."""

    sandboxes: dict[str, Sandbox]

    async def close_sandbox(self, sb: Sandbox) -> None: ...


async def expire_leases(daemon: Leased, interval_s: float = LEASE_CHECK_S) -> None:
    """Close every sandbox whose lease (its TTL, extended by keepalives) lapsed, within
    ``interval_s``: a dead rollout worker's sandboxes go seconds after its last keepalive, not at
    the next pass over the Docker engine."""
    while True:
        await anyio.sleep(interval_s)
        now = time.time()
        for sb in [sb for sb in daemon.sandboxes.values() if sb.expires < now]:
            log.info("sandbox.lease_expired", sandbox_id=sb.sandbox_id, late_s=round(now - sb.expires, 1))
            try:
                await daemon.close_sandbox(sb)
            except Exception:  # the reaper's next pass removes it
                log.exception("sandbox.expire_failed", sandbox_id=sb.sandbox_id)
