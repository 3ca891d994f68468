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


def _full_kl_and_grad(s: list[float], t: list[float], top_k: int) -> tuple[float, list[float]]:
    """KL(softmax(s) ‖ softmax(t)) over the tokens the student may emit, or over its top-k (both renormalised
    there), and its gradient w.r.t. the logits s: p_v (log p_v − log q_v − KL) on the support, 0 elsewhere."""
    support = [v for v in range(V) if s[v] != -math.inf]
    if top_k:
        p_all = _softmax(s)
        support = sorted(support, key=lambda v: -p_all[v])[:top_k]
    p = dict(zip(support, _softmax([s[v] for v in support])))
    q = dict(zip(support, _softmax([t[v] for v in support])))
    kl = sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in support)
    grad = [0.0] * V
    for v in support:
        grad[v] = p[v] * (math.log(p[v]) - math.log(q[v]) - kl)
    return kl, grad


def _by_hand(d, *, estimator, mode, gate, beta, agg, mu, top_k):
    """Loss, d loss / d logp [N, L], d loss / d student logits [N, L, V], reverse KL, k3 mean; all by hand."""
    loss = 0.0
    g_logp = [[0.0] * L for _ in range(N)]
    g_logits = [[[0.0] * V for _ in range(L)] for _ in range(N)]
    kl_sum = kl_n = k3_sum = 0.0
    for i in range(N):
        g = _gate(i, gate)
        for t in range(LENGTHS[i]):
            w = _weight(i, agg)
            lp = float(d["logp"][i, t])
            old = lp - float(d["log_ratio"][i, t]) if mu > 1 else lp
            rho = math.exp(lp - old)
            tl = float(d["teacher_logp"][i, t])
            # The OPD KL of this token, and the gradient of lam * g * w * KL.
            if estimator == "k1":
                kl = lp - tl if g > 0 else float("nan")
            else:
                kl, kl_grad = _full_kl_and_grad(d["s_logits"][i, t].tolist(), d["t_logits"][i, t].tolist(), top_k)
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


def _ids(c):
    return f"{c['estimator']}-{c['mode']}-{c['gate']}-beta{c['beta']}-{c['agg']}-mu{c['mu']}-topk{c['top_k']}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_assembled_loss_and_gradient_equal_the_formula(case):
    d = _fixed()
    logp = d["logp"].clone().requires_grad_(True)
    s_logits = d["s_logits"].clone().requires_grad_(True)
    old = (d["logp"] - d["log_ratio"]) if case["mu"] > 1 else logp.detach()
    exp = Experience(
        logp=logp, old_logp=old, advantages=torch.tensor(ADV, dtype=torch.float64), mask=d["mask"],
        ref_logp=d["ref"] if case["beta"] else None,
        teacher_logp=d["teacher_logp"], student_logits=s_logits if case["estimator"] == "full" else None,
        teacher_logits=d["t_logits"] if case["estimator"] == "full" else None,
        success=torch.tensor(SUCCESS, dtype=torch.float64), teacher_available=torch.tensor(AVAILABLE))
    cfg = LossSettings(aggregation=case["agg"], max_len=BUDGET, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                       beta_ref=case["beta"], lam=LAM, gate=case["gate"], estimator=case["estimator"],
                       mode=case["mode"], top_k=case["top_k"])
    loss, metrics = opd_grpo_loss(exp, cfg)
    loss.backward()

    want, want_g_logp, want_g_logits, want_rkl, want_k3 = _by_hand(d, **case)
    # The full KL is computed in float32; everything else in the inputs' float64.
    tol, atol = (1e-9, 1e-12) if case["estimator"] == "k1" else (1e-5, 1e-7)
    assert float(loss.detach()) == pytest.approx(want, rel=tol, abs=atol)
    torch.testing.assert_close(logp.grad, want_g_logp, rtol=tol, atol=atol)
    if case["estimator"] == "full":  # finite everywhere, 0 on the blocked token
        torch.testing.assert_close(s_logits.grad, want_g_logits, rtol=1e-5, atol=1e-8)
    else:
        assert s_logits.grad is None
    assert float(metrics["opd/reverse_kl"]) == pytest.approx(want_rkl, rel=1e-6)
    distilled = sum(LENGTHS[i] for i in range(N) if _gate(i, case["gate"]) > 0)
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
    from vold_pl.rl.rollout import SamplingConfig

    module = OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
        grpo=GRPOConfig(loss_aggregation="dr_grpo", epsilon_low=0.1, epsilon_high=0.3, beta_ref=0.02),
        opd=OPDConfig(lam=0.4, gate="all", estimator="full", mode="loss", top_k=5),
        sampling=SamplingConfig(max_new_tokens=37))
    assert module.loss_settings == LossSettings(
        aggregation="dr_grpo", max_len=37, epsilon_low=0.1, epsilon_high=0.3, beta_ref=0.02, lam=0.4, gate="all",
        estimator="full", mode="loss", top_k=5)
