"""Micro-batches and global normalisation of the OPD-GRPO step (``grpo.micro_batch_size`` /
``grpo.max_tokens_per_micro_batch``).

The step's gradient must not depend on how its rows are cut: a micro-batched step (rows or a token budget,
groups split or kept) accumulates exactly the whole batch's gradient, for every aggregation, and the teacher
and reference scores it builds are the whole batch's. Across ranks: a 2-rank gloo DDP step, each rank with
a different number of completion tokens, makes the same update as one rank on both ranks' rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rl.objective import plan_micro_batches
from vold_pl.rl.rollout_types import SamplingConfig
from tests.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parents[1]
G = 4

# Completions of very different lengths, so that `sequence`, `token` and `dr_grpo` weigh rows differently;
# rewards: accuracy x format differ within each group (non-zero advantages), failures get distilled.
SCRIPT_TEXT = ["<think> 2 + 3 = 5 </think><answer> 5 </answer>", "<answer> 4 </answer>",
               "I think it is 7 because two and three and a few more words make it longer still",
               "<answer> 5 </answer>"]
SCRIPT_IMAGE = ["<think> looking at the picture carefully </think><answer> yes </answer>", "<answer> no </answer>",
                "no", "<think> hmm </think><answer> yes </answer>"]


def _records(synth_data):
    """A text-only math record and an image record with a text view (the teacher sees both)."""
    recs, _ = read_records(synth_data["train"])
    image = next(r for r in recs if r.images and r.text_view)
    recs_t, _ = read_records(synth_data["train_text"])
    text = next(r for r in recs_t if not r.images)
    return [text, image]


def _module(tiny_models, agg: str, estimator: str, mode: str, gate: str, beta_ref: float, **micro):
    return OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
        optim=OptimConfig(lr=1e-3),
        grpo=GRPOConfig(num_generations=G, loss_aggregation=agg, beta_ref=beta_ref, **micro),
        opd=OPDConfig(lam=0.5, gate=gate, estimator=estimator, mode=mode),
        sampling=SamplingConfig(max_new_tokens=48), export=False, log_completions_every_n_steps=0)


def _step_grads(module, batch):
    """Build the step's experience and backpropagate its micro-batches: the gradient."""
    module.model.zero_grad(set_to_none=True)
    step = module.build_experience(batch)
    totals, world = module._totals(step.experience)
    loss, metrics, _ = module.backward_micro_batches(step, totals, world, backward=torch.Tensor.backward)
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return step, float(loss.detach()), metrics, grads


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    return num / sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5


CASES = {  # each aggregation, with the reference KL or an OPD estimator / mode / gate that reads more fields
    "sequence_k1_loss_ref": dict(agg="sequence", estimator="k1", mode="loss", gate="failed", beta_ref=0.04),
    "token_k1_advantage": dict(agg="token", estimator="k1", mode="advantage", gate="all", beta_ref=0.0),
    "dr_grpo_full_loss": dict(agg="dr_grpo", estimator="full", mode="loss", gate="all", beta_ref=0.04),
}


@pytest.fixture(scope="module")
def loaded(tiny_models, synth_data):
    """One module with every model loaded (student, teacher, reference), the scripted rollouts and the batch;
    each test sets the GRPO / OPD options it needs (the step reads them when it runs)."""
    records = _records(synth_data)
    module = _module(tiny_models, agg="sequence", estimator="k1", mode="loss", gate="failed", beta_ref=0.04)
    module.configure_model()
    module.model.train()
    module.rollout_engine = ScriptedEngine(module.tokenizer, {records[0].id: SCRIPT_TEXT, records[1].id: SCRIPT_IMAGE})
    batch = PromptCollator(module.processor)([to_dataset(records)[i] for i in range(2)])
    return module, batch


def _configure(module, agg: str, estimator: str, mode: str, gate: str, beta_ref: float, **micro) -> None:
    module.grpo = GRPOConfig(num_generations=G, loss_aggregation=agg, beta_ref=beta_ref, **micro)
    module.opd = OPDConfig(lam=0.5, gate=gate, estimator=estimator, mode=mode)


@pytest.mark.parametrize("case", list(CASES))
def test_micro_batched_step_has_the_whole_batch_gradient(case, loaded):
    module, batch = loaded
    _configure(module, **CASES[case])
    assert "pixel_values" in batch  # the image rows' pixels are cut with their rows

    whole, loss0, metrics0, g0 = _step_grads(module, batch)
    assert [(mb.start, mb.end, mb.padding) for mb in whole.plan] == [(0, 8, False)]
    assert max(float(g.abs().max()) for g in g0.values()) > 0
    lengths = whole.rollout.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 4  # the aggregations differ on these rows

    budget = int(G * (whole.rollout.prompt_ids.size(1) + lengths.max()))  # whole groups, one per micro-batch
    micro = {"sequence_k1_loss_ref": dict(micro_batch_size=3),  # groups split, the image group across two
             "token_k1_advantage": dict(max_tokens_per_micro_batch=budget),
             "dr_grpo_full_loss": dict(micro_batch_size=5)}[case]
    _configure(module, **CASES[case], **micro)
    step, loss, metrics, g = _step_grads(module, batch)
    assert len(step.plan) > 1, micro
    assert _rel(g0, g) <= 1e-6, (micro, _rel(g0, g))
    assert loss == pytest.approx(loss0, abs=1e-6)  # a difference of O(1) terms: float32 rounding
    for k, v in metrics0.items():
        assert float(metrics[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), k
    # The frozen scores, built micro-batch by micro-batch, are the whole batch's.
    for name in ("teacher_logp", "teacher_logits", "ref_logp"):
        a, b = getattr(whole.experience, name), getattr(step.experience, name)
        assert (a is None) == (b is None)
        if a is not None:
            m = whole.experience.mask.bool()
            torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5)


def test_plan_micro_batches():
    L = torch.tensor([3, 5, 2, 8, 1, 1, 4, 4])  # two groups of 4... and of 2
    assert plan_micro_batches(L, 4, 2) == [(0, 8)]
    assert plan_micro_batches(L, 4, 2, micro_batch_size=3) == [(0, 3), (3, 6), (6, 8)]
    # Token budget, rows x (P + longest): whole groups of 2 while each fits (2 x 12 = 24 <= 30 < 4 x 12).
    assert plan_micro_batches(L, 4, 2, max_tokens=30) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # A group over the budget (2 x 12 > 20): rows, packed while they fit.
    assert plan_micro_batches(L, 4, 2, max_tokens=20) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8)]
    assert plan_micro_batches(L, 4, 2, max_tokens=1) == [(i, i + 1) for i in range(8)]


# ------------------------------------------------------------------------------------------ across ranks

_RANKS_SCRIPT = textwrap.dedent('''
    import json, sys, torch, lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    sys.path.insert(0, sys.argv[1])
    from tests.test_microbatch import _module, _records, SCRIPT_TEXT, SCRIPT_IMAGE
    from vold_pl.data.collate import PromptCollator
    from vold_pl.data.sources import to_dataset
    from tests.scripted_engine import ScriptedEngine

    tiny, data, out, agg = json.loads(sys.argv[2])
    world = 2
    tiny = {k: __import__("pathlib").Path(v) for k, v in tiny.items()}
    data = {k: __import__("pathlib").Path(v) for k, v in data.items()}
    torch.manual_seed(0)
    records = _records(data)

    class Batches(torch.utils.data.Dataset):  # rank r trains on record r (one rank: both)
        def __init__(self, collate): self.collate = collate
        def __len__(self): return 1
        def __getitem__(self, i): return i

    class Grabber(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_rank == 0:
                g = {n: p.grad.tolist() for n, p in pl_module.model.named_parameters() if p.grad is not None}
                json.dump(g, open(out, "w"))

    module = _module(tiny, agg=agg, estimator="k1", mode="loss", gate="all", beta_ref=0.0, micro_batch_size=3)
    module.max_grad_norm = 0.0
    module.rollout_engine = ScriptedEngine(module.tokenizer, {records[0].id: SCRIPT_TEXT, records[1].id: SCRIPT_IMAGE})
    collate = PromptCollator(module.processor)
    ds = to_dataset(records)

    def loader_for(rank):
        rows = [ds[rank]]
        return torch.utils.data.DataLoader(Batches(None), batch_size=1, collate_fn=lambda _: collate(rows))

    class DM(L.LightningDataModule):
        def train_dataloader(self): return loader_for(self.trainer.global_rank)

    strategy = DDPStrategy(process_group_backend="gloo", find_unused_parameters=True)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[Grabber()])
    trainer.fit(module, datamodule=DM())
''')


def _two_ranks(agg: str, tiny_models, synth_data, tmp_path: Path) -> dict:
    """Gradients of one 2-rank gloo DDP step (rank r trains on record r), as rank 0 sees them before the update."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out, script = tmp_path / "grads.json", tmp_path / "two_ranks.py"
    script.write_text(_RANKS_SCRIPT)  # Lightning's launcher re-runs the script file for rank 1
    arg = json.dumps([{k: str(v) for k, v in tiny_models.items()}, {k: str(v) for k, v in synth_data.items()},
                      str(out), agg])
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), arg], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, log.decode()[-4000:]
    return {k: torch.tensor(v) for k, v in json.loads(out.read_text()).items()}


def test_two_rank_step_equals_one_rank_step(loaded, tiny_models, synth_data, tmp_path):
    """`token`: the DAPO mean over the global token count. The two ranks' rows have different token counts, so
    a per-rank mean averaged by DDP would weigh them differently from one rank on all the rows; micro-batches of
    3 rows (2 on each rank, 3 on one rank) on top."""
    module, batch = loaded
    _configure(module, agg="token", estimator="k1", mode="loss", gate="all", beta_ref=0.0, micro_batch_size=3)
    step, _, _, one = _step_grads(module, batch)
    lengths = step.rollout.completion_mask.sum(-1)
    assert int(lengths[:G].sum()) != int(lengths[G:].sum())  # unequal token counts on the two ranks
    two = _two_ranks("token", tiny_models, synth_data, tmp_path)
    assert _rel(one, two) <= 1e-5, _rel(one, two)
