"""Loading models the same way for a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) and a local folder.

A VLM (its config has a ``vision_config``) loads as ``AutoModelForImageTextToText`` with an
:class:`~vold_pl.models.processor.ImageTextProcessor`; a text-only LLM as ``AutoModelForCausalLM`` with its
tokenizer. ``trust_remote_code`` is off unless the config asks for it. Quantized loading (bitsandbytes 4-bit
NF4 or 8-bit) is for frozen models: the teacher and the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Quantization = Literal["none", "4bit", "8bit"]
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it.

    Args:
        name_or_path: a hub id (e.g. ``Qwen/Qwen3-8B``) or a local folder in ``save_pretrained`` format.
        dtype: weight dtype: ``float32`` (CPU), ``bfloat16`` (GPU), ``float16`` or ``auto``.
        quantization: ``none``, ``4bit`` (NF4) or ``8bit`` through bitsandbytes; frozen models only.
        attn_implementation: ``sdpa`` (default), ``eager`` or ``flash_attention_2`` (GPU with flash-attn).
        trust_remote_code: run code shipped with the model repo; off unless you trust its source.
        revision: a hub branch, tag or commit, pinned for reproducibility.
    """

    name_or_path: str
    dtype: str = "float32"
    quantization: Quantization = "none"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    revision: str | None = None


def is_vision_model(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> bool:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    return getattr(cfg, "vision_config", None) is not None


def _quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    compute = _DTYPES.get(spec.dtype, torch.float32)
    compute = torch.float32 if compute == "auto" else compute
    if spec.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_use_double_quant=True)
    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be one of none, 4bit, 8bit; got {spec.quantization!r}")


def load_model(spec: ModelSpec):
    """Load ``(model, processor_or_tokenizer)``; a VLM gets its processor, a text LLM its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    if spec.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {spec.dtype!r}")
    kwargs = dict(dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation,
                  trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    qcfg = _quantization_config(spec)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": _default_device()}
    if is_vision_model(spec.name_or_path, spec.trust_remote_code, spec.revision):
        from vold_pl.models.processor import ImageTextProcessor

        model = AutoModelForImageTextToText.from_pretrained(spec.name_or_path, **kwargs)
        processor = ImageTextProcessor.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                                       revision=spec.revision)
        return model, processor
    model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                              revision=spec.revision)
    return model, tokenizer


def _default_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: teachers and references never train."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def get_tokenizer(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


# Tokens whose ids must agree for the teacher to score the student's tokens one for one.
ALIGNMENT_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>")
_PROBE_TEXT = "<think> 3 red squares + 2 blue circles = 5 </think><answer>5</answer>"


def check_tokenizers_aligned(student_tok, teacher_tok, student_vocab: int | None = None,
                             teacher_vocab: int | None = None) -> None:
    """Raise ``ValueError`` unless teacher and student tokenise text to the same ids.

    On-policy distillation feeds the student's sampled token ids to the teacher, so a vocabulary mismatch
    would silently score the wrong tokens. Checks the special/added tokens the rewards rely on, a probe text,
    and (when given) that the teacher's output layer covers every student id.
    """
    problems = []
    for t in ALIGNMENT_TOKENS:
        s_id, t_id = student_tok.convert_tokens_to_ids(t), teacher_tok.convert_tokens_to_ids(t)
        if s_id != t_id:
            problems.append(f"{t!r}: student id {s_id}, teacher id {t_id}")
    s_ids = student_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if s_ids != t_ids:
        problems.append(f"probe text {_PROBE_TEXT!r} tokenises differently ({s_ids[:8]}… vs {t_ids[:8]}…)")
    if student_vocab is not None and teacher_vocab is not None and teacher_vocab < len(student_tok):
        problems.append(f"teacher vocabulary ({teacher_vocab}) is smaller than the student tokenizer ({len(student_tok)})")
    if problems:
        raise ValueError(
            "teacher and student tokenizers do not line up, so the teacher cannot score the student's tokens: "
            + "; ".join(problems)
            + ". Use a teacher from the same tokenizer family (e.g. Qwen3 for a Qwen2.5-VL student) or set opd.lam: 0."
        )


def load_processor(spec: ModelSpec):
    """The processor (VLM) or tokenizer (text LLM) alone, without loading weights."""
    from transformers import AutoTokenizer

    if is_vision_model(spec.name_or_path, spec.trust_remote_code, spec.revision):
        from vold_pl.models.processor import ImageTextProcessor

        return ImageTextProcessor.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                                  revision=spec.revision)
    return AutoTokenizer.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                         revision=spec.revision)
