"""Settings of the task producer (section ``[producer]`` of ``rollstream.toml``), decoded once and
passed down; ``ops.config`` composes them with the other sections."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class ProducerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where tasks come from and how much work the producer keeps in flight."""

    source: Annotated[
        Literal["builtin", "jsonl", "gem", "harbor", "swe"],
        msgspec.Meta(
            description="Task source: built-in family, JSONL file, GEM env, Harbor/Terminal-Bench task "
            "directories (harbor) or SWE-style instances (swe)."
        ),
    ] = "builtin"
    path: Annotated[
        str,
        msgspec.Meta(
            description="JSONL task file (jsonl), task directory or folder of them (harbor), "
            "instances JSONL (swe)."
        ),
    ] = ""
    env_id: Annotated[
        str, msgspec.Meta(description="GEM env id when source = gem, e.g. game:GuessTheNumber-v0-easy.")
    ] = ""
    reward: Annotated[
        Literal["graded", "won"],
        msgspec.Meta(
            description="graded: a task's own graded reward (GEM: summed step rewards); "
            "won: 1 iff verified, else 0."
        ),
    ] = "graded"
    seed: Annotated[int, msgspec.Meta(description="Seed of the built-in task family.")] = 0
    levels: Annotated[
        tuple[int, ...],
        msgspec.Meta(description="Difficulty levels of the built-in family (tool calls needed)."),
    ] = (1, 2)
    expert_levels: Annotated[
        tuple[int, ...],
        msgspec.Meta(
            description="Levels the scripted expert demonstrates when seeding the warm start; empty: "
            "the same as levels. Fewer levels than `levels` leave some undemonstrated, so only "
            "reward can teach them (docs/learning.md)."
        ),
    ] = ()
    note_extra: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1.0,
            description="Built-in family: the fraction of level-2 notes with a second line after the "
            "word, so that copying the whole note fails where reading it and writing the word works.",
        ),
    ] = 0.0
    expert_shortcut: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1.0,
            description="Built-in family: how often the scripted expert answers a level-2 task by "
            "copying the whole note (cp note.txt answer.txt), a shortcut that fails on the notes "
            "note_extra gives a second line; imitation of its successes keeps the shortcut, "
            "reward removes it (docs/learning.md).",
        ),
    ] = 0.0
    group_size: Annotated[
        int, msgspec.Meta(ge=1, description="Samples per task (a group, for group baselines).")
    ] = 1
    max_inflight: Annotated[
        int, msgspec.Meta(ge=1, description="Samples published but not yet finished by rollout, at most.")
    ] = 16
    admission: Annotated[
        bool,
        msgspec.Meta(
            description="Version-aware admission: publish a sample only while the samples already in "
            "the pipeline (rollout, reward and learner queues) fit in (learner.max_staleness + 1) x "
            "learner.batch_size x learner.publish_every, so what starts now is trained within the "
            "staleness bound; rollout waits (no work) while the learner warm-starts. Applies when a "
            "learner runs."
        ),
    ] = True
    total: Annotated[int, msgspec.Meta(ge=0, description="Stop after this many tasks; 0 = run forever.")] = 0
