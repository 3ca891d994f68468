"""What SFT and OPD-GRPO share: the trainable model, its processor, the optimizer recipe and the export."""

from __future__ import annotations

import inspect
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch

from vold_pl.checkpointing import (
    FINGERPRINT_KEY,
    allow_in_checkpoints,
    check_fingerprint,
    fingerprint_from_state_dict,
    model_fingerprint,
)
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec, check_align_option, get_tokenizer, load_model, load_processor
from vold_pl.models.inputs import MODEL_INPUT_KEYS, select_model_inputs  # noqa: F401 (MODEL_INPUT_KEYS re-exported)
from vold_pl.models.lora import LoRAConfig, apply_lora, is_lora_model, save_lora_export
from vold_pl.rl.cached_sampler import default_engine
from vold_pl.rl.rollout_types import SamplingConfig


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

        from vold_pl.optimizers import make_adamw8bit
        from vold_pl.sharding import is_fsdp2_params

        if is_fsdp2_params(params):  # bitsandbytes cannot step DTensor shards; this updates each rank's shard
            return make_adamw8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise UserError(f"optim.name: {cfg.name!r} is not an optimizer vold-pl builds; use adamw or adamw8bit.")


def bf16_lost_update_fraction(params, lr: float, sample: int = 1 << 20) -> tuple[float, float]:
    """``(fraction, median |w|)`` over the trainable bf16 weights: the share whose half-ulp exceeds ``lr``.

    An Adam(W) step moves each weight by about ``lr`` (m / sqrt(v) is ~1), and a bf16 weight keeps 8 significant
    bits: its value changes only if the step exceeds half a unit in the last place, 2^(floor(log2|w|) - 8)
    (~7.8e-5 at |w| = 0.02). Below that the update rounds away. Up to ``sample`` elements per tensor are read
    (evenly strided), on each rank's local shard under FSDP2.
    """
    lost, total, mags = 0, 0, []
    for p in params:
        if not p.requires_grad or p.dtype != torch.bfloat16:
            continue
        w = (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)  # [n] this rank's elements
        if w.numel() == 0:
            continue
        w = w[:: max(1, w.numel() // sample)].float().abs()  # [<= sample]
        _, exp = torch.frexp(w)  # |w| = m * 2^exp with m in [0.5, 1): floor(log2|w|) = exp - 1
        half_ulp = torch.ldexp(torch.ones_like(w), exp - 9)  # 2^(floor(log2|w|) - 8)
        lost += int(((half_ulp > lr) & (w > 0)).sum())
        total += w.numel()
        mags.append(w.median())
    if not total:
        return 0.0, 0.0
    return lost / total, float(torch.stack(mags).median())


def bf16_update_warning(params, cfg: OptimConfig, threshold: float = 0.5) -> str | None:
    """The setup warning when most trainable weights are bf16 and an ``optim.lr`` step rounds away on them.

    ``adamw`` and ``adamw8bit`` apply the update in the weights' own dtype (no fp32 master copy, no compensated
    or stochastic rounding), so this is what a ``precision: bf16-true`` run with ``dtype: bfloat16`` learns.
    """
    frac, median = bf16_lost_update_fraction(params, cfg.lr)
    if frac < threshold:
        return None
    return (f"[vold-pl] WARNING: {frac:.0%} of the trainable weights are bf16 and too large for an optim.lr={cfg.lr:g} "
            f"step to change them (median |w| {median:.3g}: a bf16 weight moves only by more than half its ulp, "
            f"~{median * 2 ** -8:.2g} there). {cfg.name} has no fp32 master weights, so these updates round away and "
            "the run learns almost nothing. Keep fp32 weights with bf16 compute: trainer.precision: bf16-mixed and "
            "model.init_args.model.dtype: float32 (FSDP2: bf16 compute over fp32 shards), see docs/precision.md.")


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


allow_in_checkpoints(ModelSpec, OptimConfig, SamplingConfig)
allow_in_checkpoints(LoRAConfig)


class NonFiniteStepsError(RuntimeError):
    """Too many optimizer steps in a row were skipped for a non-finite loss or gradient."""


def rng_state() -> dict:
    """Every RNG that touches sampling in this process: torch CPU (and CUDA), numpy, python ``random``."""
    # Plain tensors, strings and ints only: checkpoints stay loadable with ``torch.load(weights_only=True)``.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        max_consecutive_skips: an optimizer step whose loss or gradient is not finite is skipped (no weight
            changes) and counted (``train/skipped_steps``); this many skips in a row stop the run (0 = never).

    Checkpoints carry, besides Lightning's own state: a fingerprint of the model (a resume with another model
    fails at once, naming both), every rank's RNG states (torch, CUDA, numpy, python; restored when training
    resumes, so sampled rollouts continue exactly) and the skip counters.
    """

    def __init__(self, model: ModelSpec, optim: OptimConfig | None = OptimConfig(),
                 gradient_checkpointing: bool = False, export_dir: str | None = None, export: bool = True,
                 seed: int = 0, max_consecutive_skips: int = 10):
        super().__init__()
        self.model_spec, self.optim_cfg = model, optim or OptimConfig()
        self.gradient_checkpointing, self.export_dir, self.export, self.seed = (
            gradient_checkpointing, export_dir, export, seed)
        if max_consecutive_skips < 0:
            raise UserError(f"max_consecutive_skips: {max_consecutive_skips} is negative; use 0 (never stop) or the "
                            "number of skipped steps in a row that should stop the run.")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps, self.consecutive_skips = 0, 0
        self._step_skipped, self._last_skip = False, ""
        self._rng_to_restore: dict | None = None
        self._preempted = False  # fit ended early (``mark_unfinished``): do not export
        self._end_epoch = False  # ``end_epoch_early``: skip the rest of the running epoch
        if "teacher" not in inspect.signature(type(self).__init__).parameters:
            check_align_option(model, None)  # ``align_tokens_with: teacher`` needs a module with a teacher
        self.processor = load_processor(model)  # applies model.align_tokens_with when it names a tokenizer
        self.tokenizer = get_tokenizer(self.processor)
        self.teacher_tokenizer = None  # a module with a teacher (OPD) sets the teacher's (DataConsumer contract)
        self.model: torch.nn.Module | None = None
        self._t_last: float | None = None
        # Sampling for ``vold-pl predict``; a writer callback (TraceWriter) sets both through
        # ``set_predict_sampling`` before predicting.
        self.rollout_engine = default_engine(self.tokenizer)
        self.predict_num_samples, self.predict_sampling = 1, SamplingConfig(do_sample=False)

    # -- what callbacks may ask of the module (the only state they change from outside) ---------------------------
    def end_epoch_early(self, end: bool = True) -> None:
        """Ask Lightning to end the running training epoch before its next batch (``on_train_batch_start``
        returns -1), e.g. when a curriculum stage ends mid-epoch; ``end=False`` withdraws the request."""
        self._end_epoch = bool(end)

    def mark_unfinished(self) -> None:
        """Fit is stopping before its end (preemption): ``on_fit_end`` writes no export; the checkpoint is the
        run's result."""
        self._preempted = True

    @property
    def finished_early(self) -> bool:
        """True once :meth:`mark_unfinished` was called."""
        return self._preempted

    def set_predict_sampling(self, num_samples: int, sampling: SamplingConfig) -> None:
        """How ``predict_step`` samples: ``num_samples`` completions per prompt with ``sampling``."""
        if num_samples < 1:
            raise UserError(f"num_samples: {num_samples} is below 1; ask for at least one completion per prompt.")
        self.predict_num_samples, self.predict_sampling = int(num_samples), sampling

    def curriculum_settings(self) -> dict[str, Any]:
        """The settings a curriculum stage may set on this module (names among ``num_generations``, ``rewards``,
        ``max_new_tokens``, ``temperature``), with their current values. None here: a module without RL
        settings (SFT) takes the stages' record filters only."""
        return {}

    def apply_curriculum_settings(self, **settings: Any) -> None:
        """Set settings named by :meth:`curriculum_settings` (the ``Curriculum`` callback at each stage)."""
        if settings:
            raise ValueError(f"{type(self).__name__} has no curriculum settings; got {sorted(settings)}")

    @property
    def completion_budget(self) -> int | None:
        """The cap on sampled completion tokens of training (``sampling.max_new_tokens``), which the data module
        checks the training traces against; ``None`` for a module that trains on given targets (SFT)."""
        return None

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer this module is attached to, or ``None`` (a module used on its own, e.g. in tests)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning: "... is not attached to a `Trainer`"
            return None

    # -- model ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the model; under ModelParallelStrategy shard it with FSDP2 (``vold_pl.sharding``).

        Also installs, on more than one rank, the dummy visual forward that keeps ranks with image-free
        batches in step with ranks that have images. Refuses Lightning's FSDPStrategy (FSDP1).
        """
        if self.model is not None:
            return
        from vold_pl.rl.unsharded import rollout_engine_for
        from vold_pl.sharding import check_strategy, prepare_model, sharding_config

        trainer = self.attached_trainer()
        check_strategy(getattr(trainer, "strategy", None))  # before loading weights: FSDP1 is refused
        if self._loads_on_rank0(trainer):  # FSDP2 over ranks: the full weights in host memory on rank 0 only
            from vold_pl.models.rank0_load import load_sharded_from_rank0

            ac = self.gradient_checkpointing
            self.model = load_sharded_from_rank0(
                self.model_spec, lambda m: prepare_model(m, trainer, activation_checkpointing=ac),
                device=trainer.strategy.root_device)
            self.model.train()
        else:
            self.model, _ = load_model(self.model_spec, with_processor=False)  # the processor is loaded in __init__
            self.model = apply_lora(self.model, self.model_spec.lora)  # model.lora.r > 0: only adapters train
            self.model.train()
            prepare_model(self.model, trainer, activation_checkpointing=self.gradient_checkpointing)
        if trainer is not None:  # sharded across ranks: rollouts must keep every rank stepping (synced generate)
            self.rollout_engine = rollout_engine_for(self.rollout_engine, self.model, self.tokenizer,
                                                     trainer.world_size, sharding_config(trainer))

    def _loads_on_rank0(self, trainer) -> bool:
        """Shard the trained model with its weights read on rank 0 only (:mod:`vold_pl.models.rank0_load`): FSDP2
        over more than one rank, no LoRA (adapters are added to a loaded model), no quantization."""
        from vold_pl.sharding import fsdp_mesh

        return (trainer is not None and trainer.world_size > 1 and fsdp_mesh(trainer) is not None
                and not self.model_spec.lora.r and self.model_spec.quantization == "none")

    @property
    def is_vision(self) -> bool:
        return getattr(self.model.config, "vision_config", None) is not None

    def model_inputs(self, batch: dict) -> dict:
        return select_model_inputs(batch, self.is_vision)

    # -- optimizer -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        # After Lightning's precision plugin has cast the model (bf16-true casts every weight to bf16).
        lost = bf16_update_warning(self.model.parameters(), self.optim_cfg)
        if lost is not None:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(lost)
        opt = build_optimizer(self.model.parameters(), self.optim_cfg)
        trainer = self.attached_trainer()
        total = trainer.estimated_stepping_batches if trainer is not None else 1
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

    def on_train_start(self) -> None:
        # RNG states of a resumed run are put back here, after everything Lightning does between loading the
        # checkpoint and the first step (sanity validation, data loader set-up), so the next rollout samples
        # exactly what the uninterrupted run sampled.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def tokens_per_second(self, n_tokens: int) -> float:
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        self._t_last = now
        return n_tokens / dt if dt > 0 else 0.0

    def on_fit_end(self) -> None:
        if self._preempted:  # a preempted run is unfinished: its checkpoint, not an export, is what it leaves
            if self.trainer.is_global_zero:
                print("[vold-pl] preempted: no export (the run is unfinished).")
            return
        if self.export:
            self.export_model(self.export_dir or str(Path(self.trainer.log_dir or ".") / "export"))

    # -- numerical faults: a non-finite loss or gradient skips the update ---------------------------------------
    def _agree(self, bad: bool) -> bool:
        """True on every rank when ``bad`` is true on any: all ranks skip the same steps (no hang, no drift)."""
        trainer = self.attached_trainer()
        if trainer is None:
            return bad
        return bool(trainer.strategy.reduce_boolean_decision(bad, all=False))

    def skip_step_unless_finite(self, loss: torch.Tensor, what: str = "loss") -> bool:
        """Whether ``loss`` is finite on every rank (a collective: call it on every rank). When it is not, the
        optimizer step is marked skipped (counted and reported; ``on_before_optimizer_step`` then drops every
        gradient) and the caller must not backpropagate it. Call it before backward."""
        bad = self._agree(not bool(torch.isfinite(loss.detach()).all()))
        if bad:
            self._skip(f"non-finite {what} ({float(loss.detach().float().mean())})")
        return not bad

    @property
    def step_skipped(self) -> bool:
        """Whether the running optimizer step has been marked skipped (a non-finite loss or gradient)."""
        return self._step_skipped

    def _skip(self, reason: str) -> None:
        if not self._step_skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        self._step_skipped, self._last_skip = True, reason
        trainer = self.attached_trainer()
        step = trainer.global_step if trainer is not None else 0
        if trainer is None or trainer.is_global_zero:
            print(f"[vold-pl] step {step}: {reason}; update skipped, no weight changed "
                  f"({self.consecutive_skips} in a row, {self.skipped_steps} in total).")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Runs after backward and before the update (automatic and manual optimization alike).

        A skipped step (non-finite loss before backward, or a non-finite gradient now) leaves every ``.grad`` at
        ``None``: AdamW (torch or bitsandbytes 8-bit) then skips every parameter, so neither weights nor
        optimizer moments change. The step still counts as a step (Lightning's rule for a skipped update).
        """
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not self._step_skipped:
            grads = [p.grad for p in params if p.grad is not None]
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            bad = bool(local) and not bool(torch.stack([torch.isfinite(g).all() for g in local]).all())
            if self._agree(bad):
                self._skip("non-finite gradient")
        if self._step_skipped:
            for p in params:
                p.grad = None
            self._step_skipped = False
        else:
            self.consecutive_skips = 0

    def on_train_batch_start(self, batch, batch_idx) -> int | None:
        """-1 (Lightning: skip the rest of the epoch) after ``end_epoch_early`` (a curriculum stage that ended
        mid-epoch: the next epoch's draws obey the new stage's record filter); the batch fetched here is not
        trained on."""
        return -1 if self._end_epoch else None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1, reduce_fx="max")
        limit = self.max_consecutive_skips
        if limit and self.consecutive_skips >= limit:
            ids = [r.get("id") for r in batch.get("records", [])][:8] if isinstance(batch, dict) else []
            raise NonFiniteStepsError(
                f"stopping: {self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(last: {self._last_skip} at global step {self.trainer.global_step}, batch ids {ids}). No weights "
                "were changed by the skipped steps, so the last checkpoint is still good. Lower optim.lr, clip "
                "gradients (trainer.gradient_clip_val for SFT, max_grad_norm for OPD-GRPO), check those records, "
                f"or raise max_consecutive_skips (now {limit}).")

    # -- checkpoints: model identity, RNG states, counters ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        states = [rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint[FINGERPRINT_KEY] = {
            "format": 1,
            "fingerprint": model_fingerprint(self),
            "rng": states,  # one per rank, in rank order
            "counters": {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get(FINGERPRINT_KEY)
        current = model_fingerprint(self)
        if info is not None:
            saved = info["fingerprint"]
        else:
            saved = fingerprint_from_state_dict(checkpoint.get("state_dict", {}))
        trainer = self.attached_trainer()
        ckpt_path = getattr(trainer, "ckpt_path", None)
        check_fingerprint(saved, current, ckpt_path)
        if info is None:
            return
        counters = info.get("counters", {})
        self.skipped_steps = int(counters.get("skipped_steps", 0))
        self.consecutive_skips = int(counters.get("consecutive_skips", 0))
        states = info.get("rng") or []
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        if len(states) != world:
            warnings.warn(f"the checkpoint holds RNG states of {len(states)} process(es) and this run has {world}: "
                          "sampling will not continue exactly as the original run would have.", stacklevel=2)
        if states:
            self._rng_to_restore = states[rank % len(states)]

    def export_model(self, out: str) -> Path | None:
        """``save_pretrained`` of model + processor in safetensors, from rank 0 (full weights gathered)."""
        from vold_pl.sharding import full_state_dict

        state = full_state_dict(self.model)  # a collective under FSDP2: every rank gathers, rank 0 writes
        out_path = Path(out) if self.trainer.global_rank == 0 else None
        if out_path is not None:
            if is_lora_model(self.model):  # merged weights, or the adapter alone (model.lora.export)
                save_lora_export(self.model, state, out_path, self.model_spec.lora.export)
            else:
                self.model.save_pretrained(out_path, state_dict=state, safe_serialization=True)
            self.processor.save_pretrained(out_path)
            print(f"[vold-pl] exported model to {out_path}")
            from vold_pl.export import finish_export

            # the model card; a Hub push when a PushToHub callback is set
            finish_export(out_path, self, self.attached_trainer())
        self.trainer.strategy.barrier("vold_pl_export")  # no rank tears down while rank 0 still writes
        return out_path
