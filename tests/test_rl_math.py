"""RL math checked against values computed independently (plain Python floats, loops, a second formula)."""

import math
import statistics

import pytest
import torch
import torch.nn as nn

from vold_pl.rl.advantages import group_advantages
from vold_pl.rl.logprobs import (
    model_token_logprobs,
    selective_log_softmax,
    token_logprobs_from_hidden,
    token_logprobs_from_logits,
)
from vold_pl.rl.losses import (
    AGGREGATIONS,
    OPD_ESTIMATORS,
    aggregate,
    clipped_surrogate,
    full_reverse_kl,
    k3_kl,
    masked_mean,
    opd_gate,
    opd_loss,
    opd_token_advantages,
    sampled_reverse_kl,
)

EPS = 1e-6
D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ------------------------------------------------------------------------------------------------ advantages
GROUPS = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 1.5, 2.0, 0.0], [0.1 + 0.2] * 4]


def _expected(groups, scale, unbiased=True):
    std_fn = statistics.stdev if unbiased else statistics.pstdev
    flat = [r for g in groups for r in g]
    out, zero = [], []
    for g in groups:
        mean = sum(g) / len(g)
        equal = max(g) == min(g)
        zero.append(equal)
        for r in g:
            if equal:
                out.append(0.0)
            elif scale == "none":
                out.append(r - mean)
            elif scale == "group":
                out.append((r - mean) / (std_fn(g) + EPS))
            else:
                out.append((r - mean) / (std_fn(flat) + EPS))
    return out, zero


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_by_hand(scale, unbiased):
    rewards = t([r for g in GROUPS for r in g])
    adv, zero = group_advantages(rewards, 4, scale, eps=EPS, unbiased=unbiased)
    exp_adv, exp_zero = _expected(GROUPS, scale, unbiased)
    assert adv.shape == (16,) and zero.shape == (4,) and zero.dtype == torch.bool
    assert torch.allclose(adv, t(exp_adv), atol=1e-12)
    assert zero.tolist() == exp_zero == [False, True, False, True]
    # all-equal groups are exactly zero (groups whose mean leaves float residue: the test below)
    assert torch.equal(adv[4:8], torch.zeros(4, dtype=D)) and torch.equal(adv[12:], torch.zeros(4, dtype=D))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("value,G,dtype", [(0.3, 8, torch.float32), (0.7, 8, torch.float32), (0.1, 3, D)])
def test_all_equal_group_is_exactly_zero_despite_mean_residue(scale, value, G, dtype):
    group = torch.full((G,), value, dtype=dtype)
    residue = group - group.mean()  # what mean subtraction alone leaves: not zero for these groups
    assert (residue != 0).all(), "the group must leave float residue, or this test checks nothing"
    rewards = torch.cat([group, torch.tensor([1.0] + [0.0] * (G - 1), dtype=dtype)])  # + a group with signal
    adv, zero = group_advantages(rewards, G, scale)
    assert zero.tolist() == [True, False]
    assert torch.equal(adv[:G], torch.zeros(G, dtype=dtype))
    assert adv[G].item() > 0.5 and (adv[G + 1:] < 0).all()


def test_group_advantages_known_numbers():
    adv, _ = group_advantages(t([1.0, 0.0, 0.0, 0.0]), 4, "group", eps=0.0)
    # mean 0.25, unbiased std sqrt(0.75/3) = 0.5
    assert torch.allclose(adv, t([1.5, -0.5, -0.5, -0.5]))
    adv, _ = group_advantages(t([1.0, 0.0, 0.0, 0.0]), 4, "none")
    assert torch.allclose(adv, t([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_edge_cases():
    adv, zero = group_advantages(t([1.0, 0.0, 0.5]), 1, "group")  # G=1: unbiased std undefined
    assert torch.equal(adv, torch.zeros(3, dtype=D)) and zero.all()
    adv, zero = group_advantages(torch.tensor([1, 0, 1, 1]), 2, "batch")  # int rewards
    assert adv.dtype == torch.float32 and zero.tolist() == [False, True]
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError):
        group_advantages(t([1.0, 0.0]), 2, "bogus")


# ------------------------------------------------------------------------------------------ clipped surrogate
# (rho, A, expected loss, low clipped, high clipped), eps_low = 0.2, eps_high = 0.28
CASES = [
    (1.5, 1.0, -1.28, False, True),   # -min(1.5, 1.28)
    (0.5, -1.0, 0.8, True, False),    # -min(-0.5, -0.8)
    (1.5, -1.0, 1.5, False, False),   # -min(-1.5, -1.28): unclipped side
    (0.5, 1.0, -0.5, False, False),   # -min(0.5, 0.8)
    (1.1, 2.0, -2.2, False, False),   # inside the clip range
    (0.7, -2.0, 1.6, True, False),    # -min(-1.4, -1.6)
    # between the two bounds: 1 + eps_low < rho < 1 + eps_high is inside the band for A > 0 (clip-higher), and
    # 1 - eps_high < rho < 1 - eps_low is clipped for A < 0; swapping eps_low and eps_high anywhere changes these
    (1.25, 1.0, -1.25, False, False),  # -min(1.25, 1.25): not clipped although 1.25 > 1 + eps_low
    (1.25, -1.0, 1.25, False, False),  # -min(-1.25, -1.25)
    (0.75, -1.0, 0.8, True, False),    # -min(-0.75, -0.8): clipped although 0.75 > 1 - eps_high
    (0.75, 1.0, -0.75, False, False),  # -min(0.75, 0.8)
]


def test_clipped_surrogate_hand_values_and_grads():
    rho = t([[c[0] for c in CASES]])  # [1, 6]
    adv = t([[c[1] for c in CASES]])  # [1, 6] per-token advantages
    logp = rho.log().requires_grad_(True)
    loss, stats = clipped_surrogate(logp, torch.zeros_like(logp), adv, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, t([[c[2] for c in CASES]]), atol=1e-12)
    assert stats.low_clipped.tolist() == [[c[3] for c in CASES]]
    assert stats.high_clipped.tolist() == [[c[4] for c in CASES]]
    loss.sum().backward()
    # d/dlogp of -rho*A is -rho*A where the unclipped branch is taken, 0 where the clip is active
    exp_grad = [0.0 if (c[3] or c[4]) else -c[0] * c[1] for c in CASES]
    assert torch.allclose(logp.grad, t([exp_grad]), atol=1e-12)


def test_clip_fractions_masked():
    rho = t([[c[0] for c in CASES]])
    adv = t([[c[1] for c in CASES]])
    _, stats = clipped_surrogate(rho.log(), torch.zeros_like(rho), adv, 0.2, 0.28)
    mask = torch.tensor([[True] * 4 + [False] * (len(CASES) - 4)])
    fr = stats.fractions(mask)
    assert fr["clip_low"].item() == pytest.approx(1 / 4)
    assert fr["clip_high"].item() == pytest.approx(1 / 4)
    assert fr["clip_region"].item() == pytest.approx(2 / 4)
    assert fr["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5) / 4)
    assert masked_mean(rho, torch.zeros_like(mask)).item() == 0.0
    band = torch.tensor([[False] * 6 + [True] * 4])  # the four cases between the bounds
    fr = stats.fractions(band)
    assert (fr["clip_low"].item(), fr["clip_high"].item(), fr["clip_region"].item()) == (0.25, 0.0, 0.25)
    assert fr["ratio_mean"].item() == pytest.approx(1.0)


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(3, 5, dtype=D) - 2).requires_grad_(True)
    adv = t([0.7, -1.3, 0.0])
    loss, stats = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    assert torch.equal(stats.ratio, torch.ones(3, 5, dtype=D))
    assert not stats.low_clipped.any() and not stats.high_clipped.any()
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv[:, None].expand(3, 5))


# --------------------------------------------------------------------------------------------------- k3 KL
def test_k3_hand_values_and_nonnegative():
    pairs = [(math.log(0.5), math.log(0.25)), (math.log(0.1), math.log(0.9)), (-1.0, -1.0)]
    got = k3_kl(t([[p[0] for p in pairs]]), t([[p[1] for p in pairs]]))
    exp = [math.exp(r - lp) - (r - lp) - 1 for lp, r in pairs]
    assert torch.allclose(got, t([exp]), atol=1e-12)
    assert exp[0] == pytest.approx(0.5 + math.log(2) - 1) and exp[2] == 0.0
    torch.manual_seed(1)
    assert (k3_kl(torch.randn(50, 20) * 3, torch.randn(50, 20) * 3) >= 0).all()


# ----------------------------------------------------------------------------------------------- aggregation
NAN = float("nan")
X = [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, NAN, NAN], [5.0, float("inf"), 0.0, 0.0], [NAN, NAN, NAN, NAN]]
M = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_aggregation_modes_uneven_masks():
    x, m = t(X), torch.tensor(M, dtype=torch.bool)
    rows = [sum(v for v, k in zip(xr, mr) if k) / max(sum(mr), 1) for xr, mr in zip(X, M)]
    total = sum(v for xr, mr in zip(X, M) for v, k in zip(xr, mr) if k)  # 45
    count = sum(map(sum, M))  # 7
    assert aggregate(x, m, "sequence").item() == pytest.approx(sum(rows) / 4)  # (2.5 + 15 + 5 + 0) / 4
    assert aggregate(x, m, "sequence").item() == pytest.approx(5.625)
    assert aggregate(x, m, "token").item() == pytest.approx(total / count)
    assert aggregate(x, m, "dr_grpo").item() == pytest.approx(total / (4 * 4))
    assert aggregate(x, m, "dr_grpo", max_len=8).item() == pytest.approx(45 / 32)
    assert aggregate(x, m.float(), "token").item() == pytest.approx(45 / 7)  # float masks too
    for mode in AGGREGATIONS:
        assert aggregate(x, torch.zeros_like(m), mode).item() == 0.0
    with pytest.raises(ValueError):
        aggregate(x, m, "mean")


def test_aggregation_gradient_has_no_nan():
    x = t(X).requires_grad_(True)
    aggregate(x, torch.tensor(M, dtype=torch.bool), "sequence").backward()
    exp = [[0.25 / 4] * 4, [0.125, 0.125, 0, 0], [0.25, 0, 0, 0], [0, 0, 0, 0]]
    assert torch.allclose(x.grad, t(exp))


# -------------------------------------------------------------------------------------------------- OPD
def test_sampled_reverse_kl_value_and_gradients():
    s = t([[math.log(0.6), math.log(0.1)]]).requires_grad_(True)
    tl = t([[math.log(0.3), math.log(0.4)]])
    exp = [math.log(0.6 / 0.3), math.log(0.1 / 0.4)]
    k1 = sampled_reverse_kl(s, tl)
    assert torch.allclose(k1, t([exp]))
    k1.sum().backward()  # reinforce: grad = sg(k1)
    assert torch.allclose(s.grad, t([exp]))
    s.grad = None
    sampled_reverse_kl(s, tl, grad="pathwise").sum().backward()
    assert torch.allclose(s.grad, torch.ones_like(s))
    assert OPD_ESTIMATORS["k1"] is sampled_reverse_kl and OPD_ESTIMATORS["full"] is full_reverse_kl


def _softmax(row):
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def _manual_kl(srow, trow, top_k=None, renorm=True):
    p, q = _softmax(srow), _softmax(trow)
    idx = range(len(p)) if top_k is None else sorted(range(len(p)), key=lambda i: -p[i])[:top_k]
    pp, qq = [p[i] for i in idx], [q[i] for i in idx]
    if top_k is not None and renorm:
        pp, qq = [v / sum(pp) for v in pp], [v / sum(qq) for v in qq]
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pp, qq))


@pytest.mark.parametrize("top_k,renorm", [(None, True), (2, True), (2, False), (5, True)])
def test_full_reverse_kl_against_vocab_loop(top_k, renorm):
    torch.manual_seed(2)
    s, tt = torch.randn(2, 3, 5, dtype=D), torch.randn(2, 3, 5, dtype=D)
    got = full_reverse_kl(s, tt, top_k=top_k, renormalize=renorm)
    for i in range(2):
        for j in range(3):
            exp = _manual_kl(s[i, j].tolist(), tt[i, j].tolist(), top_k, renorm)
            assert got[i, j].item() == pytest.approx(exp, rel=1e-5, abs=1e-6)
    if renorm:
        assert (got >= 0).all()


def test_full_reverse_kl_zero_when_equal_and_logprob_inputs():
    torch.manual_seed(3)
    s = torch.randn(4, 6, 11)
    assert torch.allclose(full_reverse_kl(s, s + 3.0), torch.zeros(4, 6), atol=1e-5)  # shift = same dist
    logprobs = torch.log_softmax(s, -1)
    tt = torch.randn(4, 6, 11)
    assert torch.allclose(full_reverse_kl(s, tt), full_reverse_kl(logprobs, torch.log_softmax(tt, -1)), atol=1e-5)
    assert (full_reverse_kl(s, tt) >= 0).all()
    with pytest.raises(ValueError):
        full_reverse_kl(s, torch.randn(4, 6, 12))


def test_full_reverse_kl_gradient_closed_form():
    torch.manual_seed(4)
    s = torch.randn(2, 3, 7, requires_grad=True)
    tt = torch.randn(2, 3, 7, requires_grad=True)
    kl = full_reverse_kl(s, tt)
    kl.sum().backward()
    # dKL/dz_j = p_j * ((log p_j - log q_j) - KL), the softmax Jacobian applied by hand
    p, lp, lq = torch.softmax(s.detach(), -1), torch.log_softmax(s.detach(), -1), torch.log_softmax(tt.detach(), -1)
    exp = p * ((lp - lq) - kl.detach().unsqueeze(-1))
    assert torch.allclose(s.grad, exp, atol=1e-6)
    assert tt.grad is None  # the teacher is a constant


def test_opd_gate():
    r = t([1.0, 0.0, 1.0, 0.0, 1.5, -0.5])
    assert opd_gate(r, "failed").tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert opd_gate(r, "all").tolist() == [1.0] * 6
    avail = torch.tensor([True, True, False, False, True, True])
    assert opd_gate(r, "failed", available=avail).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert opd_gate(torch.tensor([True, False]), "failed").tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        opd_gate(r, "succeeded")


def test_opd_token_advantages_hand_values():
    adv = t([1.0, -1.0, 0.5])
    k1 = t([[0.2, -0.4], [0.3, 0.1], [float("inf"), NAN]])
    gate = t([1.0, 0.5, 0.0])
    out = opd_token_advantages(adv, k1, 0.5, gate)
    exp = [[1.0 - 0.5 * 0.2, 1.0 + 0.5 * 0.4], [-1.0 - 0.25 * 0.3, -1.0 - 0.25 * 0.1], [0.5, 0.5]]
    assert torch.allclose(out, t(exp))


def test_opd_advantage_mode_gradient():
    logp = t([[-1.0, -2.0], [-0.5, -0.3]]).requires_grad_(True)
    tl = t([[-1.5, -1.0], [-0.5, -0.1]])
    adv, gate, lam = t([1.0, -2.0]), t([1.0, 1.0]), 0.25
    a_t = opd_token_advantages(adv, sampled_reverse_kl(logp, tl), lam, gate)
    loss, _ = clipped_surrogate(logp, logp.detach(), a_t, 0.2, 0.28)
    loss.sum().backward()
    exp = [[-(1.0 - lam * 0.5), -(1.0 - lam * -1.0)], [-(-2.0 - 0.0), -(-2.0 - lam * -0.2)]]
    assert torch.allclose(logp.grad, t(exp))


def test_opd_loss_mode_values_and_gradient():
    logp = t([[-1.0, -2.0, -0.1], [-0.5, -0.3, -0.2]]).requires_grad_(True)
    tl = t([[-1.5, -1.0, NAN], [-0.5, -0.1, -0.4]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    gate, lam = t([1.0, 0.0]), 0.5
    k1 = sampled_reverse_kl(logp, tl)  # row 0: [0.5, -1.0, nan]
    loss = opd_loss(k1, mask, gate, lam, "token")
    assert loss.item() == pytest.approx(0.5 * (0.5 - 1.0) / 5)  # gated row still counts in the normaliser
    loss.backward()
    assert torch.allclose(logp.grad, t([[0.5 * 0.5 / 5, 0.5 * -1.0 / 5, 0.0], [0.0, 0.0, 0.0]]))
    seq = opd_loss(full_reverse_kl(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), mask, gate, lam, "sequence")
    assert seq.item() == 0.0


# ------------------------------------------------------------------------------------------------ logprobs
def _ref_logp(logits, ids, temp=1.0):
    lp = torch.log_softmax(logits.float() / temp, -1)
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_chunked_logprobs_match_unchunked(ckpt, chunk):
    torch.manual_seed(5)
    head = nn.Linear(16, 50, bias=False)
    h1 = torch.randn(3, 7, 16, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    ids = torch.randint(0, 50, (3, 7))
    lp, ent = token_logprobs_from_hidden(h1, head, ids, chunk_size=chunk, temperature=0.7,
                                         return_entropy=True, checkpoint_chunks=ckpt)
    ref_lp, ref_ent = _ref_logp(head(h2), ids, 0.7)
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    (lp.sum() + 0.3 * ent.sum()).backward()
    g_head = head.weight.grad.clone()
    head.weight.grad = None
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    assert torch.allclose(g_head, head.weight.grad, atol=1e-5)
    only = token_logprobs_from_hidden(h1, head.weight, ids, chunk_size=chunk, temperature=0.7)
    assert torch.allclose(only, ref_lp, atol=1e-5)


def test_logits_paths_match_manual():
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 30).bfloat16()
    ids = torch.randint(0, 30, (2, 5))
    ref, ref_ent = _ref_logp(logits, ids, 1.3)
    lp, ent = token_logprobs_from_logits(logits, ids, 1.3, return_entropy=True)
    assert lp.dtype == torch.float32 and torch.allclose(lp, ref, atol=1e-5)
    assert torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(selective_log_softmax(logits, ids, 1.3, chunk_size=3), ref, atol=1e-5)


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(7)
    return Qwen2ForCausalLM(cfg).eval()


def test_model_token_logprobs_matches_full_logits():
    model = _tiny_qwen2()
    ids = torch.randint(0, 300, (2, 10))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, :2] = 0  # left padding on row 1
    start = 6
    lp = model_token_logprobs(model, ids, attn, start, chunk_size=3, checkpoint_chunks=True)
    g_ours = torch.autograd.grad(lp.sum(), model.lm_head.weight)[0]
    logits = model(input_ids=ids, attention_mask=attn).logits  # [2, 10, 300]
    manual = torch.zeros(2, 10 - start)
    for i in range(2):
        for j, pos in enumerate(range(start, 10)):
            manual[i, j] = torch.log_softmax(logits[i, pos - 1], -1)[ids[i, pos]]
    assert lp.shape == (2, 4) and torch.allclose(lp, manual, atol=1e-5)
    g_ref = torch.autograd.grad(manual.sum(), model.lm_head.weight)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-5)

    comp = torch.zeros(2, 10, dtype=torch.bool)
    comp[0, 6:] = True
    comp[1, 6:9] = True  # row 1's completion is one token shorter (right padding)
    lpm = model_token_logprobs(model, ids, attn, comp)
    assert lpm.shape == (2, 4) and torch.allclose(lpm[:, :3], manual[:, :3], atol=1e-5)
    assert lpm[0, 3].item() == pytest.approx(manual[0, 3].item(), abs=1e-5) and lpm[1, 3].item() == 0.0


def test_model_token_logprobs_fallback_without_backbone_attr():
    model = _tiny_qwen2()

    class Wrapped(nn.Module):  # exposes the head but no `.model`: forces the output_hidden_states path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            return self.inner(**kw)

    ids = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        ours = model_token_logprobs(Wrapped(model), ids, None, 3, temperature=0.9)
        logits = model(input_ids=ids).logits
    ref = torch.log_softmax(logits[:, 2:7] / 0.9, -1).gather(-1, ids[:, 3:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError):
        model_token_logprobs(model, ids, None, 0)


# ------------------------------------------------------------------------- edges the cases above leave open
# (each pins a behaviour that a one-token change of the code would alter: found by `make mutate`)

def test_defaults_are_the_documented_ones():
    x, m = t([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(x, m).item() == pytest.approx((1.5 + 4.0) / 2)  # sequence
    gate = t([1.0, 0.0])
    assert opd_loss(x, m, gate, 1.0).item() == pytest.approx((1.5 + 0.0) / 2)  # sequence
    assert opd_gate(t([1.0, 0.0])).tolist() == [0.0, 1.0]  # failed
    adv, _ = group_advantages(t([1.0, 0.0, 0.0, 0.0]), 4)  # group scale, eps 1e-6
    assert adv.tolist() == pytest.approx([0.75 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6), -0.25 / (0.5 + 1e-6),
                                          -0.25 / (0.5 + 1e-6)], rel=1e-12)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"unknown aggregation 'mean'; choose from \['dr_grpo', 'seq_mean_token_sum', 'sequence', 'token'\]"):
        aggregate(t([[1.0]]), torch.ones(1, 1, dtype=torch.bool), "mean")
    with pytest.raises(ValueError, match="unknown OPD gate 'succeeded'"):
        opd_gate(t([1.0]), "succeeded")
    with pytest.raises(ValueError, match="grad must be 'reinforce' or 'pathwise', got 'both'"):
        sampled_reverse_kl(t([[0.0]]), t([[0.0]]), grad="both")
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[B\*G\], got shape \(2, 2\)"):
        group_advantages(t([[1.0, 0.0], [1.0, 0.0]]), 2)
    with pytest.raises(ValueError, match="rewards length 3 is not a multiple of group_size=2"):
        group_advantages(t([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="unknown advantage scale 'bogus'"):
        group_advantages(t([1.0, 0.0]), 2, "bogus")


def test_normalisers_with_a_single_token_and_non_square_shapes():
    one = torch.tensor([[False, True, False]])
    x = t([[5.0, 3.0, 7.0]])
    assert masked_mean(x, one).item() == 3.0  # one token: divide by 1
    assert aggregate(x, one, "token").item() == 3.0
    assert aggregate(x, one, "sequence").item() == 3.0
    assert aggregate(t([[3.0]]), torch.ones(1, 1, dtype=torch.bool), "dr_grpo").item() == 3.0  # N * L = 1
    # dr_grpo divides by N x L (or N x max_len), with N != L
    x2, m2 = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.ones(2, 3, dtype=torch.bool)
    assert aggregate(x2, m2, "dr_grpo").item() == pytest.approx(21 / 6)
    assert aggregate(x2, m2, "dr_grpo", max_len=7).item() == pytest.approx(21 / 14)
    assert opd_loss(x2, m2, t([1.0, 1.0]), 0.5, "dr_grpo", max_len=7).item() == pytest.approx(0.5 * 21 / 14)


def test_masked_mean_accumulates_in_float32():
    x = torch.full((1, 3), 1 / 3).bfloat16()
    out = masked_mean(x, torch.ones(1, 3, dtype=torch.bool))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(float(x[0, 0].float()), rel=1e-7)


def test_reinforce_gradient_is_zero_where_k1_is_not_finite():
    s = t([[-1.0, -1.0, -1.0, -1.0]]).requires_grad_(True)
    tl = t([[-2.0, float("-inf"), float("inf"), NAN]])  # k1: 1, +inf, -inf, nan
    k1 = sampled_reverse_kl(s, tl)
    assert k1[0, 0].item() == 1.0 and k1[0, 1].item() == float("inf") and k1[0, 2].item() == float("-inf")
    assert math.isnan(k1[0, 3].item())  # the value shows the problem
    k1.sum().backward()
    assert s.grad.tolist() == [[1.0, 0.0, 0.0, 0.0]]  # only the gradient coefficient is sanitised


def test_opd_terms_keep_the_loss_dtype_and_the_mask():
    k1 = torch.tensor([[0.2, float("inf")], [0.4, float("inf")], [0.3, NAN]])  # float32; inf/nan in padding
    mask = torch.tensor([[1, 0], [1, 0], [1, 1]], dtype=torch.bool)
    gate = t([1.0, 0.5, 0.0])  # float64 weights and advantages must not turn a float32 loss into float64
    adv = t([1.0, -1.0, 0.5])
    out = opd_token_advantages(adv, k1, 0.5, gate, mask)
    assert out.dtype == torch.float32
    exp = [[1.0 - 0.5 * 0.2, 1.0], [-1.0 - 0.25 * 0.4, -1.0], [0.5, 0.5]]  # padding and g = 0 keep A
    assert torch.allclose(out, torch.tensor(exp))
    loss = opd_loss(torch.tensor([[0.2, 0.1], [0.4, 0.3], [float("inf"), 0.3]]), mask, gate, 1.0, "token")
    assert loss.dtype == torch.float32  # the gated row's inf (g = 0) contributes 0, not inf or nan
    assert loss.item() == pytest.approx((0.2 + 0.5 * 0.4) / 4)


def test_group_advantages_eps_is_added_and_g1_dtypes():
    adv, _ = group_advantages(t([1.0, 0.0]), 2, "group", eps=0.5)  # std sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 0.5), -0.5 / (math.sqrt(0.5) + 0.5)], rel=1e-12)
    adv, zero = group_advantages(torch.tensor([1, 0, 1]), 1)  # int rewards, G = 1
    assert adv.dtype == torch.float32 and zero.dtype == torch.bool and zero.tolist() == [True] * 3


def test_logprob_helpers_defaults_blocked_ids_and_empty_input():
    torch.manual_seed(8)
    logits = torch.randn(2, 7, 5)  # more positions (14) than vocabulary entries (5)
    ids = torch.randint(0, 4, (2, 7))
    ref, _ = _ref_logp(logits, ids)
    assert torch.allclose(selective_log_softmax(logits, ids, chunk_size=3), ref, atol=1e-5)  # temperature 1
    only = token_logprobs_from_logits(logits, ids)  # temperature 1, no entropy: a tensor, not a tuple
    assert isinstance(only, torch.Tensor) and only.shape == (2, 7) and torch.allclose(only, ref, atol=1e-5)
    # a blocked id (4 here) is removed and the rest renormalised
    blocked = logits.clone()
    blocked[..., 4] = float("-inf")
    ref_b, _ = _ref_logp(blocked, ids)
    assert torch.allclose(selective_log_softmax(logits, ids, chunk_size=3, blocked_ids=[4]), ref_b, atol=1e-5)
    assert torch.allclose(token_logprobs_from_logits(logits, ids, blocked_ids=(4,)), ref_b, atol=1e-5)
    empty = selective_log_softmax(torch.zeros(0, 3, 5).bfloat16(), torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 3) and empty.dtype == torch.float32


def test_group_advantages_stay_on_the_rewards_device():
    """Both outputs live where the rewards are (the meta device stands in for an accelerator on CPU-only hosts)."""
    for g in (1, 2):
        adv, zero = group_advantages(torch.zeros(4, device="meta"), g)
        assert adv.device.type == "meta" and zero.device.type == "meta"


def test_aggregations_with_the_step_totals_of_one_token():
    """Given the step's totals, the aggregations divide by them, down to a step of one completion token (and
    the guards against an empty step only act at 0)."""
    from vold_pl.rl.losses import Totals

    x, m = t([[3.0, 5.0]]), torch.tensor([[True, False]])
    one = Totals(rows=1.0, tokens=1.0)
    assert aggregate(x, m, "token", totals=one).item() == 3.0
    assert aggregate(x, m, "sequence", totals=one).item() == 3.0
    assert aggregate(x, m, "dr_grpo", max_len=1, totals=one).item() == 3.0
    assert opd_loss(x, m, t([1.0]), 1.0, "token", totals=one).item() == 3.0
    empty = Totals(rows=0.0, tokens=0.0)
    none = torch.zeros(1, 2, dtype=torch.bool)
    for agg in ("token", "sequence", "dr_grpo"):
        assert aggregate(x, none, agg, max_len=2, totals=empty).item() == 0.0


def test_full_reverse_kl_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"^student \(1, 2, 3\) and teacher \(1, 2, 4\) vocab/shape differ$"):
        full_reverse_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_mask_blocked_on_the_vocabulary_axis_any_index_kind_and_device():
    from vold_pl.rl.logprobs import mask_blocked

    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [N, L, V]: V is not dim 1
    want = x.clone()
    want[..., 1] = float("-inf")
    want[..., 3] = float("-inf")
    for ids in ([1, 3], (3, 1), torch.tensor([1, 3], dtype=torch.int32)):  # an int32 tensor is cast to long
        assert torch.equal(mask_blocked(x, ids), want)
    assert mask_blocked(x, None) is x and mask_blocked(x, []) is x  # nothing blocked: the same tensor
    meta = torch.zeros(2, 4, device="meta")  # the index follows the logits' device (meta: any accelerator)
    for ids in ([1], torch.tensor([1])):
        assert mask_blocked(meta, ids).device.type == "meta"


class _CountingHead(nn.Module):
    """A linear head that counts its forward calls: checkpointed slabs run it again in backward."""

    def __init__(self, h: int, v: int):
        super().__init__()
        self.lin = nn.Linear(h, v, bias=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


def test_token_logprobs_from_hidden_defaults_blocked_ids_recompute_and_empty():
    torch.manual_seed(9)
    head = _CountingHead(8, 6)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    ids = torch.randint(0, 5, (2, 5))
    logits = head.lin(hidden)
    ref, _ = _ref_logp(logits, ids)  # temperature 1
    head.calls = 0
    lp = token_logprobs_from_hidden(hidden, head, ids, chunk_size=4)  # defaults: T = 1, no recompute
    assert torch.allclose(lp, ref, atol=1e-6)
    lp.sum().backward()
    assert head.calls == 3  # ceil(10 / 4) slabs, none recomputed in backward
    head.calls = 0
    token_logprobs_from_hidden(hidden, head, ids, chunk_size=4, checkpoint_chunks=True).sum().backward()
    assert head.calls == 6  # each slab again in backward: the [chunk, V] logits are not kept
    head.calls = 0
    with torch.no_grad():  # nothing to recompute without autograd
        token_logprobs_from_hidden(hidden, head, ids, chunk_size=4, checkpoint_chunks=True)
    assert head.calls == 3
    blocked = logits.detach().clone()
    blocked[..., 5] = float("-inf")
    ref_b, _ = _ref_logp(blocked, ids)
    lsm = torch.log_softmax(blocked, -1)
    ent_b = -torch.nan_to_num(lsm.exp() * lsm).sum(-1)  # 0 · -inf at the blocked id counts 0
    lp_b, ent = token_logprobs_from_hidden(hidden, head, ids, blocked_ids=(5,), return_entropy=True)
    assert torch.allclose(lp_b, ref_b, atol=1e-6)
    assert torch.allclose(ent, ent_b, atol=1e-6)
    # L = 0: nothing to score, float32 zeros of the right shape (and entropy when asked)
    empty = token_logprobs_from_hidden(torch.zeros(2, 0, 8).bfloat16(), head, torch.zeros(2, 0, dtype=torch.long))
    assert empty.shape == (2, 0) and empty.dtype == torch.float32
    e_lp, e_ent = token_logprobs_from_hidden(torch.zeros(2, 0, 8), head, torch.zeros(2, 0, dtype=torch.long),
                                             return_entropy=True)
    assert e_lp.shape == e_ent.shape == (2, 0)
    # the head: a module or a [V, H] weight, nothing else
    for bad, kind in (("head", "str"), (torch.zeros(2, 6, 8), "Tensor")):
        with pytest.raises(TypeError, match=rf"^lm_head must be an nn.Module or a \[V, H\] weight tensor, got "
                                            rf"<class '(torch\.)?{kind}'>$"):
            token_logprobs_from_hidden(hidden, bad, ids)


def test_logp_temperature_two_is_applied():
    torch.manual_seed(10)
    logits, ids = torch.randn(3, 7), torch.randint(0, 7, (3,))
    ref, _ = _ref_logp(logits, ids, 2.0)
    assert torch.allclose(token_logprobs_from_logits(logits.unsqueeze(0), ids.unsqueeze(0), 2.0)[0], ref, atol=1e-6)


class _Recorder(nn.Module):
    """Wraps a module and records the keyword arguments of each call (what scoring asks of the model)."""

    def __init__(self, inner: nn.Module, as_tuple: bool = False):
        super().__init__()
        self.inner, self.as_tuple, self.calls = inner, as_tuple, []

    def forward(self, **kw):
        self.calls.append(kw)
        out = self.inner(**kw)
        return (out.last_hidden_state,) if self.as_tuple else out


def _manual_logp(model, ids, attn, start, temp=1.0, blocked=()):
    """log softmax(logits[t - 1] / T)[ids[t]] and the entropy, position by position, from the full forward."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float() / temp  # [N, T, V]
    logits[..., list(blocked)] = float("-inf")
    lp = torch.zeros(ids.shape[0], ids.shape[1] - start)
    ent = torch.zeros_like(lp)
    for i in range(ids.shape[0]):
        for j, pos in enumerate(range(start, ids.shape[1])):
            row = torch.log_softmax(logits[i, pos - 1], -1)
            lp[i, j] = row[ids[i, pos]]
            ent[i, j] = -torch.nan_to_num(row.exp() * row).sum()
    return lp, ent


def test_model_token_logprobs_options_masks_and_bounds():
    model = _tiny_qwen2()
    torch.manual_seed(11)
    ids = torch.randint(0, 299, (2, 9))
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, :2] = 0  # left padding
    with torch.no_grad():
        # default completion_start 1: every token after the first
        full = model_token_logprobs(model, ids, attn)
        assert torch.allclose(full, _manual_logp(model, ids, attn, 1)[0], atol=1e-5)
        # a completion mask, entropy, blocked ids and temperature: everything outside the mask is 0
        comp = torch.zeros(2, 9, dtype=torch.bool)
        comp[0, 5:] = True
        comp[1, 5:8] = True
        lp, ent = model_token_logprobs(model, ids, attn, comp, temperature=0.7, return_entropy=True,
                                       blocked_ids=(299,))
        ref_lp, ref_ent = _manual_logp(model, ids, attn, 5, 0.7, blocked=(299,))
        keep = comp[:, 5:]
        assert lp.dtype == ent.dtype == torch.float32
        assert torch.allclose(lp, torch.where(keep, ref_lp, 0.0), atol=1e-5)
        assert torch.allclose(ent, torch.where(keep, ref_ent, 0.0), atol=1e-5)
        only = model_token_logprobs(model, ids, attn, comp, blocked_ids=(299,))
        assert torch.allclose(only, torch.where(keep, _manual_logp(model, ids, attn, 5, blocked=(299,))[0], 0.0),
                              atol=1e-5)
        # a mask without completion columns, and a start at the last column: nothing to score
        assert model_token_logprobs(model, ids, attn, torch.zeros(2, 9, dtype=torch.bool)).shape == (2, 0)
        assert model_token_logprobs(model, ids, attn, 9).shape == (2, 0)
    for bad in (0, 10):
        with pytest.raises(ValueError, match=rf"^completion must start at column >= 1 \(a token needs a context\), "
                                             rf"got {bad}$"):
            model_token_logprobs(model, ids, attn, bad)


def test_model_token_logprobs_asks_the_model_for_no_cache_and_passes_its_inputs():
    """The backbone path and the output_hidden_states fallback: no KV cache, the attention mask and the extra
    inputs reach the model, the fallback keeps one position of logits; a backbone returning a tuple works."""
    model = _tiny_qwen2()
    torch.manual_seed(12)
    ids = torch.randint(0, 300, (2, 8))
    attn = torch.ones(2, 8, dtype=torch.long)
    attn[0, :3] = 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # explicit position ids, the extra input passed through
    ref = _manual_logp(model, ids, attn, 4)[0]

    class Backbone(nn.Module):  # model.model records its calls; model.lm_head is the head
        def __init__(self, as_tuple):
            super().__init__()
            self.model, self.lm_head = _Recorder(model.model, as_tuple), model.lm_head

        def get_output_embeddings(self):
            return self.lm_head

    for as_tuple in (False, True):
        wrapped = Backbone(as_tuple)
        with torch.no_grad():
            out = model_token_logprobs(wrapped, ids, attn, 4, position_ids=pos)
        assert torch.allclose(out, ref, atol=1e-5)
        (kw,) = wrapped.model.calls
        assert kw["use_cache"] is False and kw["attention_mask"] is attn and kw["position_ids"] is pos
    # chunk_size and checkpoint_chunks reach the head: 8 positions in slabs of 3, each run again in backward
    wrapped = Backbone(False)
    wrapped.lm_head = head = _CountingHead(32, 300)
    head.lin.weight = model.lm_head.weight
    model_token_logprobs(wrapped, ids, attn, 4, chunk_size=3, checkpoint_chunks=True).sum().backward()
    assert head.calls == 6
    head.calls = 0
    model_token_logprobs(wrapped, ids, attn, 4, chunk_size=3).sum().backward()
    assert head.calls == 3
    model.zero_grad(set_to_none=True)

    class NoBackbone(nn.Module):  # no `.model`: the output_hidden_states path of the whole model
        def __init__(self):
            super().__init__()
            self.whole = _Recorder(model)

        def get_output_embeddings(self):
            return model.lm_head

        def forward(self, **kw):
            return self.whole(**kw)

    wrapped = NoBackbone()
    with torch.no_grad():
        out = model_token_logprobs(wrapped, ids, attn, 4, position_ids=pos)
    assert torch.allclose(out, ref, atol=1e-5)
    (kw,) = wrapped.whole.calls
    assert kw["use_cache"] is False and kw["attention_mask"] is attn and kw["position_ids"] is pos
    assert kw["output_hidden_states"] is True and kw["logits_to_keep"] == 1


def test_the_head_is_found_by_get_output_embeddings_or_lm_head():
    model = _tiny_qwen2()
    ids = torch.randint(0, 300, (1, 6))
    ref = _manual_logp(model, ids, None, 2)[0]

    class LmHeadOnly(nn.Module):  # no get_output_embeddings at all
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = model.model, model.lm_head

    class NoneFromGetter(LmHeadOnly):  # the getter answers None: lm_head is the head
        def get_output_embeddings(self):
            return None

    for cls in (LmHeadOnly, NoneFromGetter):
        with torch.no_grad():
            assert torch.allclose(model_token_logprobs(cls(), ids, None, 2), ref, atol=1e-5)

    class Headless(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model.model

    with pytest.raises(AttributeError, match=r"^Headless has no lm_head / output embeddings$"):
        model_token_logprobs(Headless(), ids, None, 2)


def test_clip_flags_only_where_the_clip_is_active():
    """A token counts as clipped only where its gradient is zeroed: outside the band on the side its advantage
    pushes towards, with A != 0; at a ratio exactly on a bound (ε = 0, on-policy) the gradient still flows."""
    rho = t([[0.5, 1.5, 0.5, 1.5, 0.5, 1.5]])
    adv = t([[0.0, 0.0, 0.5, -0.5, -0.5, 0.5]])
    logp = rho.log().requires_grad_(True)
    loss, stats = clipped_surrogate(logp, torch.zeros_like(logp), adv, 0.2, 0.2)
    assert stats.low_clipped.tolist() == [[False, False, False, False, True, False]]
    assert stats.high_clipped.tolist() == [[False, False, False, False, False, True]]
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, -0.25, 0.75, 0.0, 0.0], rel=1e-12)
    on = t([[-1.0, -2.0]]).requires_grad_(True)
    loss, stats = clipped_surrogate(on, on.detach(), t([-1.0]), 0.0, 0.0)  # ρ = 1 = 1 - 0 = 1 + 0
    assert not stats.low_clipped.any() and not stats.high_clipped.any()
    loss.sum().backward()
    assert on.grad.tolist() == [[1.0, 1.0]]
    _, stats = clipped_surrogate(on.detach(), on.detach(), t([1.0]), 0.0, 0.0)
    assert not stats.high_clipped.any()


def test_clipped_surrogate_defaults_and_loss_dtype():
    """Default clip 0.2 on both sides; float64 advantages do not turn a float32 loss into float64."""
    logp = torch.tensor([[1.3, 0.7, 1.1]]).log()
    loss, _ = clipped_surrogate(logp, torch.zeros_like(logp), t([[1.0, -1.0, 1.0]]))
    assert loss.dtype == torch.float32
    assert loss[0].tolist() == pytest.approx([-1.2, 0.8, -1.1], rel=1e-6)


# ------------------------------------------------------------------------------------------------ teacher inputs
def _teacher_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["teacher"]))


TEACHER_RECORDS = [
    {"problem": "What is 2 + 3?", "images": [], "text_view": None},  # text-only: the problem itself
    {"problem": "How many shapes?", "has_image": True, "text_view": "A red square and a blue circle. How many?"},
    {"problem": "Which colour?", "has_image": True, "text_view": None},  # an image the teacher cannot see
]


def _teacher_prompt_ids(tok, instruction: str) -> list[list[int]]:
    """Each record's teacher prompt by hand: its text view (or problem) and the instruction as one user turn of
    the teacher's chat template; the bare problem where the teacher has no view. No special tokens added."""
    out = []
    for r in TEACHER_RECORDS:
        view = r["text_view"] or (None if r.get("has_image") else r["problem"])
        content = f"{view}\n{instruction}" if view else r["problem"]
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def test_teacher_inputs_by_hand(tiny_models):
    """Left-padded teacher prompts (one per record, repeated G times), then the student's completion ids; the
    completion column, the availability flags, a custom instruction, and the rows of a micro-batch."""
    from vold_pl.rl.teacher import build_teacher_inputs, teacher_rows

    tok, G = _teacher_tokenizer(tiny_models), 2
    comp = torch.arange(6 * 4).reshape(6, 4) + 10  # [N, L] completion ids
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    for instruction in (None, "Answer briefly."):
        kw = {} if instruction is None else {"instruction": instruction}
        from vold_pl.prompts import DEFAULT_INSTRUCTION

        prompts = _teacher_prompt_ids(tok, instruction or DEFAULT_INSTRUCTION)
        S = max(len(p) for p in prompts)
        tin = build_teacher_inputs(tok, TEACHER_RECORDS, comp, cmask, G, **kw)
        assert tin.completion_start == S and tin.input_ids.shape == (6, S + 4)
        for i in range(6):
            p = prompts[i // G]
            assert tin.input_ids[i].tolist() == [tok.pad_token_id] * (S - len(p)) + p + comp[i].tolist()
            assert tin.attention_mask[i].tolist() == [0] * (S - len(p)) + [1] * len(p) + cmask[i].tolist()
        assert tin.available.tolist() == [True, True, True, True, False, False]
        sub = teacher_rows(tin, 1, 4, 2)
        assert torch.equal(sub.input_ids, tin.input_ids[1:4, : S + 2])
        assert torch.equal(sub.attention_mask, tin.attention_mask[1:4, : S + 2])
        assert sub.completion_start == S and sub.available.tolist() == [True, True, True]


def test_teacher_inputs_add_no_special_tokens_and_follow_the_completions_device(tiny_models):
    """A tokenizer that prepends a BOS when asked to: the prompt is the chat template's text only. Completions on
    another device (meta stands in for an accelerator): the teacher's inputs go there too."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from vold_pl.prompts import DEFAULT_INSTRUCTION
    from vold_pl.rl.teacher import build_teacher_inputs

    tok = copy.deepcopy(_teacher_tokenizer(tiny_models))
    bos = tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    assert tok("x")["input_ids"][0] == tok.convert_tokens_to_ids(bos)  # the BOS is really added by default
    comp, cmask = torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long)
    tin = build_teacher_inputs(tok, TEACHER_RECORDS, comp, cmask, 1)
    for i, p in enumerate(_teacher_prompt_ids(tok, DEFAULT_INSTRUCTION)):
        row = tin.input_ids[i, : tin.completion_start][tin.attention_mask[i, : tin.completion_start].bool()]
        assert row.tolist() == p
    meta = build_teacher_inputs(tok, TEACHER_RECORDS, comp.to("meta"), cmask.to("meta"), 1)
    assert {meta.input_ids.device.type, meta.attention_mask.device.type, meta.available.device.type} == {"meta"}


# ---------------------------------------------------------------------- scoring a rollout, each prompt once
def _prompts_and_completions(G=2):
    torch.manual_seed(13)
    prompt_ids = torch.randint(0, 300, (2, 5))
    prompt_mask = torch.ones(2, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    comp = torch.randint(0, 300, (2 * G, 4))
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    return prompt_ids, prompt_mask, comp, cmask


def _repeated(model, prompt_ids, prompt_mask, comp, cmask, G, **kw):
    ids = torch.cat([prompt_ids.repeat_interleave(G, 0), comp], 1)
    attn = torch.cat([prompt_mask.repeat_interleave(G, 0), cmask], 1)
    return model_token_logprobs(model, ids, attn, prompt_ids.size(1), **kw)


def _backbone_rows(model):
    """The batch size of every backbone forward (the prompt pass runs B rows, the completion pass N)."""
    rows = []
    handle = model.model.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    return rows, handle


def test_shared_prefix_defaults_values_and_errors():
    from vold_pl.rl.logprobs import shared_prefix_token_logprobs

    model, G = _tiny_qwen2(), 2
    p, pm, c, cm = _prompts_and_completions(G)
    with torch.no_grad():
        out = shared_prefix_token_logprobs(model, p, pm, c, cm, G)  # T = 1, no entropy: a tensor
        ref = _repeated(model, p, pm, c, cm, G)
        assert isinstance(out, torch.Tensor) and torch.allclose(out, ref, atol=1e-5)
        # a text model ignores image inputs it is handed
        assert torch.allclose(shared_prefix_token_logprobs(model, p, pm, c, cm, G, pixel_values=torch.ones(3)), ref,
                              atol=1e-5)
    with pytest.raises(ValueError, match=r"^3 completion rows for 2 prompts x G=2$"):
        shared_prefix_token_logprobs(model, p, pm, c[:3], cm[:3], G)


@pytest.mark.parametrize("train, grad, ckpt, L, cached", [
    (False, False, False, 4, True),  # scoring under no_grad: prompts once
    (True, True, False, 4, True),  # training forward without checkpointing: prompts once
    (True, True, True, 4, True),  # gradient checkpointing in training: recompute-safe cache, prompts once
    (True, False, True, 4, True),  # checkpointing on but no autograd: prompts once
    (False, True, True, 4, True),  # checkpointing configured, eval mode: prompts once
    (False, False, False, 1, True),  # one completion token: still prompts once
])
def test_shared_prefix_runs_prompts_once(train, grad, ckpt, L, cached):
    from vold_pl.rl.logprobs import shared_prefix_token_logprobs

    model, G = _tiny_qwen2(), 2
    p, pm, c, cm = _prompts_and_completions(G)
    c, cm = c[:, :L], cm[:, :L]
    model.train(train)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows, handle = _backbone_rows(model)
    try:
        with torch.set_grad_enabled(grad):
            out = shared_prefix_token_logprobs(model, p, pm, c, cm, G)
    finally:
        handle.remove()
    assert rows == ([2, 4] if cached else [4])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(out.detach(), _repeated(model, p, pm, c, cm, G), atol=1e-5)


def test_shared_prefix_without_a_backbone_takes_the_repeated_path():
    from vold_pl.rl.logprobs import shared_prefix_token_logprobs

    model, G = _tiny_qwen2(), 2

    class NoBackbone(nn.Module):  # no `.model`: scored through output_hidden_states
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def get_output_embeddings(self):
            return model.lm_head

        def forward(self, **kw):
            return self.inner(**kw)

    p, pm, c, cm = _prompts_and_completions(G)
    with torch.no_grad():
        out = shared_prefix_token_logprobs(NoBackbone(), p, pm, c, cm, G)
        assert torch.allclose(out, _repeated(model, p, pm, c, cm, G), atol=1e-5)


def test_concat_prompt_completion_dtypes_and_types():
    from vold_pl.rl.logprobs import concat_prompt_completion

    p, pm = torch.tensor([[0, 7, 8]]), torch.tensor([[False, True, True]])
    c, cm = torch.tensor([[9, 3]]), torch.tensor([[1, 0]])
    ids, attn, mm = concat_prompt_completion(p, pm, c, cm)
    assert ids.tolist() == [[0, 7, 8, 9, 3]] and mm is None
    assert attn.dtype == torch.bool and attn.tolist() == [[False, True, True, True, False]]  # the prompt's dtype
    types = torch.tensor([[0, 1, 0]], dtype=torch.int32)
    _, _, mm = concat_prompt_completion(p, pm, c, cm, types)
    assert mm.dtype == torch.int32 and mm.tolist() == [[0, 1, 0, 0, 0]]  # generated tokens are text (type 0)


def test_rollout_model_inputs_hand_extras_to_vision_models_only():
    from vold_pl.rl.logprobs import rollout_model_inputs
    from vold_pl.rl.rollout_types import Rollout

    ro = Rollout(prompt_ids=torch.tensor([[1, 2]]), prompt_mask=torch.ones(1, 2, dtype=torch.long),
                 completion_ids=torch.tensor([[3]]), completion_mask=torch.ones(1, 1, dtype=torch.long), texts=["x"],
                 group_size=1, clipped=torch.tensor([False]),
                 extra={"pixel_values": torch.ones(2), "mm_token_type_ids": torch.tensor([[0, 1]])})
    ids, attn, extra = rollout_model_inputs(ro, vision=False)
    assert ids.tolist() == [[1, 2, 3]] and attn.tolist() == [[1, 1, 1]] and extra == {}
    _, _, extra = rollout_model_inputs(ro, vision=True)
    assert extra.keys() == {"pixel_values", "mm_token_type_ids"}
    assert extra["mm_token_type_ids"].tolist() == [[0, 1, 0]] and ro.extra["mm_token_type_ids"].shape == (1, 2)


def test_rollout_scoring_passes_chunking_and_recompute_to_the_head():
    """rollout_token_logprobs -> shared_prefix_token_logprobs -> the head: N·L = 16 positions in slabs of 3 (6
    slabs), each run again in backward with checkpoint_chunks; the repeated path without ``prompts`` the same."""
    from vold_pl.rl.logprobs import rollout_token_logprobs
    from vold_pl.rl.rollout_types import Rollout

    model, G = _tiny_qwen2(), 2
    head = _CountingHead(32, 300)
    head.lin.weight = model.lm_head.weight
    model.lm_head = head
    p, pm, c, cm = _prompts_and_completions(G)
    ro = Rollout(prompt_ids=p.repeat_interleave(G, 0), prompt_mask=pm.repeat_interleave(G, 0), completion_ids=c,
                 completion_mask=cm, texts=[""] * 4, group_size=G, clipped=torch.zeros(4, dtype=torch.bool),
                 prompts={"input_ids": p, "attention_mask": pm})
    for prompts in (ro.prompts, None):
        ro.prompts = prompts
        for ckpt, calls in ((True, 12), (False, 6)):
            head.calls = 0
            rollout_token_logprobs(model, ro, chunk_size=3, checkpoint_chunks=ckpt).sum().backward()
            assert head.calls == calls, (prompts is None, ckpt)
        head.calls = 0
        rollout_token_logprobs(model, ro).sum().backward()  # defaults: one slab, no recompute
        assert head.calls == 1
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ non-finite frozen scores outside the mask

def _poisoned_step(mode: str, estimator: str, frozen: str, bad: float | None, on_policy: bool):
    """One ``opd_grpo_loss`` backward whose ``frozen`` scores (teacher log-probs / logits, reference log-probs)
    hold ``bad`` at every padded position (``None``: finite values there). Returns loss, grads, metrics."""
    from vold_pl.rl.objective import Experience, LossSettings, opd_grpo_loss

    g = torch.Generator().manual_seed(0)
    N, L, V = 4, 6, 9
    mask = torch.ones(N, L)  # [N, L]
    mask[0, 3:], mask[2, 1:], mask[3, 5:] = 0, 0, 0
    pad = mask == 0
    logp = (-torch.rand(N, L, generator=g) - 0.1).requires_grad_(True)  # [N, L]
    student_logits = torch.randn(N, L, V, generator=g).requires_grad_(True)  # [N, L, V]
    scores = {"teacher_logp": -torch.rand(N, L, generator=g) - 0.1, "ref_logp": -torch.rand(N, L, generator=g) - 0.1,
              "teacher_logits": torch.randn(N, L, V, generator=g)}
    if bad is not None:
        scores[frozen][pad] = bad
    exp = Experience(logp=logp, old_logp=None if on_policy else logp.detach() - 0.05,
                     advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), mask=mask, success=torch.tensor([0., 1., 0., 0.]),
                     student_logits=student_logits, **scores)
    cfg = LossSettings(lam=0.5, mode=mode, estimator=estimator, aggregation="token", beta_ref=0.1)
    loss, metrics = opd_grpo_loss(exp, cfg)
    loss.backward()
    return loss.detach(), logp.grad, student_logits.grad, metrics


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("mode,estimator,frozen,on_policy", [
    ("loss", "k1", "teacher_logp", True), ("loss", "k1", "teacher_logp", False),
    ("advantage", "k1", "teacher_logp", True), ("advantage", "k1", "teacher_logp", False),
    ("loss", "k1", "ref_logp", False), ("advantage", "k1", "ref_logp", False),
    ("loss", "full", "teacher_logits", True), ("loss", "full", "teacher_logits", False),
])
def test_nonfinite_frozen_scores_at_masked_positions_never_reach_the_gradient(mode, estimator, frozen, on_policy,
                                                                              bad):
    loss0, g0, s0, m0 = _poisoned_step(mode, estimator, frozen, None, on_policy)
    loss1, g1, s1, m1 = _poisoned_step(mode, estimator, frozen, bad, on_policy)
    assert torch.isfinite(g1).all() and torch.equal(g0, g1)
    if estimator == "full":
        assert torch.isfinite(s1).all() and torch.equal(s0, s1)
    assert torch.equal(loss0, loss1)
    assert {k: float(v) for k, v in m0.items()} == {k: float(v) for k, v in m1.items()}


def test_nonfinite_frozen_score_on_a_real_token_still_shows():
    """Only padded positions are replaced: a teacher that cannot score a real completion token makes the loss
    non-finite, so the step is skipped and counted instead of training on a silently changed target."""
    from vold_pl.rl.objective import Experience, LossSettings, opd_grpo_loss

    logp = torch.full((2, 3), -1.0, requires_grad=True)  # [N, L]
    teacher = torch.full((2, 3), -1.0)
    teacher[0, 0] = float("-inf")
    exp = Experience(logp=logp, old_logp=None, advantages=torch.tensor([1.0, -1.0]), mask=torch.ones(2, 3),
                     teacher_logp=teacher, success=torch.zeros(2))
    loss, _ = opd_grpo_loss(exp, LossSettings(lam=0.5, mode="loss", aggregation="token"))
    assert not torch.isfinite(loss)
