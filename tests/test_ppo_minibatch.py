"""Rollout batch != update batch (``grpo.ppo_mini_batch_size``): one mini-batch is today's step exactly; k
mini-batches are k optimizer steps computed here by hand (π_old from the rollout-time weights, each step's
loss normalised by its own counts, AdamW), on scripted rollouts through a real Lightning fit."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_microbatch import SCRIPT_IMAGE, SCRIPT_TEXT, _records
from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rl.logprobs import rollout_token_logprobs
from vold_pl.rl.losses import Totals
from vold_pl.rl.objective import Experience, opd_grpo_loss
from tests.scripted_engine import ScriptedEngine
from vold_pl.rl.rollout_types import SamplingConfig, rollout_rows

G, LR = 4, 1e-3


def _module(tiny_models, records, mini: int) -> OPDGRPOModule:
    m = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
                      optim=OptimConfig(lr=LR, schedule="constant", weight_decay=0.01),
                      grpo=GRPOConfig(num_generations=G, loss_aggregation="token", ppo_mini_batch_size=mini),
                      opd=OPDConfig(lam=0.5, gate="all", estimator="k1"), sampling=SamplingConfig(max_new_tokens=48),
                      max_grad_norm=0.0, export=False, log_completions_every_n_steps=0, seed=0)
    m.rollout_engine = ScriptedEngine(m.tokenizer, {records[0].id: SCRIPT_TEXT, records[1].id: SCRIPT_IMAGE})
    return m


def _fit(module, rows, steps: int, tmp_path) -> dict[str, torch.Tensor]:
    loader = DataLoader(rows, batch_size=2, shuffle=False, collate_fn=PromptCollator(module.processor))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


@pytest.fixture(scope="module")
def setup(tiny_models, synth_data):
    records = _records(synth_data)
    ds = to_dataset(records)
    return records, [ds[i] for i in range(2)]


def test_one_mini_batch_is_todays_step(tiny_models, setup, tmp_path, one_thread):
    records, rows = setup
    today = _fit(_module(tiny_models, records, 0), rows, 1, tmp_path / "a")
    one = _fit(_module(tiny_models, records, 2), rows, 1, tmp_path / "b")  # 2 prompts per mini-batch: the whole batch
    assert all(torch.equal(today[k], one[k]) for k in today)


def test_k_mini_batches_are_k_hand_computed_steps(tiny_models, setup, tmp_path, one_thread):
    records, rows = setup
    module = _module(tiny_models, records, 1)  # 2 prompts: 2 optimizer steps per rollout batch
    ref = _module(tiny_models, records, 1)
    ref.configure_model()
    model = copy.deepcopy(ref.model).train()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = _fit(module, rows, 2, tmp_path)

    # By hand: the rollout, rewards, advantages and teacher scores of the batch (no weights involved) ...
    batch = PromptCollator(ref.processor)(rows)
    exp = ref.build_experience(batch).experience
    ro = ref.rollout_engine.generate(ref.model, batch, G, ref.sampling)
    T = ref.sampling.temperature
    with torch.no_grad():  # π_old: the weights that sampled (before either step)
        old = rollout_token_logprobs(model, ro, temperature=T)  # [8, L]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    for s, e in ((0, G), (G, 2 * G)):  # ... then one optimizer step per prompt's group
        sub = rollout_rows(ro, s, e)
        w = sub.completion_ids.size(1)
        logp = rollout_token_logprobs(model, sub, temperature=T)  # [4, w] under the current weights
        mask = sub.completion_mask.float()
        mb = Experience(logp=logp, old_logp=old[s:e, :w], advantages=exp.advantages[s:e], mask=mask,
                        teacher_logp=exp.teacher_logp[s:e, :w], success=exp.success[s:e],
                        teacher_available=exp.teacher_available[s:e])
        loss, _ = opd_grpo_loss(mb, ref.loss_settings, Totals(rows=float(e - s), tokens=float(mask.sum())))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [k for k in init if not torch.equal(init[k], trained[k])]
    assert moved, "training changed nothing"
    num = sum(float((trained[k] - p.detach()).double().pow(2).sum()) for k, p in model.named_parameters())
    den = sum(float((trained[k] - init[k]).double().pow(2).sum()) for k in init)
    assert (num / den) ** 0.5 < 1e-4, (num / den) ** 0.5  # the update, not just the weights, agrees
