"""What SFT and OPD-GRPO share: the trainable model, its processor, the optimizer recipe and the export."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from vold_pl.models.factory import ModelSpec, get_tokenizer, load_model, load_processor
from vold_pl.rl.rollout import HFGenerateEngine, SamplingConfig

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclass
class OptimConfig:
    """Optimizer and schedule.

    Args:
        name: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, 8-bit states: ~4x less optimizer memory).
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam betas.
        warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
        schedule: ``cosine`` decay to ``min_lr_ratio * lr`` after warmup, or ``constant``.
        min_lr_ratio: floor of the cosine schedule as a fraction of ``lr``.
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be 'adamw' or 'adamw8bit', got {cfg.name!r}")


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak LR at optimizer step ``s``: linear warmup, then cosine or constant."""
    total = max(1, total_steps)

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class PolicyModule(L.LightningModule):
    """Base of the trainable-policy modules: loads the model in ``configure_model``, exports at fit end.

    Args:
        model: the trainable model (hub id or folder; a VLM or a text-only LLM).
        optim: optimizer and LR schedule.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        export_dir: where to write the final model in HF format (safetensors + processor) when fit ends;
            default ``<log_dir>/export``. ``null`` with ``export: false`` writes nothing.
        export: write the export folder at the end of fit.
        seed: seed set at the start of fit so the run is reproducible.
    """

    def __init__(self, model: ModelSpec, optim: OptimConfig | None = None, gradient_checkpointing: bool = False,
                 export_dir: str | None = None, export: bool = True, seed: int = 0):
        super().__init__()
        self.model_spec, self.optim_cfg = model, optim or OptimConfig()
        self.gradient_checkpointing, self.export_dir, self.export, self.seed = (
            gradient_checkpointing, export_dir, export, seed)
        self.processor = load_processor(model)
        self.tokenizer = get_tokenizer(self.processor)
        self.model: torch.nn.Module | None = None
        self._t_last: float | None = None
        # Sampling for ``vold-pl predict``; a writer callback (TraceWriter) sets both before predicting.
        self.rollout_engine = HFGenerateEngine(self.tokenizer)
        self.predict_num_samples, self.predict_sampling = 1, SamplingConfig(do_sample=False)

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, _ = load_model(self.model_spec)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        self.model.train()

    @property
    def is_vision(self) -> bool:
        return getattr(self.model.config, "vision_config", None) is not None

    def model_inputs(self, batch: dict) -> dict:
        keys = MODEL_INPUT_KEYS if self.is_vision else ("input_ids", "attention_mask")
        return {k: batch[k] for k in keys if k in batch}

    # -- optimizer -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = build_optimizer(self.model.parameters(), self.optim_cfg)
        total = self.trainer.estimated_stepping_batches if self._trainer else 1
        total = int(total) if math.isfinite(total) else 10_000
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim_cfg, self._optimizer_steps(total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _optimizer_steps(self, batches: int) -> int:
        return batches

    # -- predict: k samples per prompt, for trace writers ----------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        k = self.predict_num_samples
        rollout = self.rollout_engine.generate(self.model, batch, k, self.predict_sampling)
        texts = [rollout.texts[i * k : (i + 1) * k] for i in range(len(batch["records"]))]
        return {"records": batch["records"], "texts": texts}

    # -- fit hooks -----------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._t_last = time.perf_counter()

    def tokens_per_second(self, n_tokens: int) -> float:
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        self._t_last = now
        return n_tokens / dt if dt > 0 else 0.0

    def on_fit_end(self) -> None:
        if self.export:
            self.export_model(self.export_dir or str(Path(self.trainer.log_dir or ".") / "export"))

    def export_model(self, out: str) -> Path | None:
        """``save_pretrained`` of model + processor in safetensors, from rank 0 (full weights gathered)."""
        from vold_pl.distributed import full_state_dict

        state = full_state_dict(self.model)
        if self.trainer.global_rank != 0:
            return None
        out_path = Path(out)
        self.model.save_pretrained(out_path, state_dict=state, safe_serialization=True)
        self.processor.save_pretrained(out_path)
        print(f"[vold-pl] exported model to {out_path}")
        return out_path
