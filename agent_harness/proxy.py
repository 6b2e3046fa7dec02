"""An OpenAI-compatible model proxy that turns an external agent's calls into trajectories.

``POST /v1/chat/completions`` (non-streaming, with ``tools``; tool calls come back in OpenAI's
``tool_calls`` shape, parsed from the policy's output in its tool-call format) and ``GET /v1/models``
are served in front of any ``InferenceEngine``. Every call is recorded as a chunk of the
conversation's trajectory: the action tokens, their behaviour log-probabilities and the policy
version that generated them; what the client sent between two calls (tool results, new user turns)
becomes the previous chunk's observation tokens. A conversation is keyed by its session id: the
``X-Rollstream-Session`` header, else the request's ``user`` field, else a hash of its first two
messages.

The trajectory is published to NATS when the session ends: ``POST
/v1/rollstream/sessions/{id}/finish`` with an optional ``{"reward": r}`` publishes a scored
trajectory (``rs.traj.scored.<run>``) when a reward is given and a raw one (``rs.traj.raw.<run>``)
otherwise; a session idle for ``idle_timeout_s`` is published raw. If a client edits history so a
request no longer extends the recorded sequence, the recorded part is published as a
``truncated`` trajectory (``abort_reason`` ``context_edited``) and a new segment starts: each
published trajectory rebuilds exactly to what the engine saw.

Server: ``aiohttp.web`` — already a dependency (nats-py's optional HTTP, sglang client), runs on
the same asyncio loop as nats-py and the engine, and needs no ASGI server process.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import msgspec
import structlog
from aiohttp import web

from agent_harness.chat import ChatFormatError, assistant_key, chat_format, parse_reply, render, stop_ids
from agent_harness.engine import GenRequest, InferenceEngine
from schemas.arrays import pack_logprobs, pack_tokens
from schemas.trajectory import Chunk, ScoredTrajectory, Trajectory, TrajStatus
from streams.bus import Publisher
from streams.topology import subject

log = structlog.get_logger(__name__)

SESSION_HEADER = "X-Rollstream-Session"
GROUP_HEADER = "X-Rollstream-Group"
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ProxySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the proxy listens, what it calls its model, and when an idle session ends."""

    host: Annotated[str, msgspec.Meta(description="Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535, description="Port (0: any free port).")] = 8400
    model: Annotated[str, msgspec.Meta(min_length=1, description="Model id in /v1/models.")] = "rollstream"
    max_new_tokens: Annotated[
        int, msgspec.Meta(ge=1, description="Tokens per call when the request sets no max_tokens.")
    ] = 256
    idle_timeout_s: Annotated[
        float, msgspec.Meta(gt=0.0, description="A session idle this long is published (raw).")
    ] = 300.0


@dataclass
class _Session:
    session_id: str
    group_id: str
    segment: int = 0
    prompt: list[int] | None = None
    seq: list[int] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    generated: dict[str, list[int]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


class ModelProxy:
    """The proxy's state (sessions) and its aiohttp application."""

    def __init__(
        self, engine: InferenceEngine, publisher: Publisher, run: str, settings: ProxySettings | None = None
    ) -> None:
        self.engine, self.publisher, self.run = engine, publisher, run
        self.settings = settings or ProxySettings()
        self.sessions: dict[str, _Session] = {}
        self.published: list[str] = []  # traj ids, newest last
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/rollstream/sessions/{session}/finish", self._finish)
        return app

    async def start(self) -> str:
        """Listen on ``settings.host:port``; returns the base URL (``http://host:port/v1``)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def reap_idle(self) -> list[str]:
        """Publish (raw) every session idle for longer than ``idle_timeout_s``; their trajectory ids."""
        now = time.monotonic()
        idle = [s for s in self.sessions.values() if now - s.last_seen > self.settings.idle_timeout_s]
        out: list[str] = []
        for s in idle:
            out += await self.finish(s.session_id, reward=None, reason="idle_timeout")
        return out

    # -- HTTP handlers ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "rollstream"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "the request needs a list of messages")
        if body.get("stream"):
            return _error(400, "stream=true is not supported; send a non-streaming request")
        if int(body.get("n") or 1) != 1:
            return _error(400, "n must be 1")
        session_id = self._session_id(request, body)
        if not _SESSION_RE.fullmatch(session_id):
            return _error(400, f"session id {session_id[:40]!r} must match {_SESSION_RE.pattern}")
        session = self.sessions.get(session_id)
        if session is None:
            group = request.headers.get(GROUP_HEADER) or f"{self.run}:proxy:{session_id}"
            session = self.sessions[session_id] = _Session(session_id, group)
        async with session.lock:
            try:
                reply = await self._complete(session, body)
            except ChatFormatError as exc:
                return _error(400, str(exc))
        return web.json_response(reply, headers={SESSION_HEADER: session_id})

    async def _finish(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session"]
        body: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "the request body is not valid JSON")
        reward = body.get("reward") if isinstance(body, dict) else None
        if reward is not None and not isinstance(reward, int | float):
            return _error(400, "reward must be a number or null")
        if session_id not in self.sessions:
            return _error(404, f"no open session {session_id!r}", "not_found_error")
        output = str(body.get("verifier_output", ""))
        ids = await self.finish(session_id, reward=reward, verifier_output=output)
        return web.json_response({"session": session_id, "traj_ids": ids})

    # -- recording ----------------------------------------------------------------------------

    def _session_id(self, request: web.Request, body: dict[str, Any]) -> str:
        sid = request.headers.get(SESSION_HEADER) or body.get("user")
        if sid:
            return str(sid)
        head = msgspec.json.encode(body["messages"][:2])
        return "conv-" + hashlib.sha256(head).hexdigest()[:16]

    async def _complete(self, session: _Session, body: dict[str, Any]) -> dict[str, Any]:
        tok = self.engine.tokenizer
        fed = render(tok, body["messages"], body.get("tools"), session.generated)
        if session.prompt is not None and fed[: len(session.seq)] != session.seq:
            await self._publish(session, reward=None, reason="context_edited")
        if session.prompt is None:
            session.prompt, session.seq = list(fed), list(fed)
        elif session.chunks:
            session.chunks[-1]["obs_tokens"] = fed[len(session.seq) :]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        max_new = int(limit or self.settings.max_new_tokens)
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        request = GenRequest(list(fed), max_new, temperature, stop_ids(tok))
        t0 = time.perf_counter()
        [gen] = await self.engine.generate([request])
        gen_ms = (time.perf_counter() - t0) * 1000
        version = gen.version if gen.version is not None else self.engine.version
        reply = parse_reply(tok.decode(gen.tokens, skip_special_tokens=False), chat_format(tok).format)
        session.seq = list(fed) + gen.tokens
        ordinal = sum(1 for m in body["messages"] if isinstance(m, dict) and m.get("role") == "assistant")
        session.generated[assistant_key(reply.message(), ordinal)] = list(gen.tokens)
        session.last_seen = time.monotonic()
        call = reply.first_call
        session.chunks.append(
            {
                "action_tokens": list(gen.tokens),
                "action_logprobs": list(gen.logprobs),
                "policy_version": version,
                "tool_name": call.name if call else "",
                "tool_args": call.arguments_json if call else "",
                "tool_status": reply.status,
                "obs_tokens": [],
                "gen_ms": gen_ms,
            }
        )
        finish = "tool_calls" if reply.tool_calls else ("length" if gen.finish_reason == "length" else "stop")
        return {
            "id": f"chatcmpl-{session.session_id}-{len(session.chunks)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model,
            "choices": [{"index": 0, "message": reply.message(), "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": len(fed),
                "completion_tokens": len(gen.tokens),
                "total_tokens": len(fed) + len(gen.tokens),
            },
            "system_fingerprint": f"policy-v{version}",
        }

    async def finish(
        self, session_id: str, *, reward: float | None, reason: str = "", verifier_output: str = ""
    ) -> list[str]:
        """End a session: publish what it recorded; returns the published trajectory ids."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return []
        async with session.lock:
            if not session.chunks:
                return []
            out = verifier_output
            traj_id = await self._publish(session, reward=reward, reason=reason, verifier_output=out)
            return [traj_id]

    def trajectory(self, session: _Session, reason: str) -> Trajectory:
        """The session's recorded segment as a trajectory (``prompt + Σ(action + obs)``)."""
        tok = self.engine.tokenizer
        chunks = [
            Chunk(
                index=i,
                action_tokens=pack_tokens(c["action_tokens"]),
                action_logprobs=pack_logprobs(c["action_logprobs"]),
                policy_version=c["policy_version"],
                tool_name=c["tool_name"],
                tool_args=c["tool_args"],
                tool_status=c["tool_status"],
                obs_tokens=pack_tokens(c["obs_tokens"]),
                obs_text=tok.decode(c["obs_tokens"], skip_special_tokens=False),
                gen_ms=c["gen_ms"],
            )
            for i, c in enumerate(session.chunks)
        ]
        versions = [c.policy_version for c in chunks]
        ended_on_answer = bool(chunks) and chunks[-1].tool_status == "none"
        status: TrajStatus = "completed" if ended_on_answer and not reason else "truncated"
        return Trajectory(
            traj_id=f"{self.run}:proxy:{session.session_id}:{session.segment}",
            run=self.run,
            task_id=f"proxy:{session.session_id}",
            family="proxy",
            group_id=session.group_id,
            sample_idx=session.segment,
            prompt_tokens=pack_tokens(session.prompt or []),
            chunks=chunks,
            status=status,
            min_version=min(versions),
            max_version=max(versions),
            abort_reason=reason,
            started_at=session.started_at,
            finished_at=time.time(),
            source="proxy",
        )

    async def _publish(
        self, session: _Session, *, reward: float | None, reason: str, verifier_output: str = ""
    ) -> str:
        traj = self.trajectory(session, reason)
        if reward is None:
            await self.publisher.publish(subject("raw", self.run), traj, msg_id=f"raw:{traj.traj_id}")
        else:
            scored = ScoredTrajectory(
                traj=traj, reward=float(reward), verifier_output=verifier_output, scored_at=time.time()
            )
            await self.publisher.publish(subject("scored", self.run), scored, msg_id=f"scored:{traj.traj_id}")
        log.info("proxy_trajectory", traj_id=traj.traj_id, chunks=len(traj.chunks), reward=reward)
        self.published.append(traj.traj_id)
        session.segment += 1
        session.prompt, session.seq, session.chunks = None, [], []
        session.started_at = time.time()
        return traj.traj_id


async def serve(
    proxy: ModelProxy, *, task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run the proxy until cancelled (reaping idle sessions); ``task_status`` gets the base URL."""
    url = await proxy.start()
    task_status.started(url)
    log.info("proxy_started", url=url, model=proxy.settings.model)
    try:
        while True:
            await anyio.sleep(min(proxy.settings.idle_timeout_s / 4, 30.0))
            await proxy.reap_idle()
    finally:
        with anyio.move_on_after(10, shield=True):
            for sid in list(proxy.sessions):
                await proxy.finish(sid, reward=None, reason="proxy_stopped")
            await proxy.stop()
