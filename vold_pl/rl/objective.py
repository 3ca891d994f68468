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
    loss  = agg(−min(ρ_t A_t, clip(ρ_t, 1−ε_low, 1+ε_high) A_t))
          + β_ref · agg(k3(log π_θ, log π_ref))                                 if β_ref > 0
          + λ · agg(g_i · KL_t)                                                 loss mode

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from vold_pl.rl.losses import (
    AGGREGATIONS, OPD_GATES, aggregate, clipped_surrogate, full_reverse_kl, k3_kl, masked_mean, opd_gate, opd_loss,
    opd_token_advantages, sampled_reverse_kl,
)

__all__ = ["LossSettings", "Experience", "opd_grpo_loss", "check_opd_options"]

OPD_MODES = ("loss", "advantage")
OPD_ESTIMATOR_NAMES = ("k1", "full")


def check_opd_options(estimator: str, mode: str, gate: str, where: str = "opd") -> None:
    """Raise ``ValueError`` for an unknown or unsupported estimator × mode × gate, naming the fields."""
    if estimator not in OPD_ESTIMATOR_NAMES:
        raise ValueError(f"{where}.estimator: {estimator!r} is not one of {list(OPD_ESTIMATOR_NAMES)}.")
    if mode not in OPD_MODES:
        raise ValueError(f"{where}.mode: {mode!r} is not one of {list(OPD_MODES)}.")
    if gate not in OPD_GATES:
        raise ValueError(f"{where}.gate: {gate!r} is not one of {sorted(OPD_GATES)}.")
    if estimator == "full" and mode == "advantage":
        raise ValueError(
            f"{where}.estimator: full with {where}.mode: advantage is not supported: the full-vocabulary KL of a "
            f"position does not depend on the sampled token, so as a per-token advantage its expected policy "
            f"gradient is zero (METHODS.md §3). Use {where}.estimator: k1 with mode: advantage, or keep "
            f"estimator: full with mode: loss.")


@dataclass(frozen=True)
class LossSettings:
    """The options of :func:`opd_grpo_loss` (the trainer builds them from its GRPO, OPD and sampling configs).

    Args:
        aggregation: ``sequence`` (GRPO), ``token`` (DAPO) or ``dr_grpo`` (÷ N·``max_len``).
        max_len: the generation budget (``sampling.max_new_tokens``), ``dr_grpo``'s constant normaliser;
            ``None`` falls back to the batch's padded length (only for callers without a budget).
        epsilon_low, epsilon_high: the ratio's clip range.
        beta_ref: weight of the k3 KL to the reference; 0 ignores ``Experience.ref_logp``.
        lam: λ, weight of the OPD term; 0 turns OPD off (the teacher fields are then ignored).
        gate: ``failed`` (g = 1 − success) or ``all`` (g = 1).
        estimator: ``k1`` (needs ``teacher_logp``) or ``full`` (needs ``student_logits`` and ``teacher_logits``).
        mode: ``loss`` (λ·agg(g·KL) added) or ``advantage`` (k1 only: A_t = A − λ·g·sg(k1_old)).
        top_k: with ``estimator: full``, the KL on the student's top-k tokens, both renormalised (0 = all).
    """

    aggregation: str = "sequence"
    max_len: Optional[int] = None
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta_ref: float = 0.0
    lam: float = 0.0
    gate: str = "failed"
    estimator: str = "k1"
    mode: str = "loss"
    top_k: int = 0

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r} is not one of {sorted(AGGREGATIONS)}")
        check_opd_options(self.estimator, self.mode, self.gate)


@dataclass
class Experience:
    """The tensors of one optimizer step: N completions of at most L tokens (rows group-contiguous).

    Every log-prob is of the sampler's distribution (temperature, blocked ids removed). Only ``logp`` and
    ``student_logits`` carry gradients; everything else is treated as a constant.
    """

    logp: torch.Tensor  # [N, L] log π_θ(o_t) under the current weights (differentiable)
    old_logp: torch.Tensor  # [N, L] log π_old(o_t) at rollout time; ``logp.detach()`` when μ = 1 (ρ ≡ 1)
    advantages: torch.Tensor  # [N] sequence advantages A_i
    mask: torch.Tensor  # [N, L] 1 on completion tokens (up to and including EOS)
    ref_logp: Optional[torch.Tensor] = None  # [N, L] log π_ref(o_t), needed when beta_ref > 0
    teacher_logp: Optional[torch.Tensor] = None  # [N, L] log π_T(o_t | q_T, o_<t), k1 estimator
    student_logits: Optional[torch.Tensor] = None  # [N, L, V] π_θ logits (temperature-scaled, blocked -inf), full
    teacher_logits: Optional[torch.Tensor] = None  # [N, L, V] π_T logits, the same scaling and blocked ids, full
    success: Optional[torch.Tensor] = None  # [N] the {0, 1} success (accuracy) reward the ``failed`` gate reads
    teacher_available: Optional[torch.Tensor] = None  # [N] bool: the teacher has a view of the prompt


def _opd_kl(exp: Experience, cfg: LossSettings) -> torch.Tensor:
    """The per-token reverse KL of the configured estimator, ``[N, L]`` (k1's gradient: score function)."""
    if cfg.estimator == "full":
        if exp.student_logits is None or exp.teacher_logits is None:
            raise ValueError("estimator 'full' needs Experience.student_logits and Experience.teacher_logits")
        return full_reverse_kl(exp.student_logits, exp.teacher_logits, top_k=cfg.top_k or None)
    if exp.teacher_logp is None:
        raise ValueError("estimator 'k1' needs Experience.teacher_logp")
    return sampled_reverse_kl(exp.logp, exp.teacher_logp, old_logp=exp.old_logp)


def opd_grpo_loss(exp: Experience, cfg: LossSettings) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The step's loss (module docstring) and its diagnostics.

    Returns ``(loss, metrics)``; metrics: ``clip_low``, ``clip_high``, ``clip_region``, ``ratio_mean``; ``kl``
    (k3 to the reference, when beta_ref > 0); ``opd/reverse_kl`` (mean KL of the distilled tokens: the KL of
    the sampler's distribution to the teacher's on the same support), ``opd/frac_tokens`` (share of completion
    tokens distilled) and ``opd/frac_masked_no_text_view`` (share of rows without a teacher view), when lam > 0.
    """
    mask = exp.mask.float()  # [N, L]
    agg = cfg.aggregation
    adv = exp.advantages  # [N], or [N, L] once OPD is folded in
    metrics: Dict[str, torch.Tensor] = {}
    kl = gate_w = None
    if cfg.lam > 0:
        if cfg.gate == "failed" and exp.success is None:
            raise ValueError("gate 'failed' needs Experience.success (the accuracy reward); it never falls back "
                             "to the summed reward")
        success = exp.success if exp.success is not None else torch.zeros_like(exp.advantages)
        gate_w = opd_gate(success, cfg.gate, exp.teacher_available)  # [N]
        kl = _opd_kl(exp, cfg)  # [N, L]
        tok_mask = mask * (gate_w > 0).float().unsqueeze(-1)  # [N, L]
        metrics["opd/reverse_kl"] = masked_mean(kl.detach(), tok_mask)
        metrics["opd/frac_tokens"] = tok_mask.sum() / mask.sum().clamp(min=1)
        available = exp.teacher_available
        metrics["opd/frac_masked_no_text_view"] = (
            1 - available.float().mean() if available is not None else mask.new_zeros(()))
        if cfg.mode == "advantage":
            k1_old = exp.old_logp.detach() - exp.teacher_logp.detach()  # [N, L]: k1 at sampling time
            adv = opd_token_advantages(adv, k1_old, cfg.lam, gate_w, mask)  # [N, L]
    pg, stats = clipped_surrogate(exp.logp, exp.old_logp, adv, cfg.epsilon_low, cfg.epsilon_high)  # [N, L]
    loss = aggregate(pg, mask, agg, cfg.max_len)
    if cfg.beta_ref > 0:
        if exp.ref_logp is None:
            raise ValueError("beta_ref > 0 needs Experience.ref_logp")
        kl_ref = k3_kl(exp.logp, exp.ref_logp)  # [N, L]
        loss = loss + cfg.beta_ref * aggregate(kl_ref, mask, agg, cfg.max_len)
        metrics["kl"] = masked_mean(kl_ref.detach(), mask)
    if cfg.lam > 0 and cfg.mode == "loss":
        loss = loss + opd_loss(kl, mask, gate_w, cfg.lam, agg, cfg.max_len)
    metrics.update(stats.fractions(mask))
    return loss, metrics
