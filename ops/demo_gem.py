"""The learning demonstration on a GEM game: ``game:GuessTheNumber-v0-easy`` (1..10, 4 turns).

One command (real nats-server, real Docker sandboxes of the ``gem`` image, real torch)::

    python -m ops.demo_gem --minutes 20 --out demo-gem

It is ``ops.demo`` (one driver for every task family) with the GEM family and this plan:

0. **Floor**: the expert at error rate 1.0 guesses uniformly at random (~34 % wins).
1. **Seed**: a binary-search expert that, at every turn, guesses at random instead with
   probability ``error_rate`` (so ~77 % wins at 0.3) plays expert tasks; its scored trajectories
   land in the lake (run ``seed``, ``source = 'expert'``, ``replay_mode = 'sft'``).
2. **Warm start**: the tiny policy imitates the expert's *won* episodes (SFT).
3. **Online RL** from the warm start with the real workers (producer with ``source = gem``,
   rollout, reward, learner, lake): IPA, then GRPO when ``runs`` holds it.
4. **Evaluation** of the warm and final policies on the same held-out tasks, same temperature.

Success means *won*. GEM's graded reward gives a lost game partial credit (``1 - distance / 9`` at
the last turn), so ``reward > 0`` would count close losses, and trained on, it taught the policy to
lose close: with IPA, no baseline, lr 1e-3, the rollouts' win rate fell 39 % -> 21 % -> 15 % while
their mean graded reward held ~0.65, then the policy collapsed into one malformed call (reward 0:
no gradient any more). So by default (``reward = "won"``, i.e. ``producer.reward``) every task here
is scored 1 iff won (``producers.families.gem.won_only``). GuessTheNumber-easy has only ten
targets, so "held-out" means other seeds of the same ten games.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ops.demo import DemoPlan
from ops.demo_cli import main as demo_main

GUESS_EASY = "game:GuessTheNumber-v0-easy"


@dataclass(frozen=True)
class GemPlan(DemoPlan):
    """``DemoPlan`` for a GEM game; the defaults are the settings whose figures are reported."""

    family: str = "gem"
    env_id: str = GUESS_EASY
    seed_episodes: int = 120
    error_rate: float = 0.3  # per turn: a random guess instead of the binary-search one
    sft_steps: int = 150  # loss ~0.06 by then; a step of 8 takes ~0.7 s on a loaded core
    sft_batch: int = 8
    sft_lr: float = 3e-3
    sft_final_lr: float = 1.0
    note_extra: float = 0.0  # the files family's knobs do not apply
    expert_shortcut: float = 0.0
    eval_episodes: int = 64
    random_episodes: int = 64
    runs: tuple[str, ...] = ("ipa",)  # add "grpo" for the token-level GRPO baseline
    reward: str = "won"  # "won": 1 iff won, else 0; "graded": GEM's summed reward
    # an act call is ~23 tokens; a prompt ~505 and a turn ~85, so 12 turns of junk still fit
    harness: dict[str, Any] = field(
        default_factory=lambda: {"max_new_tokens_per_turn": 32, "max_total_tokens": 1400}
    )
    # Measured here (details in the module docstring): group-normalised advantages collapsed the
    # tiny policy into unparseable calls (then every group scores 0 alike and nothing moves again);
    # GEM's graded reward without a baseline reinforced close losses until wins fell 39 % -> 0 %.
    # So: reward 1 iff won, no baseline (failures carry no gradient: self-imitation of wins), and
    # parse errors masked so that a won episode never reinforces its malformed turns.
    rl: dict[str, Any] = field(
        default_factory=lambda: {
            "lr": 1e-3,
            "batch_size": 8,
            "batch_timeout_s": 15.0,
            "group_timeout_s": 15.0,
            "max_staleness": 2,
            "group_baseline": False,
            "mask_errors": True,
            "checkpoint_every": 1,
        }
    )


def main(argv: Sequence[str] | None = None) -> None:
    demo_main(argv, GemPlan(), out="demo-gem")


if __name__ == "__main__":
    main()
