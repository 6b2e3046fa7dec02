"""pass@k: the unbiased estimator of Chen et al. 2021 (HumanEval, "Evaluating Large Language Models
Trained on Code", section 2.1), averaged over tasks, with a 95 % interval.

For one task with ``n`` attempts of which ``c`` passed, the chance that at least one of ``k``
attempts drawn without replacement passes is

    pass@k = 1 - C(n - c, k) / C(n, k)

computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (no huge binomials); it is 1 when
``n - c < k``. Drawing ``k`` of ``n >= k`` attempts makes it unbiased, unlike ``1 - (1 - c/n)^k``.
The task set's pass@k is the mean over tasks. Its interval is the Wilson score interval of that
mean read as a success rate over the tasks (each task one trial): it stays inside [0, 1] and does
not collapse to a point at 0 or 1 for a handful of tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z95 = 1.959964


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one task with ``n`` attempts, ``c`` of them passed (needs ``k <= n``)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} attempts per task, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a rate ``p`` observed over ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Estimate:
    """pass@k of a task set: the mean over ``tasks`` tasks and its 95 % interval."""

    k: int
    value: float
    low: float
    high: float
    tasks: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def estimate(outcomes: Mapping[str, Sequence[bool]], k: int) -> Estimate:
    """pass@k over tasks from each task's attempts (True = passed); every task needs >= k attempts."""
    if not outcomes:
        raise ValueError("pass@k of an empty task set")
    per_task = [pass_at_k(len(a), sum(a), k) for a in outcomes.values()]
    value = sum(per_task) / len(per_task)
    low, high = wilson(value, len(per_task))
    return Estimate(k=k, value=value, low=min(low, value), high=max(high, value), tasks=len(per_task))
