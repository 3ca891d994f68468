"""Golden tests of the registered policy losses, reference-KL estimators and aggregations of
``vold_pl.rl.losses`` (GSPO, dual-clip, k1 / k2 / k3 / k3_clamped, seq_mean_token_sum), and of the registries
the step reads. Each expected number is a formula written out in plain Python over the entries."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vold_pl.errors import UserError
from vold_pl.rl import losses
from vold_pl.rl.losses import POLICY_LOSSES, REF_KL_ESTIMATORS, ClipRange, Totals, aggregate
from vold_pl.rl.objective import Experience, LossSettings, opd_grpo_loss

LENGTHS = [4, 2, 3]  # completion tokens per row; the rest of the L = 4 columns is padding
ADV = [1.0, -2.0, -0.5]
# log pi_theta and log pi_old per token (padding entries are garbage the losses must ignore)
LOGP = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, 9.0, float("nan")], [-0.7, -0.2, -1.5, 5.0]]
OLD = [[-1.1, -0.4, -2.5, -0.3], [-1.9, -2.4, 0.0, 0.0], [-0.6, -0.3, -1.4, 0.0]]
REF = [[-0.2, -0.9, -30.0, -0.1], [-1.0, -1.0, 0.0, 0.0], [-0.7, -3.0, -1.0, 0.0]]


def _mask() -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(4)] for n in LENGTHS])  # [N, L]


def _logp(requires_grad: bool = True) -> torch.Tensor:
    return torch.tensor(LOGP, dtype=torch.float64, requires_grad=requires_grad)  # [N, L]


def _clip(low: float, high: float, ratio: float) -> float:
    return min(max(ratio, 1 - low), 1 + high)


# ------------------------------------------------------------------------------------------------ dual-clip
def test_dual_clip_bounds_the_loss_of_negative_advantage_tokens():
    low, high, c = 0.2, 0.2, 3.0
    logp = _logp()
    loss, stats = POLICY_LOSSES["dual_clip"](logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV),
                                             _mask(), ClipRange(low, high, c))
    got = loss.detach().tolist()
    caps = 0
    for i, n in enumerate(LENGTHS):
        a = ADV[i]
        for t in range(n):
            r = math.exp(LOGP[i][t] - OLD[i][t])
            ppo = -min(r * a, _clip(low, high, r) * a)
            want = min(ppo, -c * a) if a < 0 else ppo
            caps += a < 0 and ppo > -c * a
            assert got[i][t] == pytest.approx(want, rel=1e-12)
    # row 1 (A = -2): ratios e^1.6 = 4.95 and e^1.2 = 3.32 exceed c = 3: both capped at 6, no gradient there
    assert caps == 2 and stats.dual_clipped[1, :2].all() and not stats.dual_clipped[0].any()
    loss[1, :2].sum().backward()
    assert torch.equal(logp.grad[1, :2], torch.zeros(2, dtype=torch.float64))
    assert POLICY_LOSSES["dual_clip"] is losses.dual_clip


def test_dual_clip_equals_ppo_clip_below_the_bound():
    logp, old, adv = _logp(False), torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV)
    dual, _ = losses.dual_clip(logp, old, adv, _mask(), ClipRange(0.2, 0.2, 100.0))
    ppo, _ = losses.ppo_clip(logp, old, adv, _mask(), ClipRange(0.2, 0.2, 100.0))
    m = _mask().bool()
    assert torch.equal(dual[m], ppo[m])


# ----------------------------------------------------------------------------------------------------- GSPO
@pytest.mark.parametrize("low,high", [(0.2, 0.2), (3e-4, 4e-4)])
def test_gspo_clips_one_sequence_ratio_and_has_the_papers_gradient(low, high):
    logp = _logp()
    old = torch.tensor(OLD, dtype=torch.float64)
    loss, stats = POLICY_LOSSES["gspo"](logp, old, torch.tensor(ADV, dtype=torch.float64), _mask(),
                                        ClipRange(low, high))
    total = aggregate(loss, _mask(), "sequence")
    total.backward()
    N = len(LENGTHS)
    want_total = 0.0
    for i, n in enumerate(LENGTHS):
        a = ADV[i]
        s = math.exp(sum(LOGP[i][t] - OLD[i][t] for t in range(n)) / n)  # geometric mean of the token ratios
        row = -min(s * a, _clip(low, high, s) * a)
        want_total += row / N  # the same loss on each token: its token mean is the row's loss
        clipped = (a > 0 and s > 1 + high) or (a < 0 and s < 1 - low)
        for t in range(4):
            if t < n:
                assert loss[i, t].item() == pytest.approx(row, rel=1e-12)
                assert stats.ratio[i, t].item() == pytest.approx(s, rel=1e-12)
            # the paper's gradient: -A s_i (1/|o_i|) grad log pi(o_t) per token, 0 when the sequence is clipped
            want_grad = 0.0 if clipped or t >= n else -a * s / n / N
            assert logp.grad[i, t].item() == pytest.approx(want_grad, rel=1e-12, abs=1e-15)
    assert total.item() == pytest.approx(want_total, rel=1e-12)


def test_gspo_on_policy_is_grpo():
    """With pi_old = pi_theta every sequence ratio is 1: GSPO's loss and gradient are GRPO's (-A per token)."""
    logp = _logp()
    loss, stats = losses.gspo(logp, logp.detach(), torch.tensor(ADV, dtype=torch.float64), _mask(), ClipRange())
    aggregate(loss, _mask(), "sequence").backward()
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            assert loss[i, t].item() == pytest.approx(-ADV[i]) and stats.ratio[i, t].item() == pytest.approx(1.0)
            assert logp.grad[i, t].item() == pytest.approx(-ADV[i] / n / len(LENGTHS))


# --------------------------------------------------------------------------------------- reference-KL estimators
def _kl_by_hand(name: str, lp: float, ref: float) -> float:
    d = ref - lp
    if name == "k1":
        return lp - ref
    if name == "k2":
        return 0.5 * (lp - ref) ** 2
    if name == "k3":
        return math.exp(d) - d - 1
    dc = min(max(d, -20.0), 20.0)  # k3_clamped: verl's low_var_kl
    return min(math.exp(dc) - dc - 1, 10.0)


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k3_clamped"])
def test_reference_kl_estimators(name):
    lp = torch.tensor([[-1.0, -0.5, -2.0, -0.1, -25.0, -0.3]], dtype=torch.float64)  # [1, 6]
    ref = torch.tensor([[-0.2, -0.9, -30.0, -0.1, -1.0, -4.0]], dtype=torch.float64)
    got = REF_KL_ESTIMATORS[name](lp, ref)[0].tolist()
    for t in range(6):
        assert got[t] == pytest.approx(_kl_by_hand(name, float(lp[0, t]), float(ref[0, t])), rel=1e-12, abs=1e-15)


def test_k3_clamped_differs_from_k3_only_where_a_clamp_is_active():
    lp = torch.tensor([[-1.0, -25.0, -0.3]], dtype=torch.float64)
    ref = torch.tensor([[-0.2, -1.0, -4.0]], dtype=torch.float64)
    k3, k3c = losses.k3_kl(lp, ref), losses.k3_clamped_kl(lp, ref)
    assert k3c[0, 0] == k3[0, 0] and k3[0, 1] > 1e9 and k3c[0, 1] == 10.0  # e^24 capped at 10


def test_step_uses_the_configured_reference_kl():
    """``opd_grpo_loss`` adds beta_ref · agg(REF_KL_ESTIMATORS[ref_kl]) and reports its mean as ``kl``."""
    mask, logp = _mask(), _logp(False)
    ref = torch.tensor(REF, dtype=torch.float64)
    exp = Experience(logp=logp, old_logp=None, advantages=torch.zeros(3, dtype=torch.float64), mask=mask,
                     ref_logp=ref)
    for name in ("k1", "k2", "k3", "k3_clamped"):
        loss, metrics = opd_grpo_loss(exp, LossSettings(aggregation="token", beta_ref=0.5, ref_kl=name))
        pairs = [(LOGP[i][t], REF[i][t]) for i, n in enumerate(LENGTHS) for t in range(n)]
        mean = sum(_kl_by_hand(name, a, b) for a, b in pairs) / len(pairs)
        assert loss.item() == pytest.approx(0.5 * mean, rel=1e-9) and metrics["kl"].item() == pytest.approx(mean)


# -------------------------------------------------------------------------------------------------- aggregation
def test_seq_mean_token_sum_is_each_rows_token_sum_averaged_over_rows():
    x = torch.tensor(LOGP, dtype=torch.float64)  # padding holds nan / 9.0 / 5.0: never counted
    want = sum(sum(LOGP[i][t] for t in range(n)) for i, n in enumerate(LENGTHS)) / len(LENGTHS)
    assert aggregate(x, _mask(), "seq_mean_token_sum").item() == pytest.approx(want, rel=1e-12)
    # slices with the step's totals add up to the whole (micro-batches, ranks)
    totals = Totals(rows=3.0, tokens=float(sum(LENGTHS)))
    parts = aggregate(x[:1], _mask()[:1], "seq_mean_token_sum", totals=totals) + \
        aggregate(x[1:], _mask()[1:], "seq_mean_token_sum", totals=totals)
    assert parts.item() == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------------ registries
def test_step_uses_the_configured_policy_loss():
    mask, logp, old = _mask(), _logp(False), torch.tensor(OLD, dtype=torch.float64)
    adv = torch.tensor(ADV, dtype=torch.float64)
    exp = Experience(logp=logp, old_logp=old, advantages=adv, mask=mask)
    for name in ("ppo_clip", "dual_clip", "gspo"):
        cfg = LossSettings(policy_loss=name, clip_ratio_c=2.5, epsilon_low=0.1, epsilon_high=0.3)
        loss, metrics = opd_grpo_loss(exp, cfg)
        pg, _ = POLICY_LOSSES[name](logp, old, adv, mask, ClipRange(0.1, 0.3, 2.5))
        assert loss.item() == pytest.approx(aggregate(pg, mask, "sequence").item(), rel=1e-12)
        assert ("clip_dual" in metrics) == (name == "dual_clip")
    gspo, _ = opd_grpo_loss(exp, LossSettings(policy_loss="gspo"))
    ppo, _ = opd_grpo_loss(exp, LossSettings(policy_loss="ppo_clip"))
    assert gspo.item() != pytest.approx(ppo.item())  # the name changes the number


def test_module_passes_the_grpo_options_to_the_loss():
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig

    grpo = GRPOConfig(policy_loss="dual_clip", clip_ratio_c=4.0, ref_kl_estimator="k2",
                      loss_aggregation="seq_mean_token_sum")
    fake = SimpleNamespace(grpo=grpo, opd=OPDConfig(), sampling=SamplingConfig())
    cfg = OPDGRPOModule.loss_settings.fget(fake)
    assert (cfg.policy_loss, cfg.clip_ratio_c, cfg.ref_kl, cfg.aggregation) == ("dual_clip", 4.0, "k2",
                                                                                "seq_mean_token_sum")


@pytest.mark.parametrize("field,kwargs,names", [
    ("grpo.policy_loss", {"policy_loss": "ppo"}, "['dual_clip', 'gspo', 'ppo_clip']"),
    ("grpo.ref_kl_estimator", {"ref_kl_estimator": "low_var_kl"}, "['k1', 'k2', 'k3', 'k3_clamped']"),
    ("grpo.loss_aggregation", {"loss_aggregation": "token-mean"},
     "['dr_grpo', 'seq_mean_token_sum', 'sequence', 'token']"),
])
def test_unknown_names_are_user_errors_listing_the_registered_ones(field, kwargs, names):
    from vold_pl.modules.opd_grpo import GRPOConfig

    with pytest.raises(UserError) as e:
        GRPOConfig(**kwargs)
    assert str(e.value).startswith(f"{field}: {next(iter(kwargs.values()))!r} is not registered; choose one of "
                                   f"{names}")
    with pytest.raises(UserError, match=r"grpo\.clip_ratio_c: 1\.0 must be above 1"):
        GRPOConfig(clip_ratio_c=1.0)


def test_a_new_policy_loss_is_one_function_and_one_registration():
    """Registering a function makes its name a valid ``grpo.policy_loss`` that the step calls; a name is taken
    once."""
    from vold_pl.modules.opd_grpo import GRPOConfig

    calls = []

    @losses.register_policy_loss("test_plain_pg")
    def plain_pg(logp, old_logp, advantages, mask, clip):
        calls.append(clip)
        zeros = torch.zeros_like(logp, dtype=torch.bool)
        return -advantages.unsqueeze(-1) * logp, losses.SurrogateStats(logp.detach(), zeros, zeros)

    try:
        GRPOConfig(policy_loss="test_plain_pg")
        exp = Experience(logp=_logp(False), old_logp=None, advantages=torch.tensor(ADV, dtype=torch.float64),
                         mask=_mask())
        loss, _ = opd_grpo_loss(exp, LossSettings(policy_loss="test_plain_pg", aggregation="token"))
        pairs = [(ADV[i], LOGP[i][t]) for i, n in enumerate(LENGTHS) for t in range(n)]
        assert loss.item() == pytest.approx(sum(-a * lp for a, lp in pairs) / len(pairs)) and len(calls) == 1
        with pytest.raises(ValueError, match="already registered"):
            losses.register_policy_loss("test_plain_pg")(plain_pg)
    finally:
        POLICY_LOSSES.pop("test_plain_pg")
