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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal

import torch

from vold_pl.checkpointing import allow_in_checkpoints
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec, check_align_option, freeze, load_model, prepare_teacher_tokenizer
from vold_pl.models.lora import adapters_off, is_lora_model
from vold_pl.modules.base import OptimConfig, PolicyModule
from vold_pl.prompts import DEFAULT_INSTRUCTION
from vold_pl.rewards.functions import compute_rewards, validate_weights
from vold_pl.rl.advantages import group_advantages
from vold_pl.rl.dynamic_sampling import GroupFilter, Sampled
from vold_pl.rl.full_kl import policy_scores_and_full_kl, teacher_hidden, teacher_token_logprobs_shared
from vold_pl.rl.logprobs import rollout_token_logprobs
from vold_pl.rl.losses import OPD_ESTIMATORS, Totals, masked_mean
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
from vold_pl.rl.rollout_types import Rollout, SamplingConfig, rollout_rows
from vold_pl.rl.static_decode import DecodeConfig, make_engine
from vold_pl.rl.teacher import TeacherInputs, build_teacher_inputs, teacher_rows
from vold_pl.sharding import fsdp_modules


@dataclass
class GRPOConfig:
    """The GRPO core (METHODS.md §2).

    Args:
        num_generations: G, completions sampled per prompt.
        scale: advantage normalisation: ``group`` (÷ group std), ``batch`` (÷ batch std), ``none`` (Dr. GRPO).
        epsilon_low: lower clip range ε_low of the ratio.
        epsilon_high: upper clip range ε_high; above ε_low gives DAPO's clip-higher.
        loss_aggregation: a registered aggregation (``vold_pl.rl.losses.AGGREGATIONS``): ``sequence`` (GRPO),
            ``token`` (DAPO), ``dr_grpo`` (÷ N·``sampling.max_new_tokens``, the fixed generation budget, as TRL
            and Dr. GRPO) or ``seq_mean_token_sum`` (verl: each completion's token sum, mean over completions).
        policy_loss: a registered policy loss (``vold_pl.rl.losses.POLICY_LOSSES``): ``ppo_clip`` (the clipped
            surrogate of PPO / GRPO), ``dual_clip`` (also bounds the loss of negative-advantage tokens at
            ``clip_ratio_c``·|A|, arXiv 1912.09729) or ``gspo`` (one clipped ratio per sequence, arXiv
            2507.18071; its paper clips at ε ≈ 3e-4 / 4e-4 with ``loss_aggregation: sequence``).
        clip_ratio_c: ``dual_clip``'s bound c (> 1; verl's ``clip_ratio_c``); ignored by the other losses.
        num_iterations: μ, optimizer steps per rollout batch; μ > 1 stores π_old log-probs at rollout time.
        beta_ref: weight of the KL to a frozen reference model; 0 builds no reference model at all.
        ref_kl_estimator: the estimator of that KL per sampled token (``vold_pl.rl.losses.REF_KL_ESTIMATORS``):
            ``k3`` (GRPO's, unbiased and >= 0), ``k3_clamped`` (k3 with verl's ``low_var_kl`` clamps), ``k2``
            (½(log-ratio)², verl's ``mse``) or ``k1`` (the log-ratio, verl's ``kl``).
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
        dynamic_sampling: DAPO's dynamic sampling (arXiv 2503.14476; verl's ``filter_groups``): drop the groups
            whose rewards are all equal (zero advantage) and sample further batches of prompts under the same
            weights until the step has ``data.batch_size`` groups with differing rewards (``vold_pl.rl.
            dynamic_sampling``). A step then reads one or more data batches (``train/num_gen_batches``);
            ``train/frac_reward_zero_std`` is over every group generated, the other metrics over the groups
            trained. Lightning's loggers write at every data batch (their x-axis counts data batches), so a batch
            that took no step repeats the last step's values. With OPD the dropped groups are not distilled
            either. Resume is exact from a checkpoint written at an optimizer step (``every_n_train_steps``, the
            end of fit); one written between the generation batches of a step (a pre-emption or time-based save)
            does not hold the groups kept so far, so the resumed run goes on from the next data batch and those
            few prompts are not trained on in that epoch.
        max_gen_batches: with ``dynamic_sampling``, the generation batches one step may draw from; at this many the
            step goes ahead, topped up with dropped groups of the last batch (verl's ``max_num_gen_batches``).
    """

    num_generations: int = 4
    scale: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_aggregation: str = "sequence"
    policy_loss: str = "ppo_clip"
    clip_ratio_c: float = 3.0
    num_iterations: int = 1
    beta_ref: float = 0.0
    ref_kl_estimator: str = "k3"
    micro_batch_size: int = 0
    max_tokens_per_micro_batch: int = 0
    ppo_mini_batch_size: int = 0
    dynamic_sampling: bool = False
    max_gen_batches: int = 4

    def __post_init__(self):
        # Names are checked against the registries here, at config time, with the registered names listed.
        LossSettings(aggregation=self.loss_aggregation, policy_loss=self.policy_loss,
                     clip_ratio_c=self.clip_ratio_c, ref_kl=self.ref_kl_estimator)
        for name in ("micro_batch_size", "max_tokens_per_micro_batch", "ppo_mini_batch_size"):
            if getattr(self, name) < 0:
                raise UserError(f"grpo.{name}: {getattr(self, name)} is negative; use 0 (the whole batch) or a "
                                 f"positive cap.")
        if self.max_gen_batches < 1:
            raise UserError(f"grpo.max_gen_batches: {self.max_gen_batches}; a step draws from at least one generation "
                             f"batch: use 1 or more (1 = no refill: dropped groups are put back).")


@dataclass
class OPDConfig:
    """On-policy distillation from the teacher (METHODS.md §1, §3).

    Args:
        lam: λ, weight of the distillation term; 0 turns OPD off (plain GRPO) and loads no teacher.
        gate: ``failed`` (VOLD: distil only rollouts whose ``gate_reward`` is 0, g = 1 − r) or ``all``.
        gate_reward: the {0, 1} success reward the ``failed`` gate reads, unweighted; it must be one of the
            module's ``rewards`` (never the summed reward: a format bonus would make a wrong answer look partly
            right and get less distillation).
        estimator: ``k1`` (sampled reverse KL on the student's tokens), ``full`` (full-vocabulary reverse KL), or
            ``forward`` (beyond VOLD: the full-vocabulary forward KL ``KL(π_T ‖ π_θ)`` on the student's rollouts,
            GKD's on-policy forward KL; its gradient ``π_θ − π_T`` raises the teacher's choice even where the
            student gives it little mass; logged as ``opd/forward_kl``).
        mode: ``loss`` (λ·KL added to the GRPO loss, VOLD) or ``advantage`` (A_t = A − λ·g·sg(k1_t), k1 taken
            at sampling time). ``advantage`` needs ``estimator: k1``: a full-vocabulary KL of a position does not
            depend on the sampled token, so as an advantage it has zero expected gradient.
        top_k: with ``estimator: full``, restrict the KL to the student's top-k tokens (``forward``: the
            teacher's top-k; 0 = whole vocabulary).
        horizon: which tokens of a gated rollout are distilled: ``all`` (the papers) or ``first_divergence``
            (beyond the papers: those up to and including the first token whose sampling-time k1 is above
            ``divergence_nats``; after the student's first step the teacher would not take, the teacher scores a
            prefix it would not have written, and the rest of the rollout is left to GRPO). The divergence is found
            by the sampled tokens' k1 with either estimator: with ``full`` the teacher's whole next-token
            distribution is distilled at those positions, its choice at the divergence included.
            ``at_divergence``: that first divergent token alone, the teacher's correction without the tokens
            before it (with ``full`` or ``forward``, which carry the teacher's own choice there; k1 only pushes
            the student's token down).
        divergence_nats: the k1 (log π_old − log π_T of the sampled token, nats) above which a token is the
            rollout's first divergence (5 nats: the teacher finds it about 150 times less likely than the student).
    """

    lam: float = 0.0
    gate: Literal["failed", "all"] = "failed"
    gate_reward: str = "accuracy"
    estimator: Literal["k1", "full", "forward"] = "k1"
    mode: Literal["loss", "advantage"] = "loss"
    top_k: int = 0
    horizon: Literal["all", "first_divergence", "at_divergence"] = "all"
    divergence_nats: float = 5.0

    def __post_init__(self):
        check_opd_options(self.estimator, self.mode, self.gate, horizon=self.horizon)


allow_in_checkpoints(GRPOConfig, OPDConfig)


@dataclass
class MicroBatch:
    """One entry of a step's micro-batch plan, and the one slicer of the step's tensors by it.

    Scoring (:meth:`OPDGRPOModule._score`), teacher scoring (:meth:`OPDGRPOModule._teacher_scores`) and the
    gradient loop (:meth:`OPDGRPOModule.backward_micro_batches`) all cut the rollout, the experience and the
    teacher's inputs with these methods, so the rows and the completion width of a micro-batch are decided once.

    Args:
        start, end: the rows ``start:end`` of the step's ``N`` rows.
        width: the completion columns of the slice: its longest completion (at least 1); the columns cut are
            padding after every row's EOS, which a causal model never attends to from earlier positions.
        padding: the entry exists only to keep the ranks' collectives in step (a sharded model all-gathers in
            every forward, so every rank runs as many micro-batches as the rank with the most): it runs one row
            with weight 0, and nothing it computes is kept.
    """

    start: int
    end: int
    width: int
    padding: bool = False

    @classmethod
    def pad(cls) -> MicroBatch:
        """A padding entry: row 0, one column (the cheapest forward that still touches every weight)."""
        return cls(0, 1, 1, padding=True)

    def rollout(self, rollout: Rollout) -> Rollout:
        """The micro-batch's rows of ``rollout`` (the rollout itself when the entry is all of it)."""
        whole = (self.start, self.end) == (0, rollout.num_rows) and rollout.completion_ids.size(1) == self.width
        return rollout if whole else rollout_rows(rollout, self.start, self.end, self.width)

    def experience(self, exp: Experience) -> Experience:
        return exp.rows(self.start, self.end, self.width)

    def teacher_inputs(self, inputs: TeacherInputs) -> TeacherInputs:
        return teacher_rows(inputs, self.start, self.end, self.width)

    def write(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """Put this micro-batch's ``values [n, l, ...]`` into the step's ``out [N, L, ...]``; a padding entry
        writes nothing."""
        if not self.padding:
            out[self.start:self.end, : values.size(1)] = values


def micro_batch_plan(rollout: Rollout, spans: list[tuple[int, int]], length: int | None = None) -> list[MicroBatch]:
    """The plan of ``spans`` (rows ``[(start, end)]`` of ``rollout``), padded with :meth:`MicroBatch.pad` entries
    to ``length`` entries."""
    lengths = rollout.completion_mask.sum(-1)  # [N]
    plan = [MicroBatch(s, e, max(int(lengths[s:e].max()), 1)) for s, e in spans]
    return plan + [MicroBatch.pad() for _ in range((length or len(plan)) - len(plan))]


@dataclass
class StepData:
    """What :meth:`OPDGRPOModule.build_experience` makes once per rollout batch."""

    rollout: Rollout
    experience: Experience  # the constant part; ``logp`` is filled per micro-batch
    plan: list[MicroBatch]  # the step's micro-batches
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
        # the engines pad completions with the tokenizer's pad id; joined rollouts pad with it too
        self.group_filter = (GroupFilter(self.grpo.max_gen_batches, self.tokenizer.pad_token_id)
                             if self.grpo.dynamic_sampling else None)

    # -- the curriculum's and the data module's view of the module -----------------------------------------
    def curriculum_settings(self) -> dict[str, Any]:
        """The RL settings a curriculum stage may set: G, the reward weights, the completion cap and the
        sampling temperature, with their current values."""
        return {"num_generations": self.grpo.num_generations, "rewards": dict(self.reward_weights),
                "max_new_tokens": self.sampling.max_new_tokens, "temperature": self.sampling.temperature}

    def apply_curriculum_settings(self, num_generations: int | None = None, rewards: dict[str, float] | None = None,
                                  max_new_tokens: int | None = None, temperature: float | None = None) -> None:
        """Set the settings given (``None`` keeps one). The config dataclasses are replaced, never mutated, so
        the saved hyper-parameters keep the configured values."""
        if num_generations is not None:
            self.grpo = replace(self.grpo, num_generations=num_generations)
        if rewards is not None:
            self.reward_weights = validate_weights(rewards)
        if max_new_tokens is not None:
            self.sampling = replace(self.sampling, max_new_tokens=max_new_tokens)
        if temperature is not None:
            self.sampling = replace(self.sampling, temperature=temperature)
        if self.group_filter is not None:  # groups kept so far were sampled and rewarded under the old settings
            self.group_filter.reset()

    @property
    def completion_budget(self) -> int | None:
        return self.sampling.max_new_tokens

    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen OPD teacher (loaded by :meth:`configure_model` when ``opd.lam > 0``), else None."""
        return self._frozen.get("teacher")

    @property
    def loss_settings(self) -> LossSettings:
        """The options of :func:`~vold_pl.rl.objective.opd_grpo_loss`, from the GRPO, OPD and sampling configs."""
        g, o = self.grpo, self.opd
        return LossSettings(aggregation=g.loss_aggregation, max_len=self.sampling.max_new_tokens,
                            epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, policy_loss=g.policy_loss,
                            clip_ratio_c=g.clip_ratio_c, beta_ref=g.beta_ref, ref_kl=g.ref_kl_estimator, lam=o.lam,
                            gate=o.gate, estimator=o.estimator, mode=o.mode, top_k=o.top_k, horizon=o.horizon,
                            divergence_nats=o.divergence_nats)

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
        """Load a frozen model; under FSDP2 shard it like the student or replicate it (``vold_pl.sharding``).

        Quantized models (bitsandbytes 4/8-bit) are placed by ``load_model`` and always replicated. A model that is
        sharded is read on rank 0 only (:mod:`vold_pl.models.rank0_load`).
        """
        from vold_pl.sharding import prepare_frozen, shards_frozen

        trainer = self.attached_trainer()
        if spec.quantization == "none" and trainer is not None and trainer.world_size > 1:
            from vold_pl.models.rank0_load import load_sharded_from_rank0, meta_model

            if shards_frozen(meta_model(spec), trainer):  # weights read on rank 0 only, sent to the shards
                return freeze(load_sharded_from_rank0(spec, lambda m: prepare_frozen(freeze(m), trainer, self.device),
                                                      device=trainer.strategy.root_device))
        model, _ = load_model(spec, with_processor=False)
        model = freeze(model)
        return prepare_frozen(model, trainer, self.device)

    def on_fit_start(self) -> None:
        from vold_pl.sharding import is_fsdp2, is_quantized

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
        """Rows ``start:end`` (whole groups) of the step's data: a PPO mini-batch, cut by the step's one slicer
        (:class:`MicroBatch`), with its own micro-batch plan."""
        rows = micro_batch_plan(step.rollout, [(start, end)])[0]
        ro, tin = rows.rollout(step.rollout), step.teacher_inputs
        return replace(step, rollout=ro, experience=rows.experience(step.experience), plan=self._plan(ro),
                       teacher_inputs=rows.teacher_inputs(tin) if tin is not None else None)

    def _optimizer_steps(self, batches: int) -> int:
        # ``estimated_stepping_batches`` is min(batches, max_steps), and max_steps already counts optimizer
        # steps (μ x mini-batches per batch under manual optimization): scale batches, never max_steps.
        trainer = self.attached_trainer()
        rows = getattr(getattr(trainer, "datamodule", None), "batch_size", 0) if trainer is not None else 0
        m = self.grpo.ppo_mini_batch_size
        minis = -(-rows // m) if m > 0 and rows else 1
        steps = batches * self.grpo.num_iterations * minis
        max_steps = trainer.max_steps if trainer is not None else -1
        return min(steps, max_steps) if max_steps > 0 else steps

    # -- the step ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        sampled = self.sample(batch)
        if self.group_filter is not None:  # DAPO: groups with differing rewards only, from one or more batches
            sampled = self.group_filter.add(sampled, self._fewest_over_ranks)
            if sampled is None:  # too few yet: the next batch is sampled under the same weights, no step taken
                return
        step = self.score_experience(sampled)
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
                loss, stats, ent = self.backward_micro_batches(sub, totals, world)
                entropy[s:e, : ent.size(1)] = ent
                self._clip_step_and_schedule(opt, sched)
        zero_std = step.zero_std if sampled.generated_zero_std is None else sampled.generated_zero_std
        self._log_step(step.rewards, exp.advantages, zero_std, rollout, mask, entropy, stats,
                       loss.detach() / world, step.t_roll, time.perf_counter() - t0, sampled.gen_batches)
        if self.log_completions_every and self.global_step % self.log_completions_every < self.grpo.num_iterations:
            self._write_completions(sampled.records, rollout, step.total_reward)

    def backward_micro_batches(self, step: StepData, totals: Totals, world: int = 1, backward=None):
        """The step's loss and its gradient, micro-batch by micro-batch: every micro-batch's forward and backward
        (the one place the step backpropagates). Gradients accumulate without the ranks' gradient sync; the last
        micro-batch's backward syncs the sum. A micro-batch whose loss is not finite on this rank is not
        backpropagated; the last one is backpropagated only when the step's loss is finite on every rank (else
        the step is skipped, :meth:`skip_step_unless_finite`), since its backward is a collective.

        ``totals``: the step's global counts; ``world``: the data-parallel ranks DDP / FSDP average gradients
        over, undone here so the update is the gradient of the global loss. ``backward``: default
        ``manual_backward``. Returns ``(loss, metrics, entropy [N, L])``: the whole step's (local) loss value,
        non-finite if any micro-batch's was.
        """
        backward = backward or self.manual_backward
        plan = step.plan
        entropy = step.experience.mask.new_zeros(step.experience.mask.shape)  # [N, L]
        parts, loss = [], step.experience.mask.new_zeros(())
        for k, mb in enumerate(plan):
            mb_loss, mb_parts = self._micro_batch_loss(step, mb, totals, world, entropy)
            parts += mb_parts
            loss = loss + mb_loss.detach()  # a non-finite value reaches the step's agreed check
            last = k == len(plan) - 1
            run = self.skip_step_unless_finite(loss) if last else bool(torch.isfinite(mb_loss.detach()).all())
            if run:
                with nullcontext() if last else self._without_gradient_sync():
                    backward(mb_loss)
        return loss, combine_metrics(parts), entropy

    def _micro_batch_loss(self, step: StepData, mb: MicroBatch, totals: Totals, world: int,
                          entropy: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The forward of one micro-batch: its loss times ``world`` (DDP / FSDP average gradients over ranks:
        undone, so the slices sum), its ``(metrics, weights)``, and its entropy written into ``entropy [N, L]``.
        A padding entry's loss is its log-probs times 0: a graph through every weight, no value."""
        sub = mb.rollout(step.rollout)
        scores = {}
        if step.teacher_inputs is not None:  # full KL: teacher and KL per micro-batch, slab by slab
            logp, ent, scores = self._logprobs_and_full_kl(sub, mb.teacher_inputs(step.teacher_inputs), mb.start)
        else:
            logp, ent = self._logprobs(sub)  # [n, l], [n, l]
        if mb.padding:  # the forward keeps every sharded model's collectives in step; nothing of it is kept
            return logp.sum() * 0.0, []
        mb.write(entropy, ent.detach())
        exp = replace(mb.experience(step.experience), logp=logp, **scores)
        mb_loss, mb_stats = opd_grpo_loss(exp, self.loss_settings, totals)
        return mb_loss * world, [(mb_stats, metric_weights(exp, self.loss_settings))]

    def sample(self, batch: dict) -> Sampled:
        """The rollout batch: o_1..o_G ~ π_old per prompt and their rewards r_i = Σ_k w_k R_k."""
        t0 = time.perf_counter()
        G = self.grpo.num_generations
        records = batch["records"]
        rollout = self.rollout_engine.generate(self.model, batch, G, self.sampling)
        t_roll = time.perf_counter() - t0
        rec_objs = [SimpleNamespace(**r) for r in records for _ in range(G)]
        rw = compute_rewards(rollout.texts, rec_objs, self.reward_weights)
        # the teacher's prompt ends with the instruction the student's did (the data module's ``instruction``)
        return Sampled(rollout, list(records), rw, batch.get("instruction", DEFAULT_INSTRUCTION), t_roll)

    def build_experience(self, batch: dict) -> StepData:
        """The step's data from one data batch: :meth:`sample`, then :meth:`score_experience`."""
        return self.score_experience(self.sample(batch))

    def score_experience(self, sampled: Sampled) -> StepData:
        """The step's data, built once per rollout batch: group advantages and the constant scores of the
        :class:`Experience` (π_old when μ > 1, reference, teacher), each scored micro-batch by micro-batch;
        ``experience.logp`` is filled per micro-batch."""
        G, rollout, records, rw = self.grpo.num_generations, sampled.rollout, sampled.records, sampled.rewards
        plan = self._plan(rollout)
        rewards = rw.total.to(self.device)  # [N]
        adv, zero_std = group_advantages(rewards, G, self.grpo.scale)  # [N], [B]

        # frozen scores, once per rollout batch: teacher log π_T(o_t | q_T, o_<t), reference, π_old
        teacher = self._teacher_scores(records, rollout, plan, sampled.instruction) if self.opd.lam > 0 else {}
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
        return StepData(rollout, exp, plan, rw, rewards, zero_std, sampled.t_roll, teacher.get("inputs"))

    def _plan(self, rollout: Rollout) -> list[MicroBatch]:
        """The step's micro-batches. Across ranks their number is made equal (padding entries,
        :meth:`MicroBatch.pad`, lengthen the shorter plans): a sharded model all-gathers in every forward, on
        every rank."""
        g = self.grpo
        spans = plan_micro_batches(rollout.completion_mask.sum(-1), rollout.prompt_ids.size(1), rollout.group_size,
                                   g.micro_batch_size, g.max_tokens_per_micro_batch)
        most, trainer = len(spans), self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            n = torch.tensor(float(len(spans)), device=self.device)
            most = int(trainer.strategy.reduce(n, reduce_op="max"))
        return micro_batch_plan(rollout, spans, most)

    def _fewest_over_ranks(self, n: int) -> int:
        """The smallest ``n`` over the data-parallel ranks (``n`` itself on one)."""
        trainer = self.attached_trainer()
        if trainer is None or trainer.world_size <= 1:
            return n
        return int(trainer.strategy.reduce(torch.tensor(float(n), device=self.device), reduce_op="min"))

    def _totals(self, exp: Experience) -> tuple[Totals, int]:
        """The aggregations' global counts (completions, completion tokens) summed over ranks, and the number
        of data-parallel ranks the gradients are averaged over."""
        counts = torch.stack([torch.tensor(float(exp.mask.shape[0]), device=exp.mask.device), exp.mask.sum().float()])
        world, trainer = 1, self.attached_trainer()
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            world = trainer.world_size
        return Totals(rows=float(counts[0]), tokens=float(counts[1])), world

    @staticmethod
    def _scores_by_micro_batch(plan: list[MicroBatch], shape: tuple[int, int],
                               score: Callable[[MicroBatch], torch.Tensor],
                               dtype: torch.dtype | None = None) -> torch.Tensor:
        """``score(mb)`` (``[n, l, ...]``) of every micro-batch, put together into one ``[N, L, ...]`` tensor."""
        out = None
        for mb in plan:
            values = score(mb)
            if out is None:
                out = values.new_zeros(shape + tuple(values.shape[2:]), dtype=dtype or values.dtype)
            mb.write(out, values)
        return out

    def _score(self, model: torch.nn.Module, rollout: Rollout, plan: list[MicroBatch]) -> torch.Tensor:
        """Constant log-probs ``[N, L]`` (float32) of the rollout under ``model``, micro-batch by micro-batch."""
        T, shape = self.sampling.temperature, tuple(rollout.completion_mask.shape)
        return self._scores_by_micro_batch(plan, shape, lambda mb: rollout_token_logprobs(
            model, mb.rollout(rollout), temperature=T, chunk_size=self.chunk), torch.float32)

    @contextmanager
    def _without_gradient_sync(self):
        """Backward without the gradient all-reduce (DDP) / reduce-scatter (FSDP2): the accumulating micro-batches;
        the last one syncs the sum. Public hooks: the strategy's ``block_backward_sync``, FSDP2's
        ``set_requires_gradient_sync``."""
        fsdp = fsdp_modules(self.model)
        for m in fsdp:
            m.set_requires_gradient_sync(False, recurse=False)
        trainer = self.attached_trainer()
        block = getattr(trainer.strategy, "block_backward_sync", None) if trainer is not None else None
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

    def _logprobs_and_full_kl(self, rollout: Rollout, sub: TeacherInputs, start: int):
        """A micro-batch (``rollout``: its rows, from row ``start`` of the step; ``sub``: the teacher's inputs of the
        same rows): the policy's ``logp`` and ``entropy``, and the :class:`Experience` fields of the teacher's
        scores (``opd_kl``, the full KL, and with a horizon ``teacher_logp``), ``[n, l]`` each, from one policy
        forward; the teacher runs here (each prompt once per group), so only this micro-batch's hidden states and
        one ``[chunk, V]`` logits slab per model are alive (vold_pl.rl.full_kl)."""
        group = rollout.group_size if start % rollout.group_size == 0 else 1
        t_hidden, t_head = teacher_hidden(self.teacher, sub.input_ids, sub.attention_mask,
                                          sub.completion_start, group)  # [n, l, H_T]
        scores = policy_scores_and_full_kl(
            self.model, rollout, t_hidden, t_head, self.sampling.temperature, self.chunk, self.opd.top_k or None,
            teacher_tokens=self.opd.horizon != "all",  # the first divergence is found by the sampled tokens' k1
            kl_fn=OPD_ESTIMATORS[self.opd.estimator])
        teacher = {"teacher_logp": scores.teacher_logp} if scores.teacher_logp is not None else {}
        return scores.logp, scores.entropy, {"opd_kl": scores.kl, **teacher}

    def _teacher_scores(self, records: list[dict], rollout: Rollout, plan: list[MicroBatch],
                        instruction: str = DEFAULT_INSTRUCTION) -> dict:
        """The teacher's scores of the student's tokens on the same support as the sampler (blocked ids
        removed and renormalised), micro-batch by micro-batch: ``logp [N, L]`` (k1), and ``available [N]``. For
        the full estimator (``logits`` in :data:`~vold_pl.rl.objective.TEACHER_SCORES`) only its ``inputs``: it is
        scored inside the micro-batch loop (:meth:`_logprobs_and_full_kl`)."""
        tin = build_teacher_inputs(self.teacher_tokenizer, records, rollout.completion_ids, rollout.completion_mask,
                                   rollout.group_size, instruction)
        teacher = self.teacher
        kind = TEACHER_SCORES[self.opd.estimator]
        T, blocked = self.sampling.temperature, rollout.blocked_ids
        out = {"available": tin.available}
        if kind == "logits":  # scored inside the micro-batch loop, never kept whole (_logprobs_and_full_kl)
            return {**out, "inputs": tin}

        def score(mb: MicroBatch) -> torch.Tensor:  # [n, l]
            sub = mb.teacher_inputs(tin)
            group = rollout.group_size if mb.start % rollout.group_size == 0 else 1  # whole groups: prompts once
            return teacher_token_logprobs_shared(teacher, sub.input_ids, sub.attention_mask, sub.completion_start,
                                                 group, T, self.chunk, blocked)

        return {**out, kind: self._scores_by_micro_batch(plan, tuple(rollout.completion_mask.shape), score)}

    def _clip_step_and_schedule(self, opt, sched) -> None:
        """After :meth:`backward_micro_batches`: clip the gradients (``max_grad_norm``), step the optimizer and
        the LR schedule. A skipped step (non-finite loss, or a non-finite gradient caught by
        ``on_before_optimizer_step``, which ``opt.step()`` runs first) has no gradient left, so ``opt.step()``
        changes nothing; the step still counts (global_step, LR schedule)."""
        if not self.step_skipped and self.max_grad_norm > 0:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()

    # -- logging -------------------------------------------------------------------------------------------
    def _log_step(self, rw, adv, zero_std, rollout, mask, entropy, stats, loss, t_roll, t_step,
                  gen_batches: int = 1) -> None:
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
        if self.group_filter is not None:
            m["num_gen_batches"] = torch.tensor(float(gen_batches))
        for name, v in rw.named.items():
            m[f"rewards/{name}/mean"] = v.mean()
        if rw.n_errors:
            m["rewards/errors"] = torch.tensor(float(rw.n_errors))
        renames = {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
                   "clip_region": "clip_ratio/region_mean", "ratio_mean": "ratio/mean",
                   "clip_dual": "clip_ratio/dual_mean"}
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
