"""A mini-swe-agent environment whose commands run in the episode's rollstream sandbox.

mini-swe-agent (``pip install mini-swe-agent``) runs an action's shell command through its
*environment*; its ``local`` environment would run the policy's commands on the host. Point it
here instead (``--environment-class agent_harness.mini_swe_env.RollstreamEnvironment``): every
command goes through ``agent_harness.rs_exec`` to the episode's sandbox, as the agent uid. This
module imports mini-swe-agent only when an action submits, so rollstream does not depend on it.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from agent_harness.rs_exec import run_command

SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"


class RollstreamEnvironment:
    """mini-swe-agent's ``Environment`` protocol over the runner's exec endpoint."""

    def __init__(
        self, *, cwd: str = "", env: dict[str, str] | None = None, timeout: int = 30, **_: Any
    ) -> None:
        self.cwd = cwd or os.environ.get("ROLLSTREAM_WORKDIR", "")
        self.env = dict(env or {})
        self.timeout = timeout
        self.config = {"cwd": self.cwd, "env": self.env, "timeout": timeout}

    def execute(self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        command = str(action.get("command", ""))
        where = cwd or self.cwd
        exports = "".join(f"export {k}={_quote(v)}; " for k, v in self.env.items())
        line = f"{exports}cd {_quote(where)} && {command}" if where else exports + command
        try:
            res = run_command(line, float(timeout or self.timeout))
        except OSError as exc:
            return {"output": "", "returncode": -1, "exception_info": f"the sandbox is not reachable: {exc}"}
        info = "the command timed out" if res.get("timed_out") else ""
        output = {
            "output": res["stdout"] + res["stderr"],
            "returncode": res["exit_code"],
            "exception_info": info,
        }
        self._check_finished(output)
        return output

    def _check_finished(self, output: dict[str, Any]) -> None:
        lines = output["output"].lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT_MARKER and output["returncode"] == 0:
            from minisweagent.exceptions import Submitted

            submission = "".join(lines[1:])
            raise Submitted(
                {
                    "role": "exit",
                    "content": submission,
                    "extra": {"exit_status": "Submitted", "submission": submission},
                }
            )

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return {**self.config, **platform.uname()._asdict(), **kwargs}

    def serialize(self) -> dict[str, Any]:
        kind = f"{type(self).__module__}.{type(self).__name__}"
        return {"info": {"config": {"environment": dict(self.config), "environment_type": kind}}}


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
