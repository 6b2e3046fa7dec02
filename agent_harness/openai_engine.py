"""An ``InferenceEngine`` that is a client of OpenAI-compatible completions servers.

Any server whose ``POST /v1/completions`` takes a prompt of token ids and answers with the
sampled token ids and their log-probabilities works:

- ``rollstream serve`` (this repository: ``agent_harness/server.py``), which also reports the
  policy version that generated each answer (``policy_version``);
- vLLM (``vllm serve``), started with ``--return-tokens-as-token-ids`` (or sent the request field
  ``return_tokens_as_token_ids``, which this client always sets) so that
  ``choices[i].logprobs.tokens`` reads ``"token_id:<id>"``, and ``--logprobs-mode
  processed_logprobs`` so that log-probabilities are those of the temperature-scaled sampling
  distribution the learner's ratio assumes (vLLM's default is the raw model's);
- sglang's OpenAI API, if it returns token ids the same way (not verified; its native
  ``/generate`` is ``engine = "sglang"``).

Request: ``{"model", "prompt": [[ids...], ...], "max_tokens", "temperature", "logprobs": 1,
"return_tokens_as_token_ids": true, "stop_token_ids", "stop", "skip_special_tokens": false,
"include_stop_str_in_output": true, "ignore_eos": true}`` (the end-of-sequence token stops a
generation only when the caller lists it, as with the in-process engine). Token ids come from
``choices[i].token_ids`` when the server sends them (rollstream serve; vLLM with
``return_token_ids``), else from the ``token_id:`` strings.

Several servers: each episode (``GenRequest.session``) goes to one server, chosen by a hash of the
session (prefix-cache friendly, as ROLL routes an environment to one server); an unreachable
server is skipped for ``down_s`` seconds and its sessions move to the next one.

Weights: ``load_weights`` writes the version to a shared disk once (``disk_weights``) and asks
every server to load it (``POST <server root><reload_path>`` with ``{"model_path", "weight_version"}``,
sglang's ``/update_weights_from_disk`` shape, which rollstream serve also speaks); ``version`` moves
only once every server confirmed. A stock ``vllm serve`` has no such endpoint: add one with a
worker extension (as prime-rl's ``/load_checkpoint`` does) or use rollstream serve or sglang.
A server that reports an older version than this engine holds (it restarted) lowers ``version``,
so the rollout worker's weight sync loads the newest version into it again.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from transformers import AutoTokenizer

from agent_harness import disk_weights
from agent_harness.engine import Generation, GenRequest
from agent_harness.lora import is_adapter

TOKEN_ID_PREFIX = "token_id:"


class OpenAIEngineError(RuntimeError):
    """A server refused or failed a request, or answered without token ids (carries why)."""


class _Server:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.version: int | None = None  # confirmed by a reload or reported by an answer
        self.down_until = 0.0


class OpenAIEngine:
    """Generation through OpenAI-compatible servers (sticky per session), weights by shared disk."""

    def __init__(
        self,
        urls: Sequence[str],
        tokenizer_dir: Path,
        *,
        model: str = "",
        weights_dir: Path | None = None,
        reload_path: str = "/update_weights_from_disk",
        api_key: str = "",
        timeout_s: float = 300.0,
        connect_wait_s: float = 60.0,
        down_s: float = 10.0,
        version: int = 0,
    ) -> None:
        if not urls:
            raise ValueError("OpenAIEngine needs at least one server URL (rollout.openai_urls)")
        self.servers = [_Server(u) for u in urls]
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.model = model
        self.weights_dir = Path(weights_dir) if weights_dir else self.tokenizer_dir.parent / "served-weights"
        self.reload_path = reload_path
        self.connect_wait_s, self.down_s = connect_wait_s, down_s
        self._stamped = version
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits)

    @property
    def version(self) -> int:
        """The oldest version any server holds (what this engine's next generation may run)."""
        known = [s.version for s in self.servers if s.version is not None]
        return min([self._stamped, *known]) if known else self._stamped

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        """One completions call per (server, sampling parameters) group, all groups at once."""
        groups: dict[tuple[int, tuple[Any, ...]], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(self._route(r), _params_key(r))].append(i)
        out: list[Generation | None] = [None] * len(requests)

        async def run(server: int, indices: list[int]) -> None:
            gens = await self._complete(server, [requests[i] for i in indices])
            for i, g in zip(indices, gens, strict=True):
                out[i] = g

        if len(groups) == 1:
            [((server, _), indices)] = groups.items()
            await run(server, indices)
            return [g for g in out if g is not None]
        try:
            async with anyio.create_task_group() as tg:
                for (server, _), indices in groups.items():
                    tg.start_soon(run, server, indices)
        except ExceptionGroup as group:  # callers get the error, not a group of one
            raise group.exceptions[0] from group
        return [g for g in out if g is not None]

    def _route(self, r: GenRequest) -> int:
        """The server of ``r``'s session (a hash of its prompt's head when it names none)."""
        key = r.session.encode() if r.session else repr(r.prompt_tokens[:64]).encode()
        return zlib.crc32(key) % len(self.servers)

    async def _complete(self, first: int, batch: list[GenRequest]) -> list[Generation]:
        """Post ``batch`` to server ``first``, or to the next live one while it is unreachable."""
        deadline = time.monotonic() + self.connect_wait_s
        while True:
            for k in range(len(self.servers)):
                server = self.servers[(first + k) % len(self.servers)]
                if server.down_until > time.monotonic() and k < len(self.servers) - 1:
                    continue
                try:
                    body = await self._post(server, "/completions", _payload(self.model, batch), api=True)
                except httpx.TransportError:
                    server.down_until = time.monotonic() + self.down_s
                    continue
                return self._generations(server, body, len(batch))
            if time.monotonic() > deadline:
                raise OpenAIEngineError(f"no server answered within {self.connect_wait_s:.0f} s")
            await anyio.sleep(0.5)

    def _generations(self, server: _Server, body: Any, n: int) -> list[Generation]:
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            raise OpenAIEngineError(f"{server.url}/completions answered {str(body)[:200]} for {n} prompts")
        reported = body.get("policy_version")
        if isinstance(reported, int):
            server.version = reported
        version = reported if isinstance(reported, int) else self._stamped
        ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
        return [_generation(c, version) for c in ordered]

    # -- weights --------------------------------------------------------------------------------

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        """Write ``version`` to the shared disk and have every server load it; ``version`` moves
        once all of them confirmed."""
        path = await anyio.to_thread.run_sync(self._write, safetensors_bytes, version)
        await self.update_weights_from_disk(path, version)

    async def update_weights_from_disk(self, path: Path, version: int) -> None:
        """Ask every server to load the checkpoint at ``path`` (a disk they can read)."""
        payload = {"model_path": str(path), "weight_version": str(version)}
        for server in self.servers:
            body = await self._post(server, self.reload_path, payload, api=False)
            if not isinstance(body, dict) or not body.get("success"):
                raise OpenAIEngineError(f"{server.root}{self.reload_path} refused {path}: {body!r}")
            server.version = version
        self._stamped = version

    def _write(self, data: bytes, version: int) -> Path:
        name = disk_weights.ADAPTER_FILE if is_adapter(data) else disk_weights.WEIGHTS_FILE
        return disk_weights.write_version(
            self.weights_dir, version, data, source_dir=self.tokenizer_dir, file_name=name
        )

    async def _post(self, server: _Server, path: str, payload: dict[str, Any], *, api: bool) -> Any:
        url = (server.url if api else server.root) + path
        response = await self._http.post(url, json=payload)
        if response.status_code != 200:
            raise OpenAIEngineError(f"{url} answered {response.status_code}: {response.text[:300]}")
        return response.json()


def _params_key(r: GenRequest) -> tuple[Any, ...]:
    return (r.max_new_tokens, r.temperature, tuple(r.stop_token_ids or ()), tuple(r.stop_strings or ()))


def _payload(model: str, batch: list[GenRequest]) -> dict[str, Any]:
    first = batch[0]  # the batch shares its sampling parameters (grouped by _params_key)
    payload: dict[str, Any] = {
        "model": model,
        "prompt": [list(r.prompt_tokens) for r in batch],
        "max_tokens": first.max_new_tokens,
        "temperature": first.temperature,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "ignore_eos": True,  # stop only where the caller says (stop_token_ids), as every engine does
    }
    if first.stop_token_ids:
        payload["stop_token_ids"] = list(first.stop_token_ids)
    if first.stop_strings:
        payload["stop"] = list(first.stop_strings)
    return payload


def _generation(choice: dict[str, Any], version: int) -> Generation:
    logprobs = choice.get("logprobs") or {}
    values = [float(x) for x in logprobs.get("token_logprobs") or []]
    ids = choice.get("token_ids")
    if ids is None:
        ids = [_token_id(t) for t in logprobs.get("tokens") or []]
    tokens = [int(t) for t in ids]
    if len(tokens) != len(values):
        raise OpenAIEngineError(
            f"{len(tokens)} token ids but {len(values)} log-probabilities: the server must return "
            "logprobs for every sampled token"
        )
    finish = choice.get("finish_reason")
    if finish not in ("stop", "length"):
        raise OpenAIEngineError(f"generation ended with finish_reason {finish!r}")
    return Generation(tokens, values, "stop" if finish == "stop" else "length", version)


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise OpenAIEngineError(
            f"the server returned token text {token[:20]!r}, not ids: start vLLM with "
            "--return-tokens-as-token-ids (or use a server that honours the request field)"
        )
    return int(token[len(TOKEN_ID_PREFIX) :])
