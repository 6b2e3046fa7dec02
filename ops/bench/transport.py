"""Transport benchmark: the typed layer (``streams.bus``) against raw nats-py, same server, same bytes.

For each record size (realistic ``ScoredTrajectory`` records of ~1 KB and ~48 KB), both layers run
side by side on their own runs and connections, taking turns block by block (the order alternating)
so that both see the same load on a shared machine:

- publish throughput: async publishes with ``Nats-Msg-Id``, then wait for every ack, per block;
- consume throughput: fetch batches from the durable pull consumer and ack each message
  (the typed layer also decodes; raw does not);
- latency: at a modest rate, publish -> delivered to the consumer (typed: decoded), measured with
  one clock in one process, keyed by the message id; the layers send in turns, block by block.

Every phase runs under a deadline and the whole run under a total budget: a phase that fails or
cannot finish (a broker answering ``429 too many requests``, a consumer that never receives) ends
its case with error rows naming the phase and the reason; the benchmark goes on with the next case.

Also times the encode + decode round trip of a 32k-token trajectory (DESIGN.md: well under a
millisecond), without a broker. Goal (issue): typed >= 90 % of raw, p99 < 20 ms. Run with
``python -m ops.bench.transport``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import msgspec
from rich.console import Console
from rich.table import Table

from ops.bench.transport_lanes import (
    LAYERS,
    POOL,
    Case,
    Lane,
    LaneError,
    Probe,
    bounded,
    close_lanes,
    consume_phase,
    latency_phase,
    publish_phase,
)
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.codec import encode, scored_decoder
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from streams.server import NatsServer

NAN = float("nan")


CASES = (
    Case("1 KB", 1024, chunks=1, count=20_000, latency_count=1000, latency_rate=500.0),
    Case("48 KB", 48 * 1024, chunks=6, count=5_000, latency_count=500, latency_rate=250.0),
)


@dataclass(frozen=True)
class Limits:
    """Deadlines: for each phase (setup, publish, consume, latency of a case) and the whole run."""

    phase_s: float = 90.0
    total_s: float = 900.0


@dataclass(frozen=True)
class Row:
    """What one layer achieved on one case (summed over repeats); ``error`` says what failed."""

    layer: str
    case: str
    record_bytes: int
    published: int
    consumed: int
    pub_msgs_s: float
    pub_mb_s: float
    con_msgs_s: float
    con_mb_s: float
    latency_n: int
    p50_ms: float
    p99_ms: float
    pub_cpu_us: float  # client CPU per message (this process), less sensitive to a busy machine
    con_cpu_us: float
    pub_runs: tuple[float, ...] = ()  # msgs/s of each repeat, for the spread of the ratios
    con_runs: tuple[float, ...] = ()
    error: str = ""


# -- records -----------------------------------------------------------------------------------------


def _record(i: int, chunks: int, tokens_per_chunk: int) -> ScoredTrajectory:
    n = tokens_per_chunk
    chunk_list = [
        Chunk(
            index=k,
            action_tokens=pack_tokens(range(1000 + i, 1000 + i + n)),
            action_logprobs=pack_logprobs([-0.25 - 0.001 * t for t in range(n)]),
            policy_version=7,
            tool_name="bash",
            tool_args='{"cmd": "ls -la /work"}',
            tool_status="ok",
            obs_tokens=pack_tokens(range(n // 2)),
            obs_text="total 8",
            gen_ms=41.0,
            tool_ms=12.5,
        )
        for k in range(chunks)
    ]
    traj = Trajectory(
        traj_id=f"bench-{i:08d}",
        run="bench",
        task_id=f"task-{i // 4}",
        family="bench",
        group_id=f"group-{i // 4}",
        sample_idx=i % 4,
        prompt_tokens=pack_tokens(range(32)),
        chunks=chunk_list,
        status="completed",
        min_version=7,
        max_version=7,
        sandbox_id="sbx-0001",
        started_at=1.7e9,
        finished_at=1.7e9 + 3.0,
    )
    return ScoredTrajectory(
        traj=traj, reward=1.0, chunk_rewards=[0.0] * chunks, verifier_output="ok", scored_at=1.7e9
    )


def make_record(i: int, target_bytes: int, chunks: int = 1) -> ScoredTrajectory:
    """A realistic scored trajectory whose msgpack encoding is close to ``target_bytes``."""
    base = len(encode(_record(i, chunks, 0)))
    per_token = (len(encode(_record(i, chunks, 100))) - base) / (100 * chunks)
    n = max(0, round((target_bytes - base) / (per_token * chunks)))
    return _record(i, chunks, n)


# -- one case ----------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One repeat of one case for one layer, or why it failed."""

    lane: Lane
    latencies: list[float]
    error: str = ""


async def bench_case(
    url: str, case: Case, layers: tuple[str, ...], limits: Limits, run_end: float
) -> list[Sample]:
    """All layers on one case: publish, consume, latency, each phase under its deadline."""
    pool = [make_record(i, case.record_bytes, case.chunks) for i in range(POOL)]
    blobs = [encode(r) for r in pool]
    lanes = [Lane(layer) for layer in layers]
    samples = [Sample(lane, []) for lane in lanes]

    def end() -> float:
        return min(time.monotonic() + limits.phase_s, run_end)

    try:
        for lane in lanes:
            await bounded(
                f"setup {lane.layer}",
                end(),
                partial(lane.open, url, round(statistics.fmean(map(len, blobs)))),
            )
        await bounded("publish", end(), partial(publish_phase, lanes, case, pool, blobs))
        await bounded("consume", end(), partial(consume_phase, lanes, case))
        probes = [Probe(lane, case.latency_count) for lane in lanes]
        await bounded("latency", end(), partial(latency_phase, probes, case, pool, blobs))
        for s, probe in zip(samples, probes, strict=True):
            s.latencies = probe.lat_ms
    except LaneError as exc:
        for s in samples:
            s.error = str(exc)
    finally:
        await close_lanes(lanes)
    return samples


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else NAN
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _rate(n: float, s: float) -> float:
    return n / s if s > 0 else NAN


def summarize(case: Case, layer: str, size: int, samples: list[Sample]) -> Row:
    """One row from the repeats of one layer on one case: totals over the repeats that finished;
    ``error`` tells the failed repeats and the errors the connections reported."""
    done = [s for s in samples if not s.error]
    pub, con = [s.lane.pub for s in done], [s.lane.con for s in done]
    lat = [x for s in done for x in s.latencies]
    pub_n, pub_s = sum(t.msgs for t in pub), sum(t.wall_s for t in pub)
    con_n, con_s = sum(t.msgs for t in con), sum(t.wall_s for t in con)
    failed = [s.error for s in samples if s.error]
    async_errors = [e for s in samples for e in s.lane.errors]
    error = "; ".join(
        ([f"{len(failed)} of {len(samples)} repeats failed: {failed[0]}"] if failed else [])
        + (
            [f"{len(async_errors)} connection errors, first: {async_errors[0]}"]
            if async_errors and not failed
            else []
        )
    )
    return Row(
        layer=layer, case=case.label, record_bytes=size, published=pub_n, consumed=con_n,
        pub_msgs_s=_rate(pub_n, pub_s), pub_mb_s=_rate(pub_n * size / 1e6, pub_s),
        con_msgs_s=_rate(con_n, con_s), con_mb_s=_rate(con_n * size / 1e6, con_s),
        latency_n=len(lat), p50_ms=_quantile(lat, 0.50), p99_ms=_quantile(lat, 0.99),
        pub_cpu_us=_rate(sum(t.cpu_s for t in pub) * 1e6, pub_n),
        con_cpu_us=_rate(sum(t.cpu_s for t in con) * 1e6, con_n),
        pub_runs=tuple(_rate(t.msgs, t.wall_s) for t in pub),
        con_runs=tuple(_rate(t.msgs, t.wall_s) for t in con),
        error=error,
    )  # fmt: skip


async def run_benchmark(
    url: str,
    cases: tuple[Case, ...] = CASES,
    layers: tuple[str, ...] = LAYERS,
    repeats: int = 3,
    limits: Limits = Limits(),
) -> list[Row]:
    """Every case ``repeats`` times with all layers side by side; one row per case and layer."""
    run_end = time.monotonic() + limits.total_s
    out: list[Row] = []
    for case in cases:
        size = round(
            statistics.fmean(len(encode(make_record(i, case.record_bytes, case.chunks))) for i in range(POOL))
        )
        by_layer: dict[str, list[Sample]] = {layer: [] for layer in layers}
        for _ in range(repeats):
            for s in await bench_case(url, case, layers, limits, run_end):
                by_layer[s.lane.layer].append(s)
        out += [summarize(case, layer, size, by_layer[layer]) for layer in layers]
    return out


# -- schema round trip ------------------------------------------------------------------------------


def long_trajectory(tokens: int = 32_768, chunks: int = 32) -> ScoredTrajectory:
    """A scored trajectory of ``tokens`` tokens (half actions with log-probs, half observations)."""
    per = tokens // (2 * chunks)
    record = _record(0, chunks, per)
    full = [msgspec.structs.replace(c, obs_tokens=pack_tokens(range(per))) for c in record.traj.chunks]
    traj = msgspec.structs.replace(record.traj, prompt_tokens=b"", chunks=full)
    return msgspec.structs.replace(record, traj=traj)


def roundtrip_us(record: ScoredTrajectory, repeats: int = 2000) -> tuple[float, float, int]:
    """(encode µs, decode µs, bytes) per record, best of five passes of ``repeats // 5``."""
    blob = encode(record)
    assert scored_decoder.decode(blob) == record
    n = max(1, repeats // 5)
    enc, dec = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            encode(record)
        t1 = time.perf_counter()
        for _ in range(n):
            scored_decoder.decode(blob)
        t2 = time.perf_counter()
        enc.append((t1 - t0) / n * 1e6)
        dec.append((t2 - t1) / n * 1e6)
    return min(enc), min(dec), len(blob)


# -- report ------------------------------------------------------------------------------------------


def _ratio_cell(typed: tuple[float, ...], raw: tuple[float, ...], total: float) -> str:
    runs = [t / r for t, r in zip(typed, raw, strict=False) if r > 0]
    spread = f" ({min(runs):.0%}–{max(runs):.0%})" if len(runs) > 1 else ""
    return f"{total:.0%}{spread}"


def render(rows: list[Row]) -> Table:
    """Rows per layer (a failed one followed by an error line, see ``error_notes``), then typed/raw
    ratios per case (total, and range over repeats)."""
    t = Table(title="rollstream transport: typed (streams.bus) vs raw nats-py")
    cols = ("record", "layer", "msgs", "pub msg/s", "pub MB/s", "con msg/s", "con MB/s", "p50 ms", "p99 ms",
            "pub CPU µs", "con CPU µs")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right" if col not in ("record", "layer") else "left", no_wrap=True)
    notes = 0
    for case in dict.fromkeys(r.case for r in rows):
        by = {r.layer: r for r in rows if r.case == case}
        for r in by.values():
            t.add_row(
                f"{case} ({r.record_bytes:,} B)", r.layer, f"{r.consumed:,}",
                f"{r.pub_msgs_s:,.0f}", f"{r.pub_mb_s:,.1f}", f"{r.con_msgs_s:,.0f}", f"{r.con_mb_s:,.1f}",
                f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.pub_cpu_us:.0f}", f"{r.con_cpu_us:.0f}",
            )  # fmt: skip
            if r.error:
                notes += 1
                t.add_row("", "[red]error[/red]", f"[red]note {notes}[/red]", *[""] * 8)
        typed, raw = by.get("typed"), by.get("raw")
        if typed is None or raw is None or not (typed.published and raw.published):
            t.rows[-1].end_section = True
            continue
        pub, con = typed.pub_msgs_s / raw.pub_msgs_s, typed.con_msgs_s / raw.con_msgs_s
        good = min(pub, con) >= 0.9 and typed.p99_ms < 20 and not (typed.error or raw.error)
        ratio = [
            f"{getattr(typed, f) / getattr(raw, f):.2f}x"
            for f in ("p50_ms", "p99_ms", "pub_cpu_us", "con_cpu_us")
        ]
        mark = "[green]{}[/green]".format if good else "[red]{}[/red]".format
        pub_cell, con_cell = (
            _ratio_cell(typed.pub_runs, raw.pub_runs, pub),
            _ratio_cell(typed.con_runs, raw.con_runs, con),
        )
        t.add_row("", mark("typed/raw"), "", mark(pub_cell), "", mark(con_cell), "", *ratio, end_section=True)
    t.caption = (
        "totals over repeats (layers take turns block by block; ratio: total, and range over repeats); "
        "msgs = consumed; consume = fetch + ack (typed also decodes); CPU = this client process per "
        "message.\ngoal: typed >= 90 % of raw, typed p99 < 20 ms"
    )
    return t


def error_notes(rows: list[Row]) -> list[str]:
    """The errors of the failed rows, numbered as the table's error lines."""
    return [f"note {k}: {r.case} {r.layer}: {r.error}" for k, r in enumerate((r for r in rows if r.error), 1)]


def main() -> None:
    console = Console(width=150)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rs-bench-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "js", log_file=Path(tmp) / "nats.log").start()
        try:
            rows = anyio.run(run_benchmark, server.url)
        finally:
            server.stop()
    console.print(render(rows))
    for note in error_notes(rows):
        console.print(f"[red]{note}[/red]")
    enc_us, dec_us, size = roundtrip_us(long_trajectory())
    console.print(
        f"32k-token trajectory ({size:,} B): encode {enc_us:.1f} µs + decode {dec_us:.1f} µs = "
        f"{enc_us + dec_us:.1f} µs round trip (goal: well under 1000 µs)"
    )
    console.print(
        f"done in {time.perf_counter() - t0:.0f}s; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
