"""Learning checks of OPD-GRPO on the tiny models: the trainer must *learn*, not only run.

Each check trains the tiny student through :class:`OPDGRPOModule` and a Lightning ``Trainer`` for a few dozen
steps and measures behaviour, so a broken estimator, sign, gate or aggregation makes it fail:

- GRPO alone raises a reward registered here (the share of digit characters in the completion);
- OPD alone (a constant reward: every advantage is 0) lowers the *exact* reverse KL of the student to a
  fixed teacher on held-out prompts (full-vocabulary forward passes over the sampler's support, computed here,
  not the logged estimate) for k1 and full in loss mode and k1 in advantage mode, and the exact forward KL
  for the forward estimator, while the student's mass on the tokens the sampler blocks (vision placeholders)
  stays ~0;
- on a sparse task (reward 1 when the completion contains ``<answer>``, so most groups are all-zero), GRPO +
  OPD from a teacher that knows the answer beats GRPO alone.

The teachers are the tiny random teacher with a fixed bias on its output layer: a context-free preference
the student can learn in a few steps. Text-only prompts keep the steps cheap.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.models.factory import ModelSpec, load_processor
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rewards import functions as reward_fns
from vold_pl.rl.cached_sampler import CachedSamplingEngine
from vold_pl.rl.rollout_types import SamplingConfig, blocked_token_ids
from vold_pl.rl.teacher import build_teacher_inputs

DIGITS, CONST, HAS_ANSWER = "_test_learn_digits", "_test_learn_const", "_test_learn_has_answer"
MAX_NEW = 8


@pytest.fixture(scope="module", autouse=True)
def learning_rewards():
    def digit_share(c: str, r) -> float:
        chars = [ch for ch in c if not ch.isspace()]
        return sum(ch.isdigit() for ch in chars) / max(len(chars), 1)

    reward_fns.register_reward(DIGITS)(digit_share)
    reward_fns.register_reward(CONST)(lambda c, r: 1.0)
    reward_fns.register_reward(HAS_ANSWER)(lambda c, r: float(c.lstrip().startswith("<answer>")))
    yield
    for name in (DIGITS, CONST, HAS_ANSWER):
        reward_fns._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def processor(tiny_models):
    return load_processor(ModelSpec(str(tiny_models["student"])))


@pytest.fixture(scope="module")
def heldout(synth_data, processor):
    """Eight held-out text-only prompts (the validation split), collated as the trainer collates them."""
    recs, _ = read_records(synth_data["val_text"])
    ds = to_dataset(recs[:8])
    return PromptCollator(processor)([ds[i] for i in range(len(ds))])


def _module(tiny_models, rewards, *, lam=0.0, estimator="k1", mode="loss", gate="all", gate_reward="accuracy",
            lr=3e-3, G=4, agg="token", horizon="all", divergence_nats=5.0) -> OPDGRPOModule:
    module = OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])),
        teacher=ModelSpec(str(tiny_models["teacher"])) if lam > 0 else None,
        optim=OptimConfig(lr=lr, schedule="constant"),
        grpo=GRPOConfig(num_generations=G, loss_aggregation=agg, scale="group"),
        opd=OPDConfig(lam=lam, gate=gate, gate_reward=gate_reward, estimator=estimator, mode=mode, horizon=horizon,
                      divergence_nats=divergence_nats),
        sampling=SamplingConfig(max_new_tokens=MAX_NEW),
        rewards=rewards, export=False, log_completions_every_n_steps=0, seed=0,
    )
    module.configure_model()
    return module


def _bias_teacher(module: OPDGRPOModule, bias: torch.Tensor) -> torch.nn.Module:
    """Give the frozen teacher's output layer a fixed bias: a context-free preference over tokens."""
    teacher = module.teacher
    old = teacher.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.copy_(bias)
    teacher.lm_head = head.requires_grad_(False)
    return teacher


def _peaked_bias(vocab: int, blocked: tuple[int, ...], scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    bias = scale * torch.randn(vocab, generator=g)
    bias[list(blocked)] = -10.0  # a teacher that never writes vision placeholders either
    return bias


def _fit(module: OPDGRPOModule, data: Path, tmp_path: Path, steps: int, metric: str = "train/reward") -> list[float]:
    """Train ``steps`` optimizer steps on ``data``; returns the logged ``metric`` per step."""
    import lightning as L

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource

    rewards: list[float] = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            rewards.append(float(trainer.callback_metrics[metric]))

    torch.manual_seed(0)
    dm = ReasoningDataModule(train=[DataSource(str(data), 1.0)], batch_size=2, seed=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Rec()], default_root_dir=str(tmp_path), log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    return rewards


@torch.no_grad()
def _exact_kl_and_blocked_mass(module: OPDGRPOModule, batch: dict, G: int = 4,
                               forward: bool = False) -> tuple[float, float]:
    """On student samples for the held-out prompts: the mean over completion positions of the exact
    KL(π_θ ‖ π_T) (``forward``: KL(π_T ‖ π_θ)) of the sampler's distributions (blocked ids removed from both,
    renormalised), by full-vocabulary forward passes; and the mean mass the *unmasked* student puts on the
    blocked ids (what plain ``transformers`` generation of an export would emit)."""
    model, teacher = module.model.eval(), module.teacher.eval()
    tok = module.tokenizer
    blocked = list(blocked_token_ids(tok))
    torch.manual_seed(1234)
    ro = CachedSamplingEngine(tok).generate(model, batch, G, SamplingConfig(max_new_tokens=MAX_NEW))
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    P = ro.prompt_ids.size(1)
    s_logits = model(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1].float()  # [N, L, V]
    tin = build_teacher_inputs(tok, batch["records"], ro.completion_ids, ro.completion_mask, G)
    S = tin.completion_start
    t_logits = teacher(input_ids=tin.input_ids, attention_mask=tin.attention_mask).logits[:, S - 1 : -1].float()
    m = ro.completion_mask.bool()  # [N, L]
    blocked_mass = torch.softmax(s_logits, -1)[..., blocked].sum(-1)  # [N, L]
    allowed = torch.ones(s_logits.shape[-1], dtype=torch.bool)
    allowed[blocked] = False
    ls = torch.log_softmax(s_logits[..., allowed], -1)  # [N, L, V - 4]
    lt = torch.log_softmax(t_logits[..., allowed], -1)
    kl = (lt.exp() * (lt - ls)).sum(-1) if forward else (ls.exp() * (ls - lt)).sum(-1)  # [N, L]
    model.train()
    return float(kl[m].mean()), float(blocked_mass[m].mean())


@torch.no_grad()
def _heldout_reward(module: OPDGRPOModule, batch: dict, name: str, G: int = 8) -> float:
    """Mean reward ``name`` of G samples per held-out prompt under the current student."""
    torch.manual_seed(4321)
    ro = CachedSamplingEngine(module.tokenizer).generate(module.model.eval(), batch, G,
                                                        SamplingConfig(max_new_tokens=MAX_NEW))
    module.model.train()
    fn = reward_fns.get_reward(name)
    return sum(fn(t, None) for t in ro.texts) / len(ro.texts)


# --------------------------------------------------------------------------------------------------- checks

def test_grpo_alone_raises_a_learnable_reward(tiny_models, synth_data, heldout, tmp_path, one_thread):
    module = _module(tiny_models, {DIGITS: 1.0}, lr=1e-2)
    before = _heldout_reward(module, heldout, DIGITS)
    curve = _fit(module, synth_data["train_text"], tmp_path, steps=20)
    after = _heldout_reward(module, heldout, DIGITS)
    print(f"digit share: held-out {before:.3f} -> {after:.3f}; train {curve[:3]} ... {curve[-3:]}")
    assert after > before + 0.2 and after > 2 * before, (before, after)
    assert sum(curve[-5:]) / 5 > sum(curve[:5]) / 5 + 0.1, curve


# (options, steps): the full KL's closed-form gradient converges in fewer steps than k1's sampled one.
OPD_ALONE = {
    "k1_loss": (dict(estimator="k1", mode="loss"), 30),
    "full_loss": (dict(estimator="full", mode="loss"), 20),
    "k1_advantage": (dict(estimator="k1", mode="advantage"), 30),
    "forward_loss": (dict(estimator="forward", mode="loss"), 20),  # the KL it lowers is KL(π_T ‖ π_θ)
}


@pytest.mark.parametrize("name", list(OPD_ALONE))
def test_opd_alone_moves_the_student_to_the_teacher(name, tiny_models, synth_data, heldout, tmp_path, one_thread):
    """Every advantage is 0 (constant reward), so OPD is the only signal; lam > 0, gate all.

    The blocked-mass bound is what scoring the sampler's distribution buys: with the full softmax, k1 pushes
    down sampled tokens and the freed mass flows to the never-sampled placeholders (0.008 -> 0.12 here)."""
    opts, steps = OPD_ALONE[name]
    module = _module(tiny_models, {CONST: 1.0}, lam=1.0, gate="all", **opts)
    vocab = module.model.get_output_embeddings().out_features
    _bias_teacher(module, _peaked_bias(vocab, blocked_token_ids(module.tokenizer)))
    forward = opts["estimator"] == "forward"
    kl0, mass0 = _exact_kl_and_blocked_mass(module, heldout, forward=forward)
    _fit(module, synth_data["train_text"], tmp_path, steps=steps)
    kl1, mass1 = _exact_kl_and_blocked_mass(module, heldout, forward=forward)
    print(f"{name}: exact KL {kl0:.3f} -> {kl1:.3f}; blocked mass {mass0:.4f} -> {mass1:.4f}")
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    assert mass1 < 0.02, (mass0, mass1)


def test_opd_up_to_the_first_divergence_still_moves_the_student_to_the_teacher(tiny_models, synth_data, heldout,
                                                                                 tmp_path, one_thread):
    """``opd.horizon: first_divergence`` first distils only a part of the rollouts (the share logged as
    ``opd/frac_tokens``), yet OPD alone still pulls the student to the teacher; as it comes to agree, fewer
    rollouts diverge and the share grows."""
    module = _module(tiny_models, {CONST: 1.0}, lam=1.0, gate="all", horizon="first_divergence", divergence_nats=5.0)
    vocab = module.model.get_output_embeddings().out_features
    _bias_teacher(module, _peaked_bias(vocab, blocked_token_ids(module.tokenizer)))
    kl0, _ = _exact_kl_and_blocked_mass(module, heldout)
    distilled = _fit(module, synth_data["train_text"], tmp_path, steps=60, metric="train/opd/frac_tokens")
    kl1, _ = _exact_kl_and_blocked_mass(module, heldout)
    print(f"horizon: exact KL {kl0:.3f} -> {kl1:.3f}; share of tokens distilled {distilled[:3]} ... {distilled[-3:]}")
    first, last = sum(distilled[:5]) / 5, sum(distilled[-5:]) / 5
    assert first < 0.9 and last > first + 0.1, distilled
    assert kl1 < 0.5 * kl0, (kl0, kl1)


def test_opd_teacher_that_knows_the_answer_beats_grpo_alone_on_a_sparse_reward(
        tiny_models, synth_data, heldout, tmp_path, one_thread):
    """Reward 1 when the completion starts with ``<answer>``: rare for the student (every group all-zero at the
    start, so GRPO alone has no signal); the teacher prefers ``<answer>`` everywhere. VOLD's gate (distil only
    failed rollouts) on that reward; the full-vocabulary KL reaches the answer token at every position (the
    sampled k1 only moves it where the student happened to sample it)."""
    results = {}
    for lam in (0.0, 1.0):
        module = _module(tiny_models, {HAS_ANSWER: 1.0}, lam=lam, estimator="full", gate="failed",
                         gate_reward=HAS_ANSWER, lr=1e-2)
        if lam:
            bias = torch.zeros(module.model.get_output_embeddings().out_features)  # a teacher that knows the answer
            bias[module.tokenizer.convert_tokens_to_ids("<answer>")] = 8.0
            _bias_teacher(module, bias)
        start = _heldout_reward(module, heldout, HAS_ANSWER)
        curve = _fit(module, synth_data["train_text"], tmp_path / str(lam), steps=15)
        results[lam] = (start, _heldout_reward(module, heldout, HAS_ANSWER), curve)
    print({k: (round(a, 3), round(b, 3), [round(x, 2) for x in c]) for k, (a, b, c) in results.items()})
    (s0, grpo, _), (_, vold, curve) = results[0.0], results[1.0]
    assert s0 < 0.2  # sparse: at the start most completions, and so most groups, earn nothing
    assert vold > grpo + 0.3, results
