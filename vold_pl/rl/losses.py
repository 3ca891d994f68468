"""Per-token losses for GRPO + on-policy distillation (METHODS.md §1-3).

Every function is pure and works on padded ``[N, L]`` completion tensors (``N`` completions of at most ``L``
tokens); padding is removed only by :func:`aggregate`, which takes the completion mask. The LightningModule
assembles, in "loss" mode (VOLD, arXiv 2510.23497, eq. L_VOLD)::

    pg, stats = POLICY_LOSSES[policy_loss](logp, old_logp, adv, mask, clip)        # [N, L]
    loss = aggregate(pg, mask, agg)
    loss += beta_ref * aggregate(REF_KL_ESTIMATORS[ref_kl](logp, ref_logp), mask, agg)   # if beta_ref > 0
    kl = OPD_ESTIMATORS[name](student, teacher)                                     # [N, L]
    loss += opd_loss(kl, mask, opd_gate(acc_reward, gate, has_teacher), lam, agg)

or, in "advantage" mode (Thinking Machines "On-Policy Distillation" note; verl's distillation recipe)::

    adv_t = opd_token_advantages(adv, sampled_reverse_kl(logp, teacher_logp), lam, gate_w)   # [N, L]
    pg, stats = POLICY_LOSSES[policy_loss](logp, old_logp, adv_t, mask, clip)

The teacher is always treated as a constant (detached): it is frozen and never receives gradients.

Three registries name the choices a config makes, as verl's ``register_policy_loss`` / ``register_adv_est``:
:data:`POLICY_LOSSES` (``grpo.policy_loss``), :data:`REF_KL_ESTIMATORS` (``grpo.ref_kl_estimator``) and
:data:`AGGREGATIONS` (``grpo.loss_aggregation``). Adding one is one function with its decorator in this file
(docs/architecture.md, "Adding a policy loss"); the config accepts its name and the error for an unknown name
lists the registered ones.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

__all__ = [
    "SurrogateStats", "masked_mean", "clipped_surrogate", "ClipRange", "POLICY_LOSSES", "register_policy_loss",
    "ppo_clip", "dual_clip", "gspo", "REF_KL_ESTIMATORS", "register_ref_kl", "k1_kl", "k2_kl", "k3_kl",
    "k3_clamped_kl", "aggregate", "AGGREGATIONS", "register_aggregation", "Totals", "sampled_reverse_kl",
    "full_reverse_kl", "full_forward_kl", "OPD_ESTIMATORS", "opd_gate", "OPD_GATES", "opd_token_advantages", "opd_loss",
]

_F = TypeVar("_F", bound=Callable)


def _registrar(registry: dict[str, Callable], kind: str) -> Callable[[str], Callable[[_F], _F]]:
    """A decorator factory that files a function under a name in ``registry`` (a name is taken once)."""

    def register(name: str) -> Callable[[_F], _F]:
        def add(fn: _F) -> _F:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered ({registry[name].__qualname__})")
            registry[name] = fn
            return fn

        return add

    return register


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (0 when the mask is empty, never NaN)."""
    m = mask.bool()  # [N, L]
    x = torch.where(m, x.to(torch.float32), torch.zeros((), dtype=torch.float32, device=x.device))
    return x.sum() / m.sum().clamp(min=1)


class SurrogateStats(NamedTuple):
    """Diagnostics of :func:`clipped_surrogate`, unmasked so the caller decides which tokens count.

    ``low_clipped``: ``rho < 1 - eps_low`` with ``A < 0``; ``high_clipped``: ``rho > 1 + eps_high`` with
    ``A > 0``. Those are exactly the tokens where the clip is active, i.e. whose gradient is zeroed (the same
    definition as TRL's ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``).
    """

    ratio: torch.Tensor  # [N, L]
    low_clipped: torch.Tensor  # [N, L] bool
    high_clipped: torch.Tensor  # [N, L] bool
    dual_clipped: torch.Tensor | None = None  # [N, L] bool: dual-clip's bound active (A < 0, rho > c)

    def fractions(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clip fractions over the completion tokens selected by ``mask [N, L]`` (``clip_dual`` with dual-clip)."""
        out = {
            "clip_low": masked_mean(self.low_clipped.float(), mask),
            "clip_high": masked_mean(self.high_clipped.float(), mask),
            "clip_region": masked_mean((self.low_clipped | self.high_clipped).float(), mask),
            "ratio_mean": masked_mean(self.ratio.detach(), mask),
        }
        if self.dual_clipped is not None:
            out["clip_dual"] = masked_mean(self.dual_clipped.float(), mask)
        return out


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, SurrogateStats]:
    """PPO/GRPO clipped surrogate per token (GRPO, arXiv 2402.03300 eq. 3; clip-higher from DAPO, arXiv 2503.14476).

    ``l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`` with ``rho = exp(logp - old_logp)``.
    With one optimizer step per rollout batch pass ``old_logp = logp.detach()``: ``rho == 1`` exactly and
    the gradient is the plain policy gradient ``-A * grad(logp)``.

    Args:
        logp: ``[N, L]`` log pi_theta of the sampled tokens (differentiable).
        old_logp: ``[N, L]`` log pi_old of the same tokens, stored at rollout time.
        advantages: ``[N]`` sequence advantages, or ``[N, L]`` per-token advantages (OPD advantage mode).
        eps_low, eps_high: clip range; ``eps_high > eps_low`` is DAPO's clip-higher.

    Returns:
        ``(per_token_loss [N, L], SurrogateStats)``; reduce the loss with :func:`aggregate`.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, L]
    adv = adv.detach().to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())  # [N, L]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [N, L]
    loss = -torch.min(ratio * adv, clipped * adv)  # [N, L]
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)  # [N, L] bool
        high = (ratio > 1.0 + eps_high) & (adv > 0)  # [N, L] bool
    return loss, SurrogateStats(ratio.detach(), low, high)


# ------------------------------------------------------------------------------------------- policy losses
class ClipRange(NamedTuple):
    """The ratio bounds a policy loss reads.

    Args:
        low, high: the clip range ``[1 - low, 1 + high]`` of the ratio (``high > low``: DAPO's clip-higher).
        dual: dual-clip's bound ``c`` (> 1) on the loss of negative-advantage tokens (verl's ``clip_ratio_c``).
    """

    low: float = 0.2
    high: float = 0.2
    dual: float = 3.0


# A policy loss: (logp [N, L], old_logp [N, L], advantages [N] or [N, L], mask [N, L], ClipRange)
#   -> (per-token loss [N, L], SurrogateStats). Reduced afterwards by :func:`aggregate`.
PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ClipRange],
                      tuple[torch.Tensor, SurrogateStats]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}
register_policy_loss = _registrar(POLICY_LOSSES, "policy loss")


def _token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [N, 1] or [N, L]
    return adv.detach().to(like.dtype)


@register_policy_loss("ppo_clip")
def ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             clip: ClipRange) -> tuple[torch.Tensor, SurrogateStats]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, arXiv 1707.06347; GRPO, arXiv 2402.03300):
    :func:`clipped_surrogate` with ``clip.low`` / ``clip.high``. ``mask`` is unused (the ratio is per token)."""
    return clipped_surrogate(logp, old_logp, advantages, clip.low, clip.high)


@register_policy_loss("dual_clip")
def dual_clip(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip: ClipRange) -> tuple[torch.Tensor, SurrogateStats]:
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", arXiv 1912.09729).

    For ``A < 0`` the clipped surrogate ``-min(rho A, clip(rho) A) = |A| max(rho, clip(rho))`` grows without
    bound with the ratio; dual-clip caps it at ``c |A|`` (``c = clip.dual > 1``, verl's ``clip_ratio_c``):
    ``l = min(l_clip, -c A)`` where ``A < 0``, ``l_clip`` elsewhere. Tokens at the cap get no gradient
    (``SurrogateStats.dual_clipped``). Shapes: ``[N, L], [N, L], [N] | [N, L], [N, L] -> [N, L]``.
    """
    loss, stats = clipped_surrogate(logp, old_logp, advantages, clip.low, clip.high)  # [N, L]
    adv = _token_advantages(advantages, logp)  # [N, 1] or [N, L]
    bound = -clip.dual * adv  # [N, 1] or [N, L]: c |A| where A < 0
    negative = (adv < 0).expand_as(loss)  # [N, L]
    with torch.no_grad():
        capped = negative & (loss > bound)  # [N, L] bool
    return torch.where(negative, torch.minimum(loss, bound), loss), stats._replace(dual_clipped=capped)


@register_policy_loss("gspo")
def gspo(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
         clip: ClipRange) -> tuple[torch.Tensor, SurrogateStats]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per
    sequence, the geometric mean of its token ratios, clipped per sequence.

    ``s_i = exp(1/|o_i| sum_t (logp_t - old_logp_t))`` over the completion tokens of row ``i``; each token carries
    ``s_{i,t} = sg(s_i) · pi_theta(o_t) / sg(pi_theta(o_t))`` (value ``s_i``; the paper's GSPO-token form, as
    verl), and ``l_t = -min(s_{i,t} A, clip(s_{i,t}, 1 - low, 1 + high) A)``. With ``grpo.loss_aggregation:
    sequence`` (the per-row token mean, the paper's and verl's choice) the gradient is the paper's
    ``-A s_i · 1/|o_i| sum_t grad log pi_theta(o_t)``. The log ratio is capped at 10 before ``exp`` (as verl)
    so one wild sequence cannot overflow. The paper's clip ranges are far narrower than PPO's (3e-4 / 4e-4).
    Shapes: ``[N, L], [N, L], [N] | [N, L], [N, L] -> [N, L]``.
    """
    m = mask.bool()  # [N, L]
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    diff = torch.where(m, logp.detach() - old_logp.detach(), zero)  # [N, L]
    log_s = diff.sum(-1) / m.sum(-1).clamp(min=1)  # [N]
    log_ratio = (log_s.unsqueeze(-1) + logp - logp.detach()).clamp(max=10.0)  # [N, L]
    ratio = torch.exp(log_ratio)  # [N, L]: value s_i on every token of row i
    adv = _token_advantages(advantages, logp)  # [N, 1] or [N, L]
    clipped = torch.clamp(ratio, 1.0 - clip.low, 1.0 + clip.high)  # [N, L]
    loss = -torch.min(ratio * adv, clipped * adv)  # [N, L]
    with torch.no_grad():
        low = (ratio < 1.0 - clip.low) & (adv < 0)  # [N, L] bool
        high = (ratio > 1.0 + clip.high) & (adv > 0)  # [N, L] bool
    return loss, SurrogateStats(ratio.detach(), low, high)


# ------------------------------------------------------------------------------------ reference-KL estimators
# KL(pi_theta || pi_ref) per sampled token from the two log-probs (Schulman, "Approximating KL divergence",
# 2020): (logp [N, L], ref_logp [N, L]) -> [N, L]; the reference is a constant.
REF_KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
register_ref_kl = _registrar(REF_KL_ESTIMATORS, "reference-KL estimator")


@register_ref_kl("k1")
def k1_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 ``= logp - ref``: unbiased for the KL, but can be negative, and as a loss its pathwise gradient
    ``grad logp`` has zero expectation under the sampler (verl's ``kl``). Shapes: ``[N, L] -> [N, L]``."""
    return logp - ref_logp.detach()  # [N, L]


@register_ref_kl("k2")
def k2_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 ``= (logp - ref)^2 / 2``: >= 0, the KL only to second order in the log ratio (biased), low variance;
    as a loss its gradient ``(logp - ref) grad logp`` is in expectation the gradient of KL(pi_theta || pi_ref)
    (verl's ``mse``). Shapes: ``[N, L] -> [N, L]``."""
    return 0.5 * (logp - ref_logp.detach()).square()  # [N, L]


@register_ref_kl("k3")
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token (Schulman, "Approximating KL divergence", 2020).

    ``k3 = exp(ref - logp) - (ref - logp) - 1``: unbiased for the sampled tokens and >= 0 for every sample
    (``e^x >= 1 + x``), as used by GRPO (arXiv 2402.03300 eq. 4). Shapes: ``[N, L] -> [N, L]``.
    """
    d = ref_logp.detach() - logp  # [N, L]
    return torch.exp(d) - d - 1.0


@register_ref_kl("k3_clamped")
def k3_clamped_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 with verl's low-variance clamps (``low_var_kl``): the log ratio ``ref - logp`` clamped to
    ``[-20, 20]`` before ``exp`` and the estimate capped at 10, so a token the reference finds very unlikely
    cannot blow the loss up (no gradient where a clamp is active). Shapes: ``[N, L] -> [N, L]``."""
    d = (ref_logp.detach() - logp).clamp(-20.0, 20.0)  # [N, L]
    return (torch.exp(d) - d - 1.0).clamp(max=10.0)  # [N, L]


# ---------------------------------------------------------------------------------------------- aggregation
# Each aggregation is a numerator (a sum over the rows/tokens at hand) over a denominator. The denominator is
# taken from ``totals`` when given: the step's counts over every micro-batch and rank (``Totals``), so that
# the per-micro-batch, per-rank losses add up to the loss of the whole step's batch. Signature:
# (x [N, L] with padding zeroed, mask [N, L] float, max_len, totals) -> scalar.
AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}
register_aggregation = _registrar(AGGREGATIONS, "aggregation")


@register_aggregation("sequence")
def _agg_sequence(x: torch.Tensor, m: torch.Tensor, max_len: int | None, totals=None) -> torch.Tensor:
    # Original GRPO: 1/N sum_i 1/|o_i| sum_t. Rows with no tokens contribute 0 but still count in 1/N, so a
    # gate or a missing teacher view shrinks the term instead of re-weighting the remaining rows (as TRL).
    per_row = (x * m).sum(-1) / m.sum(-1).clamp(min=1)  # [N]
    rows = x.shape[0] if totals is None else totals.rows
    return per_row.sum() / max(rows, 1)


@register_aggregation("token")
def _agg_token(x: torch.Tensor, m: torch.Tensor, max_len: int | None, totals=None) -> torch.Tensor:
    # DAPO token-level mean: long completions weigh in proportion to their length.
    tokens = m.sum().clamp(min=1) if totals is None else max(totals.tokens, 1)
    return (x * m).sum() / tokens


@register_aggregation("dr_grpo")
def _agg_dr_grpo(x: torch.Tensor, m: torch.Tensor, max_len: int | None, totals=None) -> torch.Tensor:
    # Dr. GRPO: a constant normaliser removes the length bias of 1/|o_i|.
    rows = x.shape[0] if totals is None else totals.rows
    denom = rows * (x.shape[-1] if max_len is None else max_len)
    return (x * m).sum() / max(denom, 1)


@register_aggregation("seq_mean_token_sum")
def _agg_seq_mean_token_sum(x: torch.Tensor, m: torch.Tensor, max_len: int | None, totals=None) -> torch.Tensor:
    # verl's seq-mean-token-sum: each row's token SUM, averaged over rows (1/N sum_i sum_t): long completions
    # weigh in proportion to their length, and the scale does not depend on how many tokens the batch has.
    per_row = (x * m).sum(-1)  # [N]
    rows = x.shape[0] if totals is None else totals.rows
    return per_row.sum() / max(rows, 1)


class Totals(NamedTuple):
    """The step's counts the aggregations divide by: completions (``rows``) and completion tokens
    (``tokens``), summed over every micro-batch and every data-parallel rank."""

    rows: float
    tokens: float


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = "sequence", max_len: int | None = None,
    totals: Totals | None = None,
) -> torch.Tensor:
    """Reduce a ``[N, L]`` per-token loss to a scalar over the completion tokens (METHODS.md §2).

    ``sequence``: GRPO (arXiv 2402.03300); ``token``: DAPO (arXiv 2503.14476); ``dr_grpo``: sum over
    ``N * max_len`` (arXiv 2503.20783), ``max_len`` defaulting to ``L`` (pass the generation limit to keep
    the normaliser constant across batches); ``seq_mean_token_sum``: each row's token sum, mean over rows
    (verl's ``seq-mean-token-sum``); any other :data:`AGGREGATIONS` entry. Masked-out entries are replaced by 0
    before summing, so NaN/inf in padding never leaks; rows with zero tokens are guarded.

    ``totals``: the global counts of the step (:class:`Totals`). Given, ``N`` and the token count are
    those of the whole step instead of this tensor's, so the aggregates of disjoint row slices (micro-batches,
    ranks) sum to the aggregate of the whole batch. ``None``: this tensor is the whole batch.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose from {sorted(AGGREGATIONS)}")
    m_bool = mask.bool()  # [N, L]
    x = torch.where(m_bool, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return AGGREGATIONS[mode](x, m_bool.to(per_token.dtype), max_len, totals)


# ------------------------------------------------------------------------------------ on-policy distillation
def sampled_reverse_kl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, grad: str = "reinforce",
    old_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled per-token reverse KL ``k1_t = log pi_theta(o_t) - log pi_T(o_t)`` (METHODS.md §3).

    Its *value* is the single-sample estimate of KL(pi_theta || pi_T) at each position. Its gradient needs
    care: o_t was sampled from pi_theta, so the pathwise gradient ``grad(k1) = grad(log pi_theta(o_t))`` has
    expectation zero and carries no teacher signal. ``grad="reinforce"`` (default) therefore returns a
    tensor whose value is k1 but whose gradient is the score-function one, ``sg(k1) * grad(log pi_theta)``
    with no credit to earlier tokens (discount 0, as the Thinking Machines OPD note). ``"pathwise"`` gives
    the naive gradient, for ablation only. Advantage mode detaches k1 anyway.

    ``old_logp`` (``[N, L]``, the sampling-time log-probs; only with ``"reinforce"``): the tokens came from
    pi_old, not pi_theta (several optimizer steps per rollout batch). The gradient is then importance-weighted
    per token, ``sg(k1) * rho * grad(log pi_theta)`` with ``rho = pi_theta / pi_old`` (unclipped): the unbiased
    score-function gradient of ``E_{pi_theta}[k1]`` per position. With ``old_logp = sg(logp)`` it is the plain
    one. The value stays k1.

    Shapes: ``[N, L], [N, L] -> [N, L]``.
    """
    k1 = student_logp - teacher_logp.detach()  # [N, L]
    if grad == "pathwise":
        return k1
    if grad != "reinforce":
        raise ValueError(f"grad must be 'reinforce' or 'pathwise', got {grad!r}")
    # Non-finite k1 (a teacher -inf at a padded position) would turn the masked-out zero upstream gradient
    # into NaN (0 * inf); only the gradient coefficient is sanitised, the value keeps showing the problem.
    coef = torch.nan_to_num(k1.detach(), nan=0.0, posinf=0.0, neginf=0.0)  # [N, L]
    if old_logp is None:
        return k1.detach() + coef * (student_logp - student_logp.detach())
    ratio = torch.exp(student_logp - old_logp.detach())  # [N, L]; its gradient is rho * grad(log pi_theta)
    return k1.detach() + coef * (ratio - ratio.detach())


def _paired_log_probs(student: torch.Tensor, teacher: torch.Tensor, top_k: int | None, renormalize: bool,
                      by: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' float32 log-probs ``[N, L, V]`` (the teacher's detached), or, with ``top_k``, on the k most
    likely tokens of ``by`` (``"student"`` or ``"teacher"``: the distribution the KL is an expectation under)
    ``[N, L, k]``, renormalised there unless ``renormalize`` is False."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} vocab/shape differ")
    s = F.log_softmax(student.float(), dim=-1)  # [N, L, V]
    t = F.log_softmax(teacher.detach().float(), dim=-1)  # [N, L, V]
    if top_k is not None and top_k < s.shape[-1]:
        idx = (s if by == "student" else t).detach().topk(top_k, dim=-1).indices  # [N, L, k]
        s = s.gather(-1, idx)  # [N, L, k]
        t = t.gather(-1, idx)  # [N, L, k]
        if renormalize:
            s = s - s.logsumexp(-1, keepdim=True)  # [N, L, k]
            t = t - t.logsumexp(-1, keepdim=True)  # [N, L, k]
    return s, t


def full_reverse_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    top_k: int | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """Full-vocabulary reverse KL per position, ``sum_v pi_theta(v) (log pi_theta(v) - log pi_T(v))``.

    Exact (no sampling noise) and differentiable in closed form; needs a shared vocabulary (VOLD,
    arXiv 2510.23497: Qwen2.5-VL and Qwen3 share the Qwen2 BPE). Both inputs may be logits or log-probs
    (``log_softmax`` is idempotent on log-probs), computed in float32.

    Tokens with student probability 0 (logits ``-inf``, e.g. the sampler's blocked ids masked in both
    inputs) contribute exactly 0, in value and gradient; a token the student may emit but the teacher gives
    ``-inf`` makes the KL ``+inf``, as it should.

    ``top_k``: restrict the sum to the student's k most likely tokens at each position. With
    ``renormalize=True`` (default) both distributions are renormalised on that support, giving a true KL of
    the conditionals: >= 0 and 0 iff they agree there. ``renormalize=False`` returns the raw partial sum,
    which can be negative.

    Shapes: ``[N, L, V], [N, L, V] -> [N, L]``. Materialises a few ``[N, L, V]`` float32 tensors: chunk the
    positions in the caller for large vocabularies.
    """
    s, t = _paired_log_probs(student, teacher, top_k, renormalize, by="student")  # [N, L, V] or [N, L, k]
    # 0 * (-inf - -inf) would be NaN; masked_fill (not where) keeps the backward free of 0 * NaN as well.
    diff = (s - t).masked_fill(s == float("-inf"), 0.0)  # [N, L, V]
    return (s.exp() * diff).sum(-1)  # [N, L]


def full_forward_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    top_k: int | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """Full-vocabulary forward KL per position, ``sum_v pi_T(v) (log pi_T(v) - log pi_theta(v))``, on the
    student's own rollouts: GKD's on-policy forward KL (Agarwal et al., "On-Policy Distillation of Language
    Models: Learning from Self-Generated Mistakes", arXiv 2306.13649), beyond VOLD, whose OPD term is reverse.

    Why it is here: the gradient w.r.t. the student's logits is ``pi_theta − pi_T`` (bounded, the cross-entropy
    on the teacher's next-token distribution), so at a token where the student puts little mass on the teacher's
    choice it still raises that choice. The reverse KL's gradient ``pi_theta (log pi_theta − log pi_T − KL)``
    moves a token's logit in proportion to the student's own probability of it.

    Tokens the teacher gives probability 0 (logits ``-inf``, e.g. the sampler's blocked ids masked in both)
    contribute exactly 0; a token the teacher may emit but the student gives ``-inf`` makes the KL ``+inf``.

    ``top_k``: restrict the sum to the teacher's k most likely tokens at each position (the distribution the
    expectation is under, as the reverse KL's ``top_k`` takes the student's), both renormalised there by default.

    Shapes: ``[N, L, V], [N, L, V] -> [N, L]``.
    """
    s, t = _paired_log_probs(student, teacher, top_k, renormalize, by="teacher")  # [N, L, V] or [N, L, k]
    diff = (t - s).masked_fill(t == float("-inf"), 0.0)  # [N, L, V]: 0 where the teacher gives no mass
    return (t.exp() * diff).sum(-1)  # [N, L]


# Name -> estimator. "k1" takes token log-probs [N, L]; "full" and "forward" take logits/log-probs [N, L, V].
OPD_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "k1": sampled_reverse_kl,
    "full": full_reverse_kl,
    "forward": full_forward_kl,
}


def _gate_all(r: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(r)


def _gate_failed(r: torch.Tensor) -> torch.Tensor:
    # VOLD: g = 1 - r on the {0, 1} accuracy reward; clipping keeps it a weight for graded rewards too.
    return (1.0 - r).clamp(0.0, 1.0)


OPD_GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"all": _gate_all, "failed": _gate_failed}


def opd_gate(
    rewards: torch.Tensor, gate: str = "failed", available: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-rollout OPD weights ``g_i`` (VOLD, arXiv 2510.23497, §1 of METHODS.md).

    Args:
        rewards: ``[N]`` accuracy reward in {0, 1} (or bool success); not the summed reward, since a format
            bonus would make a wrong answer look partly successful.
        gate: ``"all"`` (g = 1) or ``"failed"`` (g = clip(1 - r, 0, 1)).
        available: optional ``[N]`` bool, False where the teacher has no view of the prompt (image without
            a text view); those rollouts get g = 0.

    Returns: ``[N]`` float weights.
    """
    if gate not in OPD_GATES:
        raise ValueError(f"unknown OPD gate {gate!r}; choose from {sorted(OPD_GATES)}")
    r = rewards.detach().float()  # [N]
    g = OPD_GATES[gate](r)  # [N]
    if available is not None:
        g = g * available.to(g.dtype)
    return g


def _horizon_all(k1_old: torch.Tensor | None, mask: torch.Tensor, nats: float) -> torch.Tensor:
    return mask.float()


def _horizon_first_divergence(k1_old: torch.Tensor | None, mask: torch.Tensor, nats: float) -> torch.Tensor:
    if k1_old is None:
        raise ValueError("horizon 'first_divergence' needs the sampled tokens' k1 (Experience.teacher_logp)")
    # Divergences strictly before each position; a position is distilled while there are none.
    over = ((k1_old.detach() > nats) & mask.bool()).long()  # [N, L]
    return mask.float() * ((over.cumsum(-1) - over) == 0).float()  # [N, L]


def _horizon_at_divergence(k1_old: torch.Tensor | None, mask: torch.Tensor, nats: float) -> torch.Tensor:
    if k1_old is None:
        raise ValueError("horizon 'at_divergence' needs the sampled tokens' k1 (Experience.teacher_logp)")
    # The first divergence alone: a position over the threshold with none before it.
    over = ((k1_old.detach() > nats) & mask.bool()).long()  # [N, L]
    return (over * (over.cumsum(-1) == 1).long()).float()  # [N, L]


# Name -> which completion tokens the OPD term distils: [N, L] from (k1 at sampling time [N, L] or None, mask
# [N, L], nats).
OPD_HORIZONS: dict[str, Callable[[torch.Tensor | None, torch.Tensor, float], torch.Tensor]] = {
    "all": _horizon_all, "first_divergence": _horizon_first_divergence, "at_divergence": _horizon_at_divergence}


def opd_horizon(k1_old: torch.Tensor | None, mask: torch.Tensor, horizon: str = "all",
                nats: float = 5.0) -> torch.Tensor:
    """Which completion tokens OPD distils: ``all`` of a gated rollout's (the papers), or (beyond them)
    ``first_divergence``: its tokens up to and including the first whose sampling-time k1 (log π_old − log π_T)
    is above ``nats``, the first token the teacher finds far less likely than the student did. After it the
    teacher scores a prefix it would not have written, where its next-token distribution is no guide (a
    teacher trained only on its own correct traces), so the tokens after it are left to the GRPO term.
    ``at_divergence``: that first divergent token alone (none for a rollout without one): the teacher's
    correction without the tokens before it, where student and teacher already agree on the sampled token and
    the full KL would only reshape the rest of the student's distribution toward the teacher's.

    Shapes: ``[N, L] or None, [N, L] -> [N, L]`` float in {0, 1}, 0 outside ``mask``.
    """
    if horizon not in OPD_HORIZONS:
        raise ValueError(f"unknown OPD horizon {horizon!r}; choose from {sorted(OPD_HORIZONS)}")
    return OPD_HORIZONS[horizon](k1_old, mask, nats)


def opd_token_advantages(
    advantages: torch.Tensor, k1: torch.Tensor, lam: float, gate_w: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """OPD in advantage mode: ``A_{i,t} = A_i - lam * g_i * sg(k1_{i,t})`` (METHODS.md §3).

    The per-token reverse KL acts as a dense negative reward inside the clipped surrogate (Thinking Machines
    "On-Policy Distillation"). Rows with ``g_i = 0``, and positions outside ``mask [N, L]`` (padding), keep
    ``A_i`` even where k1 is garbage (inf/NaN from a masked teacher): an infinite advantage there would make
    the masked-out surrogate's gradient ``0 * inf = NaN``. A non-finite k1 on a real token is kept (the step
    is then skipped as non-finite, which shows the problem).

    Shapes: ``[N], [N, L], scalar, [N] (, [N, L]) -> [N, L]``.
    """
    g = gate_w.detach().to(k1.dtype).unsqueeze(-1)  # [N, 1]
    keep = g > 0 if mask is None else (g > 0) & mask.bool()  # [N, 1] or [N, L]
    penalty = torch.where(keep, lam * g * k1.detach(), torch.zeros((), dtype=k1.dtype, device=k1.device))
    return advantages.detach().to(k1.dtype).unsqueeze(-1) - penalty  # [N, L]


def opd_loss(
    kl: torch.Tensor,
    mask: torch.Tensor,
    gate_w: torch.Tensor,
    lam: float,
    mode: str = "sequence",
    max_len: int | None = None,
    totals: Totals | None = None,
) -> torch.Tensor:
    """OPD in loss mode: ``lam * aggregate(g_i * KL_{i,t})``, VOLD's ``lam * E[g(tau) KL_token]``.

    ``kl [N, L]`` comes from an :data:`OPD_ESTIMATORS` entry; ``gate_w [N]`` from :func:`opd_gate`. Rows
    with zero gate contribute exactly 0 (non-finite KL there cannot poison the sum) but their tokens stay in
    the normaliser, so the OPD term is normalised like the policy-gradient term it is added to.
    """
    g = gate_w.detach().to(kl.dtype).unsqueeze(-1)  # [N, 1]
    weighted = torch.where(g > 0, g * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))  # [N, L]
    return lam * aggregate(weighted, mask, mode, max_len, totals)
