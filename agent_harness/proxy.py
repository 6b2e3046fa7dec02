"""An OpenAI-compatible model proxy that turns an external agent's calls into trajectories.

Served in front of any ``InferenceEngine``: ``POST /v1/chat/completions`` (with ``tools``; tool
calls come back in OpenAI's ``tool_calls`` shape, parsed from the policy's output in its tool-call
format), the legacy ``POST /v1/completions``, and ``GET /v1/models``; whole or streamed
(``stream: true``: server-sent ``chat.completion.chunk`` events, tool calls as deltas), with
``n``, ``stop``, ``max_tokens``/``max_completion_tokens``, ``temperature``, ``seed`` (with the torch
engine, the same seed, messages and weights give the same choices whatever else shares the batch)
and usage counts; anything refused gets an OpenAI-shaped error naming the parameter
(``agent_harness.openai_wire``).

Every call is recorded as a chunk of the conversation's one trajectory (tokens, behaviour
log-probabilities, policy version); what the client sent between two calls becomes the previous
chunk's observation; a history edit starts a new segment of the same trajectory
(``agent_harness.proxy_session``). A conversation is keyed by its session id: the path prefix
``/s/<session>/v1`` (so an unmodified client needs only a base URL), else the
``X-Rollstream-Session`` header, else the request's ``user`` field, else a hash of its first two
messages.

Sessions a client opens are published when they end: ``POST /v1/rollstream/sessions/{id}/finish``
with an optional ``{"reward": r}`` publishes a scored trajectory (``rs.traj.scored.<run>``) when a
reward is given and a raw one (``rs.traj.raw.<run>``) otherwise; a session idle for
``idle_timeout_s`` is published raw. Sessions the agent runner opens (``open_session``) are its
own: it takes them back (``take``) and publishes the episode itself, and their
``/s/<session>/rollstream/exec`` runs a shell command in the episode's sandbox for the holder of
the session's exec token (``agent_harness.agent_runner``).

Server: ``aiohttp.web`` — already a dependency, runs on the same asyncio loop as nats-py and the
engine, and needs no ASGI server process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import anyio
import msgspec
import structlog
from aiohttp import web

from agent_harness.chat import ChatFormatError, assistant_key, chat_format, parse_reply, render, stop_ids
from agent_harness.engine import Generation, GenRequest, InferenceEngine, sampling_seed
from agent_harness.openai_wire import (
    Params,
    WireError,
    chat_response,
    chat_stream,
    error_response,
    parse_params,
    send_events,
    text_response,
    text_stream,
    trim_stop,
    usage,
)
from agent_harness.prompt import ENDOFTEXT, encode
from agent_harness.proxy_session import Candidate, Identity, Session
from schemas.trajectory import ScoredTrajectory
from streams.bus import Publisher
from streams.topology import subject

log = structlog.get_logger(__name__)

SESSION_HEADER = "X-Rollstream-Session"
GROUP_HEADER = "X-Rollstream-Group"
EXEC_TOKEN_HEADER = "X-Rollstream-Exec-Token"
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

ExecHandler = Callable[[str, float], Awaitable[dict[str, Any]]]


class ProxySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the proxy listens, what it calls its model, and when an idle session ends."""

    host: Annotated[str, msgspec.Meta(description="Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535, description="Port (0: any free port).")] = 8400
    model: Annotated[str, msgspec.Meta(min_length=1, description="Model id in /v1/models.")] = "rollstream"
    max_new_tokens: Annotated[
        int, msgspec.Meta(ge=1, description="Tokens per call when the request sets no max_tokens.")
    ] = 256
    max_tokens_limit: Annotated[
        int, msgspec.Meta(ge=1, description="Most tokens one call may generate, whatever it asks.")
    ] = 4096
    idle_timeout_s: Annotated[
        float, msgspec.Meta(gt=0.0, description="A session idle this long is published (raw).")
    ] = 300.0


class ModelProxy:
    """The proxy's state (sessions) and its aiohttp application."""

    def __init__(
        self,
        engine: InferenceEngine,
        publisher: Publisher,
        run: str,
        settings: ProxySettings | None = None,
        *,
        client_sessions: bool = True,
    ) -> None:
        self.engine, self.publisher, self.run = engine, publisher, run
        # False (the agent runner's proxy): only sessions opened with ``open_session`` are served, so an
        # agent can neither start a session of its own nor publish one with a reward it chose.
        self.client_sessions = client_sessions
        self.settings = settings or ProxySettings()
        self.sessions: dict[str, Session] = {}
        self.published: list[str] = []  # traj ids, newest last
        self._ended: dict[str, int] = {}  # session id -> trajectories published under it
        # Awaited before every generation (a rollout worker's weight sync: newest version first).
        self.before_call: Callable[[], Awaitable[None]] | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_openai_errors])
        for prefix in ("", "/s/{session}"):
            app.router.add_get(prefix + "/v1/models", self._models)
            app.router.add_post(prefix + "/v1/chat/completions", self._chat)
            app.router.add_post(prefix + "/v1/completions", self._completions)
        app.router.add_post("/v1/rollstream/sessions/{session}/finish", self._finish)
        app.router.add_post("/s/{session}/rollstream/exec", self._exec)
        return app

    async def start(self) -> str:
        """Listen on ``settings.host:port``; returns the base URL (``http://host:port/v1``)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}/v1"

    async def listen_unix(self, path: str) -> web.UnixSite:
        """Also serve on the unix socket ``path`` (a sandbox's model socket) until its ``stop``."""
        if self._runner is None:
            raise RuntimeError("the proxy is not started")
        site = web.UnixSite(self._runner, path)
        await site.start()
        await anyio.to_thread.run_sync(os.chmod, path, 0o666)  # the sandbox's agent uid connects
        return site

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def reap_idle(self) -> list[str]:
        """Publish (raw) every client session idle for longer than ``idle_timeout_s``."""
        now = time.monotonic()
        idle = [
            s
            for s in self.sessions.values()
            if not s.managed and now - s.last_seen > self.settings.idle_timeout_s
        ]
        out: list[str] = []
        for s in idle:
            out += await self.finish(s.session_id, reward=None, reason="idle_timeout")
        return out

    # -- sessions owned by the agent runner ---------------------------------------------------

    def open_session(self, identity: Identity, exec_handler: ExecHandler | None = None) -> Session:
        """Open a session for one episode under an unguessable id; the runner ``take``s it back."""
        sid = f"ep-{secrets.token_hex(12)}"
        session = Session(
            sid,
            identity,
            managed=True,
            exec_token=secrets.token_hex(16),
            exec_handler=exec_handler,
            tokenizer=self.engine.tokenizer,
        )
        self.sessions[sid] = session
        return session

    async def take(self, session_id: str) -> Session | None:
        """Remove a session (no more calls or commands reach it) with its last call committed."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return None
        async with session.lock:
            session.close()
        return session

    # -- HTTP handlers ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "rollstream"}
        return web.json_response({"object": "list", "data": [model]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if not isinstance(body.get("messages"), list):
            raise WireError("the request needs a list of messages", param="messages")
        params = parse_params(body)
        session = self._session(request, body)
        tok = self.engine.tokenizer
        async with session.lock:
            try:
                fed = render(tok, body["messages"], body.get("tools"), session.generated)
            except ChatFormatError as exc:
                raise WireError(str(exc), param="messages") from None
            session.observe(fed)
            gens, gen_ms = await self._generate(fed, params, stop_ids(tok))
            ordinal = sum(1 for m in body["messages"] if isinstance(m, dict) and m.get("role") == "assistant")
            choices, cands = [], []
            for gen in gens:
                text, hit = trim_stop(tok.decode(gen.tokens, skip_special_tokens=False), params.stop)
                reply = parse_reply(text, chat_format(tok).format)
                msg = reply.message()
                session.generated[assistant_key(msg, ordinal)] = list(gen.tokens)
                length = gen.finish_reason == "length" and not hit
                choices.append((msg, "tool_calls" if reply.tool_calls else "length" if length else "stop"))
                call = reply.first_call
                cands.append(
                    self._candidate(fed, gen, gen_ms)
                    | {
                        "tool_name": call.name if call else "",
                        "tool_args": call.arguments_json if call else "",
                        "tool_status": reply.status,
                    }
                )
            session.add([Candidate(**c) for c in cands])
        wire = (chat_stream, chat_response)
        return await self._respond(request, session, "chatcmpl", fed, gens, cands, choices, params, *wire)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise WireError("prompt must be one non-empty string", param="prompt")
        if body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1):
            raise WireError("echo, suffix and best_of are not supported by the proxy")
        params = parse_params(body)
        session = self._session(request, {"messages": [{"role": "user", "content": prompt[:256]}], **body})
        tok = self.engine.tokenizer
        async with session.lock:
            fed = _completion_fed(session, tok, prompt)
            session.observe(fed)
            gens, gen_ms = await self._generate(fed, params, [tok.convert_tokens_to_ids(ENDOFTEXT)])
            choices, cands = [], []
            for gen in gens:
                whole = tok.decode(gen.tokens, skip_special_tokens=True)
                text, hit = trim_stop(whole, params.stop)
                exact = text == tok.decode(gen.tokens, skip_special_tokens=False)
                choices.append((text, "length" if gen.finish_reason == "length" and not hit else "stop"))
                cand = self._candidate(fed, gen, gen_ms) | {"text_key": prompt + text if exact else ""}
                cands.append(cand)
            session.add([Candidate(**c) for c in cands])
        wire = (text_stream, text_response)
        return await self._respond(request, session, "cmpl", fed, gens, cands, choices, params, *wire)

    async def _respond(
        self,
        request: web.Request,
        session: Session,
        kind: str,
        fed: list[int],
        gens: list[Generation],
        cands: list[dict[str, Any]],
        choices: list[Any],
        params: Params,
        stream: Callable[..., Any],
        whole: Callable[..., dict[str, Any]],
    ) -> web.StreamResponse:
        """The reply to one call (chat or legacy completions), whole or as server-sent events."""
        cid = f"{kind}-{session.session_id}-{session.calls}"
        use = usage(len(fed), [len(g.tokens) for g in gens])
        fingerprint = f"policy-v{max(c['version'] for c in cands)}"
        headers = {SESSION_HEADER: session.session_id}
        if params.stream:
            shown_use = use if params.include_usage else None
            events = stream(cid, self.settings.model, fingerprint, choices, shown_use)
            return await send_events(request, events, headers)
        return web.json_response(whole(cid, self.settings.model, fingerprint, choices, use), headers=headers)

    async def _finish(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session"]
        body = await _json_body(request) if request.can_read_body else {}
        reward = body.get("reward")
        if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)):
            raise WireError("reward must be a number or null", param="reward")
        session = self.sessions.get(session_id)
        if session is None or session.managed or not self.client_sessions:
            return error_response(404, f"no open session {session_id!r}", "not_found_error")
        output = str(body.get("verifier_output", ""))
        ids = await self.finish(session_id, reward=reward, verifier_output=output)
        return web.json_response({"session": session_id, "traj_ids": ids})

    async def _exec(self, request: web.Request) -> web.Response:
        """Run one shell command in a runner session's sandbox (for the holder of its exec token)."""
        session = self.sessions.get(request.match_info["session"])
        token = request.headers.get(EXEC_TOKEN_HEADER, "")
        if (
            session is None
            or session.exec_handler is None
            or not secrets.compare_digest(token, session.exec_token)
        ):
            return error_response(404, "no such session", "not_found_error")
        body = await _json_body(request)
        command, timeout = body.get("command"), body.get("timeout_s", 0)
        if not isinstance(command, str) or not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise WireError("exec needs a command string and an optional number timeout_s", param="command")
        session.last_seen = time.monotonic()
        return web.json_response(await session.exec_handler(command, float(timeout)))

    # -- recording ----------------------------------------------------------------------------

    def _session(self, request: web.Request, body: dict[str, Any]) -> Session:
        sid = request.match_info.get("session") or request.headers.get(SESSION_HEADER) or body.get("user")
        if not sid:
            head = msgspec.json.encode(body["messages"][:2])
            sid = "conv-" + hashlib.sha256(head).hexdigest()[:16]
        sid = str(sid)
        if not _SESSION_RE.fullmatch(sid):
            raise WireError(f"session id {sid[:40]!r} must match {_SESSION_RE.pattern}")
        session = self.sessions.get(sid)
        if session is None and not self.client_sessions:
            raise WireError(f"no open session {sid!r}", status=404)
        if session is None:
            n = self._ended.get(sid, 0)
            group = request.headers.get(GROUP_HEADER) or f"{self.run}:proxy:{sid}"
            identity = Identity(
                traj_id=f"{self.run}:proxy:{sid}:{n}",
                run=self.run,
                task_id=f"proxy:{sid}",
                family="proxy",
                group_id=group,
                sample_idx=n,
            )
            session = self.sessions[sid] = Session(sid, identity, tokenizer=self.engine.tokenizer)
        return session

    async def _generate(
        self, fed: list[int], params: Params, stops: list[int]
    ) -> tuple[list[Generation], float]:
        limit = min(params.max_tokens or self.settings.max_new_tokens, self.settings.max_tokens_limit)
        request = GenRequest(list(fed), limit, params.temperature, stops, params.stop or None)
        requests = [request] * params.n
        if params.seed is not None:  # choice i of a seeded call draws from its own seed
            requests = [
                dataclasses.replace(request, seed=sampling_seed(params.seed, i)) for i in range(params.n)
            ]
        if self.before_call is not None:
            await self.before_call()
        t0 = time.perf_counter()
        gens = await self.engine.generate(requests)
        return gens, (time.perf_counter() - t0) * 1000

    def _candidate(self, fed: list[int], gen: Generation, gen_ms: float) -> dict[str, Any]:
        version = gen.version if gen.version is not None else self.engine.version
        return {
            "fed": list(fed),
            "tokens": list(gen.tokens),
            "logprobs": list(gen.logprobs),
            "version": version,
            "gen_ms": gen_ms,
        }

    async def finish(
        self, session_id: str, *, reward: float | None, reason: str = "", verifier_output: str = ""
    ) -> list[str]:
        """End a client session: publish what it recorded; returns the published trajectory ids."""
        session = await self.take(session_id)
        if session is None or not session.chunks:
            return []
        self._ended[session_id] = self._ended.get(session_id, 0) + 1
        traj = session.trajectory(reason=reason)
        if reward is None:
            await self.publisher.publish(subject("raw", self.run), traj, msg_id=f"raw:{traj.traj_id}")
        else:
            scored = ScoredTrajectory(
                traj=traj, reward=float(reward), verifier_output=verifier_output, scored_at=time.time()
            )
            await self.publisher.publish(subject("scored", self.run), scored, msg_id=f"scored:{traj.traj_id}")
        log.info(
            "proxy_trajectory",
            traj_id=traj.traj_id,
            chunks=len(traj.chunks),
            segments=session.segments,
            reward=reward,
        )
        self.published.append(traj.traj_id)
        return [traj.traj_id]


def _completion_fed(session: Session, tok: Any, prompt: str) -> list[int]:
    """A legacy prompt's tokens: when it extends a previous call's prompt and exact completion, that
    call's tokens plus the new text's, so the recording continues instead of starting a segment."""
    for cand in session.pending:
        if cand.text_key and prompt.startswith(cand.text_key):
            rest = prompt[len(cand.text_key) :]
            return cand.fed + cand.tokens + (encode(tok, rest) if rest else [])
    return encode(tok, prompt)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise WireError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise WireError("the request body must be a JSON object")
    return body


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refusals and unknown routes in OpenAI's error shape (clients parse ``error.message``)."""
    try:
        return await handler(request)
    except WireError as exc:
        return exc.response()
    except web.HTTPNotFound:
        return error_response(404, f"no route {request.method} {request.path}", "not_found_error")
    except web.HTTPMethodNotAllowed:
        return error_response(405, f"method {request.method} not allowed on {request.path}")


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
            for sid in [s.session_id for s in proxy.sessions.values() if not s.managed]:
                await proxy.finish(sid, reward=None, reason="proxy_stopped")
            await proxy.stop()
