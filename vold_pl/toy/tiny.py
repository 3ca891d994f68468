"""Offline tiny models: a locally trained tokenizer, a tiny Qwen2.5-VL student and a tiny text-only teacher.

Nothing here touches a model hub. The tokenizer is a byte-level BPE trained with ``tokenizers`` on the
project's own corpus (the synthetic generator's texts), with the Qwen chat special tokens, so the tiny
student and teacher share one vocabulary exactly as Qwen2.5-VL and Qwen3 do at full size.

``python -m vold_pl.toy.tiny --out artifacts/tiny`` writes ``student/`` and ``teacher/`` folders in
``save_pretrained`` format (safetensors) that :func:`vold_pl.models.factory.load_student` and
:func:`~vold_pl.models.factory.load_teacher` reload like any hub id.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

# Qwen's chat and vision special tokens, plus the reasoning tags the rewards look for.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added (non-special) tokens: they must survive ``skip_special_tokens=True`` decoding so rewards see them.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# A Qwen2.5-VL-style chat template: images become <|vision_start|><|image_pad|><|vision_end|>, which the
# processor expands to one <|image_pad|> per merged 28-px patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE_CORPUS = [
    "You are a helpful assistant.",
    "system user assistant",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 + - * / = ( ) . , ? !",
    "yes no A B C D E Options: The answer is",
]


@dataclass
class TinySizes:
    """Sizes of the tiny models; defaults give a ~1M-parameter student that runs a step in well under a second."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    teacher_hidden_size: int = 128
    teacher_layers: int = 2
    max_position_embeddings: int = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer with the Qwen special tokens and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_BASE_CORPUS) + list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
        padding_side="left",
    )
    # Added after training, as in Qwen3's vocabulary: whole tokens that decoding keeps.
    hf.add_tokens(REASONING_TOKENS)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_image_processor(image_size: int = 112):
    """A PIL Qwen2-VL image processor pinned to ``image_size``² pixels (torchvision is not needed)."""
    from transformers import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels,
                                    size={"shortest_edge": pixels, "longest_edge": pixels})


def _student_config(tokenizer, sizes: TinySizes):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        # mrope splits each head's rotary dims into (temporal, height, width) sections summing to head_dim/2.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(sizes)},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=sizes.vision_depth,
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=2 * sizes.vision_hidden_size,
        num_heads=sizes.vision_heads,
        out_hidden_size=sizes.hidden_size,
        fullatt_block_indexes=[sizes.vision_depth - 1],
        window_size=112,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def _mrope_section(sizes: TinySizes) -> list[int]:
    half = sizes.hidden_size // sizes.num_heads // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _teacher_config(tokenizer, sizes: TinySizes):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes.teacher_hidden_size,
        intermediate_size=2 * sizes.teacher_hidden_size,
        num_hidden_layers=sizes.teacher_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        head_dim=sizes.teacher_hidden_size // sizes.num_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )


def build_tiny_models(texts: Iterable[str], sizes: TinySizes | None = None, seed: int = 0, image_size: int = 112):
    """Return ``(processor, student, teacher_tokenizer, teacher)`` built from configs, no downloads.

    The teacher gets a copy of the student's tokenizer so token ids line up one for one.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM

    from vold_pl.models.processor import Qwen2_5_VLImageTextProcessor

    sizes = sizes or TinySizes()
    tokenizer = train_tokenizer(texts, sizes.vocab_size)
    processor = Qwen2_5_VLImageTextProcessor(image_processor=make_image_processor(image_size), tokenizer=tokenizer,
                                             chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    student = Qwen2_5_VLForConditionalGeneration(_student_config(tokenizer, sizes))
    torch.manual_seed(seed + 1)
    teacher = Qwen3ForCausalLM(_teacher_config(tokenizer, sizes))
    for m in (student, teacher):
        m.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        m.generation_config.pad_token_id = tokenizer.pad_token_id
        m.generation_config.bos_token_id = None
    return processor, student, tokenizer, teacher


def save_tiny_models(out: str | Path, texts: Iterable[str], sizes: TinySizes | None = None,
                     seed: int = 0) -> dict[str, Path]:
    """Build and save ``out/student`` (model + processor) and ``out/teacher`` (model + tokenizer)."""
    out = Path(out)
    processor, student, tokenizer, teacher = build_tiny_models(texts, sizes, seed)
    paths = {"student": out / "student", "teacher": out / "teacher"}
    student.save_pretrained(paths["student"], safe_serialization=True)
    processor.save_pretrained(paths["student"])
    teacher.save_pretrained(paths["teacher"], safe_serialization=True)
    tokenizer.save_pretrained(paths["teacher"])
    return paths


def reseed_tiny_models(src: str | Path, out: str | Path, seed: int) -> dict[str, Path]:
    """Copy the tiny models of ``src`` (a ``save_tiny_models`` folder) to ``out`` with weights drawn from ``seed``.

    Configs, tokenizer and processor are kept, so every seed reads the same data files; only the initial weights
    change, drawn as ``build_tiny_models`` draws them (``seed`` for the student, ``seed + 1`` for the teacher):
    ``seed=0`` gives back the weights ``make artifacts`` saved.
    """
    import shutil

    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen3ForCausalLM

    src, out = Path(src), Path(out)
    paths = {"student": out / "student", "teacher": out / "teacher"}
    for offset, (name, cls) in enumerate((("student", Qwen2_5_VLForConditionalGeneration),
                                          ("teacher", Qwen3ForCausalLM))):
        torch.manual_seed(seed + offset)
        model = cls(AutoConfig.from_pretrained(src / name))
        # Everything but the weights (tokenizer, processor, generation config) is copied as saved.
        shutil.copytree(src / name, paths[name], dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
        model.save_pretrained(paths[name], safe_serialization=True)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline tiny student (Qwen2.5-VL) and teacher (Qwen3).")
    parser.add_argument("--out", required=True, help="folder to write student/ and teacher/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and the tokenizer corpus")
    parser.add_argument("--hidden-size", type=int, default=TinySizes.hidden_size, help="student LM hidden size")
    parser.add_argument("--layers", type=int, default=TinySizes.num_layers, help="student LM decoder layers")
    parser.add_argument("--teacher-hidden-size", type=int, default=TinySizes.teacher_hidden_size,
                        help="teacher hidden size")
    parser.add_argument("--teacher-layers", type=int, default=TinySizes.teacher_layers, help="teacher decoder layers")
    parser.add_argument("--vision-hidden-size", type=int, default=TinySizes.vision_hidden_size,
                        help="student vision tower hidden size")
    parser.add_argument("--vision-depth", type=int, default=TinySizes.vision_depth, help="student vision tower blocks")
    parser.add_argument("--vocab-size", type=int, default=TinySizes.vocab_size, help="BPE vocabulary size")
    args = parser.parse_args(argv)
    from vold_pl.data.synthetic import corpus_texts

    sizes = TinySizes(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
                      teacher_hidden_size=args.teacher_hidden_size, teacher_layers=args.teacher_layers,
                      vision_hidden_size=args.vision_hidden_size, vision_depth=args.vision_depth)
    paths = save_tiny_models(args.out, corpus_texts(seed=args.seed), sizes, seed=args.seed)
    print(f"tiny student -> {paths['student']}\ntiny teacher -> {paths['teacher']}")


if __name__ == "__main__":
    main()
