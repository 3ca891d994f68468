"""Golden tests of the assembled OPD-GRPO loss (:func:`vold_pl.rl.objective.opd_grpo_loss`, what the trainer's
step calls): for one fixed rollout the loss, its gradients w.r.t. the student's token log-probs and logits,
and the logged KLs equal formulas written out here token by token, for every estimator × mode × gate, with
and without the reference KL, each aggregation, top-k, and μ > 1 (ratios inside and outside the clip band).

Nothing here calls the functions of ``vold_pl.rl.losses``: the formulas are plain Python over the entries.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vold_pl.rl.objective import Experience, LossSettings, opd_grpo_loss

N, L, V = 4, 5, 8
LENGTHS = [5, 3, 4, 2]  # completion tokens per row; the rest is padding
BUDGET = 6  # the generation budget (sampling.max_new_tokens): dr_grpo's normaliser, > L on purpose
BLOCKED = [7]  # a token the sampler never emits: -inf logits for student and teacher
EPS_LOW, EPS_HIGH, BETA, LAM = 0.2, 0.28, 0.1, 0.7
SUCCESS = [1.0, 0.0, 0.0, 0.0]
AVAILABLE = [True, True, False, True]  # row 2: the teacher has no view of its prompt
ADV = [0.9, -0.9, 0.5, -0.5]


def _fixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(N, L)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logp = -0.2 - 2.0 * torch.rand(N, L, generator=g, dtype=torch.float64)
    # log ratios for μ > 1: inside the band, above 1 + eps_high, below 1 - eps_low, between 1 + eps_low and
    # 1 + eps_high (clipped only under a symmetric clip), for both signs of the advantage.
    log_ratio = torch.tensor([[0.05, 0.3, -0.4, 0.22, -0.1],
                              [0.4, -0.3, 0.22, 0.0, 0.1],
                              [-0.5, 0.22, 0.3, -0.1, 0.05],
                              [0.22, -0.4, 0.35, 0.1, -0.3]], dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(N, L, generator=g, dtype=torch.float64)
    teacher_logp = logp - 0.5 * torch.randn(N, L, generator=g, dtype=torch.float64)
    teacher_logp[1, 3:] = float("-inf")  # a teacher that gives padding no mass: must not poison anything
    teacher_logp[2] = float("nan")  # no view of the prompt: its row is garbage and must be ignored
    s_logits = torch.randn(N, L, V, generator=g, dtype=torch.float64)
    t_logits = 2.0 * torch.randn(N, L, V, generator=g, dtype=torch.float64)
    s_logits[..., BLOCKED] = float("-inf")
    t_logits[..., BLOCKED] = float("-inf")
    return dict(mask=mask.double(), logp=logp, log_ratio=log_ratio, ref=ref, teacher_logp=teacher_logp,
                s_logits=s_logits, t_logits=t_logits)


# ---------------------------------------------------------------------------------------- the formulas by hand

def _weight(i: int, agg: str) -> float:
    """Aggregation weight of one completion token of row i."""
    if agg == "sequence":
        return 1.0 / (N * LENGTHS[i])
    if agg == "token":
        return 1.0 / sum(LENGTHS)
    return 1.0 / (N * BUDGET)  # dr_grpo: the fixed budget, not the batch's longest completion


def _gate(i: int, gate: str) -> float:
    g = 1.0 - SUCCESS[i] if gate == "failed" else 1.0
    return g if AVAILABLE[i] else 0.0


def _softmax(xs: list[float]) -> list[float]:
    finite = [x for x in xs if x != -math.inf]
    m = max(finite)
    z = sum(math.exp(x - m) for x in finite)
    return [0.0 if x == -math.inf else math.exp(x - m) / z for x in xs]


def _full_kl_and_grad(s: list[float], t: list[float], top_k: int, forward: bool = False
                      ) -> tuple[float, list[float]]:
    """KL(p ‖ q) of p = softmax(s), q = softmax(t) (``forward``: KL(q ‖ p)) over the tokens the expectation's
    distribution may emit, or over its top-k (both renormalised there), and its gradient w.r.t. the student's
    logits s on that support, 0 elsewhere: p_v (log p_v − log q_v − KL), or (forward) p_v − q_v."""
    under = t if forward else s
    support = [v for v in range(V) if under[v] != -math.inf]
    if top_k:
        u_all = _softmax(under)
        support = sorted(support, key=lambda v: -u_all[v])[:top_k]
    p = dict(zip(support, _softmax([s[v] for v in support])))
    q = dict(zip(support, _softmax([t[v] for v in support])))
    grad = [0.0] * V
    if forward:
        kl = sum(q[v] * (math.log(q[v]) - math.log(p[v])) for v in support)
        for v in support:
            grad[v] = p[v] - q[v]
        return kl, grad
    kl = sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in support)
    for v in support:
        grad[v] = p[v] * (math.log(p[v]) - math.log(q[v]) - kl)
    return kl, grad


def _distilled(d, i: int, mu: int, horizon: str, nats: float) -> range:
    """The tokens of row i OPD distils: all; up to and including the first whose k1 at sampling time
    (log π_old − log π_T) is above ``nats``; or that token alone (none if there is no such token)."""
    if horizon == "all":
        return range(LENGTHS[i])
    for t in range(LENGTHS[i]):
        lp = float(d["logp"][i, t])
        old = lp - float(d["log_ratio"][i, t]) if mu > 1 else lp
        if old - float(d["teacher_logp"][i, t]) > nats:
            return range(t + 1) if horizon == "first_divergence" else range(t, t + 1)
    return range(LENGTHS[i]) if horizon == "first_divergence" else range(0)


def _by_hand(d, *, estimator, mode, gate, beta, agg, mu, top_k, horizon="all", nats=5.0):
    """Loss, d loss / d logp [N, L], d loss / d student logits [N, L, V], reverse KL, k3 mean; all by hand."""
    loss = 0.0
    g_logp = [[0.0] * L for _ in range(N)]
    g_logits = [[[0.0] * V for _ in range(L)] for _ in range(N)]
    kl_sum = kl_n = k3_sum = 0.0
    for i in range(N):
        for t in range(LENGTHS[i]):
            g = _gate(i, gate) if t in _distilled(d, i, mu, horizon, nats) else 0.0  # no OPD outside the horizon
            w = _weight(i, agg)
            lp = float(d["logp"][i, t])
            old = lp - float(d["log_ratio"][i, t]) if mu > 1 else lp
            rho = math.exp(lp - old)
            tl = float(d["teacher_logp"][i, t])
            # The OPD KL of this token, and the gradient of lam * g * w * KL.
            if estimator == "k1":
                kl = lp - tl if g > 0 else float("nan")
            else:
                kl, kl_grad = _full_kl_and_grad(d["s_logits"][i, t].tolist(), d["t_logits"][i, t].tolist(), top_k,
                                                forward=estimator == "forward")
            if g > 0:
                kl_sum, kl_n = kl_sum + kl, kl_n + 1
            # Advantage of the token: advantage mode subtracts lam * g * k1 at sampling time (pi_old).
            a = ADV[i] - (LAM * g * (old - tl) if (mode == "advantage" and g > 0) else 0.0)
            clipped_rho = min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH)
            loss += w * -min(rho * a, clipped_rho * a)
            clip_active = (rho > 1 + EPS_HIGH and a > 0) or (rho < 1 - EPS_LOW and a < 0)
            g_logp[i][t] += 0.0 if clip_active else -w * a * rho
            if beta:
                r = float(d["ref"][i, t])
                k3 = math.exp(r - lp) - (r - lp) - 1
                loss += beta * w * k3
                g_logp[i][t] += beta * w * (1 - math.exp(r - lp))
                k3_sum += k3
            if mode == "loss" and g > 0:
                loss += LAM * g * w * kl
                if estimator == "k1":  # score function, importance-weighted per token when mu > 1
                    g_logp[i][t] += LAM * g * w * kl * rho
                else:
                    for v in range(V):
                        g_logits[i][t][v] += LAM * g * w * kl_grad[v]
    rkl = kl_sum / kl_n if kl_n else 0.0
    f64 = torch.float64
    return loss, torch.tensor(g_logp, dtype=f64), torch.tensor(g_logits, dtype=f64), rkl, k3_sum / sum(LENGTHS)


# --------------------------------------------------------------------------------------------------- the tests

CASES = [
    dict(estimator=e, mode=m, gate=g, beta=b, agg=a, mu=mu, top_k=k)
    for e, m, g, b, a, mu, k in itertools.product(
        ["k1", "full"], ["loss", "advantage"], ["failed", "all"], [0.0, BETA], ["sequence", "token", "dr_grpo"],
        [1, 2], [0, 3])
    if not (e == "full" and m == "advantage") and not (e == "k1" and k)
]


# The first divergence: k1 of the fixture is 0.5·N(0, 1) per token, so at 0.15 nats row 0 stops at its second token
# (μ = 1 and 2) and row 3 at its first (μ = 1), while rows 1 and 3 (μ = 2) are distilled to their end.
CASES += [dict(estimator="k1", mode=m, gate=g, beta=0.0, agg=a, mu=mu, top_k=0, horizon="first_divergence", nats=0.15)
          for m, g, a, mu in itertools.product(["loss", "advantage"], ["failed", "all"], ["sequence", "token"], [1, 2])]
# The full KL up to the first divergence (found by the sampled tokens' k1, as above), and at it alone.
CASES += [dict(estimator="full", mode="loss", gate=g, beta=0.0, agg=a, mu=mu, top_k=k, horizon=h, nats=0.15)
          for h, g, a, mu, k in itertools.product(["first_divergence", "at_divergence"], ["failed", "all"],
                                                  ["sequence", "token"], [1, 2], [0, 3])]
# The forward KL (GKD): on every token, and at the first divergence alone.
CASES += [dict(estimator="forward", mode="loss", gate=g, beta=b, agg=a, mu=mu, top_k=k, horizon=h, nats=0.15)
          for h, g, b, a, mu, k in itertools.product(["all", "at_divergence"], ["failed", "all"], [0.0, BETA],
                                                     ["sequence", "token"], [1, 2], [0, 3])]
CASES += [dict(estimator="k1", mode=m, gate=g, beta=0.0, agg="token", mu=mu, top_k=0, horizon="at_divergence",
               nats=0.15) for m, g, mu in itertools.product(["loss", "advantage"], ["failed", "all"], [1, 2])]


def _ids(c):
    return (f"{c['estimator']}-{c['mode']}-{c['gate']}-beta{c['beta']}-{c['agg']}-mu{c['mu']}-topk{c['top_k']}"
            + (f"-{c['horizon']}" if "horizon" in c else ""))


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_assembled_loss_and_gradient_equal_the_formula(case):
    d = _fixed()
    logp = d["logp"].clone().requires_grad_(True)
    s_logits = d["s_logits"].clone().requires_grad_(True)
    old = (d["logp"] - d["log_ratio"]) if case["mu"] > 1 else logp.detach()
    exp = Experience(
        logp=logp, old_logp=old, advantages=torch.tensor(ADV, dtype=torch.float64), mask=d["mask"],
        ref_logp=d["ref"] if case["beta"] else None,
        teacher_logp=d["teacher_logp"], student_logits=s_logits if case["estimator"] != "k1" else None,
        teacher_logits=d["t_logits"] if case["estimator"] != "k1" else None,
        success=torch.tensor(SUCCESS, dtype=torch.float64), teacher_available=torch.tensor(AVAILABLE))
    cfg = LossSettings(aggregation=case["agg"], max_len=BUDGET, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                       beta_ref=case["beta"], lam=LAM, gate=case["gate"], estimator=case["estimator"],
                       mode=case["mode"], top_k=case["top_k"], horizon=case.get("horizon", "all"),
                       divergence_nats=case.get("nats", 5.0))
    loss, metrics = opd_grpo_loss(exp, cfg)
    loss.backward()

    want, want_g_logp, want_g_logits, want_rkl, want_k3 = _by_hand(d, **case)
    # The full KL is computed in float32; everything else in the inputs' float64.
    tol, atol = (1e-9, 1e-12) if case["estimator"] == "k1" else (1e-5, 1e-7)
    assert float(loss.detach()) == pytest.approx(want, rel=tol, abs=atol)
    torch.testing.assert_close(logp.grad, want_g_logp, rtol=tol, atol=atol)
    if case["estimator"] != "k1":  # finite everywhere, 0 on the blocked token
        torch.testing.assert_close(s_logits.grad, want_g_logits, rtol=1e-5, atol=1e-8)
    else:
        assert s_logits.grad is None
    kl_name = "opd/forward_kl" if case["estimator"] == "forward" else "opd/reverse_kl"
    assert float(metrics[kl_name]) == pytest.approx(want_rkl, rel=1e-6 if case["estimator"] == "k1" else 1e-5)
    hz = (case.get("horizon", "all"), case.get("nats", 5.0))
    distilled = sum(len(_distilled(d, i, case["mu"], *hz)) for i in range(N) if _gate(i, case["gate"]) > 0)
    if hz[0] != "all" and (case["gate"] == "all" or case["mu"] == 1):  # some row stops before its end
        assert 0 < distilled < sum(LENGTHS[i] for i in range(N) if _gate(i, case["gate"]) > 0)
    assert float(metrics["opd/frac_tokens"]) == pytest.approx(distilled / sum(LENGTHS))
    assert float(metrics["opd/frac_masked_no_text_view"]) == pytest.approx(0.25)
    if case["beta"]:
        assert float(metrics["kl"]) == pytest.approx(want_k3, rel=1e-6)
    else:
        assert "kl" not in metrics


def test_grpo_without_opd_ignores_the_teacher_fields():
    """lam = 0: plain GRPO; garbage teacher inputs and a missing success reward change nothing."""
    d = _fixed()
    logp = d["logp"].clone().requires_grad_(True)
    exp = Experience(logp=logp, old_logp=logp.detach(), advantages=torch.tensor(ADV, dtype=torch.float64),
                     mask=d["mask"], teacher_logp=torch.full((N, L), float("nan"), dtype=torch.float64))
    loss, metrics = opd_grpo_loss(exp, LossSettings(aggregation="sequence", lam=0.0))
    loss.backward()
    want = sum(-ADV[i] * LENGTHS[i] / (N * LENGTHS[i]) for i in range(N))
    assert float(loss.detach()) == pytest.approx(want)
    want_g = torch.tensor([[-ADV[i] / (N * LENGTHS[i]) if t < LENGTHS[i] else 0.0 for t in range(L)]
                           for i in range(N)], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, want_g)
    assert not any(k.startswith("opd/") for k in metrics)


def test_unsupported_settings_are_errors():
    with pytest.raises(ValueError, match="estimator: full with opd.mode: advantage"):
        LossSettings(lam=1.0, estimator="full", mode="advantage")
    with pytest.raises(ValueError, match="aggregation"):
        LossSettings(aggregation="mean")
    d = _fixed()
    exp = Experience(logp=d["logp"], old_logp=d["logp"], advantages=torch.tensor(ADV, dtype=torch.float64),
                     mask=d["mask"], teacher_logp=d["teacher_logp"])
    with pytest.raises(ValueError, match="never falls back"):  # the failed gate needs the success reward
        opd_grpo_loss(exp, LossSettings(lam=1.0, gate="failed"))


def test_module_passes_its_configs_to_the_loss(tiny_models):
    """The trainer's step calls opd_grpo_loss with settings taken from its configs; dr_grpo's budget is
    sampling.max_new_tokens."""
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig

    module = OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
        grpo=GRPOConfig(loss_aggregation="dr_grpo", epsilon_low=0.1, epsilon_high=0.3, beta_ref=0.02),
        opd=OPDConfig(lam=0.4, gate="all", estimator="full", mode="loss", top_k=5),
        sampling=SamplingConfig(max_new_tokens=37))
    assert module.loss_settings == LossSettings(
        aggregation="dr_grpo", max_len=37, epsilon_low=0.1, epsilon_high=0.3, beta_ref=0.02, lam=0.4, gate="all",
        estimator="full", mode="loss", top_k=5)
    module.opd = OPDConfig(lam=0.1, horizon="first_divergence", divergence_nats=3.0)
    assert (module.loss_settings.horizon, module.loss_settings.divergence_nats) == ("first_divergence", 3.0)


# ------------------------------------------------------------------ micro-batches, metrics and the step's helpers

SLICES = [(0, 1), (1, 3), (3, 4)]  # a row alone, two rows of different lengths, the shortest row


def _experience(d, case, logp, s_logits) -> Experience:
    old = (d["logp"] - d["log_ratio"]) if case["mu"] > 1 else logp.detach()
    return Experience(
        logp=logp, old_logp=old, advantages=torch.tensor(ADV, dtype=torch.float64), mask=d["mask"],
        ref_logp=d["ref"] if case["beta"] else None, teacher_logp=d["teacher_logp"],
        student_logits=s_logits if case["estimator"] != "k1" else None,
        teacher_logits=d["t_logits"] if case["estimator"] != "k1" else None,
        success=torch.tensor(SUCCESS, dtype=torch.float64), teacher_available=torch.tensor(AVAILABLE))


def _settings(case) -> LossSettings:
    return LossSettings(aggregation=case["agg"], max_len=BUDGET, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                        beta_ref=case["beta"], lam=LAM, gate=case["gate"], estimator=case["estimator"],
                        mode=case["mode"], top_k=case["top_k"], horizon=case.get("horizon", "all"),
                        divergence_nats=case.get("nats", 5.0))


SLICE_CASES = [dict(estimator=e, mode=m, gate="failed", beta=BETA, agg=a, mu=2, top_k=k)
               for a in ("sequence", "token", "dr_grpo")
               for e, m, k in (("k1", "loss", 0), ("k1", "advantage", 0), ("full", "loss", 3), ("forward", "loss", 3))]
SLICE_CASES += [dict(estimator="k1", mode="loss", gate="all", beta=BETA, agg="token", mu=1, top_k=0,
                     horizon=h, nats=0.15) for h in ("first_divergence", "at_divergence")]


@pytest.mark.parametrize("case", SLICE_CASES, ids=[_ids(c) for c in SLICE_CASES])
def test_row_slices_with_the_step_totals_add_up_to_the_formula(case):
    """Micro-batches: each slice of rows (its columns cut to its longest completion) divided by the whole
    step's counts (Totals); the slices' losses and gradients add up to the whole batch's formula, and their
    metrics, combined with metric_weights, are the whole batch's."""
    from vold_pl.rl.objective import Totals, combine_metrics, metric_weights

    d = _fixed()
    logp = d["logp"].clone().requires_grad_(True)
    s_logits = d["s_logits"].clone().requires_grad_(True)
    exp, cfg = _experience(d, case, logp, s_logits), _settings(case)
    totals = Totals(rows=float(N), tokens=float(sum(LENGTHS)))
    total, parts = 0.0, []
    for s, e in SLICES:
        width = max(LENGTHS[s:e])
        mb = exp.rows(s, e, width)
        mb_loss, mb_metrics = opd_grpo_loss(mb, cfg, totals)
        mb_loss.backward()
        total += float(mb_loss.detach())
        parts.append((mb_metrics, metric_weights(mb, cfg)))
    want, want_g_logp, want_g_logits, want_rkl, want_k3 = _by_hand(d, **case)
    tol, atol = (1e-9, 1e-12) if case["estimator"] == "k1" else (1e-5, 1e-7)
    assert total == pytest.approx(want, rel=tol, abs=atol)
    torch.testing.assert_close(logp.grad, want_g_logp, rtol=tol, atol=atol)
    if case["estimator"] != "k1":
        torch.testing.assert_close(s_logits.grad, want_g_logits, rtol=1e-5, atol=1e-8)
    combined = combine_metrics(parts)
    _, whole = opd_grpo_loss(_experience(d, case, d["logp"].clone(), d["s_logits"].clone()), cfg)
    assert combined.keys() == whole.keys()
    for k in whole:
        assert float(combined[k]) == pytest.approx(float(whole[k]), rel=1e-6, abs=1e-9), k
    kl_name = "opd/forward_kl" if case["estimator"] == "forward" else "opd/reverse_kl"
    assert float(combined[kl_name]) == pytest.approx(want_rkl, rel=1e-6)
    assert float(combined["kl"]) == pytest.approx(want_k3, rel=1e-6)


def test_single_row_slices_divide_by_the_totals_not_by_themselves():
    """One-row slices with Totals of the whole batch: sequence divides by N rows, token by all tokens."""
    from vold_pl.rl.objective import Totals

    d = _fixed()
    for agg, weight in (("sequence", lambda i: 1 / (N * LENGTHS[i])), ("token", lambda i: 1 / sum(LENGTHS)),
                        ("dr_grpo", lambda i: 1 / (N * BUDGET))):
        exp = Experience(logp=d["logp"], old_logp=None, advantages=torch.tensor(ADV, dtype=torch.float64),
                         mask=d["mask"])
        cfg = LossSettings(aggregation=agg, max_len=BUDGET)
        total = sum(float(opd_grpo_loss(exp.rows(i, i + 1), cfg, Totals(rows=N, tokens=sum(LENGTHS)))[0])
                    for i in range(N))
        assert total == pytest.approx(sum(-ADV[i] * LENGTHS[i] * weight(i) for i in range(N)), rel=1e-12), agg


def test_rows_cut_rows_and_completion_columns():
    from vold_pl.rl.objective import Experience as Exp

    d = _fixed()
    exp = Exp(logp=d["logp"], old_logp=None, advantages=torch.tensor(ADV), mask=d["mask"],
              student_logits=d["s_logits"], success=torch.tensor(SUCCESS))
    sub = exp.rows(1, 3, 2)
    assert torch.equal(sub.logp, d["logp"][1:3, :2])
    assert torch.equal(sub.mask, d["mask"][1:3, :2])
    assert torch.equal(sub.student_logits, d["s_logits"][1:3, :2])  # [n, width, V]: the vocabulary stays
    assert torch.equal(sub.advantages, torch.tensor(ADV)[1:3])  # [n]: rows only
    assert torch.equal(sub.success, torch.tensor(SUCCESS)[1:3])
    assert sub.old_logp is None and sub.teacher_logp is None and sub.ref_logp is None
    whole_width = exp.rows(2, 4)  # no width: every column
    assert torch.equal(whole_width.logp, d["logp"][2:4]) and torch.equal(whole_width.mask, d["mask"][2:4])
    assert torch.equal(whole_width.student_logits, d["s_logits"][2:4])


def test_metric_weights_count_tokens_distilled_tokens_and_rows():
    from vold_pl.rl.objective import metric_weights

    d = _fixed()
    exp = Experience(logp=d["logp"], old_logp=None, advantages=torch.tensor(ADV), mask=d["mask"],
                     success=torch.tensor(SUCCESS), teacher_available=torch.tensor(AVAILABLE))
    tokens = float(sum(LENGTHS))
    base = {"clip_low": tokens, "clip_high": tokens, "clip_region": tokens, "ratio_mean": tokens, "kl": tokens,
            "opd/frac_tokens": tokens, "opd/frac_masked_no_text_view": float(N)}
    assert metric_weights(exp, LossSettings(lam=0.0)) == base
    for gate in ("failed", "all"):
        distilled = float(sum(LENGTHS[i] for i in range(N) if _gate(i, gate) > 0))
        assert metric_weights(exp, LossSettings(lam=LAM, gate=gate)) == {**base, "opd/reverse_kl": distilled}
    no_success = replace_field(exp, success=None)  # gate all needs no success reward: every available row
    assert metric_weights(no_success, LossSettings(lam=LAM, gate="all"))["opd/reverse_kl"] == float(
        sum(n for n, a in zip(LENGTHS, AVAILABLE) if a))


def replace_field(exp: Experience, **kw) -> Experience:
    import dataclasses

    return dataclasses.replace(exp, **kw)


def test_combine_metrics_is_the_weighted_mean():
    from vold_pl.rl.objective import combine_metrics

    t = torch.tensor
    parts = [({"a": t(1.0), "b": t(2.0), "c": t(5.0)}, {"a": 1.0, "b": 3.0}),  # "c" has no weight: 1
             ({"a": t(3.0), "c": t(7.0), "z": t(4.0)}, {"a": 3.0, "c": 3.0, "z": 0.0})]
    out = combine_metrics(parts)
    assert out.keys() == {"a", "b", "c", "z"}
    assert float(out["a"]) == pytest.approx((1 * 1 + 3 * 3) / 4)
    assert float(out["b"]) == pytest.approx(2.0)
    assert float(out["c"]) == pytest.approx((5 * 1 + 7 * 3) / 4)
    assert float(out["z"]) == 0.0  # weight 0 (a micro-batch with no distilled token): the sum, 0, not NaN
    assert combine_metrics([]) == {}
    # weights below 1 (shares rather than counts) are weights too
    frac = combine_metrics([({"a": t(1.0)}, {"a": 0.25}), ({"a": t(4.0)}, {"a": 0.5})])
    assert float(frac["a"]) == pytest.approx((1 * 0.25 + 4 * 0.5) / 0.75)


@pytest.mark.parametrize("lengths, prompt_len, group, rows, max_tokens, want", [
    # no caps: one micro-batch; an empty step: none
    ([3, 1, 4, 1, 5, 9], 2, 2, 0, 0, [(0, 6)]),
    ([], 2, 2, 0, 0, []),
    # a row cap alone: fixed slices, the last one shorter
    ([3, 1, 4, 1, 5, 9], 2, 2, 4, 0, [(0, 4), (4, 6)]),
    ([3, 1, 4, 1, 5, 9], 2, 2, 1, 0, [(i, i + 1) for i in range(6)]),
    # a token budget, rows × (P + longest): groups of 2 cost 2·3=6 ≤ 6 each, so groups stay whole: 4 rows
    # would cost 4·2=8 > 6
    ([1, 1, 1, 1, 1, 1], 1, 2, 0, 6, [(0, 2), (2, 4), (4, 6)]),
    # the same rows one by one (G = 1): 3 rows cost 3·2=6 ≤ 6
    ([1, 1, 1, 1, 1, 1], 1, 1, 0, 6, [(0, 3), (3, 6)]),
    # a group size that does not divide N (4 into 6): cut by rows
    ([1, 1, 1, 1, 1, 1], 1, 4, 0, 6, [(0, 3), (3, 6)]),
    # the last group alone costs 2·(2+9)=22 > 14: cut by rows; (0,2): 2·5=10, (0,3): 3·6=18 > 14, (2,4): 12,
    # (2,5): 3·7=21 > 14, (4,5): 7, (4,6): 22 > 14
    ([3, 1, 4, 1, 5, 9], 2, 2, 0, 14, [(0, 2), (2, 4), (4, 5), (5, 6)]),
    # groups fit (10, 12, 22 ≤ 24): (0,4) costs 4·6=24, (0,6) 6·11=66
    ([3, 1, 4, 1, 5, 9], 2, 2, 0, 24, [(0, 4), (4, 6)]),
    # a row cap that splits groups (3 rows, G = 2): cut by rows, both caps hold
    ([1, 1, 1, 1, 1, 1], 1, 2, 3, 100, [(0, 3), (3, 6)]),
    # a row cap that keeps groups: whole groups up to 4 rows
    ([1, 1, 1, 1, 1, 1], 1, 2, 4, 100, [(0, 4), (4, 6)]),
    # empty completions still cost one column per row: 2 rows cost 2 > 1
    ([0, 0], 0, 1, 0, 1, [(0, 1), (1, 2)]),
    # a single row over the budget is its own micro-batch
    ([10, 1], 0, 1, 0, 5, [(0, 1), (1, 2)]),
    # a budget exactly met keeps the rows together
    ([2, 2], 1, 1, 0, 6, [(0, 2)]),
    # a group exactly at the budget (2·2 = 4) still keeps groups whole; by rows it would be (0,3), (3,4)
    ([1, 1, 1, 2], 0, 2, 0, 4, [(0, 2), (2, 4)]),
    # only the first group is over the budget (2·9 = 18 > 10): cut by rows
    ([9, 1, 1, 1], 0, 2, 0, 10, [(0, 1), (1, 4)]),
    # G = 2 does not divide N = 5 (a row cap of 4 would): by rows, 3 rows cost 6
    ([1, 1, 1, 1, 1], 1, 2, 4, 6, [(0, 3), (3, 5)]),
    # no group size (0): by rows
    ([1, 1, 1, 1], 1, 0, 0, 6, [(0, 3), (3, 4)]),
])
def test_plan_micro_batches_worked_by_hand(lengths, prompt_len, group, rows, max_tokens, want):
    from vold_pl.rl.objective import plan_micro_batches

    assert plan_micro_batches(torch.tensor(lengths, dtype=torch.long), prompt_len, group, rows, max_tokens) == want


def test_plan_micro_batches_defaults_to_the_whole_batch():
    from vold_pl.rl.objective import plan_micro_batches

    assert plan_micro_batches(torch.tensor([3, 1, 4, 1, 5, 9]), 2, 2) == [(0, 6)]


def test_missing_inputs_name_the_field():
    d = _fixed()
    base = dict(logp=d["logp"], old_logp=None, advantages=torch.tensor(ADV, dtype=torch.float64), mask=d["mask"],
                success=torch.tensor(SUCCESS, dtype=torch.float64))
    full = LossSettings(lam=LAM, estimator="full")
    for kw in (dict(student_logits=d["s_logits"]), dict(teacher_logits=d["t_logits"]), {}):
        with pytest.raises(ValueError, match=r"^estimator 'full' needs Experience\.student_logits and "
                                             r"Experience\.teacher_logits$"):
            opd_grpo_loss(Experience(**base, **kw), full)
    with pytest.raises(ValueError, match=r"^estimator 'k1' needs Experience\.teacher_logp$"):
        opd_grpo_loss(Experience(**base), LossSettings(lam=LAM))
    with pytest.raises(ValueError, match=r"^beta_ref > 0 needs Experience\.ref_logp$"):
        opd_grpo_loss(Experience(**base), LossSettings(beta_ref=0.1))
    with pytest.raises(ValueError, match=r"^gate 'failed' needs Experience\.success \(the accuracy reward\); "
                                         r"it never falls back to the summed reward$"):
        opd_grpo_loss(Experience(**{**base, "success": None}, teacher_logp=d["logp"]), LossSettings(lam=LAM))


def test_option_errors_name_the_field_and_the_choices():
    from vold_pl.rl.objective import check_opd_options

    with pytest.raises(ValueError, match=r"^opd\.estimator: 'k2' is not one of \['k1', 'full', 'forward'\]\.$"):
        check_opd_options("k2", "loss", "all")
    with pytest.raises(ValueError, match=r"^x\.mode: 'adv' is not one of \['loss', 'advantage'\]\.$"):
        check_opd_options("k1", "adv", "all", where="x")
    with pytest.raises(ValueError, match=r"^opd\.gate: 'some' is not one of \['all', 'failed'\]\.$"):
        check_opd_options("k1", "loss", "some")
    with pytest.raises(ValueError, match=r"^opd\.estimator: full with opd\.mode: advantage is not supported"):
        check_opd_options("full", "advantage", "all")
    with pytest.raises(ValueError, match=r"^opd\.estimator: forward with opd\.mode: advantage is not supported"):
        check_opd_options("forward", "advantage", "failed")
    for e, m in (("k1", "loss"), ("k1", "advantage"), ("full", "loss"), ("forward", "loss")):
        for g in ("all", "failed"):
            check_opd_options(e, m, g)  # every supported combination passes
    with pytest.raises(ValueError, match=r"^grpo\.loss_aggregation: 'mean' is not registered; choose one of "
                                         r"\['dr_grpo', 'seq_mean_token_sum', 'sequence', 'token'\]"):
        LossSettings(aggregation="mean")
    with pytest.raises(ValueError, match=r"opd\.gate: 'none'"):
        LossSettings(gate="none")
    with pytest.raises(ValueError, match=r"^opd\.horizon: 'first' is not one of \['all', 'at_divergence', "
                                         r"'first_divergence'\]\.$"):
        check_opd_options("k1", "loss", "all", horizon="first")
    check_opd_options("full", "loss", "failed", horizon="first_divergence")
    check_opd_options("k1", "advantage", "failed", horizon="first_divergence")


def test_loss_settings_defaults_are_the_documented_ones():
    """GRPO with a symmetric 0.2 clip, sequence aggregation, no reference KL, OPD off (k1, loss, failed)."""
    assert LossSettings() == LossSettings(aggregation="sequence", max_len=None, epsilon_low=0.2, epsilon_high=0.2,
                                          beta_ref=0.0, lam=0.0, gate="failed", estimator="k1", mode="loss",
                                          top_k=0, horizon="all", divergence_nats=5.0)
    from vold_pl.rl.objective import TEACHER_SCORES

    assert TEACHER_SCORES == {"k1": "logp", "full": "logits", "forward": "logits"}


def test_metrics_without_teacher_view_flags_or_success():
    """gate all, no availability flags: every row is distilled and the no-view share is 0."""
    d = _fixed()
    exp = Experience(logp=d["logp"], old_logp=None, advantages=torch.tensor(ADV, dtype=torch.float64),
                     mask=d["mask"], teacher_logp=d["logp"] - 0.25)
    loss, metrics = opd_grpo_loss(exp, LossSettings(lam=LAM, gate="all"))
    assert float(metrics["opd/frac_masked_no_text_view"]) == 0.0
    assert float(metrics["opd/frac_tokens"]) == 1.0
    assert float(metrics["opd/reverse_kl"]) == pytest.approx(0.25)
    want = sum(-ADV[i] / N + LAM * 0.25 / N for i in range(N))  # sequence: each row's mean over 1/N
    assert float(loss) == pytest.approx(want, rel=1e-12)
    # a batch of one completion token: the share of distilled tokens is 1 (the guard against 0 tokens
    # must not change a real count)
    one = Experience(logp=d["logp"][:1, :1], old_logp=None, advantages=torch.tensor([0.5]),
                     mask=torch.ones(1, 1), teacher_logp=d["logp"][:1, :1] - 0.25)
    assert float(opd_grpo_loss(one, LossSettings(lam=LAM, gate="all"))[1]["opd/frac_tokens"]) == 1.0


def test_module_counts_and_plan_on_one_process(tiny_models):
    """Without a trainer (one process): the step's totals are this batch's rows and completion tokens, the world
    is 1, and the micro-batch plan is plan_micro_batches of the rollout's lengths and the module's caps."""
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDGRPOModule
    from vold_pl.rl.objective import Totals
    from vold_pl.rl.rollout_types import Rollout

    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])),
                           grpo=GRPOConfig(num_generations=2, micro_batch_size=2, max_tokens_per_micro_batch=9))
    d = _fixed()
    exp = Experience(logp=None, old_logp=None, advantages=torch.tensor(ADV), mask=d["mask"])
    assert module._totals(exp) == (Totals(rows=float(N), tokens=float(sum(LENGTHS))), 1)
    ro = Rollout(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1, dtype=torch.long),
                 completion_ids=torch.zeros(N, L, dtype=torch.long), completion_mask=d["mask"].long(),
                 texts=[""] * N, group_size=2, clipped=torch.zeros(N, dtype=torch.bool))
    # lengths 5, 3, 4, 2 with a 1-token prompt: the first group costs 2·6 = 12 > 9, so rows: (0,1) 6, (0,2) 12 > 9,
    # (1,2) 4, (1,3) 10 > 9, (2,3) 5, (2,4) 10 > 9, (3,4) 3
    plan = module._plan(ro)
    assert [(mb.start, mb.end) for mb in plan] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [mb.width for mb in plan] == LENGTHS and not any(mb.padding for mb in plan)  # each knows its width


def test_module_experience_carries_the_teacher_view_flags(tiny_models, synth_data):
    """build_experience with an image record the teacher cannot see: its rows are flagged unavailable in the
    experience (their OPD term is masked), and with β_ref = 0 and μ = 1 no reference or π_old is scored."""
    from vold_pl.data.collate import PromptCollator
    from vold_pl.data.sources import read_records, to_dataset
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from vold_pl.rl.rollout_types import SamplingConfig
    from tests.scripted_engine import ScriptedEngine

    img, _ = read_records(synth_data["train"])
    txt, _ = read_records(synth_data["train_text"])
    blind, text = next(r for r in img if r.images), next(r for r in txt if not r.images)
    blind.text_view = None
    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
                           grpo=GRPOConfig(num_generations=2), opd=OPDConfig(lam=0.5, gate="all"),
                           sampling=SamplingConfig(max_new_tokens=8), export=False)
    module.configure_model()
    module.rollout_engine = ScriptedEngine(module.tokenizer, {blind.id: ["<answer> 1 </answer>"],
                                                              text.id: ["<answer> 2 </answer>", "no"]})
    ds = to_dataset([blind, text])
    step = module.build_experience(PromptCollator(module.processor)([ds[0], ds[1]]))
    assert step.experience.teacher_available.tolist() == [False, False, True, True]
    assert step.experience.ref_logp is None and step.experience.old_logp is None
    assert step.experience.teacher_logp.shape == step.experience.mask.shape
