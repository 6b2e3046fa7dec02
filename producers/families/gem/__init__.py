"""The GEM family: any GEM env id as tasks, played in sandboxes of the ``gem`` image.

``api`` is GEM's ``reset``/``step`` through the in-sandbox ``driver``; ``tasks`` makes tasks (their
family is ``gem:<env id>``), ``tools`` is the ``act`` tool their episodes offer, ``expert`` plays
``game:GuessTheNumber-*`` by binary search.
"""

from __future__ import annotations

from producers.families.base import Family
from producers.families.gem.expert import GuessTheNumberExpert, next_guess
from producers.families.gem.tasks import FAMILY, family_of, gem_task, gem_tasks, make_tasks, won_only
from producers.families.gem.tools import GemToolRegistry, act_call, gem_tools

GEM = Family(
    name=FAMILY,
    source="gem",
    make_tasks=make_tasks,
    tools=gem_tools,
    expert=GuessTheNumberExpert,
    batch=16,
)

__all__ = [
    "GEM",
    "GemToolRegistry",
    "GuessTheNumberExpert",
    "act_call",
    "family_of",
    "gem_task",
    "gem_tasks",
    "next_guess",
    "won_only",
]
