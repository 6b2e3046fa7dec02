"""A small byte-level BPE tokenizer trained locally on the built-in task family.

Nothing is downloaded: the corpus is generated from ``producers.builtin`` (instructions, expert
tool calls, observations, JSON, common shell output), the tokenizer is trained with ``tokenizers``
and wrapped as a ``PreTrainedTokenizerFast`` with a Qwen-style chat template.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from agent_harness.prompt import ENDOFTEXT, IM_END, IM_START, render_transcript
from agent_harness.tools import ToolRegistry, format_tool_call
from producers.builtin import WORDS, builtin_tasks, solution_commands

TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *TOOL_CALL_TOKENS, "<tool_response>", "</tool_response>")

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SHELL_NOISE = (
    "cat: {f}: No such file or directory\n",
    "sh: 1: {w}: not found\n",
    "bash: {w}: command not found\n",
    "ls: cannot access '{f}': No such file or directory\n",
    "[exit code 1]",
    "[exit code 127]",
    "error: unknown tool '{w}'; tools: bash, submit",
    "error: the tool call is not valid JSON",
    "error: no <tool_call> in the message",
    "answer.txt\nnote.txt\nstart.txt\n{f}\n",
    "[timed out after 10s]",
    "[output truncated]",
    "submitted",
)


def corpus(*, seed: int = 0, episodes: int = 600) -> Iterator[str]:
    """Expert transcripts of built-in tasks plus some shell noise and plain words."""
    rng = random.Random(seed)
    registry = ToolRegistry()
    for task in builtin_tasks(seed=seed, count=episodes, levels=(1, 2, 3, 4)):
        chain = task.metadata["chain"].split()
        word = task.metadata["answer"]
        turns = []
        responses = [*chain[1:], word] if chain else []
        for cmd, resp in zip(solution_commands(task), [*responses, ""], strict=False):
            turns.append((format_tool_call("bash", {"command": cmd}), f"{resp}\n" if resp else ""))
        turns.append((format_tool_call("submit", {"answer": word}), "submitted"))
        yield render_transcript(task.instruction, turns, registry)
        f = f"{rng.choice(('box', 'map', 'note', 'start', 'key'))}.txt"
        yield rng.choice(_SHELL_NOISE).format(f=f, w=rng.choice(WORDS))
    yield " ".join(WORDS) + "\n"
    yield "ls cat echo printf grep head tail wc sort test cd pwd mkdir rm cp mv true false > >> | && ;"


def train_tokenizer(*, vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE and wrap it with special tokens and the chat template."""
    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's normaliser and pre-tokeniser: AutoTokenizer maps a qwen2 checkpoint to
    # Qwen2Tokenizer, which installs these; training with the same keeps both encodings equal.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
