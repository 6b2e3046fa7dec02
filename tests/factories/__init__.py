"""Builders the tests share: tasks, chunks, trajectories, scored samples, train-log records and
lakes (``records``); tiny policies and exact-accounting checks (``policies``); sandboxd settings and
helpers on the real Docker engine (``sandboxes``); role sessions on a broker with credentials
(``roles``).

Plain functions, no fixtures: those are registered once, in ``tests/conftest.py`` and the plugin it
lists. Test modules import from ``tests.factories`` only, never from one another.
"""

from __future__ import annotations

from tests.factories.policies import (
    RecordingEngine,
    assert_exact_accounting,
    make_policy,
    make_tiny_policy,
    reference_logprobs,
    segment_rows,
    sequence_of,
    tiny_qwen2_config,
)
from tests.factories.records import (
    DAY,
    GUESS,
    GUESS_RANDOM,
    LEARNER_RUN,
    STALENESS_BOUND,
    chunk,
    fill,
    lake_trajectory,
    make_chunk,
    make_scored,
    make_step,
    make_task,
    make_train,
    read_train_log,
    sample,
    scored,
    scored_at,
    seeded_scored,
    task_sample,
    trajectory,
    write_lake,
)
from tests.factories.roles import (
    BROKER_RUN,
    DENY_TIMEOUT_S,
    Broker,
    Session,
    assert_denied,
    login,
    serve_sandbox_create,
)
from tests.factories.sandboxes import (
    EXPERT_SETTINGS,
    containers_of,
    expert_trajectory,
    passes,
    remove_container,
    run_concurrently,
    running_sandboxd,
    settings_for_tests,
    verified_episode,
)

__all__ = [
    "BROKER_RUN",
    "DAY",
    "DENY_TIMEOUT_S",
    "EXPERT_SETTINGS",
    "GUESS",
    "GUESS_RANDOM",
    "LEARNER_RUN",
    "STALENESS_BOUND",
    "Broker",
    "RecordingEngine",
    "Session",
    "assert_denied",
    "assert_exact_accounting",
    "chunk",
    "containers_of",
    "expert_trajectory",
    "fill",
    "lake_trajectory",
    "login",
    "make_chunk",
    "make_policy",
    "make_scored",
    "make_step",
    "make_task",
    "make_tiny_policy",
    "make_train",
    "passes",
    "read_train_log",
    "reference_logprobs",
    "remove_container",
    "run_concurrently",
    "running_sandboxd",
    "sample",
    "scored",
    "scored_at",
    "seeded_scored",
    "segment_rows",
    "sequence_of",
    "serve_sandbox_create",
    "settings_for_tests",
    "task_sample",
    "tiny_qwen2_config",
    "trajectory",
    "verified_episode",
    "write_lake",
]
