"""Engine benchmarks (issue 13): weight sync per version, full weights vs LoRA adapters; the
``openai`` engine through ``rollstream serve`` vs the in-process torch engine.

1. **Weight sync.** Per policy version: the learner serialises its weights (``Trainer.weights_bytes``:
   every tensor, or with LoRA only the adapters), publishes them (object store, then KV), a reader
   fetches the newest version (``streams.policy.fetch_newest``) and an in-process engine applies
   it (``AdapterEngine``: loads full weights, or merges the adapter into the base). Real nats-server,
   real torch; the tiny default policy and a larger Qwen2 of the same tokenizer.
2. **openai vs torch at concurrency 8.** Eight concurrent "episodes" of several turns each
   (every turn continues the growing context by a fixed number of tokens, no stop tokens, so both
   engines generate exactly the same amount), once through ``Batcher(TorchEngine)`` in this
   process and once through ``Batcher(OpenAIEngine)`` to a ``rollstream serve`` subprocess (its own
   batcher over the same torch engine, one torch thread each). Overhead = wall time ratio − 1;
   the goal is ≤ 10 %. Rounds alternate (torch, openai, torch, ...); the table shows the fastest and
   the median round of each and the median of the per-round ratios, as the machine is shared and
   its load moves the walls by several times between rounds.

Run with ``python -m ops.bench.engines [--versions 5] [--turns 6] [--rounds 2]``; the lead folds
these sections into ``just bench-models``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import nats
from rich.console import Console
from rich.table import Table

from agent_harness.batcher import Batcher
from agent_harness.engine import GenRequest, InferenceEngine
from agent_harness.lora import AdapterEngine
from agent_harness.model import PolicySettings
from agent_harness.openai_engine import OpenAIEngine
from agent_harness.policy_init import create_tiny_policy
from agent_harness.settings import LoraSettings
from agent_harness.torch_engine import TorchEngine
from learner.settings import LearnerSettings
from learner.trainer import Trainer
from producers.families.files import corpus
from streams import policy
from streams.server import NatsServer, free_port
from streams.topology import ensure

LORA = LoraSettings(r=8, alpha=16)
MEDIUM = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 1376}


@dataclass
class SyncRow:
    policy: str
    kind: str
    params_m: float
    megabytes: float
    serialise_ms: float
    publish_ms: float
    fetch_ms: float
    apply_ms: float

    @property
    def total_ms(self) -> float:
        return self.serialise_ms + self.publish_ms + self.fetch_ms + self.apply_ms


def medium_policy(tiny: Path, target: Path) -> Path:
    """A larger random Qwen2 with the tiny policy's tokenizer."""
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    if (target / "config.json").exists():
        return target
    fields = AutoConfig.from_pretrained(tiny).to_dict()
    fields.pop("layer_types", None)
    Qwen2ForCausalLM(Qwen2Config(**(fields | MEDIUM))).save_pretrained(target)
    for f in tiny.glob("tokenizer*"):
        shutil.copy2(f, target / f.name)
    return target


async def sync_rows(js: nats.js.JetStreamContext, name: str, path: Path, versions: int) -> list[SyncRow]:
    rows = []
    for kind, lora in (("full", None), ("lora", LORA)):
        trainer = Trainer(path, LearnerSettings(), PolicySettings(lora=lora))
        engine = AdapterEngine(TorchEngine(path), path)
        params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
        run = f"bench-{name.split()[0]}-{kind}"
        await ensure(js, run)
        acc = {"ser": 0.0, "pub": 0.0, "fetch": 0.0, "apply": 0.0}
        size = 0
        for v in range(1, versions + 1):
            t0 = time.perf_counter()
            data = trainer.weights_bytes()
            t1 = time.perf_counter()
            await policy.publish_weights(js, run, v, data, step=v)
            t2 = time.perf_counter()
            found = await policy.fetch_newest(js, run, newer_than=v - 1)
            t3 = time.perf_counter()
            assert found is not None and found[0].version == v
            await engine.load_weights(found[1], v)
            t4 = time.perf_counter()
            size = len(data)
            for key, (start, stop) in zip(acc, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
                acc[key] += (stop - start) * 1000
        n = versions
        rows.append(
            SyncRow(
                name,
                kind,
                params,
                size / 1e6,
                acc["ser"] / n,
                acc["pub"] / n,
                acc["fetch"] / n,
                acc["apply"] / n,
            )
        )
    return rows


async def run_sync(policies: dict[str, Path], versions: int, work: Path) -> list[SyncRow]:
    server = NatsServer(store_dir=work / "js", log_file=work / "nats.log").start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=30)
        rows = []
        for name, path in policies.items():
            rows += await sync_rows(js, name, path, versions)
        await nc.close()
        return rows
    finally:
        server.stop()


async def episodes(
    engine: InferenceEngine, concurrency: int, turns: int, new_tokens: int
) -> tuple[float, int]:
    """Wall seconds and tokens generated by ``concurrency`` concurrent multi-turn sessions."""
    generated = 0

    async def session(i: int) -> None:
        nonlocal generated
        seq = [5 + i, 6, 7, 8, 9, 10, 11, 12] * 4
        for _ in range(turns):
            [gen] = await engine.generate([GenRequest(list(seq), new_tokens, 1.0, session=f"ep{i}")])
            generated += len(gen.tokens)
            seq += [*gen.tokens, 20, 21, 22, 23, 24, 25, 26, 27]  # an observation

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(concurrency):
            tg.start_soon(session, i)
    return time.perf_counter() - t0, generated


def start_serve(state: Path, port: int) -> subprocess.Popen[bytes]:
    sets = [f'state_dir="{state}"', f"serve.port={port}", "torch_threads=1", "log_level=warning"]
    args = [sys.executable, "-m", "ops.cli", "serve", *(x for s in sets for x in ("--set", s))]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url.removesuffix("/v1") + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.5)
    raise TimeoutError(f"rollstream serve did not answer at {url}")


LOCAL, REMOTE = "torch (in process)", "openai → rollstream serve"


@dataclass
class Overhead:
    walls: dict[str, list[float]]  # seconds per round, by engine
    tokens: dict[str, int]  # tokens generated per round

    def ratio(self) -> float:
        """Median over rounds of remote wall / local wall of the same round, minus one."""
        pairs = zip(self.walls[REMOTE], self.walls[LOCAL], strict=True)
        return statistics.median(r / loc for r, loc in pairs) - 1


async def run_overhead(state: Path, concurrency: int, turns: int, new_tokens: int, rounds: int) -> Overhead:
    port = free_port()
    proc = start_serve(state, port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        await wait_ready(url)
        local = Batcher(TorchEngine(state / "policy" / "base", num_threads=1), max_batch=concurrency)
        remote = Batcher(OpenAIEngine([url], state / "policy" / "base"), max_batch=concurrency)
        walls: dict[str, list[float]] = {}
        tokens: dict[str, int] = {}
        await episodes(remote, concurrency, 1, new_tokens)  # warm both paths at full batch size
        await episodes(local, concurrency, 1, new_tokens)
        for _ in range(rounds):
            for name, engine in ((LOCAL, local), (REMOTE, remote)):
                wall, generated = await episodes(engine, concurrency, turns, new_tokens)
                walls.setdefault(name, []).append(wall)
                tokens[name] = generated
        return Overhead(walls, tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)  # the harness default per turn
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sections", default="sync,overhead", help="Which sections to run.")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="rs-bench-engines-") as tmp:
        work = Path(tmp)
        tiny = create_tiny_policy(work / "policy" / "base", corpus(seed=0), seed=0)
        if "sync" in args.sections:
            policies = {
                "tiny (Qwen2 0.5M)": tiny,
                "medium (Qwen2 6 layers)": medium_policy(tiny, work / "medium"),
            }
            console.print(sync_table(anyio.run(run_sync, policies, args.versions, work)))
        if "overhead" in args.sections:
            result = anyio.run(run_overhead, work, args.concurrency, args.turns, args.new_tokens, args.rounds)
            console.print(overhead_table(result, args.concurrency))


def sync_table(rows: list[SyncRow]) -> Table:
    table = Table(title="weight publish + fetch + apply per version (mean)")
    for col in (
        "policy",
        "weights",
        "params M",
        "MB",
        "serialise ms",
        "publish ms",
        "fetch ms",
        "apply ms",
        "total ms",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.policy,
            r.kind,
            f"{r.params_m:.1f}",
            f"{r.megabytes:.2f}",
            f"{r.serialise_ms:.0f}",
            f"{r.publish_ms:.0f}",
            f"{r.fetch_ms:.0f}",
            f"{r.apply_ms:.0f}",
            f"{r.total_ms:.0f}",
        )
    return table


def overhead_table(result: Overhead, concurrency: int) -> Table:
    rounds = len(result.walls[LOCAL])
    table = Table(title=f"generation at concurrency {concurrency}, {rounds} alternating rounds")
    for col in ("engine", "fastest s", "median s", "tokens/round", "tokens/s (median)"):
        table.add_column(col, justify="right")
    for name, walls in result.walls.items():
        mid = statistics.median(walls)
        tokens = result.tokens[name]
        table.add_row(name, f"{min(walls):.2f}", f"{mid:.2f}", str(tokens), f"{tokens / mid:.0f}")
    table.caption = f"openai overhead: median of per-round ratios {result.ratio() * 100:+.1f} % (goal ≤ 10 %)"
    return table


if __name__ == "__main__":
    main()
