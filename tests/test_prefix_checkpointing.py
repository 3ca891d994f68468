"""Shared-prefix scoring under activation checkpointing: each prompt and image is encoded once per group in
the forward AND in the backward's recompute, and the values and gradients are those of the G-times repeated
forward (checkpointed the same way)."""

from __future__ import annotations

import pytest
import torch

from tests.test_rollout import _student, _text_llm, mixed_batch, processor, text_batch  # noqa: F401
from vold_pl.rl.logprobs import rollout_model_inputs, rollout_token_logprobs
from vold_pl.rl.cached_sampler import CachedSamplingEngine
from vold_pl.rl.rollout_types import SamplingConfig

G = 3


def _rollout(model, tok, batch):
    torch.manual_seed(3)
    ro = CachedSamplingEngine(tok).generate(model, batch, G, SamplingConfig(max_new_tokens=10, temperature=0.8))
    assert len(set(ro.completion_mask.sum(-1).tolist())) >= 2  # right padding inside the completions
    return ro


def _vision_rows(model) -> tuple[list[int], list]:
    """Patch rows through each vision block's MLP (a submodule call inside the checkpointed block: counted in
    the forward and again in the backward's recompute)."""
    rows: list[int] = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
             for b in model.model.visual.blocks]
    return rows, hooks


def _loss_and_grads(model, ro, shared: bool):
    from vold_pl.models.inputs import base_model
    from vold_pl.rl.logprobs import model_token_logprobs

    model.zero_grad()
    if shared:
        logp = rollout_token_logprobs(model, ro, temperature=0.8)
    else:  # the G-times repeated prompt
        vision = getattr(base_model(model).config, "vision_config", None) is not None
        ids, attn, extra = rollout_model_inputs(ro, vision)
        logp = model_token_logprobs(model, ids, attn, ro.prompt_ids.size(1), temperature=0.8,
                                    blocked_ids=ro.blocked_ids, **extra)
    m = ro.completion_mask.float()
    w = torch.linspace(0.5, 1.5, m.numel()).view_as(m)  # unequal weights per token: a generic loss
    (logp * m * w).sum().backward()
    return (logp * m).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["vlm", "llm"])
def test_checkpointed_shared_prefix_equals_repeated_prompt(tiny_models, processor, mixed_batch, text_batch,  # noqa: F811
                                                           kind):
    tok = processor.tokenizer
    model, batch = ((_student(tiny_models, processor, bias=3.0), mixed_batch) if kind == "vlm"
                    else (_text_llm(processor, bias=3.0), text_batch))
    ro = _rollout(model, tok, batch)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = _loss_and_grads(model, ro, shared=False)
    out = _loss_and_grads(model, ro, shared=True)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    assert out[1].keys() == ref[1].keys() and len(ref[1]) > 0
    for name in ref[1]:
        torch.testing.assert_close(out[1][name], ref[1][name], atol=1e-5, rtol=1e-4, msg=name)
    # The flag that keeps the cache under checkpointing is set only for the call.
    assert not any("_can_checkpoint_with_cache" in vars(m) for m in model.modules())


def test_checkpointed_step_encodes_each_image_once_per_group(tiny_models, processor, mixed_batch):  # noqa: F811
    """Forward + backward under checkpointing: every vision block runs on the batch's patches twice (forward
    and recompute) with the shared prefix, on G times as many with the repeated prompt."""
    model = _student(tiny_models, processor, bias=3.0)
    ro = _rollout(model, processor.tokenizer, mixed_batch)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_patches = mixed_batch["pixel_values"].shape[0]
    depth = len(model.model.visual.blocks)
    counts = {}
    for shared in (True, False):
        rows, hooks = _vision_rows(model)
        calls: list[int] = []
        h = model.model.visual.register_forward_hook(lambda m, args, out, calls=calls: calls.append(args[0].shape[0]))
        try:
            _loss_and_grads(model, ro, shared)
        finally:
            for hk in hooks + [h]:
                hk.remove()
        counts[shared] = (calls, sum(rows))
    assert counts[True] == ([n_patches], 2 * depth * n_patches)  # one tower call; blocks: forward + recompute
    assert counts[False] == ([G * n_patches], 2 * depth * G * n_patches)


def test_opd_grpo_step_with_checkpointing_encodes_each_image_once(tiny_models, synth_data):
    """One OPD-GRPO training step (``gradient_checkpointing: true``): the policy's vision tower sees each
    prompt's image once per step (forward), its blocks twice (forward + recompute), not G times."""
    from tests.test_microbatch import SCRIPT_IMAGE, SCRIPT_TEXT, _records
    from vold_pl.data.collate import PromptCollator
    from vold_pl.data.sources import to_dataset
    from vold_pl.models.factory import ModelSpec
    from vold_pl.modules.base import OptimConfig
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
    from tests.scripted_engine import ScriptedEngine

    records = _records(synth_data)
    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), optim=OptimConfig(lr=1e-3),
                           grpo=GRPOConfig(num_generations=4, loss_aggregation="token", beta_ref=0.0),
                           opd=OPDConfig(lam=0.0), sampling=SamplingConfig(max_new_tokens=48), export=False,
                           log_completions_every_n_steps=0, gradient_checkpointing=True)
    module.configure_model()
    module.model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in module.model.modules())
    module.rollout_engine = ScriptedEngine(module.tokenizer, {records[0].id: SCRIPT_TEXT, records[1].id: SCRIPT_IMAGE})
    batch = PromptCollator(module.processor)([to_dataset(records)[i] for i in range(2)])
    n_patches = batch["pixel_values"].shape[0]  # one image prompt, one text prompt
    rows, hooks = _vision_rows(module.model)
    calls: list[int] = []
    hooks.append(module.model.model.visual.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0])))
    try:
        step = module.build_experience(batch)
        totals, world = module._totals(step.experience)
        module.backward_micro_batches(step, totals, world, backward=torch.Tensor.backward)  # every backward
    finally:
        for h in hooks:
            h.remove()
    assert sum(calls) == n_patches  # 2 prompts x G = 8 rows, the image encoded once
    assert sum(rows) == 2 * len(module.model.model.visual.blocks) * n_patches
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.model.visual.parameters())
