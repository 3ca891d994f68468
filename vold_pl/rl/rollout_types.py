"""What a rollout is: the types every engine returns and every scorer reads, and the row helpers on them.

An engine (:class:`RolloutEngine`) samples G completions per prompt and returns a :class:`Rollout`; the loss code
only sees that. Engines: :class:`vold_pl.rl.cached_sampler.CachedSamplingEngine` (the fast one, the trainers'
default), :class:`vold_pl.rl.hf_engine.HFGenerateEngine` (``model.generate``, the reference and the engine that keeps
sharded ranks in step), :class:`vold_pl.rl.unsharded.UnshardedRollouts` (an engine on gathered FSDP2 weights).
A vLLM engine on GPU would implement the same ``generate(model, batch, num_samples, sampling)`` and return the
same fields. Rows are laid out group-contiguous: rows ``i*G .. i*G+G-1`` are the G samples of prompt ``i``.

An engine declares ``keeps_ranks_in_step`` (see :class:`RolloutEngine`): whether it runs the same number of model
forwards on every rank of a sharded model; the trainer asks it, never its type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from vold_pl.models.inputs import MODEL_INPUT_KEYS, TEXT_INPUT_KEYS, base_model, select_model_inputs


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        max_new_tokens: completion length cap; longer completions are cut (counted as ``clipped``).
        temperature: sampling temperature; log-probs in the loss use the same temperature.
        top_p: nucleus sampling mass (1.0 = off). Not applied when the loss scores the samples (as TRL and
            verl): the truncated support moves with the weights. Below 1.0 the samples are slightly off the
            scored distribution; keep it off for RL.
        top_k: top-k sampling (0 = off); like ``top_p``, not applied in scoring.
        do_sample: ``false`` gives greedy decoding (benchmarks).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True


@dataclass
class Rollout:
    """What an engine returns for B prompts x G samples (N = B*G rows)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded prompts, repeated G times
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] right-padded with pad_id after EOS
    completion_mask: torch.Tensor  # [N, L] 1 up to and including EOS
    texts: list[str]  # [N] decoded completions (special tokens dropped, reasoning tags kept)
    group_size: int
    clipped: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    extra: dict[str, Any] = field(default_factory=dict)  # model inputs beyond ids (pixel_values, ...), repeated
    # [N, L] float32 log pi(o_t | q, o_<t) of each sampled token under the sampling-time weights, from the
    # distribution the loss scores: temperature-scaled, ``blocked_ids`` removed, before top-k/top-p; 0 outside
    # ``completion_mask``. Only ``CachedSamplingEngine(track_logprobs=True)`` fills it (the lean decoder's self-check
    # reads it); the loss scores rollouts with :mod:`vold_pl.rl.logprobs` instead.
    logprobs: torch.Tensor | None = None
    # The B distinct prompts as the model takes them, NOT repeated (``input_ids``, ``attention_mask`` and, for a
    # VLM, ``pixel_values`` / ``image_grid_thw`` / ``mm_token_type_ids``): lets scoring run each prompt (and
    # its images) once per group, :func:`vold_pl.rl.logprobs.rollout_token_logprobs`.
    prompts: dict[str, Any] | None = None
    # Token ids the sampler could never emit (logits set to -inf before sampling): the vision placeholders,
    # :func:`blocked_token_ids`. Every scorer of this rollout (policy, reference, teacher, full-vocabulary KL)
    # removes the same ids, so the loss scores exactly the distribution the samples came from.
    blocked_ids: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return self.completion_ids.size(0)



class RolloutEngine(Protocol):
    """What the trainers call to sample: ``generate`` returns B*G rows, group-contiguous.

    ``keeps_ranks_in_step``: ``True`` when every rank runs the same number of model forwards per rollout on a
    model sharded across ranks (HF ``generate`` with ``synced_gpus``, an engine that never calls the model, or one
    that runs on gathered weights); ``False`` when it stops once its own rows are done (the cached sampler).
    :func:`vold_pl.rl.unsharded.rollout_engine_for` reads it to decide whether a sharded policy needs a wrapper.
    """

    keeps_ranks_in_step: ClassVar[bool]

    def generate(self, model: torch.nn.Module, batch: dict, num_samples: int, sampling: SamplingConfig) -> Rollout:
        ...


def prompt_inputs(model: torch.nn.Module, batch: dict) -> dict[str, Any]:
    """The model inputs of the B prompts, unrepeated: ids and mask, plus the image tensors for a VLM."""
    return select_model_inputs(batch, getattr(base_model(model).config, "vision_config", None) is not None)


def repeat_images(batch: dict, num_samples: int) -> dict[str, torch.Tensor]:
    """Repeat each row's images G times, keeping ``pixel_values`` rows aligned with ``image_grid_thw``.

    ``pixel_values`` stacks the patches of every image of the batch; row i owns the images whose placeholder
    tokens it contains, in order, and each image owns ``prod(grid_thw)`` patch rows.
    """
    if "pixel_values" not in batch:
        return {}
    thw = batch["image_grid_thw"]  # [n_img, 3]
    patches = thw.prod(-1).tolist()
    pix = torch.split(batch["pixel_values"], patches)  # n_img x [p_k, C]
    counts = _images_per_row(thw, batch["mm_token_type_ids"])
    out_pix, out_thw, k = [], [], 0
    for c in counts:
        rows_pix, rows_thw = pix[k : k + c], thw[k : k + c]
        for _ in range(num_samples):
            out_pix.extend(rows_pix)
            out_thw.append(rows_thw)
        k += c
    return {"pixel_values": torch.cat(out_pix), "image_grid_thw": torch.cat(out_thw)}


def _images_per_row(thw: torch.Tensor, mm_types: torch.Tensor) -> list[int]:
    # Each image contributes prod(thw)/4 placeholder tokens (2x2 merge); count them per row.
    per_image = (thw.prod(-1) // 4).tolist()
    placeholders = (mm_types == 1).sum(-1).tolist()
    counts, k = [], 0
    for n in placeholders:
        c = 0
        while n > 0:
            n -= per_image[k + c]
            c += 1
        counts.append(c)
        k += c
    return counts


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS; ``clipped`` rows never emitted one. ``[N, L]`` → ``[N, L], [N]``."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    has_eos = is_eos.any(-1)  # [N]
    first = torch.where(has_eos, is_eos.int().argmax(-1),
                        torch.full_like(has_eos, completion_ids.size(1), dtype=torch.long))
    pos = torch.arange(completion_ids.size(1), device=completion_ids.device)  # [L]
    mask = (pos.unsqueeze(0) <= first.unsqueeze(1)).long()  # [N, L]
    return mask, ~has_eos


# A sampled vision placeholder would desynchronise image tokens and image features in the next forward.
BLOCKED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def blocked_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids of :data:`BLOCKED_TOKENS` that ``tokenizer`` knows: never sampled, and removed from the
    distribution every scorer of a rollout uses (:attr:`Rollout.blocked_ids`)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in BLOCKED_TOKENS]
    return tuple(sorted({i for i in ids if i is not None and i != unk}))


def _image_rows(inputs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Rows ``start:end`` of a batch of model inputs, images included: ``pixel_values`` stacks every image's
    patches row after row, so a contiguous row range owns a contiguous run of images and patches."""
    out = {k: v[start:end] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    if "pixel_values" in inputs:
        thw = inputs["image_grid_thw"]  # [n_img, 3]
        counts = _images_per_row(thw, inputs["mm_token_type_ids"])
        i0, i1 = sum(counts[:start]), sum(counts[:end])
        patches = thw.prod(-1)
        p0, p1 = int(patches[:i0].sum()), int(patches[:i1].sum())
        if i1 > i0:  # rows without images take no pixel inputs at all (text-only model inputs)
            out.update(pixel_values=inputs["pixel_values"][p0:p1], image_grid_thw=thw[i0:i1])
    return out


def rollout_rows(rollout: Rollout, start: int, end: int, width: int | None = None) -> Rollout:
    """Rows ``start:end`` of a rollout (a micro-batch), completions cut to ``width`` columns (default: their
    longest length in the slice).

    A slice of whole groups keeps the shared-prefix scoring (its prompts run once per group); any other slice
    scores each row with its own prompt (group size 1). Scores are the same numbers either way: the columns
    cut are padding after every row's EOS, which a causal model never attends to from earlier positions."""
    G = rollout.group_size
    if width is None:
        width = max(int(rollout.completion_mask[start:end].sum(-1).max()), 1) if end > start else 1
    cut = lambda t: t[start:end, :width]  # noqa: E731
    extra = _image_rows(dict(rollout.extra), start, end) if rollout.extra else {}
    if start % G == 0 and end % G == 0 and rollout.prompts is not None:
        prompts, group = _image_rows(dict(rollout.prompts), start // G, end // G), G
    else:
        prompts = {"input_ids": rollout.prompt_ids[start:end], "attention_mask": rollout.prompt_mask[start:end],
                   **{k: v for k, v in extra.items()}}
        group = 1
    return Rollout(rollout.prompt_ids[start:end], rollout.prompt_mask[start:end], cut(rollout.completion_ids),
                   cut(rollout.completion_mask), rollout.texts[start:end], group, rollout.clipped[start:end], extra,
                   logprobs=cut(rollout.logprobs) if rollout.logprobs is not None else None, prompts=prompts,
                   blocked_ids=rollout.blocked_ids)


def _pad_to(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    """``t [n, w, ...]`` padded to ``[n, width, ...]`` with ``value``, on the left or the right."""
    extra = width - t.size(1)
    if extra == 0:
        return t
    pad = t.new_full((t.size(0), extra) + tuple(t.shape[2:]), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


def _concat_inputs(parts: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Model inputs of several row batches, one batch: the token-aligned keys (ids, mask, modality ids) left-padded
    to the widest prompt (a missing modality-id key is all text), the image patches and grids stacked in row order."""
    unknown = {k for p in parts for k in p} - set(MODEL_INPUT_KEYS)
    if unknown:  # a new input kind must say how its rows join (token-aligned or stacked) before it is joined
        raise ValueError(f"concat_rollouts: no rule to join the model inputs {sorted(unknown)}")
    width = max(p["input_ids"].size(1) for p in parts)
    out: dict[str, Any] = {}
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if any(key in p for p in parts):
            out[key] = torch.cat([_pad_to(p[key] if key in p else torch.zeros_like(p["input_ids"]), width, value,
                                          left=True) for p in parts])
    for key in ("pixel_values", "image_grid_thw"):
        if any(key in p for p in parts):
            out[key] = torch.cat([p[key] for p in parts if key in p])
    return out


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Several rollouts of the same group size as one (DAPO's dynamic sampling joins the kept groups of several
    generation batches): prompts left-padded to the widest (the padding is masked, as in any collated batch),
    completions right-padded with ``pad_id`` to the longest, images in row order. Scores of every row are those of
    its own rollout: a left-padded prompt is the same prompt, and columns after a row's EOS are never attended to."""
    if len(rollouts) == 1:
        return rollouts[0]
    G = rollouts[0].group_size
    if any(r.group_size != G for r in rollouts) or any(r.blocked_ids != rollouts[0].blocked_ids for r in rollouts):
        raise ValueError("concat_rollouts: the rollouts differ in group size or blocked ids")
    L = max(r.completion_ids.size(1) for r in rollouts)
    rows = [{"input_ids": r.prompt_ids, "attention_mask": r.prompt_mask, **r.extra} for r in rollouts]
    joined = _concat_inputs(rows, pad_id)
    extra = {k: v for k, v in joined.items() if k not in TEXT_INPUT_KEYS}
    prompts = None
    if all(r.prompts is not None for r in rollouts):
        prompts = _concat_inputs([dict(r.prompts) for r in rollouts], pad_id)
    logprobs = None
    if all(r.logprobs is not None for r in rollouts):
        logprobs = torch.cat([_pad_to(r.logprobs, L, 0.0, left=False) for r in rollouts])
    return Rollout(joined["input_ids"], joined["attention_mask"],
                   torch.cat([_pad_to(r.completion_ids, L, pad_id, left=False) for r in rollouts]),
                   torch.cat([_pad_to(r.completion_mask, L, 0, left=False) for r in rollouts]),
                   [t for r in rollouts for t in r.texts], G, torch.cat([r.clipped for r in rollouts]), extra,
                   logprobs=logprobs, prompts=prompts, blocked_ids=rollouts[0].blocked_ids)


def select_groups(rollout: Rollout, groups: list[int], pad_id: int) -> Rollout:
    """The rollout's groups ``groups`` (indices of prompts, in that order), whole: rows ``g*G .. g*G+G-1`` each,
    with their images and unrepeated prompts, completions at their full width."""
    G, width = rollout.group_size, rollout.completion_ids.size(1)
    if list(groups) == list(range(rollout.num_rows // G)):
        return rollout
    if not groups:
        raise ValueError("select_groups: no group selected")
    return concat_rollouts([rollout_rows(rollout, g * G, (g + 1) * G, width) for g in groups], pad_id)
