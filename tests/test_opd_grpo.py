"""OPD-GRPO (VOLD stage 2, METHODS.md §1-3): teacher scoring, the LightningModule end to end, hand-checked
rewards through a scripted policy, construction errors, and the configs / CLI.

Formula-level checks (advantages, clipped surrogate, KL estimators, aggregation, rewards) live in
``test_rl_math.py`` and ``test_rewards.py``; this file checks that the module wires them together right.
Everything runs offline on the session fixtures of ``conftest.py``, with tiny settings (G = 2-4, a few
new tokens, batch size 2) to keep the file cheap on CPU.
"""

from __future__ import annotations

import copy
import csv
import math
import re
import statistics
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from vold_pl.data.collate import DEFAULT_INSTRUCTION, PromptCollator
from vold_pl.data.schema import Record, write_jsonl
from vold_pl.data.sources import read_records, to_dataset
from vold_pl.models.factory import ModelSpec, load_model, load_processor
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rewards import functions as reward_fns
from vold_pl.rl.rollout_types import SamplingConfig
from tests.scripted_engine import ScriptedEngine
from vold_pl.rl.teacher import build_teacher_inputs, teacher_completion_logits, teacher_token_logprobs

REPO = Path(__file__).resolve().parents[1]
HASH_REWARD = "_test_opd_text_hash"

# Every metric the OPD-GRPO step must log (the list); OPD ones only when lam > 0, kl when beta_ref > 0.
CORE_METRICS = [
    "train/reward", "train/rewards/accuracy/mean", "train/rewards/format/mean", "train/reward_std",
    "train/frac_reward_zero_std", "train/completions/mean_length", "train/completions/max_length",
    "train/completions/clipped_ratio", "train/clip_ratio/low_mean", "train/clip_ratio/high_mean",
    "train/entropy", "train/rollout/tokens_per_second", "train/time/step",
]
OPD_METRICS = ["train/opd/reverse_kl", "train/opd/frac_tokens"]


# ---------------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def student_processor(tiny_models):
    return load_processor(ModelSpec(str(tiny_models["student"])))


@pytest.fixture(scope="module")
def teacher_model(tiny_models):
    model, tok = load_model(ModelSpec(str(tiny_models["teacher"])))
    return model.eval(), tok


@pytest.fixture
def hash_reward():
    """A reward that varies with the text, so random tiny-model rollouts get non-zero advantages."""
    reward_fns.register_reward(HASH_REWARD)(lambda c, r: (zlib.crc32(c.encode()) % 997) / 997)
    yield HASH_REWARD
    reward_fns._REGISTRY.pop(HASH_REWARD, None)


def _rows(path: Path, n: int, **override) -> list[dict]:
    """Rows as the data module hands them to a collator (images decoded to PIL)."""
    recs, _ = read_records(path)
    recs = recs[:n]
    for r in recs:
        for k, v in override.items():
            setattr(r, k, v)
    ds = to_dataset(recs)
    return [ds[i] for i in range(len(recs))]


def _completion_batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Student completions as a rollout holds them: ids + EOS, right-padded, and the completion mask."""
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, seqs


def _plain_teacher_logprobs(teacher, tok, view: str, completion: str, student_ids: list[int],
                            temperature: float, blocked: tuple[int, ...] = ()) -> torch.Tensor:
    """The teacher's own forward on its chat prompt + the completion text, written out independently;
    ``blocked`` ids get no mass (the distribution renormalised on the others)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": f"{view}\n{DEFAULT_INSTRUCTION}"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    n = len(student_ids)
    assert ids[-n:] == student_ids, "the teacher tokenises the student's completion differently"
    with torch.no_grad():
        logits = teacher(torch.tensor([ids])).logits[0].float() / temperature  # [T, V]
    logits[:, list(blocked)] = float("-inf")
    logp = torch.log_softmax(logits[-n - 1 : -1], -1)  # position t-1 predicts token t
    return logp.gather(-1, torch.tensor(student_ids).unsqueeze(-1)).squeeze(-1)  # [n]


def _module(tiny_models, *, lam=0.5, gate="failed", estimator="k1", mode="loss", mu=1, beta_ref=0.0,
            agg="token", G=2, max_new_tokens=8, teacher=True, rewards=None, lr=1e-3) -> OPDGRPOModule:
    return OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])),
        teacher=ModelSpec(str(tiny_models["teacher"])) if teacher else None,
        optim=OptimConfig(lr=lr, schedule="cosine", min_lr_ratio=0.1),
        grpo=GRPOConfig(num_generations=G, num_iterations=mu, beta_ref=beta_ref, epsilon_high=0.28,
                        loss_aggregation=agg),
        opd=OPDConfig(lam=lam, gate=gate, estimator=estimator, mode=mode),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens),
        rewards=rewards or {"accuracy": 1.0, "format": 0.1},
        export=False, log_completions_every_n_steps=1,
    )


class _StepRecorder:
    """Records ``trainer.global_step`` after every training batch."""

    def __new__(cls):
        import lightning as L

        class Rec(L.Callback):
            def __init__(self):
                self.steps: list[int] = []

            def on_train_batch_end(self, trainer, *args, **kwargs):
                self.steps.append(trainer.global_step)

        return Rec()


def _fit(module, sources: list[tuple[Path, float]], tmp_path: Path, max_steps: int, batch_size: int = 2,
         callbacks: tuple = ()):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource

    dm = ReasoningDataModule(train=[DataSource(str(p), w) for p, w in sources], batch_size=batch_size)
    rec = _StepRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(str(tmp_path / "logs")),
                        enable_checkpointing=False, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[rec, *callbacks],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    return trainer, rec.steps, _metrics(Path(trainer.logger.log_dir) / "metrics.csv")


def _metrics(path: Path) -> list[dict[str, float]]:
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]


def _run_cli(args: list[str]) -> None:
    from vold_pl.cli import main

    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), f"vold-pl {' '.join(args)} exited with {e.code}"


# ------------------------------------------------------------------------------------------ teacher alignment

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_scores_equal_plain_teacher_forward(tiny_models, synth_data, student_processor, teacher_model,
                                                    temperature):
    teacher, ttok = teacher_model
    stok = student_processor.tokenizer
    # A text-only record without a text view (the teacher reads the student's prompt) and an image record
    # with a text view (the teacher reads the caption + question), in one batch: prompts of different lengths.
    text_row = _rows(synth_data["train_text"], 1, text_view=None)[0]
    image_row = _rows(synth_data["train"], 2)[1]
    batch = PromptCollator(student_processor)([text_row, image_row])
    records = batch["records"]
    assert records[1]["has_image"] and records[1]["text_view"]
    completions = ["<think> 2 + 3 = 5 </think><answer> 5 </answer>", "<think> no </think><answer> yes </answer>",
                   "<answer> B </answer>", "<think> there are 3 red squares and 1 blue circle </think><answer> 4 </answer>"]
    G = 2
    comp, cmask, seqs = _completion_batch(stok, completions)

    tin = build_teacher_inputs(ttok, records, comp, cmask, G)
    assert tin.available.tolist() == [True] * 4
    # Left padding of the teacher prompts: completions start at one column for every row.
    assert tin.input_ids.shape[1] == tin.completion_start + comp.shape[1]
    assert (tin.attention_mask[:, : tin.completion_start] == 0).any(), "the two prompts should differ in length"
    logp = teacher_token_logprobs(teacher, tin, temperature)  # [4, L]
    full = teacher_completion_logits(teacher, tin, temperature).log_softmax(-1)  # [4, L, V]
    assert logp.shape == comp.shape

    # The text-only record's teacher prompt is exactly the student's prompt (same template and vocabulary).
    s_prompt = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    t_prompt = tin.input_ids[0, : tin.completion_start][tin.attention_mask[0, : tin.completion_start].bool()].tolist()
    assert s_prompt == t_prompt

    views = [text_row["problem"], image_row["text_view"]]
    for i, (text, ids) in enumerate(zip(completions, seqs)):
        n = len(ids)
        ref = _plain_teacher_logprobs(teacher, ttok, views[i // G], text, ids, temperature)
        torch.testing.assert_close(logp[i, :n], ref, atol=1e-5, rtol=0)
        from_logits = full[i, :n].gather(-1, torch.tensor(ids).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(from_logits, ref, atol=1e-5, rtol=0)
        assert torch.isfinite(logp[i, :n]).all()

    # Each record alone (no left padding at all) gives the same values as the mixed, padded batch.
    for b in range(2):
        rows = slice(b * G, (b + 1) * G)
        alone = build_teacher_inputs(ttok, records[b : b + 1], comp[rows], cmask[rows], G)
        assert alone.attention_mask[:, : alone.completion_start].bool().all()  # one prompt: no padding
        lp_alone = teacher_token_logprobs(teacher, alone, temperature)
        torch.testing.assert_close(lp_alone * cmask[rows], logp[rows] * cmask[rows], atol=1e-5, rtol=0)


def test_image_record_without_text_view_is_unavailable(tiny_models, synth_data, student_processor, teacher_model):
    teacher, ttok = teacher_model
    stok = student_processor.tokenizer
    text_row = _rows(synth_data["train_text"], 1)[0]
    blind_row = _rows(synth_data["train"], 1, text_view=None)[0]
    batch = PromptCollator(student_processor)([blind_row, text_row])
    comp, cmask, seqs = _completion_batch(stok, ["<answer> 1 </answer>", "<answer> 2 </answer>",
                                                 "<think> one </think><answer> 3 </answer>", "<answer> 4 </answer>"])
    tin = build_teacher_inputs(ttok, batch["records"], comp, cmask, 2)
    assert tin.available.tolist() == [False, False, True, True]
    # The unavailable record's placeholder prompt does not disturb the available rows' scores.
    logp = teacher_token_logprobs(teacher, tin)
    for i in (2, 3):
        ref = _plain_teacher_logprobs(teacher, ttok, text_row["text_view"] or text_row["problem"],
                                      ["<think> one </think><answer> 3 </answer>", "<answer> 4 </answer>"][i - 2],
                                      seqs[i], 1.0)
        torch.testing.assert_close(logp[i, : len(seqs[i])], ref, atol=1e-5, rtol=0)
    # A raw row (images still attached) is judged the same way as a batch record (has_image).
    raw = build_teacher_inputs(ttok, [blind_row], comp[:2], cmask[:2], 2)
    assert raw.available.tolist() == [False, False]


# ---------------------------------------------------------------------------------------------- end to end

COMBOS = {
    "grpo_only": dict(lam=0.0, agg="sequence"),
    "opd_failed_k1_loss": dict(lam=0.5, gate="failed", estimator="k1", mode="loss", agg="token"),
    "opd_all_full_loss": dict(lam=0.5, gate="all", estimator="full", mode="loss", agg="dr_grpo"),
    "opd_all_k1_advantage": dict(lam=0.5, gate="all", estimator="k1", mode="advantage", agg="token"),
    "mu2_reference": dict(lam=0.5, gate="all", mu=2, beta_ref=0.04, agg="sequence"),
}


def _advantages_by_hand(rewards: list[float]) -> list[float]:
    """GRPO's group advantage (METHODS.md §2): (r - mean) / (stdev + 1e-6), exactly 0 for an all-equal group."""
    mean, sd = statistics.mean(rewards), statistics.stdev(rewards)
    return [0.0 if max(rewards) == min(rewards) else (r - mean) / (sd + 1e-6) for r in rewards]


class _FitProbe:
    """Records, during a fit, every training rollout with its records, and the weights and (clipped) gradients
    right before each optimizer step: what the checks by hand below start from."""

    def __new__(cls, module):
        import lightning as L

        class Probe(L.Callback):
            def __init__(self):
                self.rollouts: list[tuple[list[dict], object]] = []
                self.steps: list[tuple[dict, dict]] = []  # (weights, grads) before optimizer step k

            def on_train_start(self, trainer, pl_module):
                orig = pl_module.rollout_engine.generate

                def generate(model, batch, n, sampling):
                    out = orig(model, batch, n, sampling)
                    self.rollouts.append((batch["records"], out))
                    return out

                pl_module.rollout_engine.generate = generate

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                named = list(pl_module.model.named_parameters())
                self.steps.append(({k: p.detach().clone() for k, p in named},
                                   {k: p.grad.detach().clone() for k, p in named if p.grad is not None}))

        return Probe()


_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def _rewards_by_hand(texts: list[str], records: list[dict], G: int) -> tuple[list[float], list[float], list[float]]:
    """(total, accuracy, format): accuracy + 0.1 format + the crc32 hash reward, one record per G completions."""
    acc = [reward_fns.accuracy_reward(t, SimpleNamespace(**records[i // G])) for i, t in enumerate(texts)]
    fmt = [float(_FORMAT.fullmatch(t.strip()) is not None) for t in texts]
    total = [a + 0.1 * f + (zlib.crc32(t.encode()) % 997) / 997 for a, f, t in zip(acc, fmt, texts)]
    return total, acc, fmt


def _student_scores(model, ro, temperature: float = 1.0):
    """One plain forward of the student on prompt + completion (no KV-cache reuse, no chunks): ``logp [N, L]``
    of the sampled tokens and the ``[N, L, V]`` log-probs, in the sampler's distribution (blocked ids removed)."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)  # [N, P + L]
    attn = torch.cat([ro.prompt_mask, ro.completion_mask.to(ro.prompt_mask.dtype)], 1)
    extra = {k: v for k, v in ro.extra.items() if k != "mm_token_type_ids"}
    if "mm_token_type_ids" in ro.extra:
        extra["mm_token_type_ids"] = torch.cat([ro.extra["mm_token_type_ids"], torch.zeros_like(ro.completion_ids)], 1)
    P = ro.prompt_ids.size(1)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False, **extra).logits[:, P - 1 : -1].float()
    logits = logits / temperature
    logits[..., list(ro.blocked_ids)] = float("-inf")
    full = torch.log_softmax(logits, -1)  # [N, L, V]
    return full.gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1), full


def _teacher_scores(teacher, ttok, records: list[dict], ro, temperature: float = 1.0) -> torch.Tensor:
    """The teacher's ``[N, L, V]`` log-probs at the completion positions, each row alone (no padding at all)."""
    from vold_pl.rl.teacher import build_teacher_inputs

    tin = build_teacher_inputs(ttok, records, ro.completion_ids, ro.completion_mask, ro.group_size)
    assert tin.available.all(), "every synthetic record has a text view"
    s, (N, L) = tin.completion_start, ro.completion_ids.shape
    out = torch.zeros(N, L, teacher.config.vocab_size)
    for i in range(N):
        prompt = tin.input_ids[i, :s][tin.attention_mask[i, :s].bool()]
        n = int(ro.completion_mask[i].sum())
        with torch.no_grad():
            logits = teacher(torch.cat([prompt, ro.completion_ids[i, :n]]).unsqueeze(0)).logits[0].float()
        logits = logits / temperature
        logits[:, list(ro.blocked_ids)] = float("-inf")
        out[i, :n] = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)  # position t-1 predicts token t
    return out


def _agg_by_hand(x: torch.Tensor, m: torch.Tensor, mode: str, budget: int) -> torch.Tensor:
    x = torch.where(m > 0, x, torch.zeros_like(x))  # [N, L]
    if mode == "sequence":
        return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "token":
        return (x * m).sum() / m.sum()
    return (x * m).sum() / (x.shape[0] * budget)  # dr_grpo: N x the generation budget


def _loss_by_hand(opts: dict, model, ro, records, teacher_lp, old_lp, ref_lp, max_new_tokens: int):
    """METHODS.md §2-3 written out: clipped surrogate on the group advantages, + beta_ref k3, + lam x gated OPD
    (k1 with the score-function gradient sg(k1)·ρ·∇logp, or the full-vocabulary KL; or the advantage form)."""
    G, lam, agg = 2, opts["lam"], opts["agg"]
    logp, full = _student_scores(model, ro)  # [N, L], [N, L, V]
    m = ro.completion_mask.float()
    total, acc, _ = _rewards_by_hand(ro.texts, records, G)
    adv = []
    for b in range(len(total) // G):
        adv += _advantages_by_hand(total[b * G : (b + 1) * G])
    A = torch.tensor(adv).unsqueeze(-1)  # [N, 1]
    old = logp.detach() if old_lp is None else old_lp  # μ = 1: π_old is the current policy
    ratio = torch.exp(logp - old)  # [N, L]
    if lam > 0:
        g = torch.tensor([1.0 - a for a in acc] if opts.get("gate") == "failed" else [1.0] * len(acc)).unsqueeze(-1)
        t_lp = teacher_lp.gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)  # [N, L]
        if opts.get("mode") == "advantage":
            A = A - lam * g * (old - t_lp)  # k1 at sampling time, a constant
    pg = -torch.min(ratio * A, ratio.clamp(1 - 0.2, 1 + 0.28) * A)
    loss = _agg_by_hand(pg, m, agg, max_new_tokens)
    if opts.get("beta_ref", 0) > 0:
        d = ref_lp - logp
        loss = loss + opts["beta_ref"] * _agg_by_hand(torch.exp(d) - d - 1, m, agg, max_new_tokens)
    if lam > 0 and opts.get("mode", "loss") == "loss":
        if opts.get("estimator", "k1") == "full":
            allowed = torch.isfinite(full)  # the blocked ids have probability 0 under both: they add nothing
            p = full.exp()
            s_lp = torch.where(allowed, full, torch.zeros_like(full))  # no -inf - -inf (NaN, in backward too)
            t_fin = torch.where(allowed, teacher_lp, torch.zeros_like(teacher_lp))
            kl = (p * (s_lp - t_fin)).sum(-1)  # [N, L]
        else:
            kl = (logp - t_lp).detach() * ratio
        loss = loss + lam * _agg_by_hand(g * kl, m, agg, max_new_tokens)
    return loss


def _clipped(grads: dict[str, torch.Tensor], max_norm: float = 1.0) -> dict[str, torch.Tensor]:
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return {k: g * coef for k, g in grads.items()}


@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
def test_fit_logs_metrics_and_updates_weights(combo, tiny_models, synth_data, tmp_path, hash_reward):
    opts = COMBOS[combo]
    module = _module(tiny_models, rewards={"accuracy": 1.0, "format": 0.1, hash_reward: 1.0}, **opts)
    module.configure_model()  # load now to snapshot the initial weights (fit's call is then a no-op)
    initial = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    frozen0 = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in module._frozen.items()}

    assert ("teacher" in module._frozen) == (opts["lam"] > 0)
    assert ("reference" in module._frozen) == (opts.get("beta_ref", 0.0) > 0)

    mu = opts.get("mu", 1)
    max_steps = 4 if mu == 2 else 3
    probe = _FitProbe(module)
    torch.manual_seed(0)  # the rollouts sample from torch's global generator
    trainer, steps, rows = _fit(module, [(synth_data["train"], 0.5), (synth_data["train_text"], 0.5)], tmp_path,
                                max_steps, callbacks=(probe,))

    # global_step counts optimizer steps: μ per rollout batch.
    n_batches = max_steps // mu
    assert steps == [mu * (b + 1) for b in range(n_batches)], steps
    assert trainer.global_step == max_steps

    rows = [r for r in rows if "train/reward" in r]
    assert len(rows) == n_batches
    expected = CORE_METRICS + (OPD_METRICS if opts["lam"] > 0 else []) + (["train/kl"] if mu == 2 else [])
    for name in expected:
        values = [r.get(name) for r in rows]
        assert all(v is not None and math.isfinite(v) for v in values), f"{name}: {values}"
    logged = set().union(*rows)
    if opts["lam"] == 0:
        assert not any(k.startswith("train/opd/") for k in logged), sorted(logged)
    else:
        assert all(r["train/opd/frac_masked_no_text_view"] == 0.0 for r in rows)  # every synthetic record has one
    if mu == 1:
        assert "train/kl" not in logged
        assert all(r["train/clip_ratio/low_mean"] == 0 and r["train/clip_ratio/high_mean"] == 0 for r in rows)
    else:
        assert all(r["train/kl"] >= 0 for r in rows)  # k3 is non-negative for every sample
    # Every logged figure of every step, recomputed from that step's rollout and records by hand.
    assert len(probe.rollouts) == n_batches
    eos = module.tokenizer.eos_token_id
    for b, (r, (records, ro)) in enumerate(zip(rows, probe.rollouts)):
        total, acc, fmt = _rewards_by_hand(ro.texts, records, 2)
        groups = [total[i : i + 2] for i in range(0, len(total), 2)]
        assert r["train/reward"] == pytest.approx(statistics.mean(total), abs=1e-6)
        assert r["train/reward_std"] == pytest.approx(statistics.stdev(total), abs=1e-6)
        assert r["train/rewards/accuracy/mean"] == pytest.approx(statistics.mean(acc))
        assert r["train/rewards/format/mean"] == pytest.approx(statistics.mean(fmt))
        assert r["train/frac_reward_zero_std"] == pytest.approx(statistics.mean(g[0] == g[1] for g in groups))
        lengths = [int(n) for n in ro.completion_mask.sum(-1)]
        assert r["train/completions/mean_length"] == pytest.approx(statistics.mean(lengths))
        assert r["train/completions/max_length"] == max(lengths) <= 8
        no_eos = [eos not in ro.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        assert r["train/completions/clipped_ratio"] == pytest.approx(statistics.mean(no_eos))
        if opts["lam"] > 0:  # the failed gate reads the accuracy reward, not the total
            gated = [n for n, a in zip(lengths, acc) if opts["gate"] == "all" or a == 0]
            assert r["train/opd/frac_tokens"] == pytest.approx(sum(gated) / sum(lengths))
        # cosine from 1e-3 to 1e-4 over max_steps optimizer steps, read after this batch's μ steps
        progress = mu * (b + 1) / max_steps
        assert r["train/lr"] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))), rel=1e-4)
        assert r["train/rollout/tokens_per_second"] > 0 and r["train/time/step"] > 0

    # Every batch's loss (μ = 1) and every optimizer step's gradient (clipped at norm 1), against the formula by
    # hand on plain forwards of a fresh student (the step's weights), the teacher and the reference.
    student, _ = load_model(ModelSpec(str(tiny_models["student"])))
    student.train()

    def load(weights):
        with torch.no_grad():
            for name, p in student.named_parameters():
                p.copy_(weights[name])

    assert all(torch.equal(probe.steps[0][0][k], v) for k, v in initial.items() if k in probe.steps[0][0])
    assert any("pixel_values" in ro.extra for _, ro in probe.rollouts), "no batch with an image row"
    for b, (records, ro) in enumerate(probe.rollouts):
        teacher_lp = (_teacher_scores(module.teacher, module.teacher_tokenizer, records, ro)
                      if opts["lam"] > 0 else None)
        with torch.no_grad():
            load(probe.steps[b * mu][0])
            old_lp = _student_scores(student, ro)[0]  # π_old: the weights at sampling time
            load(probe.steps[0][0])
            ref_lp = _student_scores(student, ro)[0]  # the reference: the initial weights
        for j in range(mu):
            weights, grads = probe.steps[b * mu + j]
            load(weights)
            student.zero_grad(set_to_none=True)
            loss = _loss_by_hand(opts, student, ro, records, teacher_lp, None if mu == 1 else old_lp,
                                 ref_lp if opts.get("beta_ref", 0) > 0 else None, max_new_tokens=8)
            loss.backward()
            if mu == 1:
                # abs: a loss near 0 (advantages that nearly cancel) keeps float32 summation residue of ~1e-6
                assert rows[b]["train/loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-5)
            ref = _clipped({k: p.grad for k, p in student.named_parameters() if p.grad is not None})
            assert set(grads) == set(ref)
            assert all(torch.isfinite(g).all() for g in grads.values()), f"step {b * mu + j}: the module's gradient"
            assert all(torch.isfinite(g).all() for g in ref.values()), f"step {b * mu + j}: the reference gradient"
            err = math.sqrt(sum(float(((grads[k] - ref[k]).double() ** 2).sum()) for k in ref))
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ref.values()))
            assert norm > 0 and err <= 1e-3 * norm, f"step {b * mu + j}: gradient off by {err / norm:.2e}"
    for name, sd in frozen0.items():  # teacher and reference stay frozen
        now = module._frozen[name].state_dict()
        assert all(torch.equal(v, now[k]) for k, v in sd.items()), f"the frozen {name} changed"
        assert not any(p.requires_grad for p in module._frozen[name].parameters())
    # Frozen models live outside the module tree: not optimised, not checkpointed.
    tree = set(map(id, module.modules()))
    assert not any(id(m) in tree for m in module._frozen.values())
    assert (Path(trainer.log_dir) / "completions.jsonl").is_file()


# ---------------------------------------------------------------------------------------- scripted rollouts

class _CapturingEngine(ScriptedEngine):
    def generate(self, model, batch, *args, **kwargs):
        self.batch, self.last = batch, super().generate(model, batch, *args, **kwargs)
        return self.last


def _plain_student_logprobs(model, rollout, row: int, blocked: tuple[int, ...]) -> torch.Tensor:
    """The student's own forward on one row's unpadded prompt + completion (text-only prompt), sampler's
    distribution (blocked ids removed): ``log π(o_t)`` for the row's completion tokens."""
    prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
    n = int(rollout.completion_mask[row].sum())
    comp = rollout.completion_ids[row, :n]
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, comp]).unsqueeze(0)).logits[0].float()  # [P + n, V]
    logits[:, list(blocked)] = float("-inf")
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)  # [n, V]
    return logp.gather(-1, comp.unsqueeze(-1)).squeeze(-1)  # [n]


def _group_advantages_by_hand(rewards: list[float]) -> list[float]:
    mean, sd = statistics.mean(rewards), statistics.stdev(rewards)
    return [0.0 if max(rewards) == min(rewards) else (r - mean) / (sd + 1e-6) for r in rewards]


def _hand_script(tmp_path, synth_data):
    """Two records: a text-only math problem, and an image yes/no problem WITHOUT a text view (no OPD)."""
    image_rec = next(r for r in read_records(synth_data["train"])[0] if r.answer_type == "yesno")
    image_rec.text_view = None
    text_rec = Record(id="hand-math", problem="What is 2 + 3?", answer="5", answer_type="math")
    data = write_jsonl([text_rec, image_rec], tmp_path / "hand.jsonl")
    wrong_yn = "no" if image_rec.answer == "yes" else "yes"
    script = {
        # accuracy, format -> reward with weights 1.0 / 0.1
        "hand-math": ["<think> 2 + 3 = 5 </think><answer> 5 </answer>",  # 1, 1 -> 1.1
                      "<think> 2 + 3 = 4 </think><answer> 4 </answer>",  # 0, 1 -> 0.1
                      "I think it is 7",                                 # 0, 0 -> 0.0
                      "<answer> 5 </answer>"],                           # 1, 0 -> 1.0
        image_rec.id: [f"<think> looking </think><answer> {wrong_yn} </answer>"],  # x4: 0, 1 -> 0.1 each
    }
    return data, script, image_rec


def test_scripted_rollouts_rewards_by_hand(tiny_models, synth_data, tmp_path, teacher_model):
    data, script, image_rec = _hand_script(tmp_path, synth_data)
    module = _module(tiny_models, lam=1.0, gate="failed", G=4, max_new_tokens=64, agg="token")
    module.rollout_engine = engine = _CapturingEngine(module.tokenizer, script)
    module.configure_model()  # load now to keep the initial student: the logged loss is the pre-step one
    student0 = copy.deepcopy(module.model).eval()
    _, _, rows = _fit(module, [(data, 1.0)], tmp_path, max_steps=1)
    # The image prompt kept its pixels, repeated once per sample (G = 4 copies of one image).
    ro = engine.last
    assert ro.extra["image_grid_thw"].shape[0] == 4
    assert ro.extra["pixel_values"].shape[0] == int(ro.extra["image_grid_thw"].prod(-1).sum())
    assert ro.extra["mm_token_type_ids"].shape == ro.prompt_ids.shape
    (row,) = [r for r in rows if "train/reward" in r]

    rewards = [1.1, 0.1, 0.0, 1.0] + [0.1] * 4
    assert row["train/reward"] == pytest.approx(sum(rewards) / 8, abs=1e-6)  # 0.325
    assert row["train/rewards/accuracy/mean"] == pytest.approx(2 / 8)
    assert row["train/rewards/format/mean"] == pytest.approx(6 / 8)
    assert row["train/reward_std"] == pytest.approx(statistics.stdev(rewards), abs=1e-6)
    assert row["train/frac_reward_zero_std"] == pytest.approx(0.5)  # the image record's group is all 0.1

    # Lengths (completion + EOS) and the OPD token share, counted with the tokenizer by hand: only the two
    # failed math rollouts are distilled; the image record's rollouts failed too but have no text view.
    tok = module.tokenizer
    lens = {t: len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for c in script.values() for t in c}
    all_lens = [lens[t] for t in script["hand-math"]] + [lens[script[image_rec.id][0]]] * 4
    assert row["train/completions/mean_length"] == pytest.approx(sum(all_lens) / 8)
    assert row["train/completions/max_length"] == max(all_lens)
    assert row["train/completions/clipped_ratio"] == 0.0
    failed = lens[script["hand-math"][1]] + lens[script["hand-math"][2]]
    assert row["train/opd/frac_tokens"] == pytest.approx(failed / sum(all_lens))
    assert row["train/opd/frac_masked_no_text_view"] == pytest.approx(0.5)

    # The loss and the logged reverse KL, from the two models' own forwards. With one optimizer step per
    # batch rho = 1, so each token's surrogate is -A_i; token aggregation; OPD (k1, loss mode) on the two failed
    # math rollouts only: loss = (sum_i -A_i |o_i| + lam * sum_{failed} sum_t k1_t) / sum_i |o_i|, with k1 the
    # log-ratio of the sampler's distributions (vision placeholders removed from both, renormalised).
    records = engine.batch["records"]
    math_rows = [i for i in range(8) if records[i // 4]["id"] == "hand-math"]
    math_texts = [engine.last.texts[i] for i in math_rows]
    blocked = engine.last.blocked_ids
    assert len(blocked) == 4
    teacher, ttok = teacher_model
    k1_sum, k1_n = 0.0, 0
    for i, text in zip(math_rows, math_texts):
        if text.startswith("<think> 2 + 3 = 5") or text.startswith("<answer> 5"):
            continue  # accuracy 1: not distilled
        n = int(engine.last.completion_mask[i].sum())
        ids = engine.last.completion_ids[i, :n].tolist()
        s_lp = _plain_student_logprobs(student0, engine.last, i, blocked)
        t_lp = _plain_teacher_logprobs(teacher, ttok, "What is 2 + 3?", text, ids, 1.0, blocked)
        k1_sum, k1_n = k1_sum + float((s_lp - t_lp).sum()), k1_n + n
    assert k1_n == failed
    adv = _group_advantages_by_hand([1.1, 0.1, 0.0, 1.0]) + [0.0] * 4
    row_lens = [lens[script["hand-math"][j]] for j in range(4)] + [lens[script[image_rec.id][0]]] * 4
    pg = sum(-a * n for a, n in zip(adv, row_lens))
    assert row["train/loss"] == pytest.approx((pg + 1.0 * k1_sum) / sum(row_lens), abs=1e-4)
    assert row["train/opd/reverse_kl"] == pytest.approx(k1_sum / k1_n, abs=1e-4)


def test_dr_grpo_divides_by_the_generation_budget(tiny_models, synth_data, tmp_path):
    """dr_grpo's normaliser is N x sampling.max_new_tokens (TRL, Dr. GRPO), not N x the batch's longest."""
    data, script, image_rec = _hand_script(tmp_path, synth_data)
    module = _module(tiny_models, lam=0.0, teacher=False, G=4, max_new_tokens=48, agg="dr_grpo")
    module.rollout_engine = _CapturingEngine(module.tokenizer, script)
    _, _, rows = _fit(module, [(data, 1.0)], tmp_path, max_steps=1)
    (row,) = [r for r in rows if "train/reward" in r]
    tok = module.tokenizer
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in script["hand-math"]]
    adv = _group_advantages_by_hand([1.1, 0.1, 0.0, 1.0])  # the image group's advantages are all 0
    assert max(lens) < 48
    assert row["train/loss"] == pytest.approx(sum(-a * n for a, n in zip(adv, lens)) / (8 * 48), abs=1e-6)


def test_advantage_mode_survives_a_teacher_that_gives_padding_no_mass(tiny_models, synth_data, tmp_path):
    """A teacher log-prob of -inf at padded positions (k1 = +inf there) must not turn the masked-out surrogate's
    gradient into NaN (0 * inf) in advantage mode: the step is taken and the weights move."""
    data, script, _ = _hand_script(tmp_path, synth_data)
    module = _module(tiny_models, lam=1.0, gate="all", mode="advantage", G=4, max_new_tokens=64, agg="token")
    module.rollout_engine = engine = _CapturingEngine(module.tokenizer, script)
    module.configure_model()
    teacher = module.teacher
    head = torch.nn.Linear(teacher.lm_head.in_features, teacher.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(teacher.lm_head.weight)
        head.bias.zero_()
        head.bias[module.tokenizer.pad_token_id] = float("-inf")  # pad follows EOS in every shorter completion
    teacher.lm_head = head.requires_grad_(False)
    initial = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    _, _, rows = _fit(module, [(data, 1.0)], tmp_path, max_steps=1)
    lengths = engine.last.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # padded positions exist
    (row,) = [r for r in rows if "train/reward" in r]
    assert math.isfinite(row["train/loss"]) and math.isfinite(row["train/opd/reverse_kl"])
    assert module.skipped_steps == 0
    assert any(not torch.equal(v, module.model.state_dict()[k]) for k, v in initial.items()), "no weight changed"


# ---------------------------------------------------------------------------------------- construction errors

def test_tokenizer_mismatch_fails_at_construction(tiny_models, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vold_pl.toy.tiny import train_tokenizer

    tok = train_tokenizer(["a completely different corpus about apples, pears and plums"] * 20, vocab_size=300)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    folder = tmp_path / "other_teacher"
    Qwen3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)

    with pytest.raises(ValueError, match="do not line up") as ei:
        OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(folder)), opd=OPDConfig(lam=0.5))
    assert "<think>" in str(ei.value) and "opd.lam: 0" in str(ei.value)
    # Without OPD the teacher is never used, so nothing is checked (or loaded).
    module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(folder)),
                           opd=OPDConfig(lam=0.0))
    assert module.teacher_tokenizer is None


def test_opd_without_teacher_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="opd.lam > 0 needs a teacher"):
        OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=None, opd=OPDConfig(lam=0.5))


def test_full_estimator_as_an_advantage_is_rejected():
    """The full KL of a position does not depend on the sampled token: as an advantage its expected policy
    gradient is 0 (METHODS.md §3), so the combination is refused when the config is built."""
    with pytest.raises(ValueError, match="opd.estimator: full with opd.mode: advantage") as ei:
        OPDConfig(lam=0.5, estimator="full", mode="advantage")
    assert "estimator: k1" in str(ei.value)
    OPDConfig(lam=0.5, estimator="k1", mode="advantage")  # the supported forms
    OPDConfig(lam=0.5, estimator="full", mode="loss")


def test_failed_gate_needs_its_success_reward(tiny_models):
    """The failed gate reads the accuracy (success) reward, never the summed reward: without it, an error."""
    student, teacher = ModelSpec(str(tiny_models["student"])), ModelSpec(str(tiny_models["teacher"]))
    with pytest.raises(ValueError, match="opd.gate_reward='accuracy'") as ei:
        OPDGRPOModule(student, teacher=teacher, opd=OPDConfig(lam=0.5, gate="failed"), rewards={"format": 1.0})
    assert "model.init_args.rewards" in str(ei.value) and "opd.gate: all" in str(ei.value)
    # Another success reward named explicitly, or the gate that reads none, are fine.
    OPDGRPOModule(student, teacher=teacher, opd=OPDConfig(lam=0.5, gate="failed", gate_reward="format"),
                  rewards={"format": 1.0})
    OPDGRPOModule(student, teacher=teacher, opd=OPDConfig(lam=0.5, gate="all"), rewards={"format": 1.0})


# ------------------------------------------------------------------------------------------------ configs / CLI

@pytest.mark.parametrize("config", ["quickstart/opd_grpo.yaml", "quickstart/grpo_only.yaml",
                                    "real/opd_grpo_qwen2_5_vl_3b.yaml"])
def test_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    _run_cli(["fit", "--config", f"configs/{config}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    args = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == "vold_pl.modules.opd_grpo.OPDGRPOModule"
    if config == "quickstart/grpo_only.yaml":
        assert args["opd"]["lam"] == 0.0 and args["teacher"] is None
    else:
        assert args["opd"]["lam"] > 0 and args["teacher"]["name_or_path"]
    if config.startswith("real/"):
        assert printed["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert printed["trainer"]["precision"] == "bf16-mixed"
        assert printed["trainer"]["accelerator"] == "gpu" and printed["trainer"]["devices"] == 8
        assert args["model"] == {**args["model"], "name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct", "dtype": "float32"}
        assert args["teacher"]["name_or_path"] == "Qwen/Qwen3-8B" and args["teacher"]["dtype"] == "bfloat16"
        assert args["grpo"]["num_generations"] == 8
        assert args["sampling"]["max_new_tokens"] == 1024 and args["sampling"]["temperature"] == 1.0
        assert args["opd"]["lam"] == 1.0


def test_cli_fit_end_to_end(tiny_models, synth_data, tmp_path):
    config = yaml.safe_load((REPO / "configs/quickstart/opd_grpo.yaml").read_text())
    config["trainer"].update(max_steps=3, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp_path / "run"),
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(tmp_path / "logs"), "name": "opd"}})
    init = config["model"]["init_args"]
    init["model"]["name_or_path"] = str(tiny_models["student"])
    init["teacher"]["name_or_path"] = str(tiny_models["teacher"])
    init["grpo"]["num_generations"] = 2
    init["sampling"]["max_new_tokens"] = 8
    data = config["data"]
    data["train"] = [{"path": str(synth_data["train"]), "weight": 0.5},
                     {"path": str(synth_data["train_text"]), "weight": 0.5}]
    data["val"] = [{"path": str(synth_data["val"]), "limit": 2}]
    data.update(batch_size=2, val_batch_size=2)
    cfg = tmp_path / "opd_grpo.yaml"
    cfg.write_text(yaml.safe_dump(config))

    _run_cli(["fit", "--config", str(cfg)])
    log_dir = tmp_path / "logs" / "opd" / "version_0"
    rows = _metrics(log_dir / "metrics.csv")
    train = [r for r in rows if "train/reward" in r]
    assert len(train) == 3
    assert all(math.isfinite(r["train/opd/reverse_kl"]) for r in train)
    assert any("val/reward" in r for r in rows), "validation at step 3 logged nothing"
    assert (log_dir / "export" / "model.safetensors").is_file()
