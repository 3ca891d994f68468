"""The assembled GRPO + on-policy-distillation loss of one optimizer step, as one pure function.

:func:`opd_grpo_loss` takes the step's tensors (an :class:`Experience`) and the loss options (a
:class:`LossSettings`) and returns the scalar loss and its diagnostics; it runs no model. The trainer
(:class:`vold_pl.modules.opd_grpo.OPDGRPOModule`) fills the experience (rollout, rewards, advantages,
reference and teacher scores, the current policy's log-probs) and calls it once per optimizer step, and the
golden tests (``tests/test_loss_golden.py``) pin it against formulas written out by hand. What it computes
(METHODS.md §2-3; every piece is a function of :mod:`vold_pl.rl.losses`)::

    g_i   = opd_gate(success_i, gate) · available_i                            the OPD gate, [N]
    KL_t  = k1: log π_θ(o_t) − log π_T(o_t)        full: Σ_v π_θ(v)(log π_θ(v) − log π_T(v))
    A_t   = A_i                       (loss mode)
          = A_i − λ·g_i·sg(log π_old(o_t) − log π_T(o_t))   (advantage mode: k1 at sampling time)
    loss  = agg(−min(ρ_t A_t, clip(ρ_t, 1−ε_low, 1+ε_high) A_t))            policy_loss: ppo_clip (dual_clip,
                                                                            gspo: losses.POLICY_LOSSES)
          + β_ref · agg(k3(log π_θ, log π_ref))                                 if β_ref > 0 (ref_kl: k1, k2,
                                                                            k3_clamped: losses.REF_KL_ESTIMATORS)
          + λ · agg(g_i · KL_t)                                                 loss mode
    OPD acts on the tokens of ``horizon``: all of them, those up to a rollout's first divergence
    (``first_divergence``: the first token whose sampling-time k1 is above ``divergence_nats``), or that token
    alone (``at_divergence``); KL_t and the advantage-mode penalty are 0 elsewhere, and the normaliser stays that
    of the policy-gradient term.

Decisions the papers leave open, made here (docs/opd.md):

- All log-probs are of the sampler's distribution: temperature-scaled, the sampler's blocked ids removed
  (renormalised), top-k / top-p not applied. The teacher is renormalised on the same support.
- k1 in loss mode has the score-function gradient ``sg(k1)·∇log π_θ``; with μ > 1 it is importance-weighted
  per token, ``sg(k1)·ρ_t·∇log π_θ`` (unclipped), the unbiased gradient of the KL at the sampled prefixes.
  The full-vocabulary KL is exact at each sampled prefix; neither corrects for the prefixes having been
  sampled by π_old (no sequence-level ratio), as on-policy-distillation practice.
- Advantage mode treats ``−λ·g·k1`` as a per-token reward fixed at sampling time (π_old's log-probs, as the
  Thinking Machines note and verl compute it once per rollout); the clipped ratio then handles μ > 1. It
  takes k1 only: the full KL does not depend on the sampled token, so as an advantage it has zero expected
  policy gradient (METHODS.md §3) and is rejected.
- The ``failed`` gate needs a success reward (``success``); there is no fallback to the summed reward.
- ``dr_grpo`` divides by N × ``max_len`` (the generation budget), a constant across batches.
- Micro-batches and ranks: every aggregation divides by the step's global counts (:class:`Totals`: the
  completions and completion tokens over all micro-batches and data-parallel ranks), so the losses of the
  row slices add up to the loss of the whole batch; ``token`` is DAPO's mean over the global token count.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterable

import torch

from vold_pl.errors import UserError
from vold_pl.rl.losses import (
    AGGREGATIONS,
    OPD_ESTIMATORS,
    OPD_GATES,
    OPD_HORIZONS,
    POLICY_LOSSES,
    REF_KL_ESTIMATORS,
    ClipRange,
    Totals,
    aggregate,
    masked_mean,
    opd_gate,
    opd_horizon,
    opd_loss,
    opd_token_advantages,
)

__all__ = ["LossSettings", "Experience", "Totals", "opd_grpo_loss", "check_opd_options", "check_registered",
           "metric_weights", "combine_metrics", "TEACHER_SCORES", "plan_micro_batches"]

OPD_MODES = ("loss", "advantage")
OPD_ESTIMATOR_NAMES = tuple(OPD_ESTIMATORS)
# What each estimator needs from the teacher: its log-prob of the sampled token (``Experience.teacher_logp``)
# or its full next-token logits (``Experience.teacher_logits``, with the student's ``student_logits``).
TEACHER_SCORES = {"k1": "logp", "full": "logits", "forward": "logits"}
# The metric each estimator's KL is logged under (the distilled tokens' mean).
OPD_KL_METRIC = {"k1": "opd/reverse_kl", "full": "opd/reverse_kl", "forward": "opd/forward_kl"}


def check_registered(name: str, registry: dict, field: str) -> None:
    """Raise :class:`UserError` when ``name`` is not in ``registry``, naming the config ``field`` and listing the
    registered names (a registry of :mod:`vold_pl.rl.losses`)."""
    if name not in registry:
        raise UserError(f"{field}: {name!r} is not registered; choose one of {sorted(registry)} (or register "
                        f"yours in vold_pl/rl/losses.py, docs/architecture.md 'Adding a policy loss').")


def check_opd_options(estimator: str, mode: str, gate: str, where: str = "opd", horizon: str = "all") -> None:
    """Raise ``ValueError`` for an unknown or unsupported estimator × mode × gate × horizon, naming the fields."""
    if estimator not in OPD_ESTIMATOR_NAMES:
        raise UserError(f"{where}.estimator: {estimator!r} is not one of {list(OPD_ESTIMATOR_NAMES)}.")
    if mode not in OPD_MODES:
        raise UserError(f"{where}.mode: {mode!r} is not one of {list(OPD_MODES)}.")
    if gate not in OPD_GATES:
        raise UserError(f"{where}.gate: {gate!r} is not one of {sorted(OPD_GATES)}.")
    if TEACHER_SCORES[estimator] == "logits" and mode == "advantage":
        raise UserError(
            f"{where}.estimator: {estimator} with {where}.mode: advantage is not supported: the full-vocabulary KL "
            f"of a position does not depend on the sampled token, so as a per-token advantage its expected policy "
            f"gradient is zero (METHODS.md §3). Use {where}.estimator: k1 with mode: advantage, or keep "
            f"estimator: {estimator} with mode: loss.")
    if horizon not in OPD_HORIZONS:
        raise UserError(f"{where}.horizon: {horizon!r} is not one of {sorted(OPD_HORIZONS)}.")


@dataclass(frozen=True)
class LossSettings:
    """The options of :func:`opd_grpo_loss` (the trainer builds them from its GRPO, OPD and sampling configs).

    Args:
        aggregation: an :data:`~vold_pl.rl.losses.AGGREGATIONS` name: ``sequence`` (GRPO), ``token`` (DAPO),
            ``dr_grpo`` (÷ N·``max_len``) or ``seq_mean_token_sum`` (verl: each row's token sum, mean over rows).
        max_len: the generation budget (``sampling.max_new_tokens``), ``dr_grpo``'s constant normaliser;
            ``None`` falls back to the batch's padded length (only for callers without a budget).
        epsilon_low, epsilon_high: the ratio's clip range.
        policy_loss: a :data:`~vold_pl.rl.losses.POLICY_LOSSES` name: ``ppo_clip``, ``dual_clip`` or ``gspo``.
        clip_ratio_c: ``dual_clip``'s bound c (> 1) on the loss of negative-advantage tokens, as a ratio.
        beta_ref: weight of the KL to the reference; 0 ignores ``Experience.ref_logp``.
        ref_kl: a :data:`~vold_pl.rl.losses.REF_KL_ESTIMATORS` name: ``k1``, ``k2``, ``k3`` or ``k3_clamped``.
        lam: λ, weight of the OPD term; 0 turns OPD off (the teacher fields are then ignored).
        gate: ``failed`` (g = 1 − success) or ``all`` (g = 1).
        estimator: ``k1`` (needs ``teacher_logp``), ``full`` (reverse) or ``forward`` (full-vocabulary forward
            KL, GKD); the last two need ``student_logits`` and ``teacher_logits``, or ``opd_kl``, and with a
            horizon other than ``all`` also ``teacher_logp``, which finds the divergence.
        mode: ``loss`` (λ·agg(g·KL) added) or ``advantage`` (k1 only: A_t = A − λ·g·sg(k1_old)).
        top_k: with ``estimator: full``, the KL on the student's top-k tokens (``forward``: the teacher's), both
            renormalised (0 = all).
        horizon: an :data:`~vold_pl.rl.losses.OPD_HORIZONS` name: ``all`` (every token of a gated rollout) or
            ``first_divergence`` (its tokens up to the first whose sampling-time k1 is above ``divergence_nats``),
            or ``at_divergence`` (that first divergent token alone).
        divergence_nats: the k1 (nats) at which a token is a rollout's first divergence.
    """

    aggregation: str = "sequence"
    max_len: int | None = None
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    policy_loss: str = "ppo_clip"
    clip_ratio_c: float = 3.0
    beta_ref: float = 0.0
    ref_kl: str = "k3"
    lam: float = 0.0
    gate: str = "failed"
    estimator: str = "k1"
    mode: str = "loss"
    top_k: int = 0
    horizon: str = "all"
    divergence_nats: float = 5.0

    def __post_init__(self):
        check_registered(self.aggregation, AGGREGATIONS, "grpo.loss_aggregation")
        check_registered(self.policy_loss, POLICY_LOSSES, "grpo.policy_loss")
        check_registered(self.ref_kl, REF_KL_ESTIMATORS, "grpo.ref_kl_estimator")
        if not self.clip_ratio_c > 1.0:
            raise UserError(f"grpo.clip_ratio_c: {self.clip_ratio_c} must be above 1 (dual-clip bounds the loss of "
                            f"a negative-advantage token at c·|A|; at or below 1 it would cut into the PPO clip).")
        check_opd_options(self.estimator, self.mode, self.gate, horizon=self.horizon)

    @property
    def clip(self) -> ClipRange:
        """The ratio bounds the policy loss reads."""
        return ClipRange(self.epsilon_low, self.epsilon_high, self.clip_ratio_c)


@dataclass
class Experience:
    """The tensors of one optimizer step: N completions of at most L tokens (rows group-contiguous).

    Every log-prob is of the sampler's distribution (temperature, blocked ids removed). Only ``logp`` and
    ``student_logits`` carry gradients; everything else is treated as a constant. The trainer builds the
    constant part once per rollout batch (``logp`` still ``None``) and fills ``logp`` (and ``student_logits``)
    per micro-batch of :meth:`rows`.
    """

    logp: torch.Tensor | None  # [N, L] log π_θ(o_t) under the current weights (differentiable)
    old_logp: torch.Tensor | None  # [N, L] log π_old(o_t) at rollout time; None: on-policy (μ = 1, ρ ≡ 1)
    advantages: torch.Tensor  # [N] sequence advantages A_i
    mask: torch.Tensor  # [N, L] 1 on completion tokens (up to and including EOS)
    ref_logp: torch.Tensor | None = None  # [N, L] log π_ref(o_t), needed when beta_ref > 0
    teacher_logp: torch.Tensor | None = None  # [N, L] log π_T(o_t | q_T, o_<t), k1 estimator
    student_logits: torch.Tensor | None = None  # [N, L, V] π_θ logits (temperature-scaled, blocked -inf), full
    teacher_logits: torch.Tensor | None = None  # [N, L, V] π_T logits, the same scaling and blocked ids, full
    # [N, L] the full estimator's per-token KL already computed slab by slab (vold_pl.rl.full_kl), differentiable;
    # when set, the logits above are not needed
    opd_kl: torch.Tensor | None = None
    success: torch.Tensor | None = None  # [N] the {0, 1} success (accuracy) reward the ``failed`` gate reads
    teacher_available: torch.Tensor | None = None  # [N] bool: the teacher has a view of the prompt

    def rows(self, start: int, end: int, width: int | None = None) -> Experience:
        """Rows ``start:end`` (a micro-batch), completion columns cut to ``width`` (its longest completion)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                t = t[start:end]
                if width is not None and t.dim() >= 2:
                    t = t[:, :width]
            out[f.name] = t
        return Experience(**out)


def _estimator_inputs(exp: Experience, cfg: LossSettings, old_logp: torch.Tensor) -> tuple[tuple, dict]:
    # The arguments of OPD_ESTIMATORS[cfg.estimator]: the student's and teacher's scores it compares.
    if TEACHER_SCORES[cfg.estimator] == "logits":
        if exp.student_logits is None or exp.teacher_logits is None:
            raise ValueError(f"estimator {cfg.estimator!r} needs Experience.student_logits and "
                             f"Experience.teacher_logits")
        return (exp.student_logits, exp.teacher_logits), {"top_k": cfg.top_k or None}
    if exp.teacher_logp is None:
        raise ValueError(f"estimator {cfg.estimator!r} needs Experience.teacher_logp")
    return (exp.logp, exp.teacher_logp), {"old_logp": old_logp}


def _opd_kl(exp: Experience, cfg: LossSettings, old_logp: torch.Tensor) -> torch.Tensor:
    """The per-token reverse KL of the configured estimator, ``[N, L]`` (k1's gradient: score function)."""
    if exp.opd_kl is not None:  # computed in slabs by the trainer (full estimator in bounded memory)
        return exp.opd_kl
    args, kwargs = _estimator_inputs(exp, cfg, old_logp)
    return OPD_ESTIMATORS[cfg.estimator](*args, **kwargs)


def _frozen_scores_outside_mask_finite(exp: Experience) -> Experience:
    """``exp`` with the frozen models' scores (teacher, reference) replaced by the student's own at positions
    outside the mask, where one is not finite (a teacher or reference scoring padding can give ``-inf``/NaN).

    The masked-out positions then have a KL of exactly 0 in value and gradient. Masking the aggregated value
    alone is not enough: autograd multiplies the zero upstream gradient by the local derivative (``exp(inf)`` in
    k3, a NaN softmax in the full KL), and ``0 * inf = NaN`` reaches the weights, in either OPD mode. A
    non-finite score on a real completion token is kept: the step is then skipped as non-finite, which shows it.
    """
    pad = ~exp.mask.bool()  # [N, L]
    if not bool(pad.any()):
        return exp
    changes = {}
    for name, own in (("teacher_logp", exp.logp), ("ref_logp", exp.logp)):
        t = getattr(exp, name)  # [N, L]
        if t is not None and own is not None and bool((pad & ~torch.isfinite(t)).any()):
            changes[name] = torch.where(pad, own.detach().to(t.dtype), t)  # [N, L]
    t, own = exp.teacher_logits, exp.student_logits  # [N, L, V]
    if t is not None and own is not None and bool((pad.unsqueeze(-1) & ~torch.isfinite(t)).any()):
        changes["teacher_logits"] = torch.where(pad.unsqueeze(-1), own.detach().to(t.dtype), t)  # [N, L, V]
    return replace(exp, **changes) if changes else exp


def _k1_at_sampling(exp: Experience, old_logp: torch.Tensor) -> torch.Tensor | None:
    """``[N, L]`` k1 of the sampled tokens at sampling time, ``log π_old − log π_T`` (constant); ``None`` without
    the teacher's token log-probs (the full estimator with ``horizon: all`` does not score them)."""
    return None if exp.teacher_logp is None else old_logp.detach() - exp.teacher_logp.detach()


def opd_grpo_loss(exp: Experience, cfg: LossSettings,
                  totals: Totals | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss (module docstring) and its diagnostics.

    ``totals``: the step's global counts (completions and completion tokens over every micro-batch and rank)
    when ``exp`` is one slice of the step; the slices' losses then sum to the whole step's loss. ``None``:
    ``exp`` is the whole step.

    Returns ``(loss, metrics)``; metrics: ``clip_low``, ``clip_high``, ``clip_region``, ``ratio_mean``;
    ``clip_dual`` (dual-clip only); ``kl`` (the ``ref_kl`` estimate to the reference, when beta_ref > 0);
    ``opd/reverse_kl`` (mean KL of the distilled tokens: the KL of the sampler's distribution to the teacher's
    on the same support), ``opd/frac_tokens`` (share of completion tokens distilled) and
    ``opd/frac_masked_no_text_view`` (share of rows without a teacher view), when lam > 0.
    """
    exp = _frozen_scores_outside_mask_finite(exp)
    mask = exp.mask.float()  # [N, L]
    agg = cfg.aggregation
    old_logp = exp.old_logp if exp.old_logp is not None else exp.logp.detach()  # on-policy: ρ ≡ 1
    adv = exp.advantages  # [N], or [N, L] once OPD is folded in
    metrics: dict[str, torch.Tensor] = {}
    kl = gate_w = None
    if cfg.lam > 0:
        if cfg.gate == "failed" and exp.success is None:
            raise ValueError("gate 'failed' needs Experience.success (the accuracy reward); it never falls back "
                             "to the summed reward")
        success = exp.success if exp.success is not None else torch.zeros_like(exp.advantages)
        gate_w = opd_gate(success, cfg.gate, exp.teacher_available)  # [N]
        k1_old = _k1_at_sampling(exp, old_logp)  # [N, L] or None
        distilled = opd_horizon(k1_old, mask, cfg.horizon, cfg.divergence_nats)  # [N, L]
        kl = torch.where(distilled > 0, _opd_kl(exp, cfg, old_logp), 0.0)  # [N, L]: 0 after the horizon
        tok_mask = distilled * (gate_w > 0).float().unsqueeze(-1)  # [N, L]
        metrics[OPD_KL_METRIC[cfg.estimator]] = masked_mean(kl.detach(), tok_mask)
        metrics["opd/frac_tokens"] = tok_mask.sum() / mask.sum().clamp(min=1)
        available = exp.teacher_available
        metrics["opd/frac_masked_no_text_view"] = (
            1 - available.float().mean() if available is not None else mask.new_zeros(()))
        if cfg.mode == "advantage":
            adv = opd_token_advantages(adv, k1_old, cfg.lam, gate_w, distilled)  # [N, L]
    pg, stats = POLICY_LOSSES[cfg.policy_loss](exp.logp, old_logp, adv, mask, cfg.clip)  # [N, L]
    loss = aggregate(pg, mask, agg, cfg.max_len, totals)
    if cfg.beta_ref > 0:
        if exp.ref_logp is None:
            raise ValueError("beta_ref > 0 needs Experience.ref_logp")
        kl_ref = REF_KL_ESTIMATORS[cfg.ref_kl](exp.logp, exp.ref_logp)  # [N, L]
        loss = loss + cfg.beta_ref * aggregate(kl_ref, mask, agg, cfg.max_len, totals)
        metrics["kl"] = masked_mean(kl_ref.detach(), mask)
    if cfg.lam > 0 and cfg.mode == "loss":
        loss = loss + opd_loss(kl, mask, gate_w, cfg.lam, agg, cfg.max_len, totals)
    metrics.update(stats.fractions(mask))
    return loss, metrics


def metric_weights(exp: Experience, cfg: LossSettings) -> dict[str, float]:
    """What each metric of :func:`opd_grpo_loss` is a mean over, for ``exp``: its completion tokens, its
    distilled tokens (``opd/reverse_kl``) or its rows (``opd/frac_masked_no_text_view``)."""
    tokens = float(exp.mask.float().sum())
    w = {"clip_low": tokens, "clip_high": tokens, "clip_region": tokens, "ratio_mean": tokens, "kl": tokens,
         "opd/frac_tokens": tokens, "opd/frac_masked_no_text_view": float(exp.mask.shape[0])}
    if cfg.policy_loss == "dual_clip":
        w["clip_dual"] = tokens
    if cfg.lam > 0:
        success = exp.success if exp.success is not None else torch.zeros_like(exp.advantages)
        gate_w = opd_gate(success, cfg.gate, exp.teacher_available)  # [N]
        k1_old = _k1_at_sampling(exp, exp.old_logp if exp.old_logp is not None else exp.logp)  # [N, L] or None
        distilled = opd_horizon(k1_old, exp.mask, cfg.horizon, cfg.divergence_nats)  # [N, L]
        w[OPD_KL_METRIC[cfg.estimator]] = float((distilled * (gate_w > 0).float().unsqueeze(-1)).sum())
    return w


def combine_metrics(parts: Iterable[tuple[dict[str, torch.Tensor], dict[str, float]]]) -> dict[str, torch.Tensor]:
    """The metrics of the whole step from those of its micro-batches (``(metrics, metric_weights)`` pairs):
    each a mean weighted by what it averages over, so they equal the whole batch's metrics."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for metrics, w in parts:
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() * w.get(k, 1.0)
            weights[k] = weights.get(k, 0.0) + w.get(k, 1.0)
    return {k: sums[k] / max(weights[k], 1e-12) if weights[k] > 0 else sums[k] for k in sums}


def plan_micro_batches(lengths: torch.Tensor, prompt_len: int, group_size: int, micro_batch_size: int = 0,
                       max_tokens: int = 0) -> list:
    """Cut the step's N rows into contiguous micro-batches ``[(start, end), ...]``.

    Args:
        lengths: ``[N]`` completion lengths (group-contiguous rows).
        prompt_len: the prompts' padded width P.
        group_size: G; with a token budget, whole groups are kept together when every group fits the budget
            (their prompts then run once per group in scoring).
        micro_batch_size: at most this many rows per micro-batch (0: no row cap).
        max_tokens: at most this many padded tokens per micro-batch, counted as rows × (P + the longest
            completion of the micro-batch) (0: no token cap). A single unit above it is its own micro-batch.

    Neither cap (both 0): one micro-batch, the whole batch.
    """
    n = int(lengths.numel())
    lens = [int(x) for x in lengths.tolist()]
    if n == 0:
        return []
    cap_rows = micro_batch_size if micro_batch_size > 0 else n
    if max_tokens <= 0:
        return [(s, min(s + cap_rows, n)) for s in range(0, n, cap_rows)]
    G = group_size if group_size > 0 and n % group_size == 0 else 1
    cost = lambda s, e: (e - s) * (prompt_len + max(max(lens[s:e]), 1))  # noqa: E731 - padded tokens of rows s:e
    if G > 1 and (cap_rows % G or any(cost(s, s + G) > max_tokens for s in range(0, n, G))):
        G = 1  # some group alone is over the budget (or the row cap splits groups): cut by rows
    plan, start = [], 0
    for unit in range(0, n, G):
        end = unit + G
        if end - start > cap_rows or (end - G > start and cost(start, end) > max_tokens):
            plan.append((start, unit))
            start = unit
    plan.append((start, n))
    return plan
