"""rs-bridge: inside a sandbox, a loopback TCP port that forwards to the model socket.

An agent program run *in* the sandbox (``[rollout.agent_command] where = "sandbox"``) has no network
(``NetworkMode=none``); its one route out is the proxy's unix socket that sandboxd mounts at
``/run/rollstream`` (``sandboxd/model_socket.py``). Clients that speak HTTP over TCP only (the
``openai`` package, litellm) reach it through this forwarder, which the runner starts in the
sandbox before the program (as the agent uid) and stops after it: ``python3 rs-bridge.py PORT
SOCKET``. Standard library only, since it runs on the sandbox's Python.
"""

from __future__ import annotations

import socket
import sys
import threading

BUFFER = 65536


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(BUFFER):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _relay(conn: socket.socket, path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(path)
    except OSError:
        conn.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
    back.start()
    _pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def serve(port: int, path: str) -> None:
    """Accept on 127.0.0.1:``port`` forever; each connection is relayed to the unix socket ``path``."""
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_relay, args=(conn, path), daemon=True).start()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
