"""``rollstream serve``: an OpenAI-compatible completions server over the in-process torch engine.

Unlike the proxy (``agent_harness/proxy.py``) it records nothing: it is an inference server, the
target of ``engine = "openai"`` rollout workers (and of anything else that speaks the API).

- ``POST /v1/completions``: ``prompt`` as token ids (one list, or a list of lists), or text;
  ``max_tokens``, ``temperature``, ``stop`` (strings), ``stop_token_ids``, ``logprobs``, ``seed``
  (prompt i samples from its own seed derived from it: reproducible whatever shares the batch),
  ``return_tokens_as_token_ids`` (vLLM's extension: ``logprobs.tokens`` read ``"token_id:<id>"``).
  Every choice also carries ``token_ids``; the answer carries ``policy_version``, the version of
  the weights that generated it (also as ``system_fingerprint`` ``policy-v<N>``). Log-probabilities
  are those of the sampling distribution (``TorchEngine``). Concurrent requests share one batch
  (``Batcher``).
- ``POST /update_weights_from_disk`` ``{"model_path": dir|file, "weight_version": "N"}`` (sglang's
  shape): loads ``model.safetensors`` (or a LoRA ``adapter_model.safetensors``, applied by the
  engine) from a path under ``weights_root``; answers ``{"success", "message", "version"}`` only
  once the weights are in. A version at or below the one held is acknowledged without reloading
  (several rollout workers may ask for the same version).
- ``GET /v1/models``, ``GET /health``, ``GET /v1/rollstream/version``.

Server: ``aiohttp.web``, as the proxy (same loop as the engine, no ASGI server process).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import msgspec
import structlog
from aiohttp import web

from agent_harness import disk_weights
from agent_harness.engine import Generation, GenRequest, InferenceEngine, sampling_seed

log = structlog.get_logger(__name__)


class ServeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where ``rollstream serve`` listens and how it batches."""

    host: Annotated[str, msgspec.Meta(description="Address to listen on.")] = "127.0.0.1"
    port: Annotated[
        int, msgspec.Meta(ge=0, le=65535, description="Port of server 0; server k listens on port + k.")
    ] = 8500
    model: Annotated[str, msgspec.Meta(min_length=1, description="Model id in /v1/models.")] = "rollstream"
    max_new_tokens: Annotated[
        int, msgspec.Meta(ge=1, description="Tokens per completion when the request sets no max_tokens.")
    ] = 64
    max_batch: Annotated[int, msgspec.Meta(ge=1, description="Prompts generated together in one batch.")] = 16
    batch_max_wait_ms: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            description=(
                "Longest a request waits for others to share its batch. 0: clients (the openai engine) "
                "already send their batch in one request; requests arriving while a batch runs still "
                "share the next one."
            ),
        ),
    ] = 0.0


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return web.json_response(body, status=status)


class BadRequest(ValueError):
    """A request the server cannot serve (the message names the field)."""


class PolicyServer:
    """The server's state (engine, allowed weights root) and its aiohttp application."""

    def __init__(self, engine: InferenceEngine, settings: ServeSettings, *, weights_root: Path) -> None:
        self.engine, self.settings = engine, settings
        self.weights_root = Path(weights_root).resolve()
        self.reloads = 0
        self.completions = 0  # completions requests served (for tests and the benchmark)
        self._reload_lock = anyio.Lock()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/rollstream/version", self._version)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/update_weights_from_disk", self._reload)
        return app

    async def start(self, port: int | None = None) -> str:
        """Listen; returns the API base URL (``http://host:port/v1``)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port if port is None else port)
        await site.start()
        host, bound = self._runner.addresses[0][:2]
        return f"http://{host}:{bound}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers -------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "rollstream"}
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "version": self.engine.version})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.engine.version, "reloads": self.reloads})

    async def _completions(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            requests = self._requests(body)
        except ValueError as exc:  # BadRequest, and JSON errors
            return _error(400, str(exc))
        gens = await self.engine.generate(requests)
        self.completions += 1
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        want_logprobs = body.get("logprobs") is not None
        version = gens[0].version if gens and gens[0].version is not None else self.engine.version
        choices = [self._choice(i, g, as_ids, want_logprobs) for i, g in enumerate(gens)]
        prompt_tokens = sum(len(r.prompt_tokens) for r in requests)
        completion_tokens = sum(len(g.tokens) for g in gens)
        return web.json_response(
            {
                "id": f"cmpl-{time.monotonic_ns()}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.settings.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": f"policy-v{version}",
                "policy_version": version,
            }
        )

    async def _reload(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            path = self._allowed_path(str(body.get("model_path") or ""))
            version = int(body.get("weight_version") or body.get("version") or self.engine.version + 1)
        except (ValueError, TypeError) as exc:
            return web.json_response({"success": False, "message": str(exc)}, status=400)
        async with self._reload_lock:
            if version <= self.engine.version:
                message = f"already at version {self.engine.version}"
                return web.json_response(
                    {"success": True, "message": message, "version": self.engine.version}
                )
            try:
                data, adapter = await anyio.to_thread.run_sync(disk_weights.read_weights, path)
                await self.engine.load_weights(data, version)
            except (OSError, ValueError) as exc:
                return web.json_response(
                    {"success": False, "message": f"{type(exc).__name__}: {exc}"}, status=400
                )
            self.reloads += 1
        log.info("serve_weights_loaded", policy_version=version, path=str(path), adapter=adapter)
        return web.json_response({"success": True, "message": f"loaded {path}", "version": version})

    # -- request parsing ------------------------------------------------------------------------

    def _allowed_path(self, raw: str) -> Path:
        if not raw:
            raise BadRequest("model_path is required")
        path = Path(raw).resolve()
        if not path.is_relative_to(self.weights_root):
            raise BadRequest(f"model_path must be under the server's weights root {self.weights_root}")
        return path

    def _requests(self, body: Any) -> list[GenRequest]:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported")
        if int(body.get("n") or 1) != 1 or body.get("echo"):
            raise BadRequest("n must be 1 and echo false")
        prompts = self._prompts(body.get("prompt"))
        max_new = int(body.get("max_tokens") or self.settings.max_new_tokens)
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stop_ids = [int(t) for t in body.get("stop_token_ids") or []]
        eos = self.engine.tokenizer.eos_token_id
        if eos is not None and not body.get("ignore_eos"):
            stop_ids.append(int(eos))
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("seed must be an integer")
        return [
            GenRequest(
                p,
                max_new,
                temperature,
                stop_ids or None,
                stops or None,
                seed=None if seed is None else sampling_seed(seed, i),
            )
            for i, p in enumerate(prompts)
        ]

    def _prompts(self, prompt: Any) -> list[list[int]]:
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            return [list(tok.encode(prompt, add_special_tokens=False))]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        if isinstance(prompt, list) and prompt:
            out = []
            for p in prompt:
                if isinstance(p, str):
                    out.append(list(tok.encode(p, add_special_tokens=False)))
                elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                    out.append(list(p))
                else:
                    raise BadRequest("prompt items must be strings or non-empty lists of token ids")
            return out
        raise BadRequest("prompt must be a string, a list of token ids, or a list of those")

    def _choice(self, index: int, g: Generation, as_ids: bool, want_logprobs: bool) -> dict[str, Any]:
        tok = self.engine.tokenizer
        choice: dict[str, Any] = {
            "index": index,
            "text": tok.decode(g.tokens, skip_special_tokens=False),
            "finish_reason": g.finish_reason,
            "token_ids": list(g.tokens),
            "logprobs": None,
        }
        if want_logprobs:
            names = [f"token_id:{t}" if as_ids else tok.decode([t]) for t in g.tokens]
            choice["logprobs"] = {
                "tokens": names,
                "token_logprobs": list(g.logprobs),
                "top_logprobs": None,
                "text_offset": [],
            }
        return choice


async def serve(
    server: PolicyServer,
    *,
    port: int | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` until cancelled; ``task_status`` gets the API base URL."""
    url = await server.start(port)
    task_status.started(url)
    log.info("serve_started", url=url, model=server.settings.model, policy_version=server.engine.version)
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.move_on_after(5, shield=True):
            await server.stop()
