"""Sandbox benchmark: a real nats-server, an in-process sandboxd, the real Docker engine.

- cold start: ``create`` of a sandbox that no pool serves (non-default memory) -> first command done;
- warm acquire: ``create`` served by the warm pool -> first command done;
- command round trip (``true``) through sandboxd + NATS: ``session_run`` and ``exec`` (which uses the
  sandbox's exec session), against a raw aiodocker ``docker exec`` of the same command in the same run;
- verify: ``verify(["true"])`` of a used sandbox (seal: every agent process killed; then the command
  in a fresh ``docker exec`` as the verifier uid; then the sandbox removed);
- fan-out: N sandboxes at once (create all, then one command in each, all concurrently).

Goal (issue): session round trip p50 <= 2 ms. Run with ``python -m ops.bench.sandbox``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import anyio
import nats
import structlog
import typer
from rich.console import Console
from rich.table import Table

from sandboxd import daemon
from sandboxd.client import SandboxClient
from sandboxd.docker_ops import DockerOps
from sandboxd.envhub import ensure_image
from sandboxd.settings import SandboxdSettings
from streams.server import NatsServer

cli = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class Row:
    """One measured quantity: its samples' p50/p99 in milliseconds."""

    what: str
    n: int
    p50_ms: float
    p99_ms: float
    note: str = ""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(what: str, samples: list[float], note: str = "") -> Row:
    return Row(what, len(samples), quantile(samples, 0.5), quantile(samples, 0.99), note)


async def timed(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _start(client: SandboxClient, memory_mb: int | None) -> float:
    t0 = time.perf_counter()
    created = await client.create(memory_mb=memory_mb)
    await client.exec(created.sandbox_id, "true")
    ms = (time.perf_counter() - t0) * 1000
    await client.close(created.sandbox_id)
    return ms


async def _warm(client: SandboxClient, ops: DockerOps, owner: str, n: int, size: int) -> list[float]:
    """Acquire from the pool, waiting for its refill between samples (a pool serves bursts of its size)."""
    out = []
    for _ in range(n):
        await pool_full(ops, owner, size)
        out.append(await _start(client, None))
    return out


async def _verify(client: SandboxClient) -> float:
    """One verification of a used sandbox (with a background process of the agent to end)."""
    created = await client.create(memory_mb=384)
    await client.exec(created.sandbox_id, "sleep 60 >/dev/null 2>&1 &")
    t0 = time.perf_counter()
    result = await client.verify(created.sandbox_id, ["true"])
    if not result.passed or result.agent_processes != 1:
        raise RuntimeError(f"verify: {result}")
    return (time.perf_counter() - t0) * 1000


async def pool_full(ops: DockerOps, owner: str, size: int, deadline_s: float = 60.0) -> None:
    """Wait until ``owner`` holds ``size`` containers (with no sandbox open: its full pool)."""
    until = time.monotonic() + deadline_s
    while len(await ops.list_sandboxes(owner=owner)) < size and time.monotonic() < until:  # noqa: ASYNC110
        await anyio.sleep(0.05)
    await anyio.sleep(0.3)  # the last one's exec session opens after its container starts


async def _fan_out(client: SandboxClient, n: int) -> list[Row]:
    """Create ``n`` sandboxes at once, then run one command in each at once, twice (the first opens
    each sandbox's exec session); every phase is one wall-clock time."""
    ids: list[str] = []
    oks: list[bool] = []

    async def create() -> None:
        ids.append((await client.create(memory_mb=256)).sandbox_id)

    async def run(sandbox_id: str) -> None:
        oks.append((await client.exec(sandbox_id, "echo ok")).stdout == "ok\n")

    async def phase(fn: Callable[..., Coroutine[Any, Any, None]], args: list[tuple[object, ...]]) -> float:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for a in args:
                tg.start_soon(fn, *a)
        return (time.perf_counter() - t0) * 1000

    def wall(what: str, ms: float) -> Row:
        return Row(f"{n} sandboxes at once: {what}", n, ms, ms, "one wall time")

    rows = [wall("create all", await phase(create, [()] * n))]
    for what in ("first command in each", "second command in each"):
        rows.append(wall(what, await phase(run, [(i,) for i in ids])))
    await phase(client.close, [(i,) for i in ids])
    if oks.count(True) != 2 * n:
        raise RuntimeError(f"fan-out: {oks.count(True)} of {2 * n} commands answered ok")
    return rows


async def run_benchmark(url: str, *, commands: int = 500, starts: int = 5, fan_out: int = 64) -> list[Row]:
    """All measurements against the nats-server at ``url``; returns the table's rows."""
    nc = await nats.connect(url)
    pool, scope = 2, f"bench-{time.time_ns()}"
    settings = SandboxdSettings(max_sandboxes=max(fan_out, 8), warm_pool=pool, scope=scope)
    try:
        async with DockerOps() as ops, anyio.create_task_group() as tg:
            owner = await tg.start(daemon.run, settings, nc)
            client = SandboxClient(nc, request_timeout_s=300)
            rows = await _measure(client, ops, owner, commands, starts, pool)
            rows += await _fan_out(client, fan_out) if fan_out else []
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
    return rows


async def _measure(
    client: SandboxClient, ops: DockerOps, owner: str, commands: int, starts: int, pool: int
) -> list[Row]:
    cold = [await _start(client, 384) for _ in range(starts)]
    rows = [row("cold start: create -> first command", cold, "no pool (non-default memory)")]
    warm = await _warm(client, ops, owner, starts, pool)
    rows.append(row("warm acquire: create -> first command", warm, "from the pool"))
    checks = [await _verify(client) for _ in range(starts)]
    rows.append(row("verify `true` (seal, verifier exec, remove)", checks, "one agent process to end"))
    created = await client.create()
    sid = created.sandbox_id
    session = await client.session_open(sid)
    await pool_full(ops, owner, pool + 1)  # no refill competing for the CPU while measuring
    sess: list[float] = []
    ex: list[float] = []
    for _ in range(20):  # warm-up
        await client.session_run(sid, session, "true")
        await client.exec(sid, "true")
    for _ in range(commands):  # interleaved: both see the same machine
        sess += await timed(lambda: client.session_run(sid, session, "true"), 1)
        ex += await timed(lambda: client.exec(sid, "true"), 1)
    raw = await timed(lambda: ops.exec(created.container, ["true"]), max(5, commands // 10))
    ratio = statistics.median(raw) / statistics.median(sess)
    rows.append(row("session_run `true` (sandboxd + NATS)", sess, f"raw exec p50 / this p50 = {ratio:.0f}x"))
    rows.append(row("exec `true` (sandboxd + NATS, exec session)", ex))
    rows.append(row("raw aiodocker docker exec `true`", raw))
    await client.close(sid)
    return rows


def render(rows: list[Row]) -> Table:
    t = Table(title="rollstream sandboxd: start-up and command latency")
    for col in ("measure", "n", "p50 ms", "p99 ms", "note"):
        t.add_column(col, justify="left" if col in ("measure", "note") else "right")
    for r in rows:
        t.add_row(r.what, str(r.n), f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", r.note)
    return t


@cli.command()
def main(
    commands: Annotated[int, typer.Option(help="Commands per round-trip measurement.")] = 500,
    starts: Annotated[int, typer.Option(help="Cold starts and warm acquisitions measured.")] = 5,
    fan_out: Annotated[int, typer.Option(help="Sandboxes created at once (0 skips).")] = 64,
) -> None:
    """Measure sandboxd's start-up and command latency against raw Docker; print a table."""
    console = Console(width=140)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ensure_image("base")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(store_dir=Path(tmp) / "js", log_file=Path(tmp) / "nats.log").start()
        try:
            rows = anyio.run(
                lambda: run_benchmark(server.url, commands=commands, starts=starts, fan_out=fan_out)
            )
        finally:
            server.stop()
    console.print(render(rows))
    console.print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    cli()
