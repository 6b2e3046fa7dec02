"""SWE-style instances: one JSON object per line of a JSONL file, in SWE-bench's field names.

===================  =====================================================================
``instance_id``       the task id
``repo``              a git repository: a path (relative to the JSONL file) or a URL
``base_commit``       the commit the agent starts from (checked out at ``workdir``)
``problem_statement`` what the agent is asked
``test_command``      how one test runs, in ``workdir``: with ``{test}``, once per test id (exit code
                      0 = passed); without it, once for all (``{tests}``: the ids), printing
                      ``PASSED <id>`` / ``FAILED <id>`` lines as ``pytest -rA`` does
``FAIL_TO_PASS``      tests the change must make pass (a list, or a JSON string of one)
``PASS_TO_PASS``      tests that must keep passing
``patch``             the reference (gold) patch, optional: the oracle
``test_patch``        optional: applied before the tests run (hidden tests stay out of the episode)
``image``             optional: the environment's base image (default ``rollstream-env/base``)
``workdir``           optional: where the repository is checked out (default ``/testbed``)
``agent_timeout_sec``, ``test_timeout_sec``  optional limits (600, 60 per test)
===================  =====================================================================

Reward 1.0 iff every FAIL_TO_PASS test passes and no PASS_TO_PASS test breaks.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
AbsPath = Annotated[str, msgspec.Meta(pattern=r"^/[^\s]*$")]
TaskName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")]


class SweInstance(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=False,
    rename={
        "fail_to_pass": "FAIL_TO_PASS",
        "pass_to_pass": "PASS_TO_PASS",
    },
):
    """One line of an instances file (unknown SWE-bench fields such as ``version`` are ignored)."""

    instance_id: TaskName
    repo: NonEmpty
    base_commit: NonEmpty
    problem_statement: NonEmpty
    test_command: NonEmpty
    fail_to_pass: list[str] | str
    pass_to_pass: list[str] | str = []
    patch: str = ""
    test_patch: str = ""
    image: str = "rollstream-env/base"
    workdir: AbsPath = "/testbed"
    agent_timeout_sec: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    test_timeout_sec: Annotated[float, msgspec.Meta(gt=0)] = 60.0


def test_ids(value: list[str] | str, field: str) -> list[str]:
    """A test list as SWE-bench stores it (a list, or a JSON string of one); raises ValueError."""
    if isinstance(value, str):
        try:
            value = msgspec.json.decode(value or "[]", type=list[str])
        except msgspec.DecodeError as exc:
            raise ValueError(f"{field} must be a list of test ids (or a JSON string of one): {exc}") from None
    if any(not t.strip() or "\n" in t for t in value):
        raise ValueError(f"{field} holds an empty or multi-line test id")
    return list(value)
