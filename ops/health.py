"""Failures surface: each worker tallies the errors it keeps hitting and reports them; the supervisor
shows them in the live view, in ``rollstream status`` and in one line when ``rollstream up`` stops.

In a worker process, ``ErrorTally.observe`` is a structlog processor: every warning or error
logged by any part of the worker is counted under a key (the event and its error text, numbers
and ids blanked), and the broker's asynchronous errors (``nats_error``, logged by the connection's
error callback) are counted by what they deny: ``permissions violation for rs.sandbox.create``.
``report`` publishes the tally (``schemas.health.WorkerHealth``) on ``rs.ops.health.<run>`` within
a second of a change. A non-transient error (a permission violation: grants do not change while
a deployment runs) seen ``FATAL_REPEATS`` times makes the worker exit with that message, so the
supervisor's restart count says so too. ``HealthBoard`` is the supervisor's side: the latest report
of every process, summed per worker kind, kept in ``<state>/health.json`` for ``rollstream status``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas.health import WorkerHealth, health_decoder, health_encoder
from streams.permissions import HEALTH

log = structlog.get_logger(__name__)
FATAL_REPEATS = 3  # a non-transient error seen this often ends the worker
SHOWN_AFTER = 2  # an error is shown once it repeats (a single warning is the log's business)
COUNTED_LEVELS = ("warning", "error", "exception", "critical")
MAX_KEYS = 64  # distinct kinds kept per process; later new kinds are counted as "<event>: (other)"
NOT_COUNTED = ("worker_failing",)  # restates a counted error
_DENIED = re.compile(r'permissions violation for (?:publish|subscription) to "([^"]+)"', re.IGNORECASE)
_NOISE = re.compile(r"\b[0-9a-f]{8,}\b|\d+(?:\.\d+)?")


class WorkerFailed(RuntimeError):
    """A worker stops: it hit a non-transient error ``FATAL_REPEATS`` times (the message says which)."""


def health_subject(run: str) -> str:
    return HEALTH.format(run=run)


def error_key(event_dict: MutableMapping[str, Any]) -> tuple[str, bool]:
    """(key, non-transient) of one logged warning or error."""
    event = str(event_dict.get("event", "error"))
    error = str(event_dict.get("error", ""))
    denied = _DENIED.search(error)
    if denied:
        return f"permissions violation for {denied.group(1)}", True
    if not error and event_dict.get("exc_info"):
        exc = _leaf(sys.exc_info()[1])  # log.exception runs inside the except block
        error = f"{type(exc).__name__}: {exc}" if exc is not None else ""
    detail = _NOISE.sub("N", error)[:100]
    return (f"{event}: {detail}" if detail else event), False


def _leaf(exc: BaseException | None) -> BaseException | None:
    """The first exception inside (nested) exception groups: what actually went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class ErrorTally:
    """The errors one worker process hit, by key; ``failing`` once a non-transient one repeats."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.failing = ""
        self.version = 0  # bumped on every change: the reporter publishes when it moves

    def record(self, key: str, *, fatal: bool = False) -> None:
        if key not in self.counts and len(self.counts) >= MAX_KEYS:
            key = f"{key.split(':')[0]}: (other)"
        self.counts[key] += 1
        self.version += 1
        if fatal and self.counts[key] >= FATAL_REPEATS and not self.failing:
            self.failing = f"{key} (×{self.counts[key]})"

    def observe(
        self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """structlog processor: count warnings and errors, pass every event on unchanged."""
        if method in COUNTED_LEVELS and event_dict.get("event") not in NOT_COUNTED:
            key, fatal = error_key(event_dict)
            self.record(key, fatal=fatal)
        return event_dict


async def nats_error(exc: Exception) -> None:
    """The connection's error callback: log it, so that the tally (and the log) see it."""
    log.error("nats_error", error=str(exc))


async def publish(nc: NATS, run: str, worker: str, tally: ErrorTally) -> None:
    """Send the tally once (a report lost to a broker outage is sent again with the next change)."""
    health = WorkerHealth(
        worker=worker,
        pid=os.getpid(),
        host=socket.gethostname(),
        errors=dict(tally.counts),
        fatal=tally.failing,
        time=time.time(),
    )
    try:
        await nc.publish(health_subject(run), health_encoder.encode(health))
        await nc.flush(timeout=2)
    except Exception as exc:  # noqa: BLE001 - nats raises several kinds while it reconnects
        log.info("health_report_failed", error=type(exc).__name__)


async def report(nc: NATS, run: str, worker: str, tally: ErrorTally, *, every_s: float = 1.0) -> None:
    """Publish the tally whenever it changed; raise ``WorkerFailed`` once it is failing."""
    sent = 0
    while True:
        await anyio.sleep(every_s)
        if tally.version == sent:
            continue
        sent = tally.version
        await publish(nc, run, worker, tally)
        if tally.failing:
            log.error("worker_failing", reason=tally.failing)
            raise WorkerFailed(f"{worker}: {tally.failing}")


class HealthBoard:
    """The supervisor's view of every worker's reports; persisted for ``rollstream status``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.latest: dict[tuple[str, int], WorkerHealth] = {}

    async def subscribe(self, nc: NATS, run: str) -> None:
        await nc.subscribe(health_subject(run), cb=self._on_report)

    async def _on_report(self, msg: Msg) -> None:
        try:
            health = health_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.latest[(health.worker, health.pid)] = health
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.errors()))
        tmp.replace(self.path)  # status never reads half a file

    def errors(self) -> dict[str, dict[str, Any]]:
        """Per worker kind: error counts summed over its processes, and the last fatal message."""
        out: dict[str, dict[str, Any]] = {}
        for h in sorted(self.latest.values(), key=lambda h: h.time):
            entry = out.setdefault(h.worker, {"errors": {}, "fatal": ""})
            for key, n in h.errors.items():
                entry["errors"][key] = entry["errors"].get(key, 0) + n
            entry["fatal"] = h.fatal or entry["fatal"]
        return out

    def lines(self, restarts: dict[str, int] | None = None, *, top: int = 2) -> list[str]:
        return describe(self.errors(), restarts or {}, top=top)


def describe(errors: dict[str, dict[str, Any]], restarts: dict[str, int], *, top: int = 2) -> list[str]:
    """``producer: permissions violation for rs.sandbox.create (×37); restarted 3×`` per worker kind."""
    lines = []
    for worker in sorted(set(errors) | {w for w, n in restarts.items() if n}):
        counts = Counter(errors.get(worker, {}).get("errors", {}))
        parts = [f"{key} (×{n})" for key, n in counts.most_common(top) if n >= SHOWN_AFTER]
        if restarts.get(worker):
            parts.append(f"restarted {restarts[worker]}×")
        if parts:
            lines.append(f"{worker}: " + "; ".join(parts))
    return lines


def read_board(state: Path) -> dict[str, dict[str, Any]]:
    """What the supervisor last wrote to ``<state>/health.json`` (empty when nothing failed)."""
    path = state / "health.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}
