"""An agent program that runs *inside* the sandbox (``where = "sandbox"``): standard library only.

``python3 in_sandbox_agent.py PORT...``: asks the model once through ``OPENAI_BASE_URL`` (the
bridge to the proxy's socket), writes the answer, then probes what else it can reach (TCP to the
Docker host's gateway on each PORT and to public addresses, its network interfaces, the socket
directory) and writes what it found to ``/work/probe.json``. The runner tests copy it into the
sandbox with the task's setup.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request


def status(url: str, body: dict[str, object]) -> int:
    """The HTTP status of a JSON POST."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def main() -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.load(response)
    with open("answer.txt", "w") as out:
        out.write("apple\n")
    targets = [("172.17.0.1", int(p)) for p in sys.argv[1:]] + [("1.1.1.1", 443), ("8.8.8.8", 53)]
    targets += [("127.0.0.1", int(p)) for p in sys.argv[1:]]
    probes = {}
    for host, port in targets:
        try:
            socket.create_connection((host, port), timeout=2).close()
            probes[f"{host}:{port}"] = "open"
        except OSError as exc:
            probes[f"{host}:{port}"] = type(exc).__name__
    try:
        open("/run/rollstream/planted", "w").close()
        writable = True
    except OSError:
        writable = False
    found = {
        "reply": reply["object"],
        "probes": probes,
        "socket_dir_writable": writable,
        "socket_dir": sorted(os.listdir("/run/rollstream")),
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "docker_socket": os.path.exists("/var/run/docker.sock"),
        "uid": os.getuid(),
        # a session of its own, and one published with a reward it chose: both refused
        "unscoped_call": status(os.environ["OPENAI_BASE_URL"].split("/s/")[0] + "/v1/chat/completions", body),
        "forged_finish": status(
            os.environ["OPENAI_BASE_URL"].split("/s/")[0] + "/v1/rollstream/sessions/forged/finish",
            {"reward": 1},
        ),
    }
    with open("/work/probe.json", "w") as out:
        json.dump(found, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
