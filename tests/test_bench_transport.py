"""The transport benchmark runs end to end with tiny counts and reports well-formed rows; a phase
that cannot finish (a deadline too short, a broker that stops answering) becomes error rows within
its bound instead of hanging.

No throughput assertions: timing goals live in the benchmark itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from pathlib import Path

from ops.bench.transport import (
    LAYERS,
    Case,
    Limits,
    error_notes,
    long_trajectory,
    make_record,
    render,
    roundtrip_us,
    run_benchmark,
)
from schemas.arrays import unpack_tokens
from schemas.codec import encode, scored_decoder
from streams.server import NatsServer

# Far more than any phase can move within the deadlines below.
ENDLESS = Case("endless", 1024, chunks=1, count=2_000_000, latency_count=40, latency_rate=400.0)


def test_records_have_the_requested_size_and_round_trip() -> None:
    for target, chunks in ((1024, 1), (48 * 1024, 6)):
        record = make_record(3, target, chunks)
        blob = encode(record)
        assert abs(len(blob) - target) < 0.05 * target
        assert scored_decoder.decode(blob) == record
        assert len(record.traj.chunks) == chunks


async def test_benchmark_rows_are_well_formed(nats_server: NatsServer) -> None:
    cases = (Case("tiny", 1024, chunks=1, count=200, latency_count=40, latency_rate=400.0),)
    rows = await run_benchmark(nats_server.url, cases, repeats=1)
    assert [r.layer for r in rows] == list(LAYERS)
    for r in rows:
        assert r.case == "tiny" and r.published == r.consumed == 200 and r.latency_n == 40
        assert not r.error and len(r.pub_runs) == len(r.con_runs) == 1
        assert 900 < r.record_bytes < 1150
        assert min(r.pub_msgs_s, r.pub_mb_s, r.con_msgs_s, r.con_mb_s, r.pub_cpu_us, r.con_cpu_us) > 0
        assert 0 < r.p50_ms <= r.p99_ms
    assert render(rows).row_count == 3  # raw, typed, and their ratio


def test_the_long_trajectory_has_32k_tokens_and_its_round_trip_is_measured() -> None:
    record = long_trajectory()
    chunks = record.traj.chunks
    assert (
        sum(len(unpack_tokens(c.action_tokens)) + len(unpack_tokens(c.obs_tokens)) for c in chunks) == 32_768
    )
    enc_us, dec_us, size = roundtrip_us(record, repeats=10)
    assert enc_us > 0 and dec_us > 0 and size > 32_768 * 4


async def test_a_phase_past_its_deadline_becomes_an_error_row_within_its_bound(
    nats_server: NatsServer,
) -> None:
    t0 = time.monotonic()
    rows = await run_benchmark(nats_server.url, (ENDLESS,), repeats=1, limits=Limits(phase_s=1.5))
    elapsed = time.monotonic() - t0
    assert [r.layer for r in rows] == list(LAYERS)
    for r in rows:
        assert "1 of 1 repeats failed" in r.error and "did not finish within its deadline" in r.error
        assert math.isnan(r.pub_msgs_s) and r.published == 0
    # setup and publish get 1.5 s each at most, closing 3 s; generous slack for a loaded machine
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert render(rows).row_count == 4  # raw, its error line, typed, its error line: no ratio
    assert [n.split(":")[0] for n in error_notes(rows)] == ["note 1", "note 2"]


async def test_a_broker_that_stops_answering_ends_every_case_within_the_total_budget(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "js", log_file=tmp_path / "nats.log").start()
    assert server.proc is not None
    freeze = threading.Timer(1.0, os.kill, (server.proc.pid, signal.SIGSTOP))
    try:
        freeze.start()
        t0 = time.monotonic()
        limits = Limits(phase_s=4.0, total_s=8.0)
        cases = (ENDLESS, dataclasses.replace(ENDLESS, label="endless too"))
        rows = await run_benchmark(server.url, cases, repeats=2, limits=limits)
        elapsed = time.monotonic() - t0
    finally:
        freeze.cancel()
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert len(rows) == 4 and all("2 of 2 repeats failed" in r.error for r in rows)
    assert any("did not finish within its deadline" in r.error for r in rows)
    assert all("time budget is spent" in r.error for r in rows[2:])  # the second case never started
    # 8 s of budget, plus closing connections to the frozen broker (3 s per repeat)
    assert elapsed < 8.0 + 4 * 3.0 + 5.0, f"took {elapsed:.1f} s"


async def test_a_stream_refusing_publishes_with_429_ends_the_case_with_error_rows_at_once(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "small.conf"  # the stream queues at most 20 inbound messages
    conf.write_text("jetstream { max_buffered_msgs: 20, max_buffered_size: 64KB }\n")
    server = NatsServer(store_dir=tmp_path / "js", log_file=tmp_path / "nats.log", config_file=conf).start()
    try:
        burst = Case("burst", 48 * 1024, chunks=6, count=2000, latency_count=10, latency_rate=100.0)
        t0 = time.monotonic()
        rows = await run_benchmark(server.url, (burst,), repeats=1, limits=Limits(phase_s=60.0))
        elapsed = time.monotonic() - t0
    finally:
        server.stop()
    for r in rows:  # nats-py leaves a refused publish's future pending: the raw lane says why
        assert "publish: raw: " in r.error and "too many requests" in r.error, r.error
    assert elapsed < 30, f"took {elapsed:.1f} s: the error should end the phase, not its deadline"
