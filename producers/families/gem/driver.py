"""GEM driver: runs INSIDE a ``gem`` sandbox (installed as /opt/gem_driver.py by sandboxd/envs/gem.toml).

The episode's environment lives in one **resident process** (``serve``), started by ``reset`` and
listening on a unix socket under /work/.gem: ``reset``, ``step`` and ``verify`` calls are forwarded to
it, so a ``step`` costs a socket round trip and a ``python3 -S`` start (~20 ms) instead of starting
Python with its site packages and importing GEM (~0.5 s). After every call the environment is also
saved as a pickle (the env object plus the global ``random``/``numpy`` states GEM games draw from):
when no server answers (it was killed, the sandbox was rebuilt), a call runs in its own process
from the pickle, exactly as before. Commands, each answering one JSON object on the last line of
stdout (GEM's own logs go to stderr):

    reset ENV_ID SEED       make the env, reset(seed), save it      -> {"observation", "info"}
    step ACTION             load, step(ACTION), save                -> {"observation", "reward", ...}
    observe ENV_ID SEED...  initial observations, nothing saved     -> {"observations": [...]}
    verify                  exit 0 iff the episode was won          -> the episode's result
    list                    the env ids this image holds            -> {"env_ids": [...]}
    serve                   the resident process (started by reset; exits after IDLE_S idle)
    stop                    end the resident process, if one runs   -> {"stopped": bool}

Failures exit with 3 and answer ``{"error": <kind>, "message": ...}``. Won means: the game ended
(terminated, not truncated) with a positive last reward; the episode's reward is the sum of its
step rewards (written to /work/.gem/result.json after every call).

``import gem`` imports ``reasoning_gym`` (and sympy, matplotlib: ~1 s) only to register ``rg:*``
ids; for any other id a stand-in with no datasets is imported instead (~0.15 s per call).
"""

from __future__ import annotations

# Only what a forwarded call needs is imported here: ``step`` runs as ``python3 -S`` (no site
# packages) and must start fast. Everything else is imported where it is used.
import json
import os
import socket
import sys
from typing import Any

# This file's folder must not shadow what GEM imports (in the repo it holds the family's modules).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

STATE_DIR = os.environ.get("GEM_STATE_DIR", "/work/.gem")
STATE = os.path.join(STATE_DIR, "state.pkl")
RESULT = os.path.join(STATE_DIR, "result.json")
ENV_ID = os.path.join(STATE_DIR, "env_id")
SOCKET = os.path.join(STATE_DIR, "driver.sock")
ERROR_EXIT = 3
IDLE_S = 1800.0  # the resident process exits after this long without a call
SERVER_START_S = 20.0  # how long reset waits for a freshly started server's socket
# ``verify`` is never forwarded: the verifier reads the result file itself, whatever runs in the
# sandbox (it runs as another user after the agent's processes, the server included, are killed).
FORWARDED = ("reset", "step")
_HAS_RG = [False]  # whether reasoning_gym is installed (set on the first import)


class DriverError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _import_gem(want_reasoning_gym: bool) -> tuple[Any, dict[str, Any], bool]:
    """GEM, its env registry, and whether the real ``reasoning_gym`` is installed."""
    if "gem.envs.registration" in sys.modules:  # imported already (observe makes several envs)
        registration = sys.modules["gem.envs.registration"]
        return sys.modules["gem"], registration.ENV_REGISTRY, _HAS_RG[0]
    import importlib.util
    import types

    real = importlib.util.find_spec("reasoning_gym") is not None
    _HAS_RG[0] = real
    if not (want_reasoning_gym and real):
        stub = types.ModuleType("reasoning_gym")
        vars(stub)["factory"] = types.SimpleNamespace(DATASETS={})
        sys.modules["reasoning_gym"] = stub
    import gem.envs.registration

    return gem, gem.envs.registration.ENV_REGISTRY, real


def _unknown(env_id: str, registry: dict[str, Any], has_rg: bool) -> DriverError:
    import difflib
    import re

    ids = sorted(registry)
    prefix = env_id.split(":", 1)[0] + ":"
    same = [i for i in ids if i.startswith(prefix)] or [i for i in ids if i.startswith("game:")] or ids
    families = list(dict.fromkeys(re.sub(r"(-v\d+)-[^-]+$", r"\1-*", i) for i in same))
    close = difflib.get_close_matches(env_id, ids, n=3, cutoff=0.75)
    message = f"unknown GEM env id {env_id!r}; "
    if close:
        message += f"did you mean {', '.join(close)}? "
    message += f"known ids include {', '.join(families[:12])} ({len(ids)} registered)"
    if env_id.startswith("rg:") and not has_rg:
        message += "; rg:* ids need reasoning_gym, which this image does not hold"
    return DriverError("unknown_env", message)


def _make(env_id: str, seed: int) -> Any:
    gem, registry, has_rg = _import_gem(env_id.startswith("rg:"))
    if env_id not in registry:
        raise _unknown(env_id, registry, has_rg)
    _seed_globals(seed)
    try:
        return gem.make(env_id)
    except ImportError as exc:
        raise DriverError("unavailable", f"GEM env {env_id!r} cannot run in this image: {exc}") from exc


def _seed_globals(seed: int) -> None:
    import random

    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


def _global_rng() -> dict[str, Any]:
    import random

    numpy = sys.modules.get("numpy")
    return {"random": random.getstate(), "numpy": numpy.random.get_state() if numpy else None}


def _restore_rng(state: dict[str, Any]) -> None:
    import random

    random.setstate(state["random"])
    if state["numpy"] is not None:
        import numpy

        numpy.random.set_state(state["numpy"])


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


_LIVE: dict[str, Any] = {}  # in the resident process: the episode as last saved, and its file's stamp


def _stamp() -> tuple[int, int] | None:
    try:
        st = os.stat(STATE)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def _save(episode: dict[str, Any]) -> None:
    import pickle

    os.makedirs(STATE_DIR, exist_ok=True)
    # Read before unpickling: the episode must import what it was saved with (stand-in or not).
    _atomic_write(ENV_ID, episode["env_id"].encode())
    _atomic_write(STATE, pickle.dumps({**episode, "rng": _global_rng()}))
    result = {k: episode[k] for k in ("env_id", "seed", "steps", "total_reward", "terminated", "truncated")}
    result["won"] = _won(episode)
    _atomic_write(RESULT, json.dumps(result).encode())
    _LIVE.update(episode=episode, stamp=_stamp())


def _won(episode: dict[str, Any]) -> bool:
    return bool(episode["terminated"] and not episode["truncated"] and episode["last_reward"] > 0)


def cmd_reset(env_id: str, seed: int) -> dict[str, Any]:
    env = _make(env_id, seed)
    observation, info = env.reset(seed=seed)
    episode = {
        "env_id": env_id,
        "seed": seed,
        "env": env,
        "steps": 0,
        "total_reward": 0.0,
        "last_reward": 0.0,
        "terminated": False,
        "truncated": False,
    }
    _save(episode)
    return {"observation": str(observation), "info": info}


def cmd_step(action: str) -> dict[str, Any]:
    if not os.path.exists(STATE):
        raise DriverError("no_episode", "no GEM episode in this sandbox: call reset first")
    episode = _load()
    if episode["terminated"] or episode["truncated"]:
        raise DriverError("episode_over", "the GEM episode is over: call reset to start another")
    observation, reward, terminated, truncated, info = episode["env"].step(action)
    reward = float(reward)
    episode.update(
        steps=episode["steps"] + 1,
        total_reward=episode["total_reward"] + reward,
        last_reward=reward,
        terminated=bool(terminated),
        truncated=bool(truncated),
    )
    _save(episode)
    return {
        "observation": str(observation),
        "reward": reward,
        "terminated": episode["terminated"],
        "truncated": episode["truncated"],
        "info": info,
        "total_reward": episode["total_reward"],
        "steps": episode["steps"],
    }


def _load() -> dict[str, Any]:
    """The saved episode, with the global random states it was saved with: the live one when this
    process saved it last (the resident server), else from the pickle."""
    if _LIVE and _LIVE.get("stamp") == _stamp():
        episode: dict[str, Any] = _LIVE["episode"]
        return episode
    import pickle

    with open(ENV_ID, encoding="utf-8") as f:
        env_id = f.read()
    _import_gem(env_id.startswith("rg:"))
    with open(STATE, "rb") as f:
        episode = pickle.load(f)
    _restore_rng(episode.pop("rng"))
    return episode


def cmd_observe(env_id: str, seeds: list[int]) -> dict[str, Any]:
    observations = []
    for seed in seeds:
        observation, info = _make(env_id, seed).reset(seed=seed)
        observations.append({"seed": seed, "observation": str(observation), "info": info})
    return {"env_id": env_id, "observations": observations}


def cmd_verify() -> dict[str, Any]:
    if not os.path.exists(RESULT):
        raise DriverError("no_episode", "no GEM episode was played in this sandbox")
    with open(RESULT, encoding="utf-8") as f:
        result: dict[str, Any] = json.load(f)
    return result


def cmd_list() -> dict[str, Any]:
    _, registry, _ = _import_gem(True)
    return {"env_ids": sorted(registry)}


def _seed_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DriverError("bad_request", f"seed must be an integer, got {text!r}") from None


def run(argv: list[str]) -> tuple[dict[str, Any], int]:
    """Dispatch one command; returns (answer, exit code)."""
    usage = "usage: gem_driver.py reset ENV_ID SEED | step ACTION | observe ENV_ID SEED... | verify | list"
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "reset" and len(args) == 2:
        return cmd_reset(args[0], _seed_arg(args[1])), 0
    if cmd == "step" and len(args) == 1:
        return cmd_step(args[0]), 0
    if cmd == "observe" and len(args) >= 2:
        return cmd_observe(args[0], [_seed_arg(a) for a in args[1:]]), 0
    if cmd == "verify" and not args:
        result = cmd_verify()
        return result, 0 if result["won"] else 1
    if cmd == "list" and not args:
        return cmd_list(), 0
    if cmd == "ping" and not args:
        return {"pong": os.getpid()}, 0
    raise DriverError("bad_request", usage)


def answer_of(argv: list[str]) -> tuple[dict[str, Any], int]:
    """``run`` with every failure as an answer."""
    try:
        return run(argv)
    except DriverError as exc:
        return {"error": exc.kind, "message": str(exc)}, ERROR_EXIT
    except Exception as exc:  # noqa: BLE001 (the env itself raised: answer it, not a bare traceback)
        return {"error": "env_error", "message": f"{type(exc).__name__}: {exc}"}, ERROR_EXIT


def serve() -> None:
    """The resident process: answer forwarded calls, one connection (one JSON line) at a time,
    until IDLE_S pass without one."""
    os.makedirs(STATE_DIR, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        tmp = f"{SOCKET}.{os.getpid()}"
        server.bind(tmp)
        os.chmod(tmp, 0o600)
        server.listen(8)
        os.replace(tmp, SOCKET)  # visible only once it accepts
        server.settimeout(IDLE_S)
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                break
            with conn:
                if _answer_connection(conn) == ["stop"]:
                    break
    if os.path.exists(SOCKET):
        os.unlink(SOCKET)


def _answer_connection(conn: socket.socket) -> list[str]:
    """Answer one forwarded call; returns its command line ([] when unreadable)."""
    conn.settimeout(30.0)
    try:
        argv = [str(a) for a in json.loads(_read_line(conn))]
        stop = {"stopped": True, "pid": os.getpid()}
        answer, code = (stop, 0) if argv == ["stop"] else answer_of(argv)
        conn.sendall(json.dumps({"answer": answer, "code": code}, default=repr).encode() + b"\n")
    except (OSError, ValueError, TypeError):
        return []  # the client went away or sent garbage: nothing to answer
    return argv


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        part = conn.recv(65536)
        if not part:
            break
        data += part
    return data


def forward(argv: list[str]) -> tuple[dict[str, Any], int] | None:
    """The resident server's answer to ``argv``; None when no server accepts the connection (the
    caller then runs the call itself). Once the call is sent it is never run twice: a server that
    dies before answering gives a ``driver_failed`` answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(60.0)
        try:
            conn.connect(SOCKET)
        except OSError:
            return None
        try:
            conn.sendall(json.dumps(argv).encode() + b"\n")
            reply = json.loads(_read_line(conn))
            return reply["answer"], int(reply["code"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            message = f"the GEM server did not answer: {type(exc).__name__}: {exc}"
            return {"error": "driver_failed", "message": message}, ERROR_EXIT


def start_server() -> bool:
    """Start the resident process (detached: its own session, so it outlives this call) and wait
    for its socket; False when it did not come up."""
    import subprocess
    import time

    if os.path.exists(SOCKET):
        os.unlink(SOCKET)  # a dead server's: a call would wait on nothing
    subprocess.Popen(  # this file, with the interpreter running it
        [sys.executable, os.path.abspath(__file__), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if os.path.exists(SOCKET):
            return True
        time.sleep(0.01)
    return False


def stop_server() -> tuple[dict[str, Any], int]:
    """Stop the resident process and wait (a few seconds at most) until it is gone."""
    import time

    got = forward(["stop"])
    if got is None or "pid" not in got[0]:
        return {"stopped": False}, 0
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.kill(int(got[0]["pid"]), 0)
        except ProcessLookupError:
            break
        except PermissionError:  # a process of another user reuses the pid: ours is gone
            break
        time.sleep(0.01)
    return got


def dispatch(argv: list[str]) -> tuple[dict[str, Any], int]:
    """Where a command line runs: ``reset`` starts a fresh resident server and forwards to it,
    ``step``/``verify`` forward to the running one; anything else, or no server, runs here."""
    cmd = argv[0] if argv else ""
    if cmd == "serve":
        serve()
        return {"served": True}, 0
    if cmd == "stop":
        return stop_server()
    if cmd in FORWARDED:
        if cmd == "reset" and not (forward(["ping"]) or start_server()):
            return answer_here(argv)
        got = forward(argv)
        if got is not None:
            return got
    return answer_here(argv)


def answer_here(argv: list[str]) -> tuple[dict[str, Any], int]:
    """Run in this process, which may lack site packages (``python3 -S``): re-exec normally then."""
    if sys.flags.no_site:
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *argv])
    return answer_of(argv)


def main() -> int:
    answer, code = dispatch(sys.argv[1:])
    if code == ERROR_EXIT:
        sys.stderr.write(answer["message"] + "\n")
    sys.stdout.write(json.dumps(answer, default=repr) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
