"""Loading models the same way for a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``) and a local folder.

A VLM (its config has a ``vision_config``) loads as ``AutoModelForImageTextToText`` with a
:class:`~vold_pl.models.processor.Qwen2_5_VLImageTextProcessor` (Qwen2.5-VL is the VLM family served; another is
refused by :func:`~vold_pl.models.processor.check_vision_family`); a text-only LLM as ``AutoModelForCausalLM`` with its
tokenizer. ``trust_remote_code`` is off unless the config asks for it. Quantized loading (bitsandbytes 4-bit
NF4 or 8-bit) is for frozen models: the teacher and the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from vold_pl.errors import UserError
from vold_pl.models.lora import LoRAConfig

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
        align_tokens_with: make this model's tokenizer line up with another Qwen-family tokenizer, at load
            time: ``none`` (default: the tokenizer as saved); ``teacher`` (OPD-GRPO: the module's teacher); or
            a tokenizer's hub id or folder (e.g. ``Qwen/Qwen3-8B`` for the cold-start SFT, which has no
            teacher). The other tokenizer's added tokens that this one lacks are added at the other's ids, so
            ``<think>`` in a trace is the one id the teacher scores. Allowed only when those ids follow this
            tokenizer's last id without a gap and lie below the model's embedding rows (Qwen2.5-VL + Qwen3:
            ``<tool_response>`` … ``</think>`` at 151665-151668 < 151936 rows); anything else (a shared token at
            another id, a gap, no row for the id, a different BPE) is an error naming the reason. The export
            saves the aligned tokenizer, so later stages load it as is (a second alignment is a no-op).
        lora: LoRA adapters for the trained model (``r: 0``, the default, trains every weight); see
            :class:`vold_pl.models.lora.LoRAConfig`. Ignored for frozen teachers and references.
        min_pixels: a VLM's image processor scales each image up to at least this many pixels (Qwen2.5-VL's
            own default: 3136 = 56x56); ``0`` keeps the model folder's setting. Text-only models ignore it.
        max_pixels: ... and down to at most this many (Qwen2.5-VL's default 12845056 lets a large image become
            16384 tokens; 1003520 = 1280x28x28 caps it at 1280); ``0`` keeps the model folder's setting. The
            export saves the processor with these values.
    """

    name_or_path: str
    dtype: str = "float32"
    quantization: Quantization = "none"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    revision: str | None = None
    align_tokens_with: str = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    min_pixels: int = 0
    max_pixels: int = 0


MODEL_KEY = "model.init_args.model.name_or_path"  # the config key of the trained model's path


class ModelPathError(UserError, FileNotFoundError):
    """A model path that is neither a local ``save_pretrained`` folder nor a model the hub can serve."""


def load_config(spec: ModelSpec, key: str = MODEL_KEY):
    """The model's ``config.json`` (no weights); a path that cannot be found is one :class:`ModelPathError`
    naming the path, the config ``key`` that holds it and what produces it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                          revision=spec.revision)
    except (OSError, ValueError) as e:  # hub validation errors are ValueErrors, missing files OSErrors
        raise ModelPathError(model_path_message(spec.name_or_path, key, e)) from None


def model_path_message(path: str, key: str, error: BaseException | None = None) -> str:
    """One line: which path under which config key could not be loaded, and what to do about it."""
    if os.path.isdir(path):
        return (f"{key}: {path!r} is a folder but not a model saved with save_pretrained ({error}). Point {key} at "
                "the folder holding config.json and the weights (an export folder), or rebuild it.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    where = "nor cached for offline use (HF_HUB_OFFLINE is set)" if offline else "nor a model on the hub"
    return f"{key}: model path {path!r} is neither a local folder {where}. {_producer_hint(path, key)}"


def _producer_hint(path: str, key: str) -> str:
    norm = os.path.normpath(path)
    if norm.split(os.sep)[0] == "artifacts" or f"{os.sep}artifacts{os.sep}" in norm:
        return ("The offline tiny models and data under artifacts/ are built by `make artifacts`; run "
                "`make quickstart` "
                f"first (it builds them and runs every quickstart stage), or point {key} at an existing folder.")
    producer = _config_exporting(norm)
    if producer is not None:
        return (f"It is the export of `vold-pl fit --config {producer}`: run that stage first (`make quickstart` runs "
                f"the quickstart stages in order), or point {key} at an existing export folder.")
    if norm.split(os.sep)[0] == "runs" or os.sep in norm.strip(os.sep).split(os.sep, 1)[-1]:
        return (f"Folders under runs/ are written by earlier stages (their export_dir): run that stage first, or point "
                f"{key} at an existing folder.")
    return (f"Give {key} a local save_pretrained folder, or a hub id such as Qwen/Qwen2.5-VL-3B-Instruct (online, or "
            "downloaded once with `huggingface-cli download` for offline use).")


def _config_exporting(path: str) -> str | None:
    """The shipped config (``configs/**/*.yaml`` under the working directory) whose fit exports to ``path``."""
    import glob

    import yaml

    for cfg_file in sorted(glob.glob(os.path.join("configs", "**", "*.yaml"), recursive=True)):
        try:
            with open(cfg_file, encoding="utf-8") as fh:
                cfg = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(cfg, dict) or not isinstance(cfg.get("trainer"), dict):
            continue
        init = ((cfg.get("model") or {}).get("init_args") or {}) if isinstance(cfg.get("model"), dict) else {}
        export_dir = init.get("export_dir")
        root = cfg["trainer"].get("default_root_dir")
        candidates = [export_dir] if export_dir else ([os.path.join(root, "export")] if root else [])
        if init.get("export", True) is not False and any(os.path.normpath(c) == path for c in candidates):
            return cfg_file
    return None


def is_vision_model(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                    key: str = MODEL_KEY) -> bool:
    """Whether the model is a VLM (its config has a ``vision_config``); a VLM of a family vold-pl does not serve
    raises :class:`~vold_pl.models.processor.UnsupportedVisionModelError` here, before anything loads it."""
    cfg = load_config(ModelSpec(name_or_path, trust_remote_code=trust_remote_code, revision=revision), key)
    if getattr(cfg, "vision_config", None) is None:
        return False
    from vold_pl.models.processor import check_vision_family

    check_vision_family(cfg, name_or_path, key)
    return True


def embedding_rows(spec: ModelSpec, key: str = MODEL_KEY) -> int:
    """Rows of the model's token embedding (``vocab_size`` of its text config), read from config.json alone."""
    cfg = load_config(spec, key)
    return int(cfg.get_text_config().vocab_size)


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
    raise UserError(f"quantization must be one of none, 4bit, 8bit; got {spec.quantization!r}")


def load_model(spec: ModelSpec, with_processor: bool = True):
    """Load ``(model, processor_or_tokenizer)``; a VLM gets its processor, a text LLM its tokenizer.

    ``with_processor=False`` returns ``(model, None)``: the modules load their processor once, through
    :func:`load_processor` (which applies ``align_tokens_with``); a 151k-token tokenizer takes seconds to load.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if spec.dtype not in _DTYPES:
        raise UserError(f"dtype must be one of {sorted(_DTYPES)}; got {spec.dtype!r}")
    kwargs = dict(dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation,
                  trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    qcfg = _quantization_config(spec)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": _default_device()}
    if is_vision_model(spec.name_or_path, spec.trust_remote_code, spec.revision):
        model = AutoModelForImageTextToText.from_pretrained(spec.name_or_path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, **kwargs)
    return model, (load_processor(ModelSpec(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                            revision=spec.revision, min_pixels=spec.min_pixels,
                                            max_pixels=spec.max_pixels)) if with_processor else None)


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


# Tokens whose ids must agree for the teacher to score the student's tokens one for one (besides every added
# token of either tokenizer). ``<answer>`` is plain text in the Qwen vocabulary: the probe covers it.
ALIGNMENT_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
# What a rollout looks like: chat markers, the reasoning and answer tags, digits, LaTeX, punctuation.
_PROBE_TEXT = ("<|im_start|>user\nHow many shapes? Put the answer in <answer></answer>.<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n3 red squares + 2 blue circles = 5\n</think>\n"
               "<answer>\\boxed{5}</answer><|im_end|>")
ALIGN_OPTION = "model.init_args.model.align_tokens_with"


class TokenizerMismatchError(UserError):
    """The teacher cannot score the student's token ids: the message gives every reason and the remedy."""


def _added_tokens(tok) -> dict[str, int]:
    """Added tokens (special or not) of a tokenizer, content -> id."""
    return {t.content: int(i) for i, t in tok.added_tokens_decoder.items()}


def check_tokenizers_aligned(student_tok, teacher_tok, student_vocab: int | None = None,
                             teacher_vocab: int | None = None) -> None:
    """Raise :class:`TokenizerMismatchError` unless teacher and student tokenise text to the same ids.

    On-policy distillation feeds the student's sampled token ids to the teacher, so a vocabulary mismatch
    would silently score the wrong tokens. Checks that every added token of either tokenizer (and the chat and
    reasoning tags) has one and the same id in both, that a probe rollout tokenises identically (same BPE),
    and (when given) that the teacher's embedding rows cover every id the student can produce.
    """
    problems, student_lacks, conflicts = [], [], 0
    s_added, t_added = _added_tokens(student_tok), _added_tokens(teacher_tok)
    for t in sorted(set(ALIGNMENT_TOKENS) | set(s_added) | set(t_added), key=lambda t: (t_added.get(t, 1 << 30), t)):
        s_id, t_id = student_tok.convert_tokens_to_ids(t), teacher_tok.convert_tokens_to_ids(t)
        s_id = None if s_id == student_tok.unk_token_id and t not in s_added else s_id
        t_id = None if t_id == teacher_tok.unk_token_id and t not in t_added else t_id
        if s_id == t_id:
            continue
        if s_id is None:
            student_lacks.append(f"{t!r} (teacher id {t_id})")
        else:
            conflicts += 1
            problems.append(f"{t!r}: student id {s_id}, teacher id {t_id}")
    if student_lacks:
        problems.insert(0, "the student's tokenizer lacks the teacher's added tokens " + ", ".join(student_lacks))
    s_ids = student_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    t_ids = teacher_tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if s_ids != t_ids:
        at = next((i for i, (a, b) in enumerate(zip(s_ids, t_ids)) if a != b), min(len(s_ids), len(t_ids)))
        problems.append(f"a probe rollout tokenises differently from token {at} on (student {s_ids[at:at + 6]}…, "
                        f"teacher {t_ids[at:at + 6]}…)")
    if teacher_vocab is not None:
        need = max(len(student_tok), student_vocab or 0)
        if teacher_vocab < need:
            problems.append(f"the teacher's vocabulary ({teacher_vocab} embedding rows) is smaller than the "
                            "student tokenizer "
                            f"and embedding ({need} ids the student can produce)")
    if problems:
        if student_lacks and not conflicts:  # the student's vocabulary may extend to the teacher's
            remedy = (f" Set {ALIGN_OPTION}: teacher (the student's tokenizer takes the teacher's added tokens at the "
                      "teacher's ids, where they fit its embedding rows); if that is refused, the pair cannot be "
                      "aligned: use a teacher of the student's tokenizer family or opd.lam: 0.")
        else:
            remedy = (" Use a teacher from the same tokenizer family (e.g. Qwen3 for a Qwen2.5-VL student) or set "
                      "opd.lam: 0.")
        raise TokenizerMismatchError(
            "teacher and student tokenizers do not line up, so the teacher cannot score the student's tokens: "
            + "; ".join(problems) + "." + remedy)


def align_added_tokens(tokenizer, reference, rows: int) -> list[str]:
    """Give ``tokenizer`` the added tokens of ``reference`` it lacks, at ``reference``'s ids; returns them.

    Only an extension is allowed: the missing ids must follow ``tokenizer``'s last id without a gap and lie
    below ``rows`` (the model's embedding rows, so each new id has a row to train); a token the two share
    must already have the same id. Anything else raises :class:`TokenizerMismatchError` with the reason.
    Idempotent: an aligned tokenizer gets nothing added.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    ref = {int(i): t for i, t in reference.added_tokens_decoder.items()}
    shifted = [f"{t.content!r} (here {vocab[t.content]}, there {i})" for i, t in sorted(ref.items())
               if t.content in vocab and vocab[t.content] != i]
    if shifted:
        raise TokenizerMismatchError(
            f"{ALIGN_OPTION}: the tokenizers share added tokens at different ids: {', '.join(shifted)}; they are not "
            "the same vocabulary with tokens appended, so no alignment can make the ids agree. Use a teacher of the "
            "student's tokenizer family.")
    missing = [(i, t) for i, t in sorted(ref.items()) if t.content not in vocab]
    if not missing:
        return []
    start, ids = len(tokenizer), [i for i, _ in missing]
    if ids != list(range(start, start + len(ids))):
        raise TokenizerMismatchError(
            f"{ALIGN_OPTION}: the missing added tokens {[t.content for _, t in missing]} sit at ids {ids}, but this "
            f"tokenizer's next free id is {start}: only tokens that continue it without a gap can be added at the same "
            "ids. The vocabularies are shifted against each other; use a teacher of the student's tokenizer family.")
    if ids[-1] >= rows:
        raise TokenizerMismatchError(
            f"{ALIGN_OPTION}: the missing added tokens need ids up to {ids[-1]}, but the model has only {rows} "
            "embedding "
            "rows; resizing the embeddings would give those tokens untrained rows, so this is refused. Use a teacher "
            "whose added tokens fit the student's embedding rows.")
    for i, t in missing:  # one at a time, in id order: each takes the next free id
        tokenizer.add_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                         normalized=t.normalized, special=t.special)], special_tokens=t.special)
        if tokenizer.convert_tokens_to_ids(t.content) != i:  # pragma: no cover - guarded by the checks above
            raise TokenizerMismatchError(f"{ALIGN_OPTION}: {t.content!r} got id "
                                         f"{tokenizer.convert_tokens_to_ids(t.content)}, expected {i}")
    return [t.content for _, t in missing]


def align_tokenizer(processor_or_tokenizer, spec: ModelSpec, reference_spec: ModelSpec,
                    reference_tok=None, key: str = MODEL_KEY) -> list[str]:
    """Apply ``spec.align_tokens_with`` (resolved to ``reference_spec``): extend, then check strictly.

    Returns the tokens added; prints them on rank zero so the run's log says what changed.
    """
    tok = get_tokenizer(processor_or_tokenizer)
    ref = reference_tok if reference_tok is not None else get_tokenizer(
        load_processor(reference_spec, key=ALIGN_OPTION))
    added = align_added_tokens(tok, ref, embedding_rows(spec, key))
    check_tokenizers_aligned(tok, ref)
    if added and int(os.environ.get("RANK", "0")) == 0:
        print(f"[vold-pl] {ALIGN_OPTION}: added {added} to the tokenizer of {spec.name_or_path} at the ids of "
              f"{reference_spec.name_or_path}'s tokenizer ({tok.convert_tokens_to_ids(added[0])}-"
              f"{tok.convert_tokens_to_ids(added[-1])}); the export saves them.")
    return added


def load_processor(spec: ModelSpec, key: str = MODEL_KEY):
    """The processor (VLM) or tokenizer (text LLM) alone, without loading weights.

    ``spec.align_tokens_with`` naming a tokenizer (a hub id or folder) is applied here; ``teacher`` is
    applied by the module that has the teacher (:class:`~vold_pl.modules.opd_grpo.OPDGRPOModule`).
    ``key`` is the config key of ``spec.name_or_path``, named in the error when the path is not found.
    """
    from transformers import AutoTokenizer

    if is_vision_model(spec.name_or_path, spec.trust_remote_code, spec.revision, key=key):
        from vold_pl.models.processor import Qwen2_5_VLImageTextProcessor

        proc = Qwen2_5_VLImageTextProcessor.from_pretrained(
            spec.name_or_path, trust_remote_code=spec.trust_remote_code, revision=spec.revision,
            min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    else:
        proc = AutoTokenizer.from_pretrained(spec.name_or_path, trust_remote_code=spec.trust_remote_code,
                                             revision=spec.revision)
    if spec.align_tokens_with not in ("none", "teacher"):
        align_tokenizer(proc, spec, ModelSpec(spec.align_tokens_with), key=key)
    return proc


TEACHER_KEY = "model.init_args.teacher.name_or_path"


def check_align_option(spec: ModelSpec, teacher: ModelSpec | None) -> None:
    """``align_tokens_with: teacher`` needs a teacher that the module loads (``teacher``: ``None`` when it has none)."""
    if spec.align_tokens_with == "teacher" and teacher is None:
        raise UserError(
            f"{ALIGN_OPTION}: teacher needs a teacher to align with, and this module loads none (OPD-GRPO loads one "
            "when opd.lam > 0 and model.init_args.teacher is set; SFT never does). Give the teacher's tokenizer "
            "instead (its hub id or folder, e.g. Qwen/Qwen3-8B), or none.")


def prepare_teacher_tokenizer(student_processor, spec: ModelSpec, teacher: ModelSpec):
    """The teacher's tokenizer, once the student's lines up with it: applies ``spec.align_tokens_with:
    teacher`` to ``student_processor`` (in place), then checks the pair strictly, embedding rows included."""
    teacher_tok = get_tokenizer(load_processor(teacher, key=TEACHER_KEY))
    if spec.align_tokens_with == "teacher":
        align_tokenizer(student_processor, spec, teacher, reference_tok=teacher_tok)
    student_tok = get_tokenizer(student_processor)
    check_tokenizers_aligned(student_tok, teacher_tok, student_vocab=embedding_rows(spec),
                             teacher_vocab=embedding_rows(teacher, TEACHER_KEY))
    return teacher_tok
