"""DAPO's dynamic sampling (``grpo.dynamic_sampling``): a step trains on groups whose rewards differ, gathered
from as many generation batches as it takes (at most ``grpo.max_gen_batches``), and its update is the update of
an ordinary step on exactly those groups.

Scripted rollouts make each prompt's rewards known in advance: ``A`` prompts get completions of differing rewards,
``U`` prompts one completion G times (equal rewards, zero advantage).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.scripted_engine import ScriptedEngine
from tests.test_microbatch import SCRIPT_IMAGE, SCRIPT_TEXT
from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rewards.functions import RewardOutput
from vold_pl.rl.dynamic_sampling import GroupFilter, Sampled
from vold_pl.rl.logprobs import rollout_token_logprobs
from vold_pl.rl.rollout_types import Rollout, SamplingConfig, concat_rollouts, select_groups

G, LR = 4, 1e-3
UNIFORM = ["<answer> 5 </answer>"]  # the same completion G times: equal rewards


@pytest.fixture(scope="module")
def prompts(synth_data):
    """Two informative prompts (a text one and an image one) and two uniform ones, as dataset rows by name."""
    recs_t, _ = read_records(synth_data["train_text"])
    recs, _ = read_records(synth_data["train"])
    text = [r for r in recs_t if not r.images][:2]
    image = [r for r in recs if r.images and r.text_view][:2]
    named = {"A_text": text[0], "A_image": image[0], "U_text": text[1], "U_image": image[1]}
    ds = to_dataset(list(named.values()))
    return named, dict(zip(named, (ds[i] for i in range(len(named)))))


def _module(tiny_models, named, **grpo) -> OPDGRPOModule:
    m = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
                      optim=OptimConfig(lr=LR, schedule="constant"),
                      grpo=GRPOConfig(num_generations=G, loss_aggregation="token", **grpo),
                      opd=OPDConfig(lam=0.5, gate="failed", estimator="k1"), sampling=SamplingConfig(max_new_tokens=48),
                      max_grad_norm=0.0, export=False, log_completions_every_n_steps=0, seed=0)
    script = {"A_text": SCRIPT_TEXT, "A_image": SCRIPT_IMAGE, "U_text": UNIFORM, "U_image": UNIFORM}
    m.rollout_engine = ScriptedEngine(m.tokenizer, {named[k].id: v for k, v in script.items()})
    return m


def _fit(module, rows: list[dict], tmp_path) -> tuple[dict[str, torch.Tensor], dict]:
    """One optimizer step of a real Lightning fit over ``rows`` in order, 2 prompts per data batch."""
    loader = DataLoader(rows, batch_size=2, shuffle=False, collate_fn=PromptCollator(module.processor))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 1
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    return weights, {k: float(v) for k, v in trainer.callback_metrics.items()}


def _update_distance(a: dict, b: dict, init: dict) -> float:
    """‖a − b‖ / ‖b − init‖: how far apart two one-step updates from the same weights are."""
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    den = sum(float((b[k] - init[k]).double().pow(2).sum()) for k in b)
    assert den > 0, "the step changed nothing"
    return (num / den) ** 0.5


@pytest.mark.parametrize("case", ["refilled", "topped_up"])
def test_a_dynamic_step_is_the_plain_step_on_its_groups(tiny_models, prompts, tmp_path, one_thread, case):
    """refilled: batch 1 = [A_text, U_text] keeps one group, batch 2 = [U_image, A_image] the second: the step is the
    plain step on [A_text, A_image]. topped_up: at max_gen_batches = 2 with one informative group, the last batch's
    dropped groups fill the step: [A_text] + [U_image]."""
    named, rows = prompts
    if case == "refilled":
        order, trained_on, cap = ["A_text", "U_text", "U_image", "A_image"], ["A_text", "A_image"], 4
    else:
        order, trained_on, cap = ["A_text", "U_text", "U_image", "U_text"], ["A_text", "U_image"], 2
    dynamic = _module(tiny_models, named, dynamic_sampling=True, max_gen_batches=cap)
    dynamic.configure_model()
    init = {n: p.detach().clone() for n, p in dynamic.model.named_parameters()}
    got, metrics = _fit(dynamic, [rows[k] for k in order], tmp_path / "dynamic")
    want, _ = _fit(_module(tiny_models, named), [rows[k] for k in trained_on], tmp_path / "plain")
    assert _update_distance(got, want, init) < 1e-4
    # ... and not the plain step on the first batch, which the update would be without dynamic sampling
    first, _ = _fit(_module(tiny_models, named), [rows[k] for k in order[:2]], tmp_path / "first")
    assert _update_distance(first, want, init) > 0.1
    assert metrics["train/num_gen_batches"] == 2
    assert metrics["train/frac_reward_zero_std"] == pytest.approx(0.5 if case == "refilled" else 0.75)


def test_joined_rollouts_score_as_their_parts(tiny_models, prompts, one_thread):
    """Groups picked from two rollouts of different prompt widths (text and image prompts) and joined: every row's
    log-probs under the policy are its own rollout's, and its images go with it."""
    named, rows = prompts
    module = _module(tiny_models, named)
    module.configure_model()
    collate = PromptCollator(module.processor)
    ro1 = module.rollout_engine.generate(module.model, collate([rows["A_text"], rows["U_text"]]), G, module.sampling)
    ro2 = module.rollout_engine.generate(module.model, collate([rows["U_image"], rows["A_image"]]), G,
                                         module.sampling)
    assert ro1.prompt_ids.size(1) != ro2.prompt_ids.size(1)
    pad = module.tokenizer.pad_token_id
    joined = concat_rollouts([select_groups(ro2, [1], pad), select_groups(ro1, [0, 1], pad)], pad)
    assert joined.num_rows == 3 * G and joined.group_size == G
    assert joined.texts == ro2.texts[G:] + ro1.texts
    T = module.sampling.temperature
    with torch.no_grad():
        parts = [rollout_token_logprobs(module.model, ro, temperature=T) for ro in (ro1, ro2)]  # [2G, L_k]
        whole = rollout_token_logprobs(module.model, joined, temperature=T)  # [3G, L]
    for rows_joined, part, rows_part in ((slice(0, G), parts[1], slice(G, 2 * G)), (slice(G, 3 * G), parts[0],
                                                                                       slice(0, 2 * G))):
        w = part.size(1)
        torch.testing.assert_close(whole[rows_joined, :w], part[rows_part], atol=2e-5, rtol=1e-4)
        assert not joined.completion_mask[rows_joined, w:].any()  # only padding beyond the part's width


def _sampled(rewards: list[list[float]], tag: str, errors: int = 1) -> Sampled:
    """B groups of G one-token completions with the given rewards; records named ``tag0``, ``tag1``, ..."""
    B = len(rewards)
    N = B * G
    ids = torch.arange(N).view(N, 1) + 10  # [N, 1] one distinct token per row, to trace rows
    ro = Rollout(torch.ones(N, 2, dtype=torch.long), torch.ones(N, 2, dtype=torch.long), ids,
                 torch.ones(N, 1, dtype=torch.long), [f"{tag}{i // G}.{i % G}" for i in range(N)], G,
                 torch.zeros(N, dtype=torch.bool),
                 prompts={"input_ids": torch.ones(B, 2, dtype=torch.long), "attention_mask": torch.ones(B, 2)})
    total = torch.tensor([r for g in rewards for r in g])  # [N]
    return Sampled(ro, [{"id": f"{tag}{b}"} for b in range(B)], RewardOutput(total, {"accuracy": total}, {"x": errors}),
                   "instr", t_roll=1.5)


def test_the_filter_keeps_differing_groups_in_order_and_stops_at_the_target():
    f = GroupFilter(max_gen_batches=3, pad_id=0)
    same, mixed = [1.0] * G, [1.0, 0.0, 0.0, 1.0]
    assert f.add(_sampled([same, mixed, same], "a")) is None  # 1 of 3
    assert f.pending_groups == 1
    step = f.add(_sampled([mixed, [0.0] * G, mixed], "b"))  # 3 of 3
    assert [r["id"] for r in step.records] == ["a1", "b0", "b2"]
    assert step.rollout.texts[:G] == [f"a1.{k}" for k in range(G)] and step.rollout.texts[G:2 * G][0] == "b0.0"
    assert step.rewards.total.tolist() == mixed * 3 and step.rewards.named["accuracy"].tolist() == mixed * 3
    assert step.rewards.errors == {"x": 2}
    assert step.generated_zero_std.tolist() == [True, False, True, False, True, False]
    assert (step.gen_batches, step.t_roll) == (2, 3.0)
    assert f.pending_groups == 0  # the next step starts afresh
    # more than the target: exactly a batch's worth, the first ones
    step = f.add(_sampled([mixed, mixed, same], "c"))
    assert step is None
    step = f.add(_sampled([mixed, mixed, mixed], "d"))
    assert [r["id"] for r in step.records] == ["c0", "c1", "d0"] and step.rollout.num_rows == 3 * G


def test_the_filter_gives_up_at_max_gen_batches_and_tops_up_from_the_last_batch():
    f = GroupFilter(max_gen_batches=2, pad_id=0)
    same, mixed = [0.0] * G, [0.0, 1.0, 0.0, 0.0]
    assert f.add(_sampled([same, same], "a", errors=1)) is None
    step = f.add(_sampled([same, mixed], "b", errors=3))
    assert [r["id"] for r in step.records] == ["b1", "b0"]
    assert step.rewards.errors == {"x": 4}  # every generated rollout's failures, each counted once
    assert step.gen_batches == 2 and step.generated_zero_std.tolist() == [True, True, True, False]
    # one generation batch: never refilled, the batch's own groups, informative ones first
    one = GroupFilter(max_gen_batches=1, pad_id=0)
    assert [r["id"] for r in one.add(_sampled([same, mixed], "c")).records] == ["c1", "c0"]


def test_the_ranks_decide_together():
    """A rank with enough groups still samples again while another rank has too few."""
    f = GroupFilter(max_gen_batches=4, pad_id=0)
    mixed = [1.0, 0.0, 0.0, 0.0]
    assert f.add(_sampled([mixed, mixed], "a"), fewest_over_ranks=lambda n: min(n, 1)) is None
    step = f.add(_sampled([mixed, mixed], "b"), fewest_over_ranks=lambda n: min(n, 2))
    assert [r["id"] for r in step.records] == ["a0", "a1"]


def test_max_gen_batches_below_one_is_refused():
    with pytest.raises(UserError, match="grpo.max_gen_batches"):
        GRPOConfig(dynamic_sampling=True, max_gen_batches=0)


def test_a_curriculum_stage_starts_the_filter_afresh(tiny_models, prompts, one_thread):
    """Groups kept under one stage's G and rewards never join a step of the next stage."""
    named, rows = prompts
    module = _module(tiny_models, named, dynamic_sampling=True)
    module.configure_model()
    batch = PromptCollator(module.processor)([rows["A_text"], rows["U_text"]])
    assert module.group_filter.add(module.sample(batch)) is None
    assert module.group_filter.pending_groups == 1
    module.apply_curriculum_settings(rewards={"accuracy": 1.0})
    assert module.group_filter.pending_groups == 0
    assert _module(tiny_models, named).group_filter is None  # off by default: every group trains


TWO_RANKS = '''
"""2-rank DDP (gloo) with dynamic sampling: rank 0's batches are all informative, rank 1's first one is half so."""
import json, os, sys
from datetime import timedelta
from pathlib import Path

import json

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from tests.scripted_engine import ScriptedEngine
from tests.test_dynamic_sampling import UNIFORM
from tests.test_microbatch import SCRIPT_TEXT
from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDGRPOModule
from vold_pl.rl.rollout_types import SamplingConfig

tiny, data, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(1)
recs = [r for r in read_records(data / "train_text.jsonl")[0] if not r.images][:4]
rank = int(os.environ.get("LOCAL_RANK", "0"))
module = OPDGRPOModule(ModelSpec(str(tiny / "student")), optim=OptimConfig(lr=1e-3, schedule="constant"),
                       grpo=GRPOConfig(num_generations=4, loss_aggregation="token", dynamic_sampling=True),
                       sampling=SamplingConfig(max_new_tokens=48), export=False, log_completions_every_n_steps=0)
module.rollout_engine = ScriptedEngine(module.tokenizer, {recs[0].id: SCRIPT_TEXT, recs[1].id: SCRIPT_TEXT,
                                                          recs[2].id: UNIFORM, recs[3].id: SCRIPT_TEXT})
ds = to_dataset(recs)
rows = [ds[0], ds[1]] * 2 if rank == 0 else [ds[2], ds[3], ds[3], ds[3]]
loader = DataLoader(rows, batch_size=2, shuffle=False, collate_fn=PromptCollator(module.processor))


class Probe(L.Callback):
    batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1


probe = Probe()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=120)), max_steps=1,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False, callbacks=[probe])
trainer.fit(module, train_dataloaders=loader)
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
    "global_step": trainer.global_step, "batches": probe.batches,
    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}))
'''


def test_two_ranks_sample_until_every_rank_has_its_groups(tiny_models, synth_data, tmp_path):
    """Rank 1 keeps 1 of 2 groups from its first batch, so both ranks read a second batch before their one step
    (every rank's step runs the same collectives): no rank steps alone, none waits forever."""
    from tests.test_distributed import RUN_TIMEOUT_S, _run_two_ranks

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    out = tmp_path / "out"
    out.mkdir()
    res = _run_two_ranks(script, [str(tiny_models["student"].parent), str(synth_data["train"].parent), str(out)],
                         RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["global_step"] == 1 and r["batches"] == 2
    assert ranks[0]["metrics"]["train/num_gen_batches"] == 2
