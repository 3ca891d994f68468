"""OPD-GRPO: GRPO with on-policy distillation from a text-only teacher — VOLD's second stage.

One training step is the algorithm box of VOLD (arXiv 2510.23497) on top of GRPO (METHODS.md §1-3)::

    rollout   o_1..o_G ~ π_old(·|q)                      for each prompt q of the batch
    reward    r_i = Σ_k w_k R_k(o_i, q)
    advantage A_i = (r_i − mean_G r) / (std_G r + ε)
    teacher   log π_T(o_t | q_T, o_<t)                   q_T: the text view; frozen
    repeat μ times:
      loss = agg(clip-surrogate(ρ, A)) + β_ref·agg(k3) + λ·agg(g(τ)·KL_t)     (OPD in loss mode)
      or, OPD in advantage mode: A_{i,t} = A_i − λ·g_i·sg(k1_t) inside the surrogate
      one optimizer step

Every formula lives in ``vold_pl/rl`` and ``vold_pl/rewards``; this module only sequences them. The loss of a
step is :func:`vold_pl.rl.objective.opd_grpo_loss` of one :class:`~vold_pl.rl.objective.Experience`. Every
log-prob (policy, π_old, reference, teacher) is of the sampler's distribution: the sampling temperature, and
the rollout's blocked ids (vision placeholders) removed and renormalised; see ``docs/opd.md``.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from vold_pl.checkpointing import allow_in_checkpoints
from vold_pl.distributed import fsdp_modules
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec, check_align_option, freeze, load_model, prepare_teacher_tokenizer
from vold_pl.models.lora import adapters_off, is_lora_model
from vold_pl.modules.base import OptimConfig, PolicyModule
from vold_pl.rewards.functions import compute_rewards, validate_weights
from vold_pl.rl.advantages import group_advantages
from vold_pl.rl.full_kl import policy_scores_and_full_kl, teacher_hidden, teacher_token_logprobs_shared
from vold_pl.rl.logprobs import rollout_token_logprobs
from vold_pl.rl.losses import Totals, masked_mean
from vold_pl.rl.objective import (
    TEACHER_SCORES,
    Experience,
    LossSettings,
    check_opd_options,
    combine_metrics,
    metric_weights,
    opd_grpo_loss,
    plan_micro_batches,
)
from vold_pl.rl.rollout import Rollout, SamplingConfig, rollout_rows
from vold_pl.rl.static_decode import DecodeConfig, make_engine
from vold_pl.rl.teacher import build_teacher_inputs, teacher_rows


@dataclass
class GRPOConfig:
    """The GRPO core (METHODS.md §2).

    Args:
        num_generations: G, completions sampled per prompt.
        scale: advantage normalisation: ``group`` (÷ group std), ``batch`` (÷ batch std), ``none`` (Dr. GRPO).
        epsilon_low: lower clip range ε_low of the ratio.
        epsilon_high: upper clip range ε_high; above ε_low gives DAPO's clip-higher.
        loss_aggregation: ``sequence`` (GRPO), ``token`` (DAPO) or ``dr_grpo`` (÷ N·``sampling.max_new_tokens``,
            the fixed generation budget, as TRL and Dr. GRPO).
        num_iterations: μ, optimizer steps per rollout batch; μ > 1 stores π_old log-probs at rollout time.
        beta_ref: weight of the k3 KL to a frozen reference model; 0 builds no reference model at all.
        micro_batch_size: at most this many completions per forward/backward; the step accumulates the
            gradients of its micro-batches before its one optimizer step, and the policy, π_old, reference and
            teacher scoring run per micro-batch too. 0 = the whole batch (B·G rows) at once. The update does
            not depend on it: every aggregation divides by the step's global counts (all micro-batches and
            ranks), see ``docs/distributed.md``.
        max_tokens_per_micro_batch: at most this many padded tokens per micro-batch, counted as rows ×
            (prompt width + the micro-batch's longest completion); whole groups stay together when each fits.
            0 = no token budget. With both set, both caps hold.
        ppo_mini_batch_size: prompts per optimizer step on each rank. The rollout batch (``data.batch_size``
            prompts x G, sampled once per Lightning batch) is split into PPO mini-batches of whole groups, one
            optimizer step each (micro-batches inside each), with π_old stored at rollout time so the clipped
            ratio bounds every step after the first; the global normalisation (``Totals``) is per optimizer step.
            0 (default) = one optimizer step on the whole rollout batch. ``max_steps`` and the LR schedule count
            optimizer steps (μ x mini-batches per batch).
    """

    num_generations: int = 4
    scale: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_aggregation: Literal["sequence", "token", "dr_grpo"] = "sequence"
    num_iterations: int = 1
    beta_ref: float = 0.0
    micro_batch_size: int = 0
    max_tokens_per_micro_batch: int = 0
    ppo_mini_batch_size: int = 0

    def __post_init__(self):
        for name in ("micro_batch_size", "max_tokens_per_micro_batch", "ppo_mini_batch_size"):
            if getattr(self, name) < 0:
                raise UserError(f"grpo.{name}: {getattr(self, name)} is negative; use 0 (the whole batch) or a "
                                 f"positive cap.")


@dataclass
class OPDConfig:
    """On-policy distillation from the teacher (METHODS.md §1, §3).

    Args:
        lam: λ, weight of the distillation term; 0 turns OPD off (plain GRPO) and loads no teacher.
        gate: ``failed`` (VOLD: distil only rollouts whose ``gate_reward`` is 0, g = 1 − r) or ``all``.
        gate_reward: the {0, 1} success reward the ``failed`` gate reads, unweighted; it must be one of the
            module's ``rewards`` (never the summed reward: a format bonus would make a wrong answer look partly
            right and get less distillation).
        estimator: ``k1`` (sampled reverse KL on the student's tokens) or ``full`` (full-vocabulary reverse KL).
        mode: ``loss`` (λ·KL added to the GRPO loss, VOLD) or ``advantage`` (A_t = A − λ·g·sg(k1_t), k1 taken
            at sampling time). ``advantage`` needs ``estimator: k1``: the full KL of a position does not depend
            on the sampled token, so as an advantage it has zero expected gradient.
        top_k: with ``estimator: full``, restrict the KL to the student's top-k tokens (0 = whole vocabulary).
    """

    lam: float = 0.0
    gate: Literal["failed", "all"] = "failed"
    gate_reward: str = "accuracy"
    estimator: Literal["k1", "full"] = "k1"
    mode: Literal["loss", "advantage"] = "loss"
    top_k: int = 0

    def __post_init__(self):
        check_opd_options(self.estimator, self.mode, self.gate)


allow_in_checkpoints(GRPOConfig, OPDConfig)


@dataclass
class StepData:
    """What :meth:`OPDGRPOModule.build_experience` makes once per rollout batch."""

    rollout: Rollout
    experience: Experience  # the constant part; ``logp`` is filled per micro-batch
    plan: list  # the micro-batches [(start, end)]
    rewards: object  # the reward functions' output (``total [N]``, ``named``)
    total_reward: torch.Tensor  # [N] r_i
    zero_std: torch.Tensor  # [B] groups whose rewards are all equal
    t_roll: float  # seconds spent generating
    # ``estimator: full``: the teacher's inputs, scored inside the micro-batch loop (vold_pl.rl.full_kl)
    teacher_inputs: object = None


class OPDGRPOModule(PolicyModule):
    """GRPO + on-policy distillation from a frozen text-only teacher, with manual optimization.

    Args:
        model: the student policy (a VLM such as Qwen2.5-VL, or a text LLM).
        teacher: the text-only teacher; needed when ``opd.lam > 0``. May be quantized (``quantization: 4bit``).
        reference: the frozen reference for the k3 KL; default the student's initial weights (``model``).
        optim: optimizer and LR schedule (one scheduler step per optimizer step).
        grpo: GRPO options.
        opd: distillation options.
        sampling: rollout sampling.
        rewards: reward name → weight; names from ``vold_pl.rewards.functions`` (``accuracy``, ``format``, …).
        max_grad_norm: gradient clipping by global norm (0 = off).
        logprob_chunk_size: positions per chunk when projecting hidden states to log-probs.
        log_completions_every_n_steps: append a few decoded completions to ``<log_dir>/completions.jsonl``.
        gradient_checkpointing: recompute activations in backward.
        export_dir: final HF-format export folder; default ``<log_dir>/export``.
        export: write the export at the end of fit.
        seed: run seed.
        max_consecutive_skips: an optimizer step whose loss or gradient is not finite is skipped (no weight
            changes) and counted in ``train/skipped_steps``; this many in a row stop the run (0 = never).
        decode: the rollout decode loop (:class:`~vold_pl.rl.static_decode.DecodeConfig`): ``engine: eager``
            (default, the reference) or ``engine: static`` (static KV cache, compiled step, EOS checked on device
            every ``eos_check_every`` steps; ``compile: reduce-overhead`` adds CUDA graphs on CUDA).
    """

    collate_mode = "prompt"

    def __init__(
        self,
        model: ModelSpec,
        teacher: ModelSpec | None = None,
        reference: ModelSpec | None = None,
        optim: OptimConfig | None = OptimConfig(),  # instances, not None: --print_config shows the values
        grpo: GRPOConfig | None = GRPOConfig(),
        opd: OPDConfig | None = OPDConfig(),
        sampling: SamplingConfig | None = SamplingConfig(),
        rewards: dict[str, float] | None = {"accuracy": 1.0, "format": 0.1},  # noqa: B006 - copied, never mutated
        max_grad_norm: float = 1.0,
        logprob_chunk_size: int = 1024,
        log_completions_every_n_steps: int = 10,
        gradient_checkpointing: bool = False,
        export_dir: str | None = None,
        export: bool = True,
        seed: int = 0,
        max_consecutive_skips: int = 10,
        decode: DecodeConfig | None = DecodeConfig(),
    ):
        super().__init__(model, optim, gradient_checkpointing, export_dir, export, seed, max_consecutive_skips)
        self.save_hyperparameters()
        self.decode = decode or DecodeConfig()
        self.rollout_engine = make_engine(self.tokenizer, self.decode)
        self.automatic_optimization = False
        self.grpo, self.opd, self.sampling = grpo or GRPOConfig(), opd or OPDConfig(), sampling or SamplingConfig()
        self.reward_weights = validate_weights(rewards if rewards is not None else {"accuracy": 1.0, "format": 0.1})
        self.teacher_spec, self.reference_spec = teacher, reference
        self.max_grad_norm, self.chunk = max_grad_norm, logprob_chunk_size
        self.log_completions_every = log_completions_every_n_steps
        check_align_option(model, teacher if self.opd.lam > 0 else None)
        if self.opd.lam > 0:
            if teacher is None:
                raise UserError("opd.lam > 0 needs a teacher: set model.init_args.teacher.name_or_path, or "
                                 "opd.lam: 0.")
            # Aligns the student's tokenizer when model.align_tokens_with: teacher, then fails at setup, not deep
            # in a step, when the teacher cannot score the student's tokens.
            self.teacher_tokenizer = prepare_teacher_tokenizer(self.processor, model, teacher)
            if self.opd.gate == "failed" and self.opd.gate_reward not in self.reward_weights:
                raise UserError(
                    f"opd.gate: failed reads the success reward opd.gate_reward={self.opd.gate_reward!r}, which is "
                    f"not among the rewards {sorted(self.reward_weights)}: add it to model.init_args.rewards "
                    f"(weight 0 is fine), set opd.gate_reward to your success reward, or use opd.gate: all.")

        # Frozen models live outside the module tree: not trained, not checkpointed, not sharded by Lightning.
        self._frozen: dict[str, torch.nn.Module] = {}

    @property
    def loss_settings(self) -> LossSettings:
        """The options of :func:`~vold_pl.rl.objective.opd_grpo_loss`, from the GRPO, OPD and sampling configs."""
        g, o = self.grpo, self.opd
        return LossSettings(aggregation=g.loss_aggregation, max_len=self.sampling.max_new_tokens,
                            epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta_ref=g.beta_ref, lam=o.lam,
                            gate=o.gate, estimator=o.estimator, mode=o.mode, top_k=o.top_k)

    # -- setup ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.opd.lam > 0 and "teacher" not in self._frozen:
            self._frozen["teacher"] = self._load_frozen(self.teacher_spec)
        # With LoRA and no explicit reference, the reference is the policy with its adapters off (no second copy).
        lora_reference = self.reference_spec is None and is_lora_model(self.model)
        if self.grpo.beta_ref > 0 and "reference" not in self._frozen and not lora_reference:
            self._frozen["reference"] = self._load_frozen(self.reference_spec or self.model_spec)

    def _load_frozen(self, spec: ModelSpec) -> torch.nn.Module:
        """Load a frozen model; under FSDP2 shard it like the student or replicate it (``vold_pl.distributed``).

        Quantized models (bitsandbytes 4/8-bit) are placed by ``load_model`` and always replicated. A model that is
        sharded is read on rank 0 only (:mod:`vold_pl.models.rank0_load`).
        """
        from vold_pl.distributed import prepare_frozen, shards_frozen

        trainer = self._trainer
        if spec.quantization == "none" and trainer is not None and trainer.world_size > 1:
            from vold_pl.models.rank0_load import load_sharded_from_rank0, meta_model

            if shards_frozen(meta_model(spec), trainer):  # weights read on rank 0 only, sent to the shards
                return freeze(load_sharded_from_rank0(spec, lambda m: prepare_frozen(freeze(m), trainer, self.device),
                                                      device=trainer.strategy.root_device))
        model, _ = load_model(spec, with_processor=False)
        model = freeze(model)
        return prepare_frozen(model, trainer, self.device)

    def on_fit_start(self) -> None:
        from vold_pl.distributed import is_fsdp2, is_quantized

        super().on_fit_start()
        for name, m in self._frozen.items():  # sharded and quantized models are already where they belong
            if not is_quantized(m) and not is_fsdp2(m):
                self._frozen[name] = m.to(self.device)

    def _mini_batches(self, rollout: Rollout) -> list[tuple[int, int]]:
        """The PPO mini-batches of a rollout batch, ``[(start, end)]`` rows of whole groups."""
        G, m = rollout.group_size, self.grpo.ppo_mini_batch_size
        N = rollout.num_rows
        if m <= 0 or m * G >= N:
            return [(0, N)]
        return [(s, min(s + m * G, N)) for s in range(0, N, m * G)]

    def _step_rows(self, step: StepData, start: int, end: int) -> StepData:
        """Rows ``start:end`` (whole groups) of the step's data: a PPO mini-batch, with its own micro-batch plan."""
        ro = rollout_rows(step.rollout, start, end)
        width = ro.completion_ids.size(1)
        tin = step.teacher_inputs
        return replace(step, rollout=ro, experience=step.experience.rows(start, end, width), plan=self._plan(ro),
                       teacher_inputs=teacher_rows(tin, start, end, width) if tin is not None else None)

    def _optimizer_steps(self, batches: int) -> int:
        # ``estimated_stepping_batches`` is min(batches, max_steps), and max_steps already counts optimizer
        # steps (μ x mini-batches per batch under manual optimization): scale batches, never max_steps.
        rows = getattr(getattr(self._trainer, "datamodule", None), "batch_size", 0) if self._trainer else 0
        m = self.grpo.ppo_mini_batch_size
        minis = -(-rows // m) if m > 0 and rows else 1
        steps = batches * self.grpo.num_iterations * minis
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return min(steps, max_steps) if max_steps > 0 else steps

    # -- the step ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        step = self.build_experience(batch)
        rollout, exp = step.rollout, step.experience
        mask = rollout.completion_mask.float()  # [N, L]
        totals, world = self._totals(exp)

        # repeat μ times: each PPO mini-batch of the step's experience (whole groups), micro-batch by micro-batch,
        # one optimizer step each; a single mini-batch (the default) is the whole rollout batch
        opt = self.optimizers()
        sched = self.lr_schedulers()
        minis = self._mini_batches(rollout)
        entropy = mask.new_zeros(mask.shape)  # [N, L]
        for _ in range(self.grpo.num_iterations):
            for s, e in minis:
                sub = step if len(minis) == 1 else self._step_rows(step, s, e)
                if len(minis) > 1:
                    totals, world = self._totals(sub.experience)  # the global counts of this optimizer step
                opt.zero_grad()
                loss, stats, ent = self.accumulate_gradients(sub, totals, world)
                entropy[s:e, : ent.size(1)] = ent
                self._optimizer_step(opt, sched, loss)
        self._log_step(step.rewards, exp.advantages, step.zero_std, rollout, mask, entropy, stats,
                       loss.detach() / world, step.t_roll, time.perf_counter() - t0)
        if self.log_completions_every and self.global_step % self.log_completions_every < self.grpo.num_iterations:
            self._write_completions(batch["records"], rollout, step.total_reward)

    def accumulate_gradients(self, step: StepData, totals: Totals, world: int = 1, backward=None):
        """The loss of ``step`` micro-batch by micro-batch: every micro-batch but the last is backpropagated here
        (gradients accumulate, without the ranks' gradient sync); the last one's loss is returned for the
        optimizer step to backpropagate (its backward syncs the sum).

        ``totals``: the step's global counts; ``world``: the data-parallel ranks DDP / FSDP average gradients
        over, undone here so the update is the gradient of the global loss. ``backward``: default
        ``manual_backward``. Returns ``(loss, metrics, entropy [N, L])``: ``loss`` has the whole step's (local)
        value, non-finite if any micro-batch was, and the last micro-batch's graph.
        """
        backward = backward or self.manual_backward
        rollout, exp, plan, cfg = step.rollout, step.experience, step.plan, self.loss_settings
        entropy = exp.mask.new_zeros(exp.mask.shape)  # [N, L]
        parts, earlier, loss = [], exp.mask.new_zeros(()), None
        for k, (s, e) in enumerate(plan):
            e1 = max(e, s + 1)  # (s, s): a rank with fewer micro-batches runs one row, weight 0
            sub = rollout_rows(rollout, s, e1) if (s, e1) != (0, rollout.num_rows) else rollout
            if step.teacher_inputs is not None:  # full KL: teacher and KL per micro-batch, slab by slab
                logp, ent, kl = self._logprobs_and_full_kl(sub, step.teacher_inputs, s, e1)  # [n, l] each
                mb = replace(exp.rows(s, e1, logp.size(1)), logp=logp, opd_kl=kl)
            else:
                logp, ent = self._logprobs(sub)  # [n, l], [n, l]
                mb = replace(exp.rows(s, e1, logp.size(1)), logp=logp)
            width = logp.size(1)
            if e > s:
                entropy[s:e, :width] = ent.detach()
                mb_loss, mb_stats = opd_grpo_loss(mb, cfg, totals)
                mb_loss = mb_loss * world  # DDP / FSDP average gradients over ranks: undo it (a sum of slices)
                parts.append((mb_stats, metric_weights(mb, cfg)))
            else:  # the dummy keeps every sharded model's collectives in step across ranks
                mb_loss = logp.sum() * 0.0
            if k < len(plan) - 1:  # accumulate locally; the last micro-batch's backward syncs the gradients
                if bool(torch.isfinite(mb_loss.detach()).all()):  # this rank only: ranks differ in count
                    with self._no_grad_sync():
                        backward(mb_loss)
                earlier = earlier + mb_loss.detach()  # a non-finite value reaches the step's agreed check
            else:
                loss = mb_loss + earlier
        return loss, combine_metrics(parts), entropy

    def build_experience(self, batch: dict) -> StepData:
        """The step's data, built once per rollout batch: the rollout (o_1..o_G ~ π_old per prompt), rewards,
        group advantages, and the constant scores of the :class:`Experience` (π_old when μ > 1, reference,
        teacher), each scored micro-batch by micro-batch; ``experience.logp`` is filled per micro-batch."""
        t0 = time.perf_counter()
        G = self.grpo.num_generations
        records = batch["records"]
        rollout = self.rollout_engine.generate(self.model, batch, G, self.sampling)
        t_roll = time.perf_counter() - t0
        plan = self._plan(rollout)

        # reward r_i = Σ_k w_k R_k, group advantage A_i
        rec_objs = [SimpleNamespace(**r) for r in records for _ in range(G)]
        rw = compute_rewards(rollout.texts, rec_objs, self.reward_weights)
        rewards = rw.total.to(self.device)  # [N]
        adv, zero_std = group_advantages(rewards, G, self.grpo.scale)  # [N], [B]

        # frozen scores, once per rollout batch: teacher log π_T(o_t | q_T, o_<t), reference, π_old
        teacher = self._teacher_scores(records, rollout, plan) if self.opd.lam > 0 else {}
        ref_logp = old_logp = None
        if self.grpo.beta_ref > 0:
            reference = self._frozen.get("reference", self.model)  # LoRA: the policy, adapters off below
            with torch.no_grad(), adapters_off(reference):
                ref_logp = self._score(reference, rollout, plan)  # [N, L]
        if self.grpo.num_iterations > 1 or len(self._mini_batches(rollout)) > 1:
            with torch.no_grad():  # π_old at rollout time: the weights the samples came from
                old_logp = self._score(self.model, rollout, plan)  # [N, L]
        success = rw.named[self.opd.gate_reward].to(self.device) if self.opd.gate_reward in rw.named else None  # [N]
        exp = Experience(logp=None, old_logp=old_logp, advantages=adv, mask=rollout.completion_mask.float(),
                         ref_logp=ref_logp, success=success, teacher_logp=teacher.get("logp"),
                         teacher_logits=teacher.get("logits"), teacher_available=teacher.get("available"))
        return StepData(rollout, exp, plan, rw, rewards, zero_std, t_roll, teacher.get("inputs"))

    def _plan(self, rollout: Rollout) -> list:
        """The step's micro-batches ``[(start, end)]``. Across ranks their number is made equal (empty ``(s, s)``
        entries pad the shorter plans): a sharded model all-gathers in every forward, on every rank."""
        g = self.grpo
        plan = plan_micro_batches(rollout.completion_mask.sum(-1), rollout.prompt_ids.size(1), rollout.group_size,
                                  g.micro_batch_size, g.max_tokens_per_micro_batch)
        if self._trainer is not None and self.trainer.world_size > 1:
            n = torch.tensor(float(len(plan)), device=self.device)
            most = int(self.trainer.strategy.reduce(n, reduce_op="max"))
            plan = plan + [(0, 0)] * (most - len(plan))
        return plan

    def _totals(self, exp: Experience) -> tuple[Totals, int]:
        """The aggregations' global counts (completions, completion tokens) summed over ranks, and the number
        of data-parallel ranks the gradients are averaged over."""
        counts = torch.stack([torch.tensor(float(exp.mask.shape[0]), device=exp.mask.device), exp.mask.sum().float()])
        world = 1
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            world = self.trainer.world_size
        return Totals(rows=float(counts[0]), tokens=float(counts[1])), world

    def _score(self, model: torch.nn.Module, rollout: Rollout, plan: list) -> torch.Tensor:
        """Constant log-probs ``[N, L]`` of the rollout under ``model``, micro-batch by micro-batch."""
        out = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=rollout.completion_ids.device)
        for s, e in plan:
            sub = rollout_rows(rollout, s, e if e > s else s + 1)  # (s, s): a forward only for the collectives
            logp = rollout_token_logprobs(model, sub, temperature=self.sampling.temperature, chunk_size=self.chunk)
            if e > s:
                out[s:e, : logp.size(1)] = logp
        return out

    @contextmanager
    def _no_grad_sync(self):
        """Backward without the gradient all-reduce (DDP) / reduce-scatter (FSDP2): the accumulating micro-batches;
        the last one syncs the sum. Public hooks: the strategy's ``block_backward_sync``, FSDP2's
        ``set_requires_gradient_sync``."""
        fsdp = fsdp_modules(self.model)
        for m in fsdp:
            m.set_requires_gradient_sync(False, recurse=False)
        block = getattr(self.trainer.strategy, "block_backward_sync", None) if self._trainer is not None else None
        try:
            if block is not None:
                with block():
                    yield
            else:
                yield
        finally:
            for m in fsdp:
                m.set_requires_gradient_sync(True, recurse=False)

    def _logprobs(self, rollout: Rollout):
        # Each prompt (and its images) runs once per group; completions are scored on its expanded KV cache.
        # Chunks are recomputed in backward so the [N, L, V] logits never live whole. The sampler's
        # distribution: its temperature, the rollout's blocked ids removed.
        return rollout_token_logprobs(self.model, rollout, temperature=self.sampling.temperature,
                                      chunk_size=self.chunk, return_entropy=True, checkpoint_chunks=True)

    def _logprobs_and_full_kl(self, rollout: Rollout, tin, start: int, end: int):
        """Micro-batch rows ``start:end``: the policy's ``logp``, ``entropy`` and full KL to the teacher, ``[n, l]``
        each, from one policy forward; the teacher runs here (each prompt once per group), so only this
        micro-batch's hidden states and one ``[chunk, V]`` logits slab per model are alive (vold_pl.rl.full_kl)."""
        width = max(int(rollout.completion_mask.sum(-1).max()), 1)
        sub = teacher_rows(tin, start, end, width)
        group = rollout.group_size if start % rollout.group_size == 0 else 1
        t_hidden, t_head = teacher_hidden(self._frozen["teacher"], sub.input_ids, sub.attention_mask,
                                          sub.completion_start, group)  # [n, l, H_T]
        return policy_scores_and_full_kl(self.model, rollout, t_hidden, t_head, self.sampling.temperature,
                                         self.chunk, self.opd.top_k or None)

    def _teacher_scores(self, records: list[dict], rollout: Rollout, plan: list) -> dict:
        """The teacher's scores of the student's tokens on the same support as the sampler (blocked ids
        removed and renormalised), micro-batch by micro-batch: ``logp [N, L]`` (k1), and ``available [N]``. For
        the full estimator (``logits`` in :data:`~vold_pl.rl.objective.TEACHER_SCORES`) only its ``inputs``: it is
        scored inside the micro-batch loop (:meth:`_logprobs_and_full_kl`)."""
        tin = build_teacher_inputs(self.teacher_tokenizer, records, rollout.completion_ids, rollout.completion_mask,
                                   rollout.group_size)
        teacher = self._frozen["teacher"]
        kind = TEACHER_SCORES[self.opd.estimator]
        T, blocked = self.sampling.temperature, rollout.blocked_ids
        lengths = rollout.completion_mask.sum(-1)  # [N]
        out, parts = {"available": tin.available}, []
        if kind == "logits":  # scored inside the micro-batch loop, never kept whole (_logprobs_and_full_kl)
            return {**out, "inputs": tin}
        for s, e in plan:
            width = max(int(lengths[s:e].max()), 1) if e > s else 1
            sub = teacher_rows(tin, s, e if e > s else s + 1, width)
            group = rollout.group_size if s % rollout.group_size == 0 else 1  # whole groups: prompts once each
            parts.append((s, e, teacher_token_logprobs_shared(teacher, sub.input_ids, sub.attention_mask,
                                                              sub.completion_start, group, T, self.chunk,
                                                              blocked)))  # [n, l]
        full = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=lengths.device)  # [N, L]
        for s, e, v in parts:
            if e > s:
                full[s:e, : v.size(1)] = v
        out[kind] = full
        return out

    def _optimizer_step(self, opt, sched, loss: torch.Tensor) -> None:
        # ``loss`` is the step's last micro-batch (its graph) carrying the whole step's value; the earlier
        # micro-batches' gradients are already accumulated (``training_step`` zeroes them before the first).
        # A non-finite loss skips backward on every rank; a non-finite gradient is caught in
        # ``on_before_optimizer_step``, which ``opt.step()`` runs first. Either way ``opt.step()`` then finds no
        # gradient and changes nothing, and the step still counts (global_step, LR schedule).
        if self.loss_is_finite(loss):
            self.manual_backward(loss)
            if self.max_grad_norm > 0:
                self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    # -- logging -------------------------------------------------------------------------------------------
    def _log_step(self, rw, adv, zero_std, rollout, mask, entropy, stats, loss, t_roll, t_step) -> None:
        rewards = rw.total.to(mask.device)  # [N]
        lengths = mask.sum(-1)  # [N]
        n_tokens = float(lengths.sum())
        m = {
            "loss": loss.detach(),
            "reward": rewards.mean(),
            "reward_std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
            "frac_reward_zero_std": zero_std.float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": rollout.clipped.float().mean(),
            "entropy": masked_mean(entropy.detach(), mask),
            "rollout/tokens_per_second": torch.tensor(n_tokens / max(t_roll, 1e-9)),
            "time/rollout": torch.tensor(t_roll),
            "time/step": torch.tensor(t_step),
            "lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
        }
        for name, v in rw.named.items():
            m[f"rewards/{name}/mean"] = v.mean()
        if rw.n_errors:
            m["rewards/errors"] = torch.tensor(float(rw.n_errors))
        renames = {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
                   "clip_region": "clip_ratio/region_mean", "ratio_mean": "ratio/mean"}
        m.update({renames.get(k, k): v for k, v in stats.items()})
        bs = rollout.num_rows // rollout.group_size
        self.log_dict({f"train/{k}": v.float() for k, v in m.items()}, batch_size=bs, prog_bar=False)
        self.log("reward", m["reward"].float(), prog_bar=True, batch_size=bs, logger=False)

    def _write_completions(self, records, rollout: Rollout, rewards: torch.Tensor, k: int = 4) -> None:
        if self.trainer.global_rank != 0:
            return
        path = Path(self.trainer.log_dir or ".") / "completions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        G = rollout.group_size
        rows = [{"step": self.global_step, "id": records[i // G]["id"], "answer": records[i // G]["answer"],
                 "completion": rollout.texts[i], "reward": float(rewards[i])} for i in range(min(k, rollout.num_rows))]
        with path.open("a") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        from vold_pl.callbacks.samples import log_completions

        log_completions(self.loggers, rows, self.global_step)  # a table (W&B) or text (TensorBoard) as well

    # -- evaluation ----------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        greedy = SamplingConfig(max_new_tokens=self.sampling.max_new_tokens, do_sample=False)
        rollout = self.rollout_engine.generate(self.model, batch, 1, greedy)
        recs = [SimpleNamespace(**r) for r in batch["records"]]
        rw = compute_rewards(rollout.texts, recs, self.reward_weights)
        bs = len(recs)
        self.log("val/reward", rw.total.mean(), batch_size=bs, sync_dist=True)
        if "accuracy" in rw.named:
            self.log("val/accuracy", rw.named["accuracy"].mean(), batch_size=bs, sync_dist=True, prog_bar=True)
