"""GEM environments in sandboxes: ``reset(seed)`` / ``step(action)`` as ROCK's GEM API has them.

The environment runs inside a sandbox of the ``gem`` EnvHub image (``sandboxd/envs/gem.toml``)
through ``/opt/gem_driver.py`` (this package's ``driver.py``); every call is one ``exec`` of the
driver, which keeps the episode's state in the sandbox's /work between calls. Only the public
``SandboxClient`` API is used, so the same commands also serve the agent loop's ``act`` tool and
the verifier (``VERIFY_COMMAND``).
"""

from __future__ import annotations

import shlex
from types import TracebackType
from typing import Any, TypeVar

import msgspec

from producers.families.base import TaskSandbox
from schemas.sandbox import ExecResult

ENVIRONMENT = "gem"
DRIVER = "/opt/gem_driver.py"
RESULT_PATH = "/work/.gem/result.json"
VERIFY_COMMAND = f"python3 {DRIVER} verify"  # exits 0 iff the episode was won
DRIVER_ERROR_EXIT = 3
DEFAULT_TIMEOUT_S = 30.0

T = TypeVar("T")


class GemError(Exception):
    """A GEM call failed. ``kind``: ``unknown_env``, ``unavailable`` (the image lacks what the env
    imports), ``no_episode``, ``episode_over``, ``env_error`` (the env raised), ``bad_request``,
    ``driver_failed`` (no answer from the driver) or ``timeout``."""

    def __init__(self, kind: str, message: str, *, env_id: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.env_id = env_id


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    """What ``step`` returns: GEM's five values, plus the episode's running totals."""

    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any] = {}
    total_reward: float = 0.0
    steps: int = 0

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class EpisodeResult(msgspec.Struct, frozen=True, kw_only=True):
    """The result the driver keeps in ``RESULT_PATH`` (and ``verify`` prints)."""

    env_id: str
    seed: int
    steps: int
    total_reward: float
    terminated: bool
    truncated: bool
    won: bool


class _Reset(msgspec.Struct, frozen=True):
    observation: str
    info: dict[str, Any] = {}


class _Observed(msgspec.Struct, frozen=True):
    seed: int
    observation: str
    info: dict[str, Any] = {}


class _Observations(msgspec.Struct, frozen=True):
    observations: list[_Observed]


class _EnvIds(msgspec.Struct, frozen=True):
    env_ids: list[str]


class _Fault(msgspec.Struct, frozen=True):
    error: str
    message: str


def reset_command(env_id: str, seed: int) -> str:
    return f"python3 {DRIVER} reset {shlex.quote(env_id)} {int(seed)}"


def step_command(action: str) -> str:
    # -S: no site packages, a fast start; the driver forwards the step to the episode's resident
    # process (started by reset) and re-executes itself normally only when none answers.
    return f"python3 -S {DRIVER} step {shlex.quote(action)}"


def stop_command() -> str:
    """Stop the episode's resident GEM process (the saved episode stays for verification)."""
    return f"python3 -S {DRIVER} stop"


def observe_command(env_id: str, seeds: list[int]) -> str:
    return f"python3 {DRIVER} observe {shlex.quote(env_id)} {' '.join(str(int(s)) for s in seeds)}"


def decode_answer(
    result: ExecResult, into: type[T], *, env_id: str = "", ok_codes: tuple[int, ...] = (0,)
) -> T:
    """The driver's JSON answer (its last stdout line) as ``into``; a fault raises ``GemError``."""
    if result.timed_out:
        raise GemError(
            "timeout", f"the GEM driver did not answer in time: {result.stderr[-300:]}", env_id=env_id
        )
    lines = result.stdout.strip().splitlines()
    last = lines[-1].encode() if lines else b""
    if result.exit_code == DRIVER_ERROR_EXIT:
        try:
            fault = msgspec.json.decode(last, type=_Fault)
        except msgspec.DecodeError:
            fault = _Fault("driver_failed", result.stdout[-300:] + result.stderr[-300:])
        raise GemError(fault.error, fault.message, env_id=env_id)
    if result.exit_code not in ok_codes:
        detail = (result.stderr or result.stdout).strip()[-500:]
        raise GemError(
            "driver_failed", f"the GEM driver exited with {result.exit_code}: {detail}", env_id=env_id
        )
    try:
        return msgspec.json.decode(last, type=into)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise GemError(
            "driver_failed", f"unreadable answer from the GEM driver ({exc}): {last[:300]!r}"
        ) from exc


class GemSession:
    """One GEM environment in one sandbox. ``open`` creates the sandbox; ``close`` removes it.

    >>> async with await GemSession.open(client, "game:GuessTheNumber-v0-easy") as env:
    ...     observation, info = await env.reset(seed=0)
    ...     result = await env.step("\\\\boxed{5}")
    """

    def __init__(
        self, sandbox: TaskSandbox, sandbox_id: str, env_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.sandbox = sandbox
        self.sandbox_id = sandbox_id
        self.env_id = env_id
        self.timeout_s = timeout_s

    @classmethod
    async def open(
        cls,
        sandbox: TaskSandbox,
        env_id: str,
        *,
        environment: str = ENVIRONMENT,
        ttl_s: float | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> GemSession:
        created = await sandbox.create(environment, ttl_s=ttl_s)
        return cls(sandbox, created.sandbox_id, env_id, timeout_s=timeout_s)

    async def reset(self, seed: int) -> tuple[str, dict[str, Any]]:
        """Make the env (an unknown id raises ``GemError`` of kind ``unknown_env``) and reset it."""
        answer = await self._call(reset_command(self.env_id, seed), _Reset)
        return answer.observation, answer.info

    async def step(self, action: str) -> StepResult:
        return await self._call(step_command(action), StepResult)

    async def observe(self, seeds: list[int]) -> list[tuple[int, str]]:
        """Initial observations for ``seeds`` (each as ``reset(seed)`` gives it), nothing kept."""
        answer = await self._call(observe_command(self.env_id, seeds), _Observations)
        return [(o.seed, o.observation) for o in answer.observations]

    async def result(self) -> EpisodeResult:
        """The episode so far; ``won`` is what ``VERIFY_COMMAND``'s exit code says."""
        return await self._call(VERIFY_COMMAND, EpisodeResult, ok_codes=(0, 1))

    async def env_ids(self) -> list[str]:
        """Every id the image's GEM registers (including ids whose imports the image lacks)."""
        return (await self._call(f"python3 {DRIVER} list", _EnvIds)).env_ids

    async def close(self) -> None:
        await self.sandbox.close(self.sandbox_id)

    async def __aenter__(self) -> GemSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, command: str, into: type[T], *, ok_codes: tuple[int, ...] = (0,)) -> T:
        result = await self.sandbox.exec(self.sandbox_id, command, timeout_s=self.timeout_s)
        return decode_answer(result, into, env_id=self.env_id, ok_codes=ok_codes)
