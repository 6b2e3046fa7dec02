"""An ``InferenceEngine`` that is a client of an sglang server (the GPU / large-model path).

Native API used (sglang docs, "SGLang Native APIs" and ``io_struct.GenerateReqInput``):

- ``POST /generate`` with ``{"input_ids": [...] | [[...], ...], "sampling_params": {...} | [...],
  "return_logprob": true}``; the answer (one object, or a list for a batch) carries
  ``meta_info.output_token_logprobs = [[logprob, token_id, text|null], ...]`` and
  ``meta_info.finish_reason = {"type": "stop" | "length" | "abort", "matched": ...}``.
- ``POST /update_weights_from_disk`` with ``{"model_path": dir}`` answering
  ``{"success": bool, "message": str}``.

NOT YET RUN AGAINST A REAL SGLANG SERVER: the tests use a local HTTP server answering with the
documented shapes. Unverified on a real server: (1) whether returned log-probabilities are of the
temperature-scaled distribution (sglang's default "processed" logprobs; ``SGLANG_RETURN_ORIGINAL_LOGPROB``
changes it) — the learner's ratio assumes they are, like ``TorchEngine``; (2) that a stop token is
the last entry of ``output_token_logprobs`` (``no_stop_trim`` is sent to keep it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
from transformers import AutoTokenizer

from agent_harness import disk_weights
from agent_harness.engine import Generation, GenRequest
from agent_harness.lora import is_adapter


class SGLangError(RuntimeError):
    """The sglang server refused or failed a request (carries its message)."""


class SGLangEngine:
    """Generation and weight updates through an sglang server's HTTP API."""

    def __init__(
        self,
        base_url: str,
        tokenizer_dir: Path,
        *,
        weights_dir: Path | None = None,
        timeout_s: float = 300.0,
        version: int = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
        # Where load_weights writes checkpoints for the server to read (a disk both can see).
        self.weights_dir = Path(weights_dir) if weights_dir else self.tokenizer_dir.parent / "sglang-weights"
        self.version = version
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        if not requests:
            return []
        version = self.version
        params = [_sampling_params(r) for r in requests]
        single = len(requests) == 1
        payload = {
            "input_ids": requests[0].prompt_tokens if single else [r.prompt_tokens for r in requests],
            "sampling_params": params[0] if single else params,
            "return_logprob": True,
        }
        body = await self._post("/generate", payload)
        outputs = [body] if single else body
        if not isinstance(outputs, list) or len(outputs) != len(requests):
            raise SGLangError(f"/generate answered {type(body).__name__} for {len(requests)} requests")
        return [_generation(out, version) for out in outputs]

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        """Write a checkpoint directory for ``version`` and ask the server to load it."""
        if is_adapter(safetensors_bytes):
            raise SGLangError("LoRA adapters are not supported with engine = sglang; use torch or openai")
        target = await anyio.to_thread.run_sync(self._write_checkpoint, version, safetensors_bytes)
        await self.update_weights_from_disk(target, version)

    async def update_weights_from_disk(self, model_path: Path, version: int) -> None:
        """Point the server at a checkpoint it can read (shared disk); sets ``version`` on success."""
        body = await self._post("/update_weights_from_disk", {"model_path": str(model_path)})
        if not isinstance(body, dict) or not body.get("success"):
            raise SGLangError(f"weight update to {model_path} failed: {body!r}")
        self.version = version

    def _write_checkpoint(self, version: int, data: bytes) -> Path:
        return disk_weights.write_version(self.weights_dir, version, data, source_dir=self.tokenizer_dir)

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            response = await self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise SGLangError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise SGLangError(f"{self.base_url}{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()


def _sampling_params(r: GenRequest) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_new_tokens": r.max_new_tokens,
        "temperature": r.temperature,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if r.stop_token_ids:
        params["stop_token_ids"] = list(r.stop_token_ids)
    if r.stop_strings:
        params["stop"] = list(r.stop_strings)
    return params


def _generation(out: dict[str, Any], version: int) -> Generation:
    meta = out.get("meta_info", {})
    finish = (meta.get("finish_reason") or {}).get("type", "length")
    if finish == "abort":
        raise SGLangError(f"generation aborted: {meta.get('finish_reason')}")
    entries = meta.get("output_token_logprobs") or []
    tokens = [int(e[1]) for e in entries]
    logprobs = [float(e[0]) for e in entries]
    return Generation(tokens, logprobs, "stop" if finish == "stop" else "length", version)
