"""Padded training batches built from scored trajectories.

Layout: right-padded ``[B, T]`` tensors aligned with ``input_ids``. A per-token quantity at position
``t`` refers to token ``input_ids[:, t]`` and is predicted by the logits at ``t − 1`` (see
``learner.ipa.token_logprobs``); position 0 is never a target, so an action token there (empty
prompt) carries no loss. Chunk tensors are ``[B, Kmax]``, indexed by the chunk's position in
``traj.chunks``.

Segments. A trajectory whose agent edited its history (``Chunk.context_tokens``, see
``schemas.trajectory.segments``) is laid out as one row per segment: each row holds its context and
its own chunks' tokens, while the chunk tensors of every row of the sample are the sample's (rewards
and returns over all its chunks), and a chunk is present only in the row that holds its tokens. So
every generated token is trained exactly once, under the context it was generated in.
``row_sample`` maps rows back to samples (for group baselines and per-sample losses).

Rewards. The effective reward of a sample is ``R' = R + failure_reward`` when ``R ≤ 0`` and ``R``
otherwise. Per-chunk rewards ``r_j`` are ``chunk_rewards`` when the scorer gave one per chunk (the
terminal reward included in the last one; ``failure_reward`` is added to the last one on failure),
otherwise ``r_K = R'`` and all other ``r_j = 0``, so ``G_k = γ^{K−k} R'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from learner.ipa import chunk_returns
from schemas.arrays import unpack_logprobs, unpack_tokens
from schemas.trajectory import Chunk, ScoredTrajectory, segments

ERROR_STATUSES = frozenset({"error", "parse_error"})
"""Tool statuses whose chunks error masking removes (``timeout`` is the environment's fault)."""


class BatchError(ValueError):
    """A sample cannot be laid out for training (its arrays disagree); the sample is poison."""


@dataclass(frozen=True, slots=True)
class Batch:
    """One padded batch; every tensor is on the CPU until ``to`` moves it to the model's device."""

    input_ids: torch.Tensor  # [B, T] int64, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, T] int64
    action_mask: torch.Tensor  # [B, T] bool: a target action token (loss-bearing)
    chunk_id: torch.Tensor  # [B, T] int64: chunk index of a target action token, −1 elsewhere
    behaviour_logprobs: torch.Tensor  # [B, T] float32: log π_b of the token at t, 0 elsewhere
    chunk_rewards: torch.Tensor  # [B, Kmax] float32: r_j, 0 for padding chunks
    chunk_returns: torch.Tensor  # [B, Kmax] float32: G_k
    chunk_discount: torch.Tensor  # [B, Kmax] float32: γ^{K−k} for real chunks, 0 for padding
    chunk_present: torch.Tensor  # [B, Kmax] bool: a real chunk with at least one target token
    chunk_valid: torch.Tensor  # [B, Kmax] bool: present and its tool status is not error/parse_error
    rewards: torch.Tensor  # [B] float32: effective reward R'
    group_ids: list[str]
    row_sample: list[
        int
    ]  # [B]: the index of the sample each row belongs to (rows of one sample are adjacent)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_returns.shape[1])

    def to(self, device: torch.device) -> Batch:
        """The same batch with every tensor on ``device`` (the learner's model's)."""
        if self.input_ids.device == device:
            return self
        moved: dict[str, Any] = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in ((f, getattr(self, f)) for f in self.__dataclass_fields__)
        }
        return Batch(**moved)

    def rows(self, start: int, stop: int) -> Batch:
        """The micro-batch of samples ``start:stop`` (trimmed to its own longest sequence)."""
        t = max(int(self.attention_mask[start:stop].sum(dim=1).max().item()), 1)
        return Batch(
            input_ids=self.input_ids[start:stop, :t],
            attention_mask=self.attention_mask[start:stop, :t],
            action_mask=self.action_mask[start:stop, :t],
            chunk_id=self.chunk_id[start:stop, :t],
            behaviour_logprobs=self.behaviour_logprobs[start:stop, :t],
            chunk_rewards=self.chunk_rewards[start:stop],
            chunk_returns=self.chunk_returns[start:stop],
            chunk_discount=self.chunk_discount[start:stop],
            chunk_present=self.chunk_present[start:stop],
            chunk_valid=self.chunk_valid[start:stop],
            rewards=self.rewards[start:stop],
            group_ids=self.group_ids[start:stop],
            row_sample=self.row_sample[start:stop],
        )


def effective_reward(reward: float, failure_reward: float) -> float:
    """``R + failure_reward`` for a failure (``R ≤ 0``), ``R`` otherwise."""
    return reward + failure_reward if reward <= 0 else reward


def _chunk_arrays(chunk: Chunk) -> tuple[list[int], list[float], list[int]]:
    actions = unpack_tokens(chunk.action_tokens).tolist()
    logprobs = unpack_logprobs(chunk.action_logprobs).tolist()
    if len(actions) != len(logprobs):
        raise BatchError(
            f"chunk {chunk.index} has {len(actions)} action tokens but {len(logprobs)} log-probabilities"
        )
    return actions, logprobs, unpack_tokens(chunk.obs_tokens).tolist()


def _per_chunk_rewards(sample: ScoredTrajectory, failure_reward: float) -> list[float]:
    k = len(sample.traj.chunks)
    if k == 0:
        return []
    offset = effective_reward(sample.reward, failure_reward) - sample.reward
    if sample.chunk_rewards:
        if len(sample.chunk_rewards) != k:
            raise BatchError(f"{len(sample.chunk_rewards)} chunk rewards for {k} chunks")
        rewards = list(sample.chunk_rewards)
        rewards[-1] += offset
        return rewards
    return [0.0] * (k - 1) + [sample.reward + offset]


def build_batch(
    samples: Sequence[ScoredTrajectory], *, pad_id: int, gamma: float, failure_reward: float
) -> Batch:
    """Lay out ``samples`` as one right-padded batch (see the module docstring for the layout)."""
    if not samples:
        raise BatchError("cannot build a batch from no samples")
    seqs: list[list[int]] = []
    targets: list[list[tuple[int, float]]] = []  # per position: (chunk index or −1, behaviour logprob)
    row_sample: list[int] = []
    for i, sample in enumerate(samples):
        k = 0
        for context, chunks in segments(sample.traj):
            ids = unpack_tokens(context).tolist()
            tgt: list[tuple[int, float]] = [(-1, 0.0)] * len(ids)
            for chunk in chunks:
                actions, logprobs, obs = _chunk_arrays(chunk)
                ids += actions + obs
                tgt += [(k, lp) for lp in logprobs] + [(-1, 0.0)] * len(obs)
                k += 1
            if tgt:
                tgt[0] = (-1, 0.0)  # position 0 has no logits to predict it
            seqs.append(ids)
            targets.append(tgt)
            row_sample.append(i)

    b, t = len(seqs), max(1, max(len(s) for s in seqs))
    k_max = max(1, max(len(s.traj.chunks) for s in samples))
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    chunk_id = torch.full((b, t), -1, dtype=torch.long)
    behaviour = torch.zeros((b, t), dtype=torch.float32)
    rewards_k = torch.zeros((b, k_max), dtype=torch.float32)
    discount = torch.zeros((b, k_max), dtype=torch.float32)
    not_error = torch.zeros((b, k_max), dtype=torch.bool)
    for i, (ids, tgt) in enumerate(zip(seqs, targets, strict=True)):
        sample = samples[row_sample[i]]
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        chunk_id[i, :n] = torch.tensor([c for c, _ in tgt], dtype=torch.long)
        behaviour[i, :n] = torch.tensor([lp for _, lp in tgt], dtype=torch.float32)
        chunks = sample.traj.chunks
        k = len(chunks)
        rewards_k[i, :k] = torch.tensor(_per_chunk_rewards(sample, failure_reward), dtype=torch.float32)
        discount[i, :k] = torch.tensor([gamma ** (k - 1 - j) for j in range(k)], dtype=torch.float32)
        not_error[i, :k] = torch.tensor([c.tool_status not in ERROR_STATUSES for c in chunks])

    counts = torch.zeros((b, k_max), dtype=torch.long)
    counts.scatter_add_(1, chunk_id.clamp(min=0), (chunk_id >= 0).long())
    present = counts > 0
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        action_mask=chunk_id >= 0,
        chunk_id=chunk_id,
        behaviour_logprobs=behaviour,
        chunk_rewards=rewards_k,
        chunk_returns=chunk_returns(rewards_k, gamma),
        chunk_discount=discount,
        chunk_present=present,
        chunk_valid=present & not_error,
        rewards=torch.tensor(
            [effective_reward(samples[j].reward, failure_reward) for j in row_sample], dtype=torch.float32
        ),
        group_ids=[samples[j].traj.group_id for j in row_sample],
        row_sample=row_sample,
    )
