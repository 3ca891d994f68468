"""Sampling G completions per prompt, behind a small engine interface.

The loss code only sees a :class:`Rollout`; how it was produced is the engine's business. The default
:class:`HFGenerateEngine` uses ``model.generate`` with the KV cache; a vLLM engine on GPU would implement
the same ``generate(model, batch, num_samples, sampling)`` and return the same fields. Rows are laid out
group-contiguous: rows ``i*G .. i*G+G-1`` are the G samples of prompt ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        max_new_tokens: completion length cap; longer completions are cut (counted as ``clipped``).
        temperature: sampling temperature; log-probs in the loss use the same temperature.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: top-k sampling (0 = off).
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

    @property
    def num_rows(self) -> int:
        return self.completion_ids.size(0)


class RolloutEngine(Protocol):
    def generate(self, model: torch.nn.Module, batch: dict, num_samples: int, sampling: SamplingConfig) -> Rollout:
        ...


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
    first = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, completion_ids.size(1), dtype=torch.long))
    pos = torch.arange(completion_ids.size(1), device=completion_ids.device)  # [L]
    mask = (pos.unsqueeze(0) <= first.unsqueeze(1)).long()  # [N, L]
    return mask, ~has_eos


class HFGenerateEngine:
    """Rollouts with ``model.generate`` (KV cache, batched; it stops once every row has emitted EOS).

    Args:
        tokenizer: decodes completions and gives pad/EOS ids.
    """

    # A sampled vision placeholder would desynchronise image tokens and image features in the next forward.
    SUPPRESSED = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        ids = [tokenizer.convert_tokens_to_ids(t) for t in self.SUPPRESSED]
        self.suppress_ids = [i for i in ids if i is not None and i != unk]
        eos = tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, batch: dict, num_samples: int, sampling: SamplingConfig) -> Rollout:
        G = num_samples
        ids = batch["input_ids"].repeat_interleave(G, 0)  # [N, P]
        mask = batch["attention_mask"].repeat_interleave(G, 0)  # [N, P]
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        extra: dict[str, Any] = {}
        if getattr(model.config, "vision_config", None) is not None:  # text-only LLMs take ids only
            extra["mm_token_type_ids"] = batch["mm_token_type_ids"].repeat_interleave(G, 0)
            extra.update(repeat_images(batch, G))
        inputs.update(extra)
        gen_kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                          pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_ids,
                          suppress_tokens=self.suppress_ids or None)
        if sampling.do_sample:
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        was_training = model.training
        model.eval()
        out = model.generate(**inputs, **gen_kwargs)  # [N, P + L']
        model.train(was_training)
        comp = out[:, ids.size(1):]  # [N, L']
        if comp.size(1) == 0:
            comp = torch.full((ids.size(0), 1), self.tokenizer.pad_token_id, dtype=torch.long, device=ids.device)
        cmask, clipped = completion_mask_from_ids(comp, self.eos_ids)
        comp = comp.masked_fill(cmask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(comp, skip_special_tokens=True)
        return Rollout(ids, mask, comp, cmask, texts, G, clipped, extra)


class ScriptedEngine:
    """Returns fixed completions per record id: a stub policy for tests of everything after the rollout."""

    def __init__(self, tokenizer, completions: dict[str, list[str]]):
        self.tokenizer, self.completions = tokenizer, completions
        self.eos_ids = [tokenizer.eos_token_id]

    def generate(self, model, batch: dict, num_samples: int, sampling: SamplingConfig) -> Rollout:
        G = num_samples
        texts = [self.completions[r["id"]][g % len(self.completions[r["id"]])] for r in batch["records"] for g in range(G)]
        seqs = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: sampling.max_new_tokens - 1] + self.eos_ids
                for t in texts]
        width = max(len(s) for s in seqs)
        comp = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            comp[i, : len(s)] = torch.tensor(s)
        ids = batch["input_ids"].repeat_interleave(G, 0)
        comp = comp.to(ids.device)
        cmask, clipped = completion_mask_from_ids(comp, self.eos_ids)
        # The same model inputs as HFGenerateEngine, so image prompts stay scorable (pixels per row, repeated).
        extra: dict[str, Any] = {}
        if "mm_token_type_ids" in batch:
            extra["mm_token_type_ids"] = batch["mm_token_type_ids"].repeat_interleave(G, 0)
        extra.update(repeat_images(batch, G))
        return Rollout(ids, batch["attention_mask"].repeat_interleave(G, 0), comp, cmask,
                       self.tokenizer.batch_decode(comp, skip_special_tokens=True), G, clipped, extra)
