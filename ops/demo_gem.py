"""The learning demonstration on a GEM game: ``game:GuessTheNumber-v0-easy`` (1..10, 4 turns).

One command (real nats-server, real Docker sandboxes of the ``gem`` image, real torch)::

    python -m ops.demo_gem --out demo-gem      # 45 minutes on 2 cores

It is ``ops.demo`` (one driver for every task family) with the GEM family and this plan:

0. **Floor**: the expert at error rate 1.0 guesses uniformly at random (~34 % wins).
1. **Seed**: a binary-search expert that, at every turn, guesses at random instead with
   probability ``error_rate`` (so ~70 % wins at 0.3) plays expert tasks; its scored trajectories
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
    minutes: float = 45.0  # ~10 to seed, warm-start and evaluate it, ~30 online, ~3 to evaluate
    seed_episodes: int = 120
    error_rate: float = 0.3  # per turn: a random guess instead of the binary-search one
    # the rate decaying to a tenth (as the files demo): 150 steps at a constant 3e-3 left the warm
    # start at 50-52 %, 400 decaying ones at 70-72 % (about the expert's own rate)
    sft_steps: int = 400
    sft_batch: int = 8
    sft_lr: float = 3e-3
    sft_final_lr: float = 0.1
    note_extra: float = 0.0  # the files family's knobs do not apply
    expert_shortcut: float = 0.0
    eval_episodes: int = 256  # 95 % interval about ±5.5 points at 70 %
    random_episodes: int = 64
    runs: tuple[str, ...] = ("ipa",)  # add "grpo" for the token-level GRPO baseline
    reward: str = "won"  # "won": 1 iff won, else 0; "graded": GEM's summed reward
    # an act call is ~23 tokens; a prompt ~505 and a turn ~85, so 12 turns of junk still fit
    harness: dict[str, Any] = field(
        default_factory=lambda: {"max_new_tokens_per_turn": 32, "max_total_tokens": 1400}
    )
    # Measured here (README, Learning): with group-normalised advantages (lr 3e-4) the failures'
    # negative weight eroded the call format (parse errors 1 % -> 20 % of calls in 20 versions,
    # wins 68 % -> 49 %); without a baseline at lr 1e-3, batch 8 the win rate rose for ten versions
    # and then wandered down (75 % -> 36 %). So: reward 1 iff won, no baseline (a REINFORCE
    # gradient of the win rate: the policy imitates its own wins, failures carry no gradient),
    # parse errors masked (a won episode never reinforces its malformed turns), a small rate and
    # batches of four whole groups, so that each step averages out the noise of a few games.
    rl: dict[str, Any] = field(
        default_factory=lambda: {
            "lr": 2e-4,
            "batch_size": 16,
            "batch_timeout_s": 15.0,
            "group_timeout_s": 15.0,
            "max_staleness": 2,
            "group_baseline": False,
            "dynamic_sampling": False,  # without a baseline an all-won group still carries signal
            "mask_errors": True,
            "checkpoint_every": 1,
        }
    )


def main(argv: Sequence[str] | None = None) -> None:
    demo_main(argv, GemPlan(), out="demo-gem")


if __name__ == "__main__":
    main()
