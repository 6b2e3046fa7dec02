"""rs-exec: run one shell command in this episode's rollstream sandbox, from an agent on the host.

The agent runner writes this file, as it is, as the executable ``rs-exec`` on the agent program's
``PATH``; so it imports nothing but the standard library. It reads ``ROLLSTREAM_EXEC_URL`` and
``ROLLSTREAM_EXEC_TOKEN`` from its environment (the runner sets both), sends the command to the
proxy, which runs it with bash in the sandbox as the agent uid, and relays its output and exit
status (124 after a timeout, as coreutils ``timeout`` does). Usage::

    rs-exec 'ls -la'          # the arguments, joined by spaces, are the command
    rs-exec -c 'ls -la'       # so it also serves as a SHELL for programs that run "$SHELL -c cmd"
    echo 'ls -la' | rs-exec   # no arguments: the command is read from stdin
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

TIMED_OUT_STATUS = 124


def run_command(command: str, timeout_s: float = 0.0) -> dict[str, Any]:
    """Run ``command`` in the sandbox: ``{stdout, stderr, exit_code, timed_out}``."""
    body = json.dumps({"command": command, "timeout_s": timeout_s}).encode()
    request = urllib.request.Request(
        os.environ["ROLLSTREAM_EXEC_URL"],
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Rollstream-Exec-Token": os.environ["ROLLSTREAM_EXEC_TOKEN"],
        },
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    with opener.open(request, timeout=max(timeout_s, 600.0) + 60.0) as response:
        result: dict[str, Any] = json.load(response)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["-c"]:
        args = args[1:]
    command = " ".join(args) if args else sys.stdin.read()
    try:
        result = run_command(command, float(os.environ.get("ROLLSTREAM_EXEC_TIMEOUT", "0") or 0))
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        sys.stderr.write(f"rs-exec: the sandbox is not reachable: {exc}\n")
        return 255
    sys.stdout.write(result.get("stdout", ""))
    sys.stderr.write(result.get("stderr", ""))
    if result.get("timed_out"):
        return TIMED_OUT_STATUS
    return int(result.get("exit_code", 1))


if __name__ == "__main__":
    sys.exit(main())
