"""The full-vocabulary OPD KL in bounded memory (``opd.estimator: full``): slab-by-slab values and gradients
equal the whole-logits formula; the trainer's step (teacher scored per micro-batch, each teacher prompt once per
group) has the loss and gradient of the step built from the whole ``[N, L, V]`` logits of both models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_microbatch import SCRIPT_IMAGE, SCRIPT_TEXT, _records
from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rl.full_kl import sliced_full_kl
from vold_pl.rl.logprobs import mask_blocked, rollout_model_inputs
from vold_pl.rl.objective import opd_grpo_loss
from tests.scripted_engine import ScriptedEngine
from vold_pl.rl.rollout_types import SamplingConfig
from vold_pl.rl.teacher import build_teacher_inputs, teacher_completion_logits


def _kl_by_hand(s_logits, t_logits, top_k=None):
    """sum_v p_s (log p_s - log p_t), written out (top-k: both renormalised on the student's top k)."""
    s, t = F.log_softmax(s_logits.double(), -1), F.log_softmax(t_logits.double(), -1)
    if top_k:
        idx = s.topk(top_k, -1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
        s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    p = s.exp()
    return (p * torch.where(p > 0, s - t, torch.zeros_like(s))).sum(-1)


@pytest.mark.parametrize("top_k", [None, 5])
def test_sliced_kl_equals_whole_logits_formula(top_k):
    g = torch.Generator().manual_seed(0)
    n, l, H, Ht, V = 3, 7, 16, 24, 50
    hs = torch.randn(n, l, H, generator=g, requires_grad=True)
    ht = torch.randn(n, l, Ht, generator=g)
    head_s = torch.nn.Linear(H, V, bias=False)
    head_t = torch.nn.Linear(Ht, V, bias=False)
    blocked, T = (3, 11), 0.7
    kl = sliced_full_kl(hs, head_s, ht, head_t, T, blocked, top_k, chunk_size=4)  # 21 positions: 6 slabs
    s_logits = mask_blocked(head_s(hs) / T, blocked)
    with torch.no_grad():
        t_logits = mask_blocked(head_t(ht) / T, blocked)
    ref = _kl_by_hand(s_logits, t_logits, top_k)
    torch.testing.assert_close(kl.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.rand(n, l, generator=g)
    (gh, gw) = torch.autograd.grad((kl * w).sum(), (hs, head_s.weight))
    (rh, rw) = torch.autograd.grad((ref.float() * w).sum(), (hs, head_s.weight))
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-4)
    assert head_t.weight.grad is None  # the teacher is a constant


def test_non_finite_teacher_outside_the_mask_never_reaches_the_gradient():
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    ht = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ht[0, 3:] = float("nan")  # the teacher scoring padding badly
    head_s, head_t = torch.nn.Linear(8, 30, bias=False), torch.nn.Linear(8, 30, bias=False)
    kl = sliced_full_kl(hs, head_s, ht, head_t, chunk_size=3, mask=mask)
    assert torch.isfinite(kl).all() and (kl[0, 3:] == 0).all() and (kl[mask.bool()] > 0).all()
    (kl * mask).sum().backward()
    assert torch.isfinite(hs.grad).all() and torch.isfinite(head_s.weight.grad).all()
    ref = sliced_full_kl(hs.detach()[1:], head_s, ht[1:], head_t, chunk_size=3)  # the unpadded row, alone
    torch.testing.assert_close(kl[1:].detach(), ref.detach())


@pytest.fixture(scope="module")
def full_module(tiny_models, synth_data):
    records = _records(synth_data)
    module = OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
        optim=OptimConfig(lr=1e-3), grpo=GRPOConfig(num_generations=4, loss_aggregation="token", beta_ref=0.0,
                                                    micro_batch_size=4),
        opd=OPDConfig(lam=0.5, gate="all", estimator="full", mode="loss"), sampling=SamplingConfig(max_new_tokens=48,
                                                                                                  temperature=0.9),
        export=False, log_completions_every_n_steps=0, logprob_chunk_size=16)
    module.configure_model()
    module.model.train()
    module.rollout_engine = ScriptedEngine(module.tokenizer, {records[0].id: SCRIPT_TEXT, records[1].id: SCRIPT_IMAGE})
    batch = PromptCollator(module.processor)([to_dataset(records)[i] for i in range(2)])
    return module, batch


@pytest.mark.parametrize("estimator,horizon", [("full", "all"), ("full", "first_divergence"),
                                               ("full", "at_divergence"), ("forward", "at_divergence")])
def test_step_equals_the_whole_logits_step(full_module, estimator, horizon):
    """Loss and gradient of the trainer's micro-batched, slab-by-slab step = one step on the whole batch's
    student and teacher logits ``[N, L, V]`` (teacher prompts repeated G times), built here by hand. With
    ``horizon: first_divergence`` the slabs also give the teacher's token log-probs that find the divergence;
    the reference gathers them from the whole teacher logits."""
    from dataclasses import replace

    from vold_pl.rl.logprobs import token_logprobs_from_logits

    module, batch = full_module
    saved = module.opd
    step = module.build_experience(batch)
    assert step.experience.teacher_logits is None and step.teacher_inputs is not None  # nothing [N, L, V] kept
    assert len(step.plan) == 2  # a micro-batch per group
    ro, T = step.rollout, module.sampling.temperature
    ids, attn, extra = rollout_model_inputs(ro, vision=True)
    P = ro.prompt_ids.size(1)
    tin = build_teacher_inputs(module.teacher_tokenizer, batch["records"], ro.completion_ids, ro.completion_mask, 4)
    t_logits = teacher_completion_logits(module.teacher, tin, T, ro.blocked_ids)  # [N, L, V]
    t_logp = token_logprobs_from_logits(t_logits, ro.completion_ids)  # [N, L]
    mask = ro.completion_mask.bool()  # [N, L]
    if horizon != "all":  # a threshold that cuts rollouts in their middle: the median k1 of the sampled tokens
        with torch.no_grad():
            s_now = mask_blocked(module.model(input_ids=ids, attention_mask=attn, use_cache=False, **extra)
                                 .logits[:, P - 1 : -1].float() / T, ro.blocked_ids)  # [N, L, V]
        k1 = token_logprobs_from_logits(s_now, ro.completion_ids) - t_logp  # [N, L]
        module.opd = replace(saved, estimator=estimator, horizon=horizon, divergence_nats=float(k1[mask].median()))
    try:
        module.model.zero_grad(set_to_none=True)
        totals, world = module._totals(step.experience)
        loss, metrics, _ = module.backward_micro_batches(step, totals, world, backward=torch.Tensor.backward)
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}

        module.model.zero_grad(set_to_none=True)
        s_logits = mask_blocked(module.model(input_ids=ids, attention_mask=attn, use_cache=False, **extra)
                                .logits[:, P - 1 : -1].float() / T, ro.blocked_ids)  # [N, L, V]
        logp = token_logprobs_from_logits(s_logits, ro.completion_ids)  # already temperature-scaled
        exp = replace(step.experience, logp=logp, student_logits=s_logits, teacher_logits=t_logits,
                      teacher_logp=t_logp)
        ref_loss, ref_metrics = opd_grpo_loss(exp, module.loss_settings, totals)
        ref_loss.backward()
    finally:
        module.opd = saved
    assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
    kl_name = "opd/forward_kl" if estimator == "forward" else "opd/reverse_kl"
    assert float(metrics[kl_name]) == pytest.approx(float(ref_metrics[kl_name]), rel=1e-4)
    assert float(ref_metrics[kl_name]) > 1e-3  # the KL term is really there
    share = float(metrics["opd/frac_tokens"])
    assert share == pytest.approx(float(ref_metrics["opd/frac_tokens"]))
    assert share == 1.0 if horizon == "all" else 0.0 < share < 0.9  # the horizon cut the rollouts
    num = sum(float((grads[k] - p.grad).pow(2).sum()) for k, p in module.model.named_parameters() if k in grads)
    den = sum(float(p.grad.pow(2).sum()) for k, p in module.model.named_parameters() if k in grads)
    assert (num / den) ** 0.5 < 1e-5


def test_teacher_prompt_runs_once_per_group(full_module):
    module, batch = full_module
    rows: list[tuple[int, int]] = []
    emb = module.teacher.model.embed_tokens
    h = emb.register_forward_hook(lambda m, a, o: rows.append(tuple(a[0].shape)))
    try:
        step = module.build_experience(batch)
        totals, world = module._totals(step.experience)
        module.backward_micro_batches(step, totals, world, backward=lambda loss: None)
    finally:
        h.remove()
    # Per micro-batch (one group of G = 4): the teacher prompt on 1 row, then the 4 completions on its cache.
    assert [r[0] for r in rows] == [1, 4, 1, 4], rows


def test_k1_teacher_scores_run_each_teacher_prompt_once(full_module):
    """k1: the step's teacher log-probs equal ``teacher_token_logprobs`` on the G-times repeated teacher prompts,
    and the teacher embeds each prompt once per group (1 row, then the G completions)."""
    from dataclasses import replace as dc_replace

    from vold_pl.rl.teacher import teacher_token_logprobs

    module, batch = full_module
    saved = module.opd
    module.opd = dc_replace(saved, estimator="k1")
    rows: list[int] = []
    emb = module.teacher.model.embed_tokens
    h = emb.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        step = module.build_experience(batch)
    finally:
        h.remove()
        module.opd = saved
    assert rows == [1, 4, 1, 4], rows
    ro = step.rollout
    tin = build_teacher_inputs(module.teacher_tokenizer, batch["records"], ro.completion_ids, ro.completion_mask, 4)
    ref = teacher_token_logprobs(module.teacher, tin, module.sampling.temperature,
                                 blocked_ids=ro.blocked_ids)  # [N, L]
    m = ro.completion_mask.bool()
    torch.testing.assert_close(step.experience.teacher_logp[m], ref[m], atol=1e-5, rtol=0)
