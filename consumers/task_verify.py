"""Verification of imported tasks (Harbor, Terminal-Bench, SWE-style): ``Task.verifier``.

Runs after the agent's last command, in the episode's sandbox: empty the ``clear`` directories
(``/tests``, ``/logs/verifier``) so the agent cannot plant a test or a reward file, write the
verifier's files (they never enter the sandbox before, nor the prompt), run its command in the
task's working directory, then read the reward:

- ``results_file`` set (SWE-style): lines ``PASSED <test id>`` / ``FAILED <test id>``; reward 1.0
  iff every ``fail_to_pass`` test passed and no ``pass_to_pass`` test failed (or went missing);
- else the first reward file that exists: ``reward.txt`` holds one number, ``reward.json`` an
  object whose ``reward`` (or, without it, the mean of its numbers) is taken, or a bare number —
  rewards need not be binary;
- else the command's exit code: 1.0 for 0, 0.0 otherwise.

A verifier that outlives its ``timeout_s`` scores 0.0 (the state the agent left made it hang); a
reward file that does not parse is the verifier's fault: ``VerifierBroken``, an invalid sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from sandboxd.errors import SandboxBadRequest
from schemas.sandbox import ExecResult
from schemas.task import Task, Verifier

OUTPUT_CAP = 16384
RESULTS_CAP = 1 << 20


class VerifierBroken(Exception):
    """The verifier itself failed (unparseable reward, cannot stage its files): not the agent's doing."""


class VerifySandbox(Protocol):
    """The part of ``sandboxd.client.SandboxClient`` verification uses."""

    async def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        timeout_s: float = ...,
        cwd: str = ...,
        env: dict[str, str] | None = ...,
        max_output_bytes: int = ...,
    ) -> ExecResult: ...

    async def write_file(self, sandbox_id: str, path: str, data: bytes, mode: int = ...) -> None: ...

    async def read_file(self, sandbox_id: str, path: str, max_bytes: int = ...) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    reward: float
    output: str


def parse_reward_file(path: str, data: bytes) -> float:
    """The reward a verifier wrote to ``path`` (``.json``: an object or a number; else one number)."""
    text = data.decode(errors="replace").strip()
    try:
        value: Any = msgspec.json.decode(text) if path.endswith(".json") else float(text)
    except (msgspec.DecodeError, ValueError) as exc:
        raise VerifierBroken(f"{path} does not hold a reward: {text[:200]!r}") from exc
    if isinstance(value, dict):
        numbers = [v for v in value.values() if isinstance(v, int | float) and not isinstance(v, bool)]
        value = value.get("reward", sum(numbers) / len(numbers) if numbers else None)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise VerifierBroken(f"{path} does not hold a finite number: {text[:200]!r}")
    return float(value)


def parse_test_results(text: str) -> dict[str, bool]:
    """``PASSED <id>`` / ``FAILED <id>`` lines -> {id: passed}; a test listed twice keeps its last."""
    results: dict[str, bool] = {}
    for line in text.splitlines():
        status, _, test = line.strip().partition(" ")
        if status in ("PASSED", "FAILED") and test.strip():
            results[test.strip()] = status == "PASSED"
    return results


def swe_reward(results: dict[str, bool], fail_to_pass: list[str], pass_to_pass: list[str]) -> Verdict:
    """1.0 iff every FAIL_TO_PASS test passes and no PASS_TO_PASS test breaks (a missing one breaks)."""
    unfixed = [t for t in fail_to_pass if not results.get(t, False)]
    broken = [t for t in pass_to_pass if not results.get(t, False)]
    lines = [f"FAIL_TO_PASS: {len(fail_to_pass) - len(unfixed)}/{len(fail_to_pass)} pass"]
    lines.append(f"PASS_TO_PASS: {len(pass_to_pass) - len(broken)}/{len(pass_to_pass)} pass")
    lines += [f"still failing: {t}" for t in unfixed[:20]] + [f"broken: {t}" for t in broken[:20]]
    return Verdict(1.0 if not unfixed and not broken else 0.0, "\n".join(lines))


async def stage(sandbox: VerifySandbox, sandbox_id: str, verifier: Verifier) -> None:
    """Empty the verifier's directories, then write its files (the agent's last command is done)."""
    if verifier.clear:
        dirs = " ".join(f"'{d}'" for d in verifier.clear)
        res = await sandbox.exec(sandbox_id, f"rm -rf -- {dirs} && mkdir -p -- {dirs}", cwd="/", timeout_s=30)
        if res.exit_code != 0:
            raise VerifierBroken(f"cannot empty {', '.join(verifier.clear)}: {res.stderr.strip()[:300]}")
    for path, data in sorted(verifier.files.items()):
        mode = 0o755 if path.endswith(".sh") else 0o644
        try:
            await sandbox.write_file(sandbox_id, path, data, mode=mode)
        except SandboxBadRequest as exc:
            raise VerifierBroken(f"cannot write the verifier's {path}: {exc.message}") from exc


async def _read(sandbox: VerifySandbox, sandbox_id: str, path: str, cap: int = 4096) -> bytes | None:
    try:
        return await sandbox.read_file(sandbox_id, path, max_bytes=cap)
    except SandboxBadRequest:  # no such file
        return None


async def verify_task(sandbox: VerifySandbox, sandbox_id: str, task: Task) -> Verdict:
    """Verify ``task`` (which has a ``verifier``) in ``sandbox_id``; see the module docstring."""
    verifier = task.verifier
    assert verifier is not None
    await stage(sandbox, sandbox_id, verifier)
    res = await sandbox.exec(
        sandbox_id,
        verifier.command,
        cwd=task.workdir,
        env=dict(verifier.env),
        timeout_s=verifier.timeout_s,
        max_output_bytes=OUTPUT_CAP,
    )
    output = f"$ {verifier.command}\n[{res.exit_code}] {res.stdout}{res.stderr}"[-4000:]
    if res.timed_out:
        return Verdict(0.0, f"{output}\n[verifier timed out after {verifier.timeout_s:g}s]")
    if verifier.results_file:
        data = await _read(sandbox, sandbox_id, verifier.results_file, RESULTS_CAP)
        if data is None:
            return Verdict(0.0, f"{output}\n[no test results in {verifier.results_file}]")
        results = parse_test_results(data.decode(errors="replace"))
        verdict = swe_reward(results, verifier.fail_to_pass, verifier.pass_to_pass)
        return Verdict(verdict.reward, f"{verdict.output}\n{output}"[-4000:])
    for path in verifier.reward_files:
        data = await _read(sandbox, sandbox_id, path)
        if data is not None:
            reward = parse_reward_file(path, data)
            return Verdict(reward, f"{output}\n[reward {reward:g} from {path}]"[-4000:])
    return Verdict(1.0 if res.exit_code == 0 else 0.0, f"{output}\n[reward from exit code {res.exit_code}]")
