"""The OPD-GRPO module's step helpers on the paths only several ranks take, checked on one process.

``_plan`` pads a rank's micro-batch plan to the longest plan of all ranks, ``_totals`` sums the counts over
ranks, and ``backward_micro_batches`` undoes the ranks' gradient average (``world``) and runs the padding entries
(``MicroBatch.pad()``) as weightless dummies. A two-rank strategy stand-in supplies the other rank's numbers to the
collective (``reduce``); the expected values are worked out by hand below.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vold_pl.models.factory import ModelSpec
from vold_pl.modules.opd_grpo import GRPOConfig, MicroBatch, OPDGRPOModule, StepData, micro_batch_plan
from vold_pl.rl.objective import Experience, Totals
from vold_pl.rl.rollout_types import Rollout

N, L = 4, 5
LENGTHS = [5, 3, 4, 2]
ADV = [1.0, -0.5, 0.25, 0.5]  # sums to 1.25: the sequence-aggregated GRPO loss at ratio 1 is -1.25 / N


class _OtherRank:
    """The collective of a two-rank run: this rank's tensor combined with the other rank's ``other``."""

    def __init__(self, other: torch.Tensor):
        self.other = other

    def reduce(self, tensor, group=None, reduce_op="mean"):
        both = torch.stack([tensor, self.other.to(tensor)])
        return {"max": both.max(0).values, "sum": both.sum(0), "mean": both.mean(0)}[reduce_op]


def _mask() -> torch.Tensor:
    mask = torch.zeros(N, L, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    return mask


def _rollout() -> Rollout:
    g = torch.Generator().manual_seed(0)
    return Rollout(prompt_ids=torch.randint(3, 40, (N, 3), generator=g), prompt_mask=torch.ones(N, 3, dtype=torch.long),
                   completion_ids=torch.randint(3, 40, (N, L), generator=g), completion_mask=_mask(),
                   texts=[""] * N, group_size=2, clipped=torch.zeros(N, dtype=torch.bool))


def _module(tiny_models, **grpo) -> OPDGRPOModule:
    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), grpo=GRPOConfig(num_generations=2, **grpo),
                           export=False, log_completions_every_n_steps=0)
    module.configure_model()
    return module


def test_plan_is_padded_to_the_longest_plan_of_the_ranks(tiny_models):
    """One row per micro-batch here (4 entries); the other rank has 6: two padding entries pad this plan,
    so every rank runs 6 forwards (the max over ranks, not their mean 5). Each entry knows its rows and width."""
    module = _module(tiny_models, micro_batch_size=1)
    module._trainer = SimpleNamespace(world_size=2, strategy=_OtherRank(torch.tensor(6.0)))
    rows = [MicroBatch(i, i + 1, n) for i, n in enumerate(LENGTHS)]
    assert module._plan(_rollout()) == rows + [MicroBatch(0, 1, 1, padding=True)] * 2
    module._trainer = SimpleNamespace(world_size=2, strategy=_OtherRank(torch.tensor(2.0)))
    assert module._plan(_rollout()) == rows  # the longest plan: nothing to pad


def test_totals_are_summed_over_the_ranks(tiny_models):
    """This rank: 4 rows, 14 completion tokens; the other: 3 rows, 10 tokens. The aggregations divide by the
    sums 7 and 24, and the world is 2."""
    module = _module(tiny_models)
    module._trainer = SimpleNamespace(world_size=2, strategy=_OtherRank(torch.tensor([3.0, 10.0])))
    exp = Experience(logp=None, old_logp=None, advantages=torch.tensor(ADV), mask=_mask().float())
    assert module._totals(exp) == (Totals(rows=7.0, tokens=24.0), 2)


class _DeviceCollective:
    """A collective that, like NCCL, takes only tensors on the accelerator (the meta device stands in for it)."""

    def reduce(self, tensor, group=None, reduce_op="mean"):
        assert tensor.device.type == "meta" and tensor.shape == (2,) and reduce_op == "sum"
        return torch.tensor([7.0, 24.0])


def test_totals_hand_the_collective_counts_on_the_mask_device(tiny_models):
    """The counts are built on the completion mask's device, where the gradient collective runs."""
    module = _module(tiny_models)
    module._trainer = SimpleNamespace(world_size=2, strategy=_DeviceCollective())
    exp = Experience(logp=None, old_logp=None, advantages=torch.tensor(ADV), mask=_mask().float().to("meta"))
    assert module._totals(exp) == (Totals(rows=7.0, tokens=24.0), 2)


def test_step_loss_undoes_the_rank_average_and_pads_with_weightless_dummies(tiny_models):
    """μ = 1, no KL terms, sequence aggregation over the totals' 4 rows: at ratio 1 the loss is
    -Σ_i A_i · (1/|o_i|) Σ_t 1 / 4 = -1.25 / 4 on this rank, times world = 2 (DDP then averages over the ranks).
    The plan's two padding entries add nothing to the value (their dummy forward has weight 0), and
    the gradient of the log-probs is the one of the plan without them."""
    module = _module(tiny_models, micro_batch_size=2)
    rollout = _rollout()
    exp = Experience(logp=None, old_logp=None, advantages=torch.tensor(ADV), mask=_mask().float())
    totals = Totals(rows=4.0, tokens=float(sum(LENGTHS)))
    grads = []
    for length in (2, 4):
        module.model.zero_grad(set_to_none=True)
        step = StepData(rollout, exp, micro_batch_plan(rollout, [(0, 2), (2, 4)], length), None, None, None, 0.0)
        loss, _, _ = module.backward_micro_batches(step, totals, world=2, backward=torch.Tensor.backward)
        assert math.isfinite(float(loss.detach()))
        assert float(loss.detach()) == pytest.approx(2 * -sum(ADV) / N, rel=1e-5)
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])


def test_scores_ignore_the_padding_dummy_on_a_one_row_rollout(tiny_models):
    """A one-row rollout with a padding entry: the dummy scores one row and writes nothing; the scores
    are the row's log-softmax of a plain forward over prompt + completion, position by position."""
    module = _module(tiny_models)
    full = _rollout()
    one = Rollout(full.prompt_ids[:1], full.prompt_mask[:1], full.completion_ids[:1], full.completion_mask[:1],
                  [""], 1, full.clipped[:1])
    with torch.no_grad():
        got = module._score(module.model, one, micro_batch_plan(one, [(0, 1)], 2))
        ids = torch.cat([one.prompt_ids, one.completion_ids], 1)
        logits = module.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
    P = one.prompt_ids.size(1)
    want = [float(torch.log_softmax(logits[P - 1 + t] / module.sampling.temperature, -1)[one.completion_ids[0, t]])
            for t in range(L)]
    torch.testing.assert_close(got[0].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_policy_scores_recompute_their_slabs_in_backward(tiny_models):
    """The policy's log-probs run the head over N·L = 20 positions in slabs of logprob_chunk_size = 4: 5 head
    calls in forward, and each slab again in backward (checkpointed, so the [N, L, V] logits never live whole):
    10 calls. The constant scores (no gradient) run each slab once."""
    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), grpo=GRPOConfig(num_generations=2),
                           export=False, logprob_chunk_size=4)
    module.configure_model()
    calls = []
    module.model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    logp, _ = module._logprobs(_rollout())
    assert len(calls) == 5
    logp.sum().backward()
    assert len(calls) == 10
    calls.clear()
    with torch.no_grad():
        module._score(module.model, _rollout(), micro_batch_plan(_rollout(), [(0, 4)]))
    assert len(calls) == 5
