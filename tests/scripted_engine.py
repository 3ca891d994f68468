"""A stub rollout engine for tests of everything after the rollout: fixed completions per record id."""

from __future__ import annotations

from typing import Any

import torch

from vold_pl.models.inputs import select_model_inputs
from vold_pl.rl.rollout_types import (
    Rollout,
    SamplingConfig,
    blocked_token_ids,
    completion_mask_from_ids,
    repeat_images,
)


class ScriptedEngine:
    """Returns fixed completions per record id: a stub policy for tests of everything after the rollout."""

    # It never calls the model, so every rank of a sharded model runs the same (zero) forwards.
    keeps_ranks_in_step = True

    def __init__(self, tokenizer, completions: dict[str, list[str]]):
        self.tokenizer, self.completions = tokenizer, completions
        self.eos_ids = [tokenizer.eos_token_id]
        self.suppress_ids = list(blocked_token_ids(tokenizer))  # scored like the real sampler's rollouts

    def generate(self, model, batch: dict, num_samples: int, sampling: SamplingConfig) -> Rollout:
        G = num_samples
        texts = [self.completions[r["id"]][g % len(self.completions[r["id"]])]
                 for r in batch["records"] for g in range(G)]
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
        prompts = select_model_inputs(batch, vision=True)
        return Rollout(ids, batch["attention_mask"].repeat_interleave(G, 0), comp, cmask,
                       self.tokenizer.batch_decode(comp, skip_special_tokens=True), G, clipped, extra,
                       prompts=prompts, blocked_ids=tuple(self.suppress_ids))
