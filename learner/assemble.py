"""Batch assembly: whole task groups per optimiser step, with a timeout for stragglers.

Group-normalised advantages (IPA's ``group_baseline``, GRPO) compare the samples of one task with
each other, so a group split over two steps is normalised over half its members (a lone member
gets advantage 0 and trains nothing). The learner therefore holds deliveries by ``group_id`` until

- the group is **complete** (its ``group_size`` members arrived: the size the producer stamped on
  the task; a trajectory without a task, or of a task of size 1, is a group of its own), or
- its first member has waited ``group_timeout_s`` (a **straggler** group: a slow episode or one
  lost upstream must not hold the others back forever; it is released with what arrived),

and hands out batches made of whole ready groups: as soon as they hold ``batch_size`` samples, or,
when fewer are ready, once the oldest ready group has waited ``batch_timeout_s``. A batch may exceed
``batch_size`` by less than one group. Held deliveries are heartbeated (``in_progress``) so the
broker does not redeliver them while they wait. Members that arrive after their group was released
start a new entry and are released by the same rules (at the latest after the timeout); a late
member of a released group that is still held joins it.

With ``informative`` given (dynamic sampling, as in DAPO and ROLL), a ready group of a task that
fails it (all rewards equal: every group-normalised advantage is 0) is not batched: it is set aside
for the caller to account for, and the batch keeps filling from informative groups.

``GroupBuffer`` is the pure bookkeeping (no I/O, clock passed in); ``GroupBatcher`` drives it from a
``Consumer``. Without groups (tasks of size 1) the batcher is a plain "``batch_size`` or timeout"
collector.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.trajectory import ScoredTrajectory
from streams.bus import Consumer, Delivery

HEARTBEAT_EVERY_S = 10.0
"""Heartbeat held deliveries this often (the learner consumer's ack wait is 60 s)."""

T = TypeVar("T")


@dataclass
class _Group(Generic[T]):
    first_seen: float
    size: int
    members: list[T] = field(default_factory=list)
    ready_since: float | None = None


@dataclass
class AssemblyStats:
    """How groups left the buffer (for logs and tests)."""

    complete: int = 0
    stragglers: int = 0  # released incomplete after group_timeout_s
    batches: int = 0
    filtered: int = 0  # ready groups set aside as uninformative


class GroupBuffer(Generic[T]):
    """Deliveries held by group until ready; see the module docstring. ``key`` maps an item to its
    group id and size (``None``, or a size of 1: the item is a complete group of its own);
    ``group_size`` only sizes fetches."""

    def __init__(
        self,
        *,
        key: Callable[[T], tuple[str, int] | None],
        batch_size: int,
        group_size: int,
        group_timeout_s: float,
        batch_timeout_s: float,
        informative: Callable[[Sequence[T]], bool] | None = None,
    ) -> None:
        self.key, self.batch_size, self.group_size = key, batch_size, group_size
        self.group_timeout_s, self.batch_timeout_s = group_timeout_s, batch_timeout_s
        self.informative = informative
        self.groups: dict[str, _Group[T]] = {}  # insertion order = arrival order of first members
        self.stats = AssemblyStats()
        self.filtered: list[list[T]] = []  # uninformative groups not yet claimed by the caller
        self._anon = 0

    def __len__(self) -> int:
        return sum(len(g.members) for g in self.groups.values())

    def items(self) -> list[T]:
        return [m for g in self.groups.values() for m in g.members]

    def add(self, item: T, now: float) -> None:
        keyed = self.key(item)
        gid, size = keyed if keyed is not None and keyed[1] > 1 else (None, 1)
        if gid is None:
            self._anon += 1
            gid = f"\0{self._anon}"  # cannot collide with a real group id
        group = self.groups.get(gid)
        if group is None:  # new, or a late member of a group already handed out: a new entry
            group = self.groups[gid] = _Group(first_seen=now, size=size)
        group.members.append(item)
        self._ready(group, now)

    def _ready(self, group: _Group[T], now: float) -> bool:
        if group.ready_since is not None:
            return True
        if len(group.members) >= group.size:
            group.ready_since = now
        elif now - group.first_seen >= self.group_timeout_s:
            group.ready_since = group.first_seen + self.group_timeout_s
        return group.ready_since is not None

    def next_deadline(self, now: float) -> float:
        """The next time at which ``take`` could return a batch without new arrivals."""
        times = []
        for g in self.groups.values():
            if self._ready(g, now):
                assert g.ready_since is not None
                times.append(g.ready_since + self.batch_timeout_s)
            else:
                times.append(g.first_seen + self.group_timeout_s)
        return min(times, default=now + self.batch_timeout_s)

    def take_filtered(self) -> list[list[T]]:
        """The groups set aside as uninformative since the last call (each one whole)."""
        out, self.filtered = self.filtered, []
        return out

    def _set_aside(self, now: float) -> None:
        if self.informative is None:
            return
        for gid, g in list(self.groups.items()):
            if not gid.startswith("\0") and self._ready(g, now) and not self.informative(g.members):
                del self.groups[gid]
                self.filtered.append(g.members)
                self.stats.filtered += 1

    def take(self, now: float) -> list[T]:
        """A batch of whole ready groups, or ``[]`` when none is due yet."""
        self._set_aside(now)
        ready = [(gid, g) for gid, g in self.groups.items() if self._ready(g, now)]
        count = sum(len(g.members) for _, g in ready)
        oldest = min((g.ready_since for _, g in ready if g.ready_since is not None), default=None)
        if count < self.batch_size and (oldest is None or now - oldest < self.batch_timeout_s):
            return []
        batch: list[T] = []
        for gid, g in ready:  # oldest first
            if len(batch) >= self.batch_size:
                break
            batch += g.members
            del self.groups[gid]
            if len(g.members) >= g.size:
                self.stats.complete += 1
            else:
                self.stats.stragglers += 1
        self.stats.batches += 1
        return batch


def trajectory_group(d: Delivery[ScoredTrajectory]) -> tuple[str, int] | None:
    """The group of a scored trajectory and its size (from its task); replays are never grouped
    (their group mates are not replayed with them)."""
    traj = d.record.traj
    if d.record.replay or traj.task is None:
        return None
    return traj.group_id, traj.task.group_size


def rewards_differ(group: Sequence[Delivery[ScoredTrajectory]]) -> bool:
    """Whether a group carries a group-baseline signal: not every member has the same reward."""
    return len({d.record.reward for d in group}) > 1


class GroupBatcher:
    """Fetches from the learner consumer and hands out batches of whole groups. With
    ``on_filtered`` (dynamic sampling), groups whose rewards are all equal are handed to it as soon
    as they are ready instead of being batched."""

    def __init__(
        self,
        consumer: Consumer[ScoredTrajectory],
        *,
        batch_size: int,
        group_size: int,
        group_timeout_s: float,
        batch_timeout_s: float,
        on_filtered: Callable[[list[Delivery[ScoredTrajectory]]], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer, self.clock, self.on_filtered = consumer, clock, on_filtered
        self.buffer: GroupBuffer[Delivery[ScoredTrajectory]] = GroupBuffer(
            key=trajectory_group,
            batch_size=batch_size,
            group_size=group_size,
            group_timeout_s=group_timeout_s,
            batch_timeout_s=batch_timeout_s,
            informative=rewards_differ if on_filtered is not None else None,
        )
        self._last_heartbeat = clock()

    @property
    def stats(self) -> AssemblyStats:
        return self.buffer.stats

    def held(self) -> Sequence[Delivery[ScoredTrajectory]]:
        return self.buffer.items()

    async def next_batch(self) -> list[Delivery[ScoredTrajectory]]:
        """Block until a batch is due; returns it (never empty)."""
        buf = self.buffer
        while True:
            now = self.clock()
            batch = buf.take(now)
            await self._settle_filtered()
            if batch:
                return batch
            wait = min(2.0, max(0.2, buf.next_deadline(now) - now))
            want = max(1, buf.batch_size + max(buf.group_size, 1) - len(buf))
            for d in await self.consumer.fetch(want, timeout_s=wait):
                buf.add(d, self.clock())
            await self._heartbeat()

    async def _settle_filtered(self) -> None:
        for group in self.buffer.take_filtered():
            assert self.on_filtered is not None
            await self.on_filtered(group)

    async def _heartbeat(self) -> None:
        now = self.clock()
        if now - self._last_heartbeat < HEARTBEAT_EVERY_S:
            return
        self._last_heartbeat = now
        for d in self.buffer.items():
            await d.in_progress()
