"""Settings of background evaluation (``[eval]`` in rollstream.toml; ``rollstream eval`` flags)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class EvalSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Evaluate every ``every``-th policy version of the run on a held-out task set, in the
    background of ``just up``, on a sandboxd of its own (``concurrency`` sandboxes at most)."""

    tasks: Annotated[
        str, msgspec.Meta(description="Held-out task set: a task directory, a folder of them or a SWE JSONL.")
    ] = ""
    every: Annotated[
        int, msgspec.Meta(ge=0, description="Evaluate each published version divisible by this; 0 = off.")
    ] = 0
    k: Annotated[
        int, msgspec.Meta(ge=1, description="Attempts per task (pass@1 and pass@k are reported).")
    ] = 4
    concurrency: Annotated[
        int, msgspec.Meta(ge=1, description="Attempts at once (the evaluator's own sandbox budget).")
    ] = 2
    pass_threshold: Annotated[
        float, msgspec.Meta(description="An attempt passes when its reward is at least this.")
    ] = 1.0
    poll_s: Annotated[float, msgspec.Meta(gt=0, description="Seconds between looks for new checkpoints.")] = (
        10.0
    )
    build_network: Annotated[
        Literal["none", "default"],
        msgspec.Meta(description="Network of task image builds: none (offline) or default."),
    ] = "none"
