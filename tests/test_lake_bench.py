"""The lake benchmark runs end to end on a small lake and reports well-formed figures.

No timing assertions: timing goals live in the benchmark itself.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ops.bench.lake import QUERIES, Generator, render, run_benchmark


def test_generated_records_look_like_real_trajectories() -> None:
    scored = Generator(seed=1, pool=20_000).trajectory("r")
    chunks = scored.traj.chunks
    assert 1 <= len(chunks) <= 16 and chunks[-1].tool_name == "submit"
    assert all(len(c.action_tokens) == len(c.action_logprobs) >= 40 for c in chunks)
    assert 600 <= len(scored.traj.prompt_tokens) <= 2400


def test_the_benchmark_ingests_compacts_and_times_every_query_over_views_and_raw_files(
    tmp_path: Path,
) -> None:
    result = run_benchmark(tmp_path, chunk_rows=3000, batch=100, repeats=1)
    assert result.chunk_rows >= 3000 and result.flushes == -(-result.trajectories // 100)
    assert result.ingest_s > 0 and result.lake_bytes > result.bytes_after_compact * 0.5 > 0
    assert len(result.query_ms) == len(QUERIES) * 2 * 2
    assert len(list(tmp_path.glob("chunks/run=*/date=*/part-*.parquet"))) == 1
    console = Console(record=True, width=150)
    for table in render(result):
        console.print(table)
    text = console.export_text()
    assert "full token scan" in text and "compacted" in text and f"{result.chunk_rows:,}" in text
