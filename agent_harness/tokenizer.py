"""A small byte-level BPE tokenizer trained locally on a text corpus its caller supplies.

Nothing is downloaded: the caller passes the corpus (the default policy's comes from the ``files``
task family: instructions, expert tool calls, observations, JSON, common shell output), the
tokenizer is trained with ``tokenizers`` and wrapped as a ``PreTrainedTokenizerFast`` with a
Qwen-style chat template.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *TOOL_CALL_TOKENS, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

LEGACY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""The template of policies made before tools went through the template (upgraded on load)."""

CHAT_TEMPLATE = (
    # The embedded policy's framing, unchanged since its first checkpoints: the tool schemas and one
    # example call follow the system text (or make the system message when there is none); tool
    # results come back as a user turn of <tool_response> blocks; Hermes-style <tool_call> calls.
    "{%- macro tools_block() -%}"
    "{{- 'Tools:\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson(separators=(',', ':')) + '\\n' -}}{%- endfor -%}"
    "{%- set f = tools[0].function -%}"
    '{{- \'Call a tool like this:\\n<tool_call>\\n{"name":"\' + f.name + \'","arguments":{\' -}}'
    "{%- if f.name == 'bash' -%}{{- '\"command\":\"ls\"' -}}"
    "{%- else -%}{%- for p in f.parameters.properties -%}"
    "{{- '\"' + p + '\":\"...\"' -}}{%- if not loop.last -%},{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '}}\\n</tool_call>' -}}"
    "{%- endmacro -%}"
    "{%- if tools and messages[0].role != 'system' -%}"
    "{{- '<|im_start|>system\\n' + tools_block() + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + message.content -}}"
    "{%- if tools -%}{{- '\\n' + tools_block() -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int = 1024,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    eos: str = IM_END,
    pad: str = ENDOFTEXT,
    bos: str | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``corpus`` and wrap it with special tokens and the chat template
    (by default the embedded policy's; ``agent_harness.architectures`` passes other families')."""
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
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        unk_token=None,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast
