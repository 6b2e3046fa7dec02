"""The live view of ``just up``: trajectories, policy version, success rate, drops, processes.

It listens to the run's subjects on core NATS (an observer, not a consumer group), so it costs the
pipeline nothing and sees records as they are published.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import TYPE_CHECKING

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from schemas.codec import scored_decoder, train_decoder
from schemas.train import StepStats, TrainRecord
from streams.topology import subject

if TYPE_CHECKING:
    from ops.config import Config
    from ops.supervisor import Supervisor


class Progress:
    def __init__(self, cfg: Config, nc: NATS, supervisor: Supervisor) -> None:
        self.cfg, self.nc, self.sup = cfg, nc, supervisor
        self.started = time.monotonic()
        self.trajectories = 0
        self.invalid = 0
        self.seeded = 0  # expert trajectories (the warm start's seed): not the policy's success
        self.recent: deque[float] = deque(maxlen=100)
        self.versions: Counter[int] = Counter()
        self.success_by_version: dict[int, list[float]] = {}
        self.policy_version = 0
        self.trained = 0
        self.dropped: Counter[str] = Counter()
        self.last_loss: float | None = None
        self.console = Console(stderr=True)

    async def subscribe(self) -> None:
        await self.nc.subscribe(subject("scored", self.cfg.run), cb=self._on_scored)
        await self.nc.subscribe(subject("train", self.cfg.run), cb=self._on_train)

    async def _on_scored(self, msg: Msg) -> None:
        try:
            s = scored_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.trajectories += 1
        if not s.valid:
            self.invalid += 1
            return
        if s.traj.source == "expert":
            self.seeded += 1
            return
        self.recent.append(s.reward)
        self.versions[s.traj.min_version] += 1
        self.success_by_version.setdefault(s.traj.min_version, []).append(s.reward)

    async def _on_train(self, msg: Msg) -> None:
        try:
            r = train_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(r, StepStats):
            self.policy_version = max(self.policy_version, r.version)
            self.last_loss = r.loss
        elif isinstance(r, TrainRecord):
            if r.fate == "trained":
                self.trained += 1
            else:
                self.dropped[r.reason.split(":")[0]] += 1

    def table(self) -> Table:
        t = Table(
            title=f"rollstream · run {self.cfg.run} · {time.monotonic() - self.started:,.0f}s",
            show_header=False,
        )
        t.add_column(style="bold cyan")
        t.add_column()
        success = sum(self.recent) / len(self.recent) if self.recent else 0.0
        t.add_row(
            "trajectories",
            f"{self.trajectories} ({self.invalid} infra failures, {self.seeded} expert seeds)",
        )
        t.add_row("policy version", str(self.policy_version))
        t.add_row("success (last 100 of the policy)", f"{success:.0%}")
        t.add_row(
            "versions in lake", ", ".join(f"v{v}:{n}" for v, n in sorted(self.versions.items())[-8:]) or "-"
        )
        t.add_row(
            "trained / dropped", f"{self.trained} / {sum(self.dropped.values())} {dict(self.dropped) or ''}"
        )
        t.add_row("loss", f"{self.last_loss:.4f}" if self.last_loss is not None else "-")
        procs = ", ".join(f"{n}×{self.sup.count(n)}" for n in self.sup.desired)
        t.add_row("processes", procs)
        for line in self.sup.problems():
            t.add_row("[bold red]failing[/]", line)
        t.add_row("logs", str(self.sup.logs))
        return t

    async def render(self, quiet: bool) -> None:
        if quiet or not self.console.is_terminal:
            while True:  # a line every 15 s for logs and CI
                await anyio.sleep(15)
                self.console.print(self.line())
        with Live(self.table(), console=self.console, refresh_per_second=2) as live:
            while True:
                await anyio.sleep(0.5)
                live.update(self.table())

    def line(self) -> str:
        success = sum(self.recent) / len(self.recent) if self.recent else 0.0
        return (
            f"[{time.monotonic() - self.started:5.0f}s] trajectories={self.trajectories} "
            f"expert_seeds={self.seeded} "
            f"policy_version={self.policy_version} versions={len(self.versions)} success={success:.0%} "
            f"trained={self.trained} dropped={sum(self.dropped.values())}"
            + "".join(f"\n  failing: {line}" for line in self.sup.problems())
        )

    def summary(self) -> None:
        """The last progress line, and one line naming the errors workers kept hitting, if any."""
        self.console.print(self.line().split("\n")[0])
        problems = self.sup.problems()
        if problems:
            line = "[bold red]errors:[/] " + " | ".join(problems)
            self.console.print(line, highlight=False, soft_wrap=True)
