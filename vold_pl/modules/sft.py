"""Supervised fine-tuning: completion-only next-token NLL on reasoning traces.

Used for VOLD's cold start (the student learns the teacher's traces, METHODS.md §1), for the tiny
teacher's own SFT on text-only problems, for Curr-ReFT's rejection-sampled SFT and OpenVLThinker's SFT rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vold_pl.data.collate import IGNORE_INDEX
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig, PolicyModule
from vold_pl.rl.logprobs import backbone_and_head


def completion_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean NLL over target tokens, token accuracy, and the number of target tokens, from the full ``[B, T, V]``
    logits (a model whose backbone cannot be run apart from its head); :func:`completion_nll_from_hidden` with
    the logits as the rows and no head."""
    return completion_nll_from_hidden(logits, torch.nn.Identity(), labels)


def completion_nll_from_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module,
                               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean NLL over target tokens, token accuracy, and the number of target tokens, with the LM head applied
    only at the positions that predict a target token. Position t predicts token t+1, so ``hidden`` drops its
    last step and ``labels`` their first.

    The loss, accuracy and gradient are those of the full ``[B, T, V]`` logits; only the ``[n, V]`` rows that
    count are made. A VLM's prompt (hundreds of image tokens, the instruction) is most of a row and carries no
    label: at real size (V = 151,936, float32 logits) a row of 1,200 prompt and 300 target tokens keeps 0.18 GB
    of logits instead of 0.91 GB. On the tiny models (V = 526) it saves 5-11% of an SFT step (same batches, 1 thread).
    """
    targets = labels[:, 1:]  # [B, T-1]
    mask = targets != IGNORE_INDEX  # [B, T-1]
    picked = targets[mask]  # [n]
    n = picked.numel()
    logits = lm_head(hidden[:, :-1][mask]).float()  # [n, V]
    loss = F.cross_entropy(logits, picked, reduction="sum") / max(n, 1)
    acc = (logits.argmax(-1) == picked).sum() / max(n, 1)
    return loss, acc, n


class SFTModule(PolicyModule):
    """Completion-only SFT of a VLM or a text-only LLM (prompt tokens carry label -100).

    Args:
        model: the model to fine-tune (hub id or local folder).
        optim: optimizer and schedule (AdamW or bitsandbytes AdamW8bit, warmup + cosine).
        gradient_checkpointing: recompute activations in backward to save memory.
        export_dir: folder for the final HF-format export; default ``<log_dir>/export``.
        export: write the export at the end of fit.
        seed: run seed.
        max_consecutive_skips: a step whose loss or gradient is not finite is skipped (no weight changes) and
            counted in ``train/skipped_steps``; this many in a row stop the run (0 = never).
    """

    collate_mode = "sft"

    def __init__(self, model: ModelSpec, optim: OptimConfig | None = OptimConfig(),
                 gradient_checkpointing: bool = False,
                 export_dir: str | None = None, export: bool = True, seed: int = 0, max_consecutive_skips: int = 10):
        super().__init__(model, optim, gradient_checkpointing, export_dir, export, seed, max_consecutive_skips)
        self.save_hyperparameters()

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        backbone, head = backbone_and_head(self.model)
        if backbone is None:  # a model without ``.model``: the wrapper's full logits
            out = self.model(**self.model_inputs(batch), use_cache=False)
            loss, acc, n = completion_nll(out.logits, batch["labels"])
        else:
            hidden = backbone(**self.model_inputs(batch), use_cache=False).last_hidden_state  # [B, T, H]
            loss, acc, n = completion_nll_from_hidden(hidden, head, batch["labels"])
        bs = batch["input_ids"].size(0)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/token_accuracy", acc, batch_size=bs, sync_dist=stage != "train")
        if stage == "train":
            self.log("train/tokens_per_second", self.tokens_per_second(int(batch["attention_mask"].sum())),
                     batch_size=bs)
            self.log("train/truncated", float(batch.get("truncated", 0)), batch_size=bs, reduce_fx="sum")
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train")
        # None skips backward and the update (every rank agrees); a non-finite gradient is caught later, in
        # ``on_before_optimizer_step``. Trainer's gradient_clip_val still applies to the steps that go through.
        return loss if self.skip_step_unless_finite(loss) else None

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")
