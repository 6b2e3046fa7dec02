"""OpenAI's wire shapes for the model proxy: request parameters, responses, stream chunks, errors.

Only what ``agent_harness.proxy`` serves: ``/v1/chat/completions`` and the legacy
``/v1/completions``, each whole or streamed as server-sent events. A parameter the proxy cannot
honour is refused with an OpenAI-shaped ``invalid_request_error`` naming it, never ignored silently;
``top_p``, ``presence_penalty`` and the like that change nothing the policy can be trained on are
refused too unless they hold their neutral value.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

MAX_N = 8
MAX_STOP = 4
# Parameters accepted only at their neutral value (anything else would sample from another policy
# than the one whose log-probabilities are recorded).
_NEUTRAL: dict[str, float] = {"top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


class WireError(ValueError):
    """A request the proxy refuses: HTTP status, OpenAI error type and the parameter at fault."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status

    def response(self) -> web.Response:
        return error_response(self.status, str(self), param=self.param)


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None
) -> web.Response:
    """An error in OpenAI's shape (``{"error": {message, type, param, code}}``)."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


@dataclass(frozen=True, slots=True)
class Params:
    """The sampling parameters of one request, validated."""

    max_tokens: int | None
    temperature: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise WireError(f"{name} must be a number between {lo:g} and {hi:g}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(f"{name} must be an integer between {lo} and {hi}", param=name)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise WireError(
            f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop"
        )
    return list(stops)


def parse_params(body: dict[str, Any], default_temperature: float = 1.0) -> Params:
    """Validate the sampling parameters shared by chat and legacy completions."""
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and value != neutral:
            raise WireError(f"{name} other than {neutral:g} is not supported by the proxy", param=name)
    if body.get("logit_bias"):
        raise WireError("logit_bias is not supported by the proxy", param="logit_bias")
    limit = _integer(body, "max_completion_tokens", 1, 1 << 20)
    if limit is None:
        limit = _integer(body, "max_tokens", 1, 1 << 20)
    temperature = _number(body, "temperature", 0.0, 2.0)
    options = body.get("stream_options") or {}
    return Params(
        max_tokens=limit,
        temperature=default_temperature if temperature is None else temperature,
        n=_integer(body, "n", 1, MAX_N) or 1,
        stop=_stop(body),
        seed=_integer(body, "seed", -(1 << 63), (1 << 63) - 1),
        stream=bool(body.get("stream")),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
    )


def usage(prompt: int, completions: list[int]) -> dict[str, int]:
    done = sum(completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def chat_response(
    cid: str, model: str, fingerprint: str, choices: list[tuple[dict[str, Any], str]], use: dict[str, int]
) -> dict[str, Any]:
    """A whole ``chat.completion`` from ``(message, finish_reason)`` per choice."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": msg, "finish_reason": finish, "logprobs": None}
            for i, (msg, finish) in enumerate(choices)
        ],
        "usage": use,
        "system_fingerprint": fingerprint,
    }


def chat_stream(
    cid: str,
    model: str,
    fingerprint: str,
    choices: list[tuple[dict[str, Any], str]],
    use: dict[str, int] | None,
) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` events of whole choices: a role delta, the content, each tool
    call (id and name first, then its arguments), the finish reason, then usage if asked."""
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    for i, (msg, finish) in enumerate(choices):
        yield chunk(i, {"role": "assistant", "content": ""})
        if msg.get("content"):
            yield chunk(i, {"content": msg["content"]})
        for k, call in enumerate(msg.get("tool_calls") or []):
            fn = call["function"]
            head = {"index": k, "id": call["id"], "type": "function", "function": {"name": fn["name"]}}
            head["function"]["arguments"] = ""
            yield chunk(i, {"tool_calls": [head]})
            yield chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})
        yield chunk(i, {}, finish)
    if use is not None:
        last = chunk(0, {})
        last["choices"], last["usage"] = [], use
        yield last


def text_response(
    cid: str, model: str, fingerprint: str, choices: list[tuple[str, str]], use: dict[str, int]
) -> dict[str, Any]:
    """A whole legacy ``text_completion`` from ``(text, finish_reason)`` per choice."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": use,
        "system_fingerprint": fingerprint,
    }


def text_stream(
    cid: str, model: str, fingerprint: str, choices: list[tuple[str, str]], use: dict[str, int] | None
) -> Iterator[dict[str, Any]]:
    """Legacy completion events: each choice's text, then its finish reason (then usage if asked)."""
    whole = text_response(cid, model, fingerprint, [], use or {})
    for i, (text, finish) in enumerate(choices):
        for piece, reason in ((text, None), ("", finish)):
            event = dict(
                whole, choices=[{"index": i, "text": piece, "finish_reason": reason, "logprobs": None}]
            )
            event.pop("usage")
            yield event
    if use is not None:
        yield dict(whole, choices=[])


async def send_events(
    request: web.Request, events: Iterator[dict[str, Any]], headers: dict[str, str]
) -> web.StreamResponse:
    """Write ``events`` as server-sent events (``data: {...}``), then ``data: [DONE]``."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    for event in events:
        await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def trim_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string (OpenAI leaves the stop out); whether one was hit."""
    cut = min((at for at in (text.find(s) for s in stops) if at >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
