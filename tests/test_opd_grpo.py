"""OPD-GRPO (VOLD stage 2, METHODS.md §1-3): teacher scoring, the LightningModule end to end, hand-checked
rewards through a scripted policy, construction errors, and the configs / CLI.

Formula-level checks (advantages, clipped surrogate, KL estimators, aggregation, rewards) live in
``test_rl_math.py`` and ``test_rewards.py``; this file checks that the module wires them together right.
Everything runs offline on the session fixtures of ``conftest.py``, with tiny settings (G = 2-4, a few
new tokens, batch size 2) to keep the file cheap on CPU.
"""

from __future__ import annotations

import csv
import math
import statistics
import zlib
from pathlib import Path

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
from vold_pl.rl.rollout import SamplingConfig, ScriptedEngine
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
                            temperature: float) -> torch.Tensor:
    """The teacher's own forward on its chat prompt + the completion text, written out independently."""
    prompt = tok.apply_chat_template([{"role": "user", "content": f"{view}\n{DEFAULT_INSTRUCTION}"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt + completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    n = len(student_ids)
    assert ids[-n:] == student_ids, "the teacher tokenises the student's completion differently"
    with torch.no_grad():
        logits = teacher(torch.tensor([ids])).logits[0].float() / temperature  # [T, V]
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


def _fit(module, sources: list[tuple[Path, float]], tmp_path: Path, max_steps: int, batch_size: int = 2):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource

    dm = ReasoningDataModule(train=[DataSource(str(p), w) for p, w in sources], batch_size=batch_size)
    rec = _StepRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=CSVLogger(str(tmp_path / "logs")),
                        enable_checkpointing=False, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[rec],
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
    trainer, steps, rows = _fit(module, [(synth_data["train"], 0.5), (synth_data["train_text"], 0.5)], tmp_path,
                                max_steps)

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
        assert all(0.0 <= r["train/opd/frac_tokens"] <= 1.0 for r in rows)
        assert all(r["train/opd/frac_masked_no_text_view"] == 0.0 for r in rows)  # every synthetic record has one
    if mu == 1:
        assert "train/kl" not in logged
        assert all(r["train/clip_ratio/low_mean"] == 0 and r["train/clip_ratio/high_mean"] == 0 for r in rows)
    else:
        assert all(r["train/kl"] >= 0 for r in rows)  # k3 is non-negative for every sample
    for r in rows:
        assert r["train/completions/max_length"] <= 8
        assert 0 <= r["train/completions/clipped_ratio"] <= 1 and 0 <= r["train/frac_reward_zero_std"] <= 1
        assert r["train/rollout/tokens_per_second"] > 0 and r["train/time/step"] > 0
    # The cosine schedule spans exactly the run's optimizer steps: the last logged LR is the floor.
    assert rows[-1]["train/lr"] == pytest.approx(0.1 * 1e-3, rel=1e-4)

    trained = module.model.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in initial.items()), "no weight changed"
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
    def generate(self, *args, **kwargs):
        self.last = super().generate(*args, **kwargs)
        return self.last


def test_scripted_rollouts_rewards_by_hand(tiny_models, synth_data, tmp_path):
    # Two records: a text-only math problem, and an image yes/no problem WITHOUT a text view (no OPD).
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
    module = _module(tiny_models, lam=1.0, gate="failed", G=4, max_new_tokens=64, agg="token")
    module.rollout_engine = engine = _CapturingEngine(module.tokenizer, script)
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


# ---------------------------------------------------------------------------------------- construction errors

def test_tokenizer_mismatch_fails_at_construction(tiny_models, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vold_pl.models.tiny import train_tokenizer

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
    assert not hasattr(module, "teacher_tokenizer")


def test_opd_without_teacher_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="opd.lam > 0 needs a teacher"):
        OPDGRPOModule(ModelSpec(str(tiny_models["student"])), teacher=None, opd=OPDConfig(lam=0.5))


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
