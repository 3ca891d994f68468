"""Rollouts with HF ``model.generate`` on the G-times repeated batch: the reference engine, and the one that keeps
ranks in step on a model sharded by FSDP2 (``synced_gpus``)."""

from __future__ import annotations

from typing import Any

import torch

from vold_pl.rl.rollout_types import (
    BLOCKED_TOKENS,
    Rollout,
    SamplingConfig,
    blocked_token_ids,
    completion_mask_from_ids,
    prompt_inputs,
    repeat_images,
)
from vold_pl.sharding import generation_needs_sync


class HFGenerateEngine:
    """Rollouts with ``model.generate`` (KV cache, batched; it stops once every row has emitted EOS).

    On a model sharded by FSDP2 across ranks it runs with ``synced_gpus`` (a rank whose rows ended keeps
    stepping with the others), as :func:`vold_pl.sharding.generation_needs_sync` decides.

    Args:
        tokenizer: decodes completions and gives pad/EOS ids.
    """

    SUPPRESSED = BLOCKED_TOKENS
    # Under FSDP2 across ranks, ``synced_gpus`` keeps a rank whose rows ended stepping with the others.
    keeps_ranks_in_step = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.suppress_ids = list(blocked_token_ids(tokenizer))
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
                          suppress_tokens=self.suppress_ids or None, synced_gpus=generation_needs_sync(model))
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
        return Rollout(ids, mask, comp, cmask, texts, G, clipped, extra, prompts=prompt_inputs(model, batch),
                       blocked_ids=tuple(self.suppress_ids))
