"""A scripted engine: an ``InferenceEngine`` whose actions come from a script, not a model.

A task family's expert subclasses ``ScriptedEngine`` and writes ``next_action(context)``: the next
assistant message given the whole episode text so far. The message is tokenised with the real
tokenizer and cut like a model's generation (at the first stop token, or at ``max_new_tokens``), so
the expert's trajectories look exactly like the policy's (log-probabilities 0.0).
"""

from __future__ import annotations

from typing import Any

from agent_harness.engine import FinishReason, Generation, GenRequest
from agent_harness.prompt import IM_START, encode

USER_TURN = f"{IM_START}user\n"


def episode_body(context: str) -> str:
    """The episode text from the user's instruction on (without the system prompt and its tools)."""
    start = context.find(USER_TURN)
    return context[start + len(USER_TURN) :] if start >= 0 else context


class ScriptedEngine:
    """``generate`` answers every request with ``next_action`` of its decoded prompt;
    ``load_weights`` only moves ``version`` (its trajectories carry the version it is told)."""

    def __init__(self, *, tokenizer: Any, version: int = 0) -> None:
        self.tokenizer = tokenizer
        self.version = version

    def next_action(self, context: str) -> str:
        """The next assistant message given the whole episode text so far."""
        raise NotImplementedError

    async def generate(self, requests: list[GenRequest]) -> list[Generation]:
        return [self._one(r) for r in requests]

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        self.version = version

    def _one(self, req: GenRequest) -> Generation:
        text = self.tokenizer.decode(req.prompt_tokens, skip_special_tokens=False)
        tokens = encode(self.tokenizer, self.next_action(text))
        allowed = tokens[: req.max_new_tokens]
        stops = set(req.stop_token_ids or ())
        cut = next((i + 1 for i, t in enumerate(allowed) if t in stops), None)
        if cut is not None:
            return Generation(allowed[:cut], [0.0] * cut, "stop", self.version)
        reason: FinishReason = "length" if len(tokens) > req.max_new_tokens else "stop"
        return Generation(allowed, [0.0] * len(allowed), reason, self.version)
