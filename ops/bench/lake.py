"""Lake benchmark: ingest through ``LakeWriter`` and query latency over >= 1M chunk rows.

Synthetic but realistic records: trajectories of 1-16 chunks (mean ~8), Zipf-distributed token ids
over a 32k vocabulary (as real text is), 10-200 action tokens and 0-300 observation tokens per
chunk, a 150-600 token prompt, behaviour log-probabilities, tool calls and observation text.
Records are generated outside the timed sections; ingest times ``add_scored`` + ``flush`` (build
Arrow arrays, write zstd Parquet, fsync, rename) in batches of ``--batch`` trajectories, as the
lake worker does. Queries run through the deduplicating views (what ``rollstream query`` opens)
and, for comparison, over the raw files; then once more after ``lake compact``.

Run with ``python -m ops.bench.lake [--chunks 1000000] [--dir PATH] [--keep]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from consumers.lake import LakeWriter, compact, open_lake
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory

DAY = 1_767_268_800.0
COMMANDS = ("ls -la", "cat notes.txt", "grep -rn TODO src", "python3 main.py", "echo done > answer.txt")

QUERIES: dict[str, str] = {
    "trajectories: reward by version": (
        "SELECT policy_version, count(*), avg(reward) FROM trajectories GROUP BY 1 ORDER BY 1"
    ),
    "chunks: status counts and mean length": (
        "SELECT tool_status, count(*), avg(num_action_tokens) FROM chunks GROUP BY 1"
    ),
    "chunks: full token scan": (
        "SELECT sum(len(action_tokens)) + sum(len(obs_tokens)), sum(list_sum(action_tokens)), "
        "avg(list_avg(action_logprobs)) FROM chunks"
    ),
}


@dataclass
class Result:
    trajectories: int = 0
    chunk_rows: int = 0
    tokens: int = 0
    ingest_s: float = 0.0
    flushes: int = 0
    lake_bytes: int = 0
    compact_s: float = 0.0
    bytes_after_compact: int = 0
    query_ms: dict[str, list[float]] = field(default_factory=dict)  # label -> [ms per repeat]


class Generator:
    """Realistic random records from one pool of Zipf token ids (slicing it is cheap)."""

    def __init__(self, seed: int = 0, pool: int = 8_000_000) -> None:
        self.rng = np.random.default_rng(seed)
        tokens = np.minimum(self.rng.zipf(1.15, pool), 32_000).astype("<i4")
        self.tokens = tokens.tobytes()
        self.logprobs = (-self.rng.exponential(0.6, pool // 2)).astype("<f4").tobytes()
        self.n = 0

    def _slice(self, blob: bytes, count: int) -> bytes:
        start = int(self.rng.integers(0, len(blob) // 4 - count)) * 4
        return blob[start : start + 4 * count]

    def trajectory(self, run: str) -> ScoredTrajectory:
        self.n += 1
        rng, k = self.rng, int(self.rng.integers(1, 17))
        version = self.n // 2000
        chunks = []
        for i in range(k):
            n_action, n_obs = int(rng.integers(10, 201)), int(rng.integers(0, 301))
            command = COMMANDS[int(rng.integers(len(COMMANDS)))]
            chunks.append(
                Chunk(
                    index=i,
                    action_tokens=self._slice(self.tokens, n_action),
                    action_logprobs=self._slice(self.logprobs, n_action),
                    policy_version=version + (i > k // 2),
                    tool_name="bash" if i < k - 1 else "submit",
                    tool_args=f'{{"command": "{command}"}}',
                    tool_status="ok" if rng.random() > 0.1 else "error",
                    obs_tokens=self._slice(self.tokens, n_obs),
                    obs_text=f"$ {command}\n" + "output line\n" * int(rng.integers(0, 8)),
                    gen_ms=float(rng.random() * 400),
                    tool_ms=float(rng.random() * 80),
                )
            )
        traj = Trajectory(
            traj_id=f"{run}:bench-{self.n:08d}:0",
            run=run,
            task_id=f"bench-{self.n:08d}",
            family="files",
            group_id=f"{run}:bench-{self.n:08d}",
            sample_idx=0,
            prompt_tokens=self._slice(self.tokens, int(rng.integers(150, 601))),
            chunks=chunks,
            status="completed",
            min_version=version,
            max_version=version + (k > 1),
            started_at=DAY + self.n,
            finished_at=DAY + self.n + 30,
        )
        return ScoredTrajectory(traj=traj, reward=float(rng.random() < 0.4), scored_at=DAY + self.n + 31)

    def batches(self, chunk_rows: int, batch: int, run: str) -> Iterator[list[ScoredTrajectory]]:
        made = 0
        while made < chunk_rows:
            records = [self.trajectory(run) for _ in range(batch)]
            made += sum(len(r.traj.chunks) for r in records)
            yield records


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def ingest(root: Path, chunk_rows: int, batch: int, result: Result) -> None:
    writer = LakeWriter(root, writer_id="bench")
    generator = Generator(pool=min(8_000_000, max(10_000, chunk_rows * 50)))
    for records in generator.batches(chunk_rows, batch, "bench"):
        t0 = time.perf_counter()
        for scored in records:
            writer.add_scored(scored)
        writer.flush()
        result.ingest_s += time.perf_counter() - t0
        result.flushes += 1
        result.trajectories += len(records)
        for r in records:
            result.chunk_rows += len(r.traj.chunks)
            result.tokens += (
                len(r.traj.prompt_tokens)
                + sum(len(c.action_tokens) + len(c.obs_tokens) for c in r.traj.chunks)
            ) // 4


def time_queries(root: Path, label: str, repeats: int, result: Result) -> None:
    con = open_lake(root)
    try:
        for name, sql in QUERIES.items():
            for mode, text in (("view", sql), ("raw files", _raw(root, sql))):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    con.execute(text).fetchall()
                    times.append((time.perf_counter() - t0) * 1000)
                result.query_ms[f"{name} | {mode} | {label}"] = times
    finally:
        con.close()


def _raw(root: Path, sql: str) -> str:
    """The same query over the raw parts (no deduplication)."""
    for table in ("trajectories", "chunks"):
        sql = sql.replace(f"FROM {table}", f"FROM read_parquet('{root.absolute()}/{table}/**/*.parquet')")
    return sql


def run_benchmark(root: Path, *, chunk_rows: int, batch: int = 512, repeats: int = 3) -> Result:
    result = Result()
    ingest(root, chunk_rows, batch, result)
    result.lake_bytes = _size(root)
    time_queries(root, f"{result.flushes} parts/table", repeats, result)
    t0 = time.perf_counter()
    compact(root)
    result.compact_s = time.perf_counter() - t0
    result.bytes_after_compact = _size(root)
    time_queries(root, "compacted", repeats, result)
    return result


def render(result: Result) -> list[Table]:
    ingest = Table(title="lake ingest (LakeWriter.add_scored + flush)", header_style="bold")
    for column in (
        "trajectories",
        "chunk rows",
        "tokens",
        "flushes",
        "seconds",
        "traj/s",
        "chunk rows/s",
        "MB on disk",
        "compact s",
        "MB after",
    ):
        ingest.add_column(column, justify="right")
    ingest.add_row(
        f"{result.trajectories:,}",
        f"{result.chunk_rows:,}",
        f"{result.tokens:,}",
        str(result.flushes),
        f"{result.ingest_s:.1f}",
        f"{result.trajectories / result.ingest_s:,.0f}",
        f"{result.chunk_rows / result.ingest_s:,.0f}",
        f"{result.lake_bytes / 1e6:,.0f}",
        f"{result.compact_s:.1f}",
        f"{result.bytes_after_compact / 1e6:,.0f}",
    )
    queries = Table(title=f"query latency over {result.chunk_rows:,} chunk rows (ms)", header_style="bold")
    for column, justify in (
        ("query", "left"),
        ("over", "left"),
        ("lake", "left"),
        ("median", "right"),
        ("min", "right"),
    ):
        queries.add_column(column, justify=justify)  # type: ignore[arg-type]
    for label, times in result.query_ms.items():
        name, mode, lake = label.split(" | ")
        queries.add_row(name, mode, lake, f"{statistics.median(times):,.0f}", f"{min(times):,.0f}")
    return [ingest, queries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1_000_000, help="chunk rows to write (default 1M)")
    parser.add_argument("--batch", type=int, default=512, help="trajectories per flush (lake.max_batch)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each query")
    parser.add_argument("--dir", type=Path, default=None, help="lake directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the lake afterwards")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="rollstream-lake-bench-"))
    console = Console(width=150)
    console.print(f"writing {args.chunks:,} chunk rows to {root} ...")
    try:
        result = run_benchmark(root, chunk_rows=args.chunks, batch=args.batch, repeats=args.repeats)
        for table in render(result):
            console.print(table)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
