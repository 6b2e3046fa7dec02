"""The sandbox benchmark runs end to end with tiny counts and reports well-formed rows.

No timing assertions: timing goals live in the benchmark itself.
"""

from __future__ import annotations

import pytest

from ops.bench.sandbox import render, run_benchmark
from streams.server import NatsServer

pytestmark = pytest.mark.docker


async def test_benchmark_rows_are_well_formed(nats_server: NatsServer, base_image: str) -> None:
    rows = await run_benchmark(nats_server.url, commands=5, starts=1, fan_out=2)
    assert [r.what.split(":")[0] for r in rows] == [
        "cold start",
        "warm acquire",
        "verify `true` (seal, verifier exec, remove)",
        "session_run `true` (sandboxd + NATS)",
        "exec `true` (sandboxd + NATS, exec session)",
        "raw aiodocker docker exec `true`",
        "2 sandboxes at once",
        "2 sandboxes at once",
        "2 sandboxes at once",
    ]
    assert all(0 < r.p50_ms <= r.p99_ms for r in rows)
    assert "x" in rows[3].note  # the ratio to raw docker exec
    assert render(rows).row_count == len(rows)
