"""The scripted expert of the GEM family: ``game:GuessTheNumber-*`` by binary search.

A ``ScriptedEngine`` writing ``act`` calls. At every turn it guesses uniformly in the game's range
instead, with probability ``error_rate`` (0: it always wins; 1.0: a random player, the floor).
"""

from __future__ import annotations

import random
import re
from typing import Any

from agent_harness.scripted import ScriptedEngine, episode_body
from producers.families.gem.tools import act_call

_RANGE = re.compile(r"between (\d+) and (\d+)")
_HINT = re.compile(r"you guessed (\d+), and the target number is (higher|lower) than")


def game_range(context: str) -> tuple[int, int]:
    """The range the game announced in its first observation (1..100 if it said none)."""
    found = _RANGE.search(episode_body(context))
    return (int(found.group(1)), int(found.group(2))) if found else (1, 100)


def next_guess(context: str) -> int:
    """The binary-search guess given the episode so far (instruction and the game's hints)."""
    low, high = game_range(context)
    for guess, hint in _HINT.findall(episode_body(context)):
        if hint == "higher":
            low = max(low, int(guess) + 1)
        else:
            high = min(high, int(guess) - 1)
    return (low + max(low, high)) // 2


class GuessTheNumberExpert(ScriptedEngine):
    """Binary search through ``act`` calls, a uniform guess with probability ``error_rate``."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        error_rate: float = 0.0,
        seed: int = 0,
        version: int = 0,
        shortcut: float = 0.0,
    ) -> None:
        """``shortcut``: this family has none, it is accepted and ignored."""
        super().__init__(tokenizer=tokenizer, version=version)
        self.error_rate = error_rate
        self._rng = random.Random(seed)

    def next_action(self, context: str) -> str:
        guess = next_guess(context)
        if self.error_rate > 0 and self._rng.random() < self.error_rate:
            guess = self._rng.randint(*game_range(context))
        return act_call(f"\\boxed{{{guess}}}")
