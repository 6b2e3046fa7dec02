"""The transport benchmark runs end to end with tiny counts and reports well-formed rows.

No timing assertions: timing goals live in the benchmark itself.
"""

from __future__ import annotations

from ops.bench.transport import (
    LAYERS,
    Case,
    long_trajectory,
    make_record,
    render,
    roundtrip_us,
    run_benchmark,
)
from schemas.arrays import unpack_tokens
from schemas.codec import encode, scored_decoder
from streams.server import NatsServer


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
