"""Verification of imported tasks (Harbor, Terminal-Bench, SWE-style): ``Task.verifier``.

Runs after the agent's last command, in the episode's sandbox, through sandboxd's ``verify`` (see
docs/security.md): every agent process is killed and the sandbox sealed; sandboxd, as root through
fresh ``docker exec``s, empties the ``clear`` directories (``/tests``, ``/logs/verifier``) so the
agent cannot plant a test or a reward file, and writes the verifier's files (they never enter the
sandbox before, nor the prompt); the command runs as the verifier uid (``rs-verify``, clean
environment) in the task's working directory; then the reward is read (``result_path``):

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
import shlex
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from schemas.sandbox import VerifyResult
from schemas.task import Task, Verifier

OUTPUT_CAP = 16384
RESULTS_CAP = 1 << 20
RESULT_DIR = "/logs/rollstream"  # emptied by sandboxd after the seal, then the verifier's alone
RESULT = f"{RESULT_DIR}/result"


class VerifierBroken(Exception):
    """The verifier itself failed (unparseable reward, cannot stage its files): not the agent's doing."""


class VerifySandbox(Protocol):
    """The part of ``sandboxd.client.SandboxClient`` verification uses."""

    async def verify(
        self,
        sandbox_id: str,
        commands: list[str],
        *,
        timeout_s: float = ...,
        max_output_bytes: int = ...,
        cwd: str = ...,
        env: dict[str, str] | None = ...,
        result_path: str = ...,
        close: bool = ...,
        clear: list[str] | None = ...,
        files: dict[str, bytes] | None = ...,
    ) -> VerifyResult: ...


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


def wrapped(verifier: Verifier) -> str:
    """The verifier's command, then a copy of its first reward file (or its results file) to
    ``RESULT``, headed by that file's path: sandboxd's ``verify`` reads one ``result_path``. The
    command's exit code is kept (the verdict when no reward file exists)."""
    found = [verifier.results_file] if verifier.results_file else list(verifier.reward_files)
    paths = " ".join(shlex.quote(p) for p in found)
    return (
        f"( {verifier.command}\n)\nrc=$?\n"
        f'for f in {paths}; do if [ -f "$f" ]; then '
        f'{{ printf \'%s\\n\' "$f"; head -c {RESULTS_CAP} -- "$f"; }} >{RESULT}; break; fi; done\n'
        "exit $rc"
    )


def found_file(data: bytes | None) -> tuple[str, bytes] | None:
    """(path, bytes) of the file ``wrapped`` copied, or None when there was none."""
    if not data:
        return None
    path, _, body = data.partition(b"\n")
    return path.decode(errors="replace"), body


async def verify_task(sandbox: VerifySandbox, sandbox_id: str, task: Task) -> Verdict:
    """Verify ``task`` (which has a ``verifier``) in ``sandbox_id`` through sandboxd's ``verify``:
    the agent's processes are ended first, then sandboxd (as root) empties the ``clear``
    directories and places the verifier's files, then the command runs as the verifier uid in
    fresh ``docker exec``s (never the agent's session); the sandbox is removed afterwards."""
    verifier = task.verifier
    assert verifier is not None
    res = await sandbox.verify(
        sandbox_id,
        [wrapped(verifier)],
        timeout_s=verifier.timeout_s,
        max_output_bytes=OUTPUT_CAP,
        cwd=task.workdir,
        env=dict(verifier.env),
        result_path=RESULT,
        clear=[*verifier.clear, RESULT_DIR],
        files=dict(verifier.files),
    )
    if not res.results:
        raise VerifierBroken("the verifier's command did not run")
    r = res.results[0]
    output = f"$ {verifier.command}\n[{r.exit_code}] {r.stdout}{r.stderr}"[-4000:]
    if r.timed_out:
        return Verdict(0.0, f"{output}\n[verifier timed out after {verifier.timeout_s:g}s]")
    found = found_file(res.result_data)
    if verifier.results_file:
        if found is None:
            return Verdict(0.0, f"{output}\n[no test results in {verifier.results_file}]")
        results = parse_test_results(found[1].decode(errors="replace"))
        verdict = swe_reward(results, verifier.fail_to_pass, verifier.pass_to_pass)
        return Verdict(verdict.reward, f"{verdict.output}\n{output}"[-4000:])
    if found is not None:
        reward = parse_reward_file(found[0], found[1])
        return Verdict(reward, f"{output}\n[reward {reward:g} from {found[0]}]"[-4000:])
    return Verdict(1.0 if r.exit_code == 0 else 0.0, f"{output}\n[reward from exit code {r.exit_code}]")
