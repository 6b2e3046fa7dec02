"""Transport benchmark: the typed layer (``streams.bus``) against raw nats-py, same server, same bytes.

For each record size (realistic ``ScoredTrajectory`` records of ~1 KB and ~48 KB) and each layer:

- publish throughput: async publishes with ``Nats-Msg-Id``, then wait for every ack;
- consume throughput: fetch batches from the durable pull consumer and ack each message
  (the typed layer also decodes; raw does not);
- latency: a separate pass at a modest rate, publish -> delivered to the consumer (typed: decoded),
  measured with one clock in one process, keyed by the message id.

Also times the encode + decode round trip of a 32k-token trajectory (DESIGN.md: well under a
millisecond), without a broker.

Goal (issue): typed >= 90 % of raw, p99 < 20 ms. Run with ``python -m ops.bench.transport``.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table

from schemas.arrays import pack_logprobs, pack_tokens
from schemas.codec import encode, scored_decoder
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory
from streams.bus import MSG_ID, Consumer, Publisher
from streams.server import NatsServer
from streams.topology import LAKE_TRAJ, ensure, subject

LAYERS = ("raw", "typed")
FETCH_BATCH = 256
POOL = 16  # distinct records per case, reused with fresh message ids


@dataclass(frozen=True)
class Case:
    """One record size with its message counts."""

    label: str
    record_bytes: int
    chunks: int
    count: int
    latency_count: int
    latency_rate: float  # msgs/s in the latency pass


CASES = (
    Case("1 KB", 1024, chunks=1, count=20_000, latency_count=1000, latency_rate=500.0),
    Case("48 KB", 48 * 1024, chunks=6, count=5_000, latency_count=500, latency_rate=250.0),
)


@dataclass(frozen=True)
class Row:
    """What one layer achieved on one case."""

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


# -- one layer on one case ---------------------------------------------------------------------------


def _index(msg: Msg) -> int:
    # Message ids are "<run>-<i>": unique per case, because de-duplication is stream-wide.
    return int((msg.headers or {})[MSG_ID].rsplit("-", 1)[1])


class _Layer:
    """Publish and consume through one layer; ``typed`` wraps streams.bus, ``raw`` is nats-py."""

    def __init__(self, layer: str, pub_js: JetStreamContext, sub_js: JetStreamContext, run: str) -> None:
        self.layer, self.pub_js, self.sub_js, self.run = layer, pub_js, sub_js, run
        self.subject = subject("scored", run)
        self.publisher = Publisher(pub_js)
        self.raw_pending: list[asyncio.Future[Any]] = []
        self.consumer: Consumer[ScoredTrajectory] | None = None
        self.sub: Any = None

    async def bind(self) -> None:
        if self.layer == "typed":
            self.consumer = await Consumer(self.sub_js, LAKE_TRAJ, self.run, scored_decoder).bind()
        else:
            self.sub = await self.sub_js.pull_subscribe_bind(
                durable=LAKE_TRAJ.durable(self.run), stream=LAKE_TRAJ.stream
            )

    async def publish(self, record: ScoredTrajectory, data: bytes, msg_id: str) -> None:
        if self.layer == "typed":
            await self.publisher.publish_async(self.subject, record, msg_id=msg_id)
        else:
            self.raw_pending.append(
                await self.pub_js.publish_async(self.subject, data, headers={MSG_ID: msg_id})
            )

    async def flush(self) -> None:
        if self.layer == "typed":
            await self.publisher.flush()
        else:
            pending, self.raw_pending = self.raw_pending, []
            await asyncio.gather(*pending)

    async def consume_batch(self, batch: int, timeout_s: float, on_msg: Callable[[Msg], None]) -> int:
        """Fetch up to ``batch``, ack each; returns how many arrived."""
        if self.consumer is not None:
            deliveries = await self.consumer.fetch(batch, timeout_s)
            for d in deliveries:
                on_msg(d.msg)
                await d.ack()
            return len(deliveries)
        try:
            msgs = await self.sub.fetch(batch, timeout=timeout_s)
        except (TimeoutError, NatsTimeoutError):
            return 0
        for m in msgs:
            on_msg(m)
            await m.ack()
        return len(msgs)


async def _timed(fn: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn``."""
    t0, c0 = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - t0, time.process_time() - c0


async def _throughput(
    lay: _Layer, case: Case, pool: list[ScoredTrajectory], blobs: list[bytes]
) -> tuple[tuple[float, float], tuple[float, float], int]:
    async def publish_all() -> None:
        for i in range(case.count):
            await lay.publish(pool[i % POOL], blobs[i % POOL], f"{lay.run}-{i}")
        await lay.flush()

    consumed = 0

    async def consume_all() -> None:
        nonlocal consumed
        idle = 0
        while consumed < case.count and idle < 3:
            got = await lay.consume_batch(FETCH_BATCH, 2.0, lambda m: None)
            consumed += got
            idle = 0 if got else idle + 1

    pub_s = await _timed(publish_all)
    con_s = await _timed(consume_all)
    return pub_s, con_s, consumed


async def _latency(lay: _Layer, case: Case, pool: list[ScoredTrajectory], blobs: list[bytes]) -> list[float]:
    sent: dict[int, float] = {}
    lat_ms: list[float] = []
    done = asyncio.Event()

    def on_msg(m: Msg) -> None:
        lat_ms.append((time.perf_counter() - sent[_index(m)]) * 1000.0)
        if len(lat_ms) >= case.latency_count:
            done.set()

    async def consume() -> None:
        while not done.is_set():
            await lay.consume_batch(16, 1.0, on_msg)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.2)  # the first pull request is waiting at the server
    t0 = time.perf_counter()
    for i in range(case.latency_count):
        delay = t0 + i / case.latency_rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent[i] = time.perf_counter()
        await lay.publish(pool[i % POOL], blobs[i % POOL], f"{lay.run}-{i}")
    await lay.flush()
    try:
        await asyncio.wait_for(done.wait(), timeout=10.0)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    return lat_ms


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def bench_case(url: str, layer: str, case: Case) -> Row:
    """Measure one layer on one case against the broker at ``url`` (no auth; ensure() runs here)."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, not {layer!r}")
    pool = [make_record(i, case.record_bytes, case.chunks) for i in range(POOL)]
    blobs = [encode(r) for r in pool]
    size = round(statistics.fmean(len(b) for b in blobs))
    pub_nc: NATS = await nats.connect(url, max_reconnect_attempts=2)
    sub_nc: NATS = await nats.connect(url, max_reconnect_attempts=2)
    try:
        tp_run, lat_run = (f"bench-{layer}-{uuid.uuid4().hex[:8]}" for _ in range(2))
        admin = pub_nc.jetstream(timeout=10)
        await ensure(admin, tp_run)
        await ensure(admin, lat_run)
        lay = _Layer(layer, pub_nc.jetstream(timeout=10), sub_nc.jetstream(timeout=10), tp_run)
        await lay.bind()
        (pub_s, pub_cpu), (con_s, con_cpu), consumed = await _throughput(lay, case, pool, blobs)
        lat = _Layer(layer, pub_nc.jetstream(timeout=10), sub_nc.jetstream(timeout=10), lat_run)
        await lat.bind()
        lat_ms = await _latency(lat, case, pool, blobs)
    finally:
        await pub_nc.close()
        await sub_nc.close()
    mb = case.count * size / 1e6
    return Row(
        layer=layer,
        case=case.label,
        record_bytes=size,
        published=case.count,
        consumed=consumed,
        pub_msgs_s=case.count / pub_s,
        pub_mb_s=mb / pub_s,
        con_msgs_s=consumed / con_s,
        con_mb_s=consumed * size / 1e6 / con_s,
        latency_n=len(lat_ms),
        p50_ms=_quantile(lat_ms, 0.50),
        p99_ms=_quantile(lat_ms, 0.99),
        pub_cpu_us=pub_cpu / case.count * 1e6,
        con_cpu_us=con_cpu / max(consumed, 1) * 1e6,
    )


def median_row(rows: list[Row]) -> Row:
    """The per-metric median of repeated runs of one layer on one case."""
    first = rows[0]
    fields = {f: statistics.median(getattr(r, f) for r in rows) for f in Row.__dataclass_fields__}
    return Row(**{**fields, "layer": first.layer, "case": first.case, "record_bytes": first.record_bytes,
                  "published": sum(r.published for r in rows), "consumed": sum(r.consumed for r in rows),
                  "latency_n": sum(r.latency_n for r in rows)})  # fmt: skip


async def run_benchmark(
    url: str, cases: tuple[Case, ...] = CASES, layers: tuple[str, ...] = LAYERS, repeats: int = 3
) -> list[Row]:
    """Every case and layer ``repeats`` times, alternating which layer goes first; medians per layer."""
    out: list[Row] = []
    for case in cases:
        runs: dict[str, list[Row]] = {layer: [] for layer in layers}
        for rep in range(repeats):
            for layer in layers if rep % 2 == 0 else layers[::-1]:
                runs[layer].append(await bench_case(url, layer, case))
        out += [median_row(runs[layer]) for layer in layers]
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


def render(rows: list[Row]) -> Table:
    """Rows per layer, then typed/raw ratios per case."""
    t = Table(title="rollstream transport: typed (streams.bus) vs raw nats-py")
    cols = ("record", "layer", "msgs", "pub msg/s", "pub MB/s", "con msg/s", "con MB/s", "p50 ms", "p99 ms",
            "pub CPU µs", "con CPU µs")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right" if col not in ("record", "layer") else "left", no_wrap=True)
    for case in dict.fromkeys(r.case for r in rows):
        by = {r.layer: r for r in rows if r.case == case}
        for r in by.values():
            t.add_row(
                f"{case} ({r.record_bytes:,} B)", r.layer, f"{r.consumed:,}",
                f"{r.pub_msgs_s:,.0f}", f"{r.pub_mb_s:,.1f}", f"{r.con_msgs_s:,.0f}", f"{r.con_mb_s:,.1f}",
                f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.pub_cpu_us:.0f}", f"{r.con_cpu_us:.0f}",
            )  # fmt: skip
        if "typed" in by and "raw" in by:
            typed, raw = by["typed"], by["raw"]
            pub, con = typed.pub_msgs_s / raw.pub_msgs_s, typed.con_msgs_s / raw.con_msgs_s
            ok = "green" if min(pub, con) >= 0.9 and typed.p99_ms < 20 else "red"
            ratio = [
                f"{getattr(typed, f) / getattr(raw, f):.2f}x"
                for f in ("p50_ms", "p99_ms", "pub_cpu_us", "con_cpu_us")
            ]
            mark = f"[{ok}]{{}}[/{ok}]".format
            t.add_row(
                "",
                mark("typed/raw"),
                "",
                mark(f"{pub:.0%}"),
                "",
                mark(f"{con:.0%}"),
                "",
                *ratio,
                end_section=True,
            )
    t.caption = (
        "medians of repeated runs; msgs = total over repeats; consume = fetch + ack (typed also decodes); "
        "CPU = this client process per message.\ngoal: typed >= 90 % of raw, typed p99 < 20 ms"
    )
    return t


def main() -> None:
    console = Console(width=140)
    with tempfile.TemporaryDirectory(prefix="rs-bench-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "js", log_file=Path(tmp) / "nats.log").start()
        try:
            t0 = time.perf_counter()
            rows = asyncio.run(run_benchmark(server.url))
        finally:
            server.stop()
    console.print(render(rows))
    enc_us, dec_us, size = roundtrip_us(long_trajectory())
    console.print(
        f"32k-token trajectory ({size:,} B): encode {enc_us:.1f} µs + decode {dec_us:.1f} µs = "
        f"{enc_us + dec_us:.1f} µs round trip (goal: well under 1000 µs)"
    )
    console.print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
