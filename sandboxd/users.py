"""The uids inside a sandbox. sandboxd itself (the session driver, file and seal helpers) runs as
root without capabilities beyond setuid/setgid/kill; the agent's commands run as ``agent``; the
verifier's commands as ``rs-verify``. Neither of the two can signal, trace or read the other's
processes, nor any root process: the kernel's uid checks, since no capability is left to them."""

from __future__ import annotations

AGENT_USER = "agent"
AGENT_UID = AGENT_GID = 1000
AGENT_HOME = "/work"
VERIFIER_USER = "rs-verify"
VERIFIER_UID = VERIFIER_GID = 1001
