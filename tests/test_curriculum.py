"""Curr-ReFT curriculum (METHODS.md §4): stage filters, per-stage RL settings, the three advancement rules, exact
resume right after a stage change, the shipped configs, and the stage rewards not covered in test_rewards.py.

The fits run OPD-GRPO (no teacher) on the tiny student with a scripted policy (``ScriptedEngine``: fixed
completions per record id), so every reward is known by hand: for each record the completions are, in order,
correct + well formatted, correct without tags, wrong + well formatted, junk. Stage timelines (which step runs in
which stage and epoch) are derived in the tests from the record counts of the fixture files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from vold_pl.callbacks.curriculum import Curriculum
from vold_pl.callbacks.preemption import PreemptionCallback
from vold_pl.checkpointing import ResumableCheckpoint
from vold_pl.data.curriculum import CurriculumStage, EmptyStageError, eligible_indices, stage_pools
from vold_pl.data.datamodule import MixedSampler, ReasoningDataModule
from vold_pl.data.schema import Record
from vold_pl.data.sources import DataSource, read_records, to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.rewards import functions as F
from vold_pl.rl.rollout_types import SamplingConfig
from tests.scripted_engine import ScriptedEngine

REPO = Path(__file__).resolve().parents[1]
LIMIT = 24  # records per training source in the fits (6 of each answer type in the fixture's first 24)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ------------------------------------------------------------------------------------------------ helpers

def _records(path: Path, limit: int | None = None) -> list[Record]:
    return read_records(path)[0][:limit]


def _wrong(r: Record) -> str:
    if r.answer_type == "yesno":
        return "no" if r.answer == "yes" else "yes"
    if r.answer_type == "choice":
        return "B" if r.answer != "B" else "A"
    if r.answer_type == "math":
        return str(int(r.answer) + 1)
    return "purple" if r.answer != "purple" else "red"


def _script(*paths: Path) -> dict[str, list[str]]:
    """record id -> [correct + format, correct without tags, wrong + format, junk] (see the module docstring)."""
    return {r.id: [f"<think>ok</think><answer>{r.answer}</answer>", f"<answer>{r.answer}</answer>",
                   f"<think>no</think><answer>{_wrong(r)}</answer>", "idk"]
            for p in paths for r in _records(p)}


def _group_reward(G: int, w_acc: float, w_fmt: float) -> float:
    """Mean reward of one prompt's G scripted completions: acc/format = (1,1), (1,0), (0,1), (0,0) in turn."""
    per = [w_acc + w_fmt, w_acc, w_fmt, 0.0]
    return sum(per[g % 4] for g in range(G)) / G


class RecordingEngine(ScriptedEngine):
    """The scripted policy, noting G and the sampling settings of every training rollout."""

    def __init__(self, tokenizer, completions):
        super().__init__(tokenizer, completions)
        self.calls: list[dict] = []

    def generate(self, model, batch, num_samples, sampling):
        if model.training:
            self.calls.append({"G": num_samples, "max_new_tokens": sampling.max_new_tokens,
                               "temperature": sampling.temperature})
        return super().generate(model, batch, num_samples, sampling)


class Recorder(L.Callback):
    """Per trained batch: global step, epoch, the records' ids and answer types (what the module saw)."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                          "ids": [r["id"] for r in batch["records"]],
                          "types": [r["answer_type"] for r in batch["records"]]})


class SignalAt(L.Callback):
    """Sends SIGUSR1 to this process at the given global step (PreemptionCallback then saves and stops)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _train_rows(log_dir: Path) -> list[dict[str, float]]:
    with (log_dir / "metrics.csv").open() as fh:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(fh)]
    return [r for r in rows if "train/reward" in r]


def _fit(tmp: Path, models, sources, stages, max_steps: int, *, ckpt=None, stop_at=None, val=None, **trainer_kw):
    """A seeded tiny OPD-GRPO fit (G = 3, 16 new tokens, accuracy + 0.1 format by default) under a curriculum."""
    L.seed_everything(0)
    module = OPDGRPOModule(ModelSpec(str(models["student"])), optim=OptimConfig(lr=1e-3, schedule="constant"),
                           grpo=GRPOConfig(num_generations=3), opd=OPDConfig(lam=0.0),
                           sampling=SamplingConfig(max_new_tokens=16), rewards={"accuracy": 1.0, "format": 0.1},
                           export=False, log_completions_every_n_steps=0)
    paths = [p for p, _ in sources] + ([val] if val else [])
    engine = module.rollout_engine = RecordingEngine(module.tokenizer, _script(*paths))
    dm = ReasoningDataModule(train=[DataSource(str(p), w, limit=LIMIT) for p, w in sources],
                             val=[DataSource(str(val), limit=4)] if val else None, batch_size=2, val_batch_size=4)
    rec, cur = Recorder(), Curriculum(stages)
    cbs = [rec, cur] + ([SignalAt(stop_at)] if stop_at else []) + [PreemptionCallback(),
                                                                    ResumableCheckpoint(every_n_train_steps=1000)]
    kw = dict(limit_val_batches=0, num_sanity_val_steps=0) if val is None else {}
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, log_every_n_steps=1,
                        logger=CSVLogger(str(tmp / "logs"), name="run"), enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=cbs,
                        default_root_dir=str(tmp), **{**kw, **trainer_kw})
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return {"trainer": trainer, "module": module, "rows": rec.rows, "calls": engine.calls, "curriculum": cur,
            "metrics": _train_rows(Path(trainer.logger.log_dir))}


# Steps rule: 3 steps of yes/no (G 4), 2 of multiple choice (G 2, T 0.7), then math + open with the module's
# own G (3) and max_new_tokens (16). Two sources (image problems and their text twins) at equal weight.
STEP_STAGES = [
    dict(name="yesno", answer_types=["yesno"], num_generations=4, rewards={"currreft_yesno": 1.0, "format": 0.5},
         max_new_tokens=12, steps=3),
    dict(name="choice", answer_types=["choice"], num_generations=2, rewards={"currreft_choice": 1.0, "format": 0.25},
         max_new_tokens=10, temperature=0.7, steps=2),
    dict(name="open", answer_types=["math", "open"], rewards={"currreft_open": 1.0, "format": 0.1}),
]


@pytest.fixture(scope="module")
def step_run(tiny_models, synth_data, tmp_path_factory):
    sources = [(synth_data["train"], 0.5), (synth_data["train_text"], 0.5)]
    stages = [CurriculumStage(**s) for s in STEP_STAGES]
    return _captured_fit(tmp_path_factory.mktemp("steps"), tiny_models, sources, stages, max_steps=7)


def _captured_fit(tmp: Path, models, sources, stages, **fit_kw) -> dict:
    """``_fit`` with its stdout captured, remembering how it was called (the resume test reruns it in halves)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run = _fit(tmp, models, sources, stages, **fit_kw)
    run.update(stdout=out.getvalue(), sources=sources, stages=stages, fit_kw=fit_kw)
    return run


def _count(paths: list[Path], types: list[str]) -> int:
    return sum(r.answer_type in types for p in paths for r in _records(p, LIMIT))


# ------------------------------------------------------------------------------------------------ steps rule

def test_steps_rule_filter_and_stage_settings(step_run):
    rows, calls, metrics = step_run["rows"], step_run["calls"], step_run["metrics"]
    paths = [p for p, _ in step_run["sources"]]
    # Each stage's epoch is one pass over its eligible records (2 per batch): longer than the stage's steps, so
    # every change is mid-epoch and ends that epoch; the next stage starts a new one.
    assert _count(paths, ["yesno"]) // 2 > 3 and _count(paths, ["choice"]) // 2 > 2
    expected_stage = [0, 0, 0, 1, 1, 2, 2]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["epoch"] for r in rows] == expected_stage
    assert [m["curriculum/stage"] for m in metrics] == expected_stage
    # The records the module trained on all have the stage's answer types (and both sources are drawn).
    for r, k in zip(rows, expected_stage):
        assert set(r["types"]) <= set(STEP_STAGES[k]["answer_types"]), (r, k)
    assert {i.endswith("-text") for r in rows for i in r["ids"]} == {True, False}
    # G, max_new_tokens and temperature the module sampled with; stage 2 sets none and gets the module's own.
    assert [c["G"] for c in calls] == [4, 4, 4, 2, 2, 3, 3]
    assert [c["max_new_tokens"] for c in calls] == [12, 12, 12, 10, 10, 16, 16]
    assert [c["temperature"] for c in calls] == [1.0, 1.0, 1.0, 0.7, 0.7, 1.0, 1.0]
    # Rewards: exactly the stage's names are computed, and the logged reward is their weighted sum, by hand.
    for m, k, c in zip(metrics, expected_stage, calls):
        weights = STEP_STAGES[k]["rewards"]
        assert {n.split("/")[2] for n in m if n.startswith("train/rewards/")} == set(weights)
        acc_name = next(n for n in weights if n != "format")
        assert m["train/reward"] == pytest.approx(_group_reward(c["G"], weights[acc_name], weights["format"]))
        assert m[f"train/rewards/{acc_name}/mean"] == pytest.approx(_group_reward(c["G"], 1.0, 0.0))
    # Lightning's epoch length follows the stage: math + open records of both sources, 2 per batch.
    assert step_run["trainer"].num_training_batches == _count(paths, ["math", "open"]) // 2
    out = step_run["stdout"]
    assert ("[vold-pl] curriculum: stage 0 'yesno' -> stage 1 'choice' at step 3 (steps: 3 optimizer steps in the "
            "stage)") in out
    assert "[vold-pl] curriculum: stage 1 'choice' -> stage 2 'open' at step 5 (steps: 2" in out
    # The module's configured settings are untouched in its hparams (stages replace, never mutate, them).
    assert step_run["module"].hparams["grpo"].num_generations == 3


# Stopped (SIGUSR1 -> PreemptionCallback writes last.ckpt) at the batch end where a stage changed: by the steps rule
# mid-epoch (the new stage must still end that epoch first), or by the epochs rule at the epoch's last batch (the
# next, longer epoch must run in full: Lightning skips epoch-start hooks after such a resume).
@pytest.mark.parametrize("which, stop_at, state", [
    ("step_run", 3, {"stage": 1, "start_step": 3, "start_epoch": 1, "end_epoch": True}),
    ("rule_run", None, {"stage": 2, "start_epoch": 2, "end_epoch": False}),
])
def test_resume_right_after_stage_change(which, stop_at, state, request, tiny_models, tmp_path):
    straight = request.getfixturevalue(which)
    stop_at = stop_at or straight["epoch_end_step"]
    state = {"start_step": stop_at, **state}
    args = (tiny_models, straight["sources"], straight["stages"])
    first = _fit(tmp_path, *args, stop_at=stop_at, **straight["fit_kw"])
    assert first["trainer"].global_step == stop_at and first["module"].finished_early
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Curriculum"))
    assert {k: saved[k] for k in state} == state  # the checkpoint holds the new stage
    dm_state = ckpt["ReasoningDataModule"]
    new_types = straight["stages"][state["stage"]].answer_types
    assert dm_state["curriculum_stage"] == state["stage"] and dm_state["curriculum_state"]["answer_types"] == new_types
    second = _fit(tmp_path, *args, ckpt="last", **straight["fit_kw"])
    assert second["trainer"].global_step == straight["trainer"].global_step
    assert first["rows"] + second["rows"] == straight["rows"]
    assert first["calls"] + second["calls"] == straight["calls"]

    def logged(ms):  # every logged value but wall-clock timings
        return [{k: v for k, v in m.items() if "time" not in k and "per_second" not in k} for m in ms]

    assert logged(first["metrics"] + second["metrics"]) == logged(straight["metrics"])
    a, b = straight["module"].model.state_dict(), second["module"].model.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items()), "final weights differ"


# --------------------------------------------------------------------------------------- val + epochs rules

def _val_reward(val: Path) -> float:
    """Validation decodes greedily = the scripted first completion (correct, well formatted): under stage 0's
    rewards a yes/no record scores 1 + 0.5, any other record only the format reward 0.5."""
    recs = _records(val, 4)
    n_yes = sum(r.answer_type == "yesno" for r in recs)
    assert 0 < n_yes < 4
    return (1.5 * n_yes + 0.5 * (4 - n_yes)) / 4


@pytest.fixture(scope="module")
def rule_run(tiny_models, synth_data, tmp_path_factory):
    """Stage 0 ends by val threshold, stage 1 by epochs (or an unreachable threshold), stage 2 runs an epoch + 1."""
    val, train = synth_data["val"], [synth_data["train"]]
    stages = [
        CurriculumStage("yesno", answer_types=["yesno"], rewards={"currreft_yesno": 1.0, "format": 0.5},
                        val_threshold=_val_reward(val) - 0.01),
        CurriculumStage("choice", answer_types=["choice"], epochs=1, val_threshold=99.0),
        CurriculumStage("math+open", answer_types=["math", "open"]),
    ]
    n1, n2 = _count(train, ["choice"]) // 2, _count(train, ["math", "open"]) // 2
    run = _captured_fit(tmp_path_factory.mktemp("rules"), tiny_models, [(synth_data["train"], 1.0)], stages,
                        max_steps=2 + n1 + n2 + 1, val=val, val_check_interval=2, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=1)
    run["epoch_end_step"] = 2 + n1
    return run


def test_val_threshold_and_epochs_rules(rule_run, synth_data):
    train = [synth_data["train"]]
    n1, n2 = _count(train, ["choice"]) // 2, _count(train, ["math", "open"]) // 2
    assert _count(train, ["yesno"]) // 2 > 2 and n2 > n1  # stage 0 ends mid-epoch; stage 2's epochs are longer
    # Sanity validation (same score) does not count; the first real one, after step 2, ends stage 0 mid-epoch.
    # Stage 1 runs exactly one epoch of its records; stage 2's epoch is one pass over its own (more) records.
    stages = [0, 0] + [1] * n1 + [2] * (n2 + 1)
    assert [m["curriculum/stage"] for m in rule_run["metrics"]] == stages
    assert [r["epoch"] for r in rule_run["rows"]] == [0, 0] + [1] * n1 + [2] * n2 + [3]
    for r, k in zip(rule_run["rows"], stages):
        assert set(r["types"]) <= set(rule_run["stages"][k].answer_types)
    out = rule_run["stdout"]
    val_reward = _val_reward(synth_data["val"])
    assert f"stage 0 'yesno' -> stage 1 'choice' at step 2 (val/reward {val_reward:.4g} >= " in out
    assert f"stage 1 'choice' -> stage 2 'math+open' at step {2 + n1} (epochs: 1 epoch(s) in the stage)" in out
    assert rule_run["trainer"].num_training_batches == n2


# ------------------------------------------------------------------------------------------------ pure pieces

def test_eligible_indices_and_stage_pools(synth_data):
    recs = _records(synth_data["train"])
    stage = CurriculumStage("hard-math", answer_types=["math"], difficulties=[3])
    expected = [i for i, r in enumerate(recs) if r.answer_type == "math" and r.difficulty == 3]
    assert expected
    assert eligible_indices(recs, stage) == expected
    assert eligible_indices(to_dataset(recs), stage) == expected  # a datasets.Dataset, read by column
    assert eligible_indices([r.to_json() for r in recs], stage.record_filter()) == expected
    assert eligible_indices(recs, CurriculumStage("all")) == list(range(len(recs)))
    yesno = [r for r in recs if r.answer_type == "yesno"]
    # a source without the stage's records drops out of the stage; only "nothing anywhere" is an error
    assert stage_pools([("yn", yesno), ("train", recs)], stage) == [[], expected]
    with pytest.raises(EmptyStageError, match=r"stage 'hard-math' .* selects no record from any training source "
                                              r"\(yn: answer types \['yesno'\], difficulties \[1, 2, 3\]\)"):
        stage_pools([("yn", yesno)], stage)


def test_sampler_pools_renormalise_and_walk():
    s = MixedSampler([10, 20, 5], [1.0, 1.0, 2.0], 600, seed=0)
    s.set_pools([[1, 3], [], [0, 4]], 600)  # the middle source has no eligible record: it drops out
    draws = list(s)
    assert len(draws) == len(s) == 600 and set(draws) == {1, 3, 30, 34}  # offsets 0, 10, 30
    k = sum(d < 10 for d in draws)  # weights 1 : 2 over the two sources left -> p = 1/3
    assert abs(k - 200) < 4 * math.sqrt(600 * (1 / 3) * (2 / 3)), k
    first = [d for d in draws if d < 10]
    assert all(len(set(first[i:i + 2])) == 2 for i in range(0, len(first) - 1, 2))  # a pool is walked, not sampled
    with pytest.raises(ValueError, match="weight 0"):
        MixedSampler([3, 3], [1.0, 0.0], 5).set_pools([[], [0, 1]], 5)


def test_datamodule_stage_takes_effect_at_next_iterator(synth_data, tiny_models):
    paths = [synth_data["train"], synth_data["train_text"]]
    dm = ReasoningDataModule(train=[DataSource(str(p), 0.5, limit=LIMIT) for p in paths], batch_size=4,
                             processor=str(tiny_models["student"]), collate="prompt")
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 2 * LIMIT // 4  # no stage: one pass over every record
    dm.set_curriculum_stage(0, name="yesno", answer_types=["yesno"], difficulties=None)
    it = iter(loader)
    n_yes = _count(paths, ["yesno"])
    assert len(loader) == n_yes // 4  # the epoch is one pass over the stage's records
    first = next(it)
    dm.set_curriculum_stage(1, name="choice", answer_types=["choice"], difficulties=None)
    rest = list(it)  # the running epoch keeps its draws
    assert {r["answer_type"] for b in [first, *rest] for r in b["records"]} == {"yesno"}
    assert len(rest) + 1 == n_yes // 4
    choice = [r["answer_type"] for b in loader for r in b["records"]]  # same loader object, next epoch
    assert set(choice) == {"choice"} and len(choice) == (_count(paths, ["choice"]) // 4) * 4
    with pytest.raises(EmptyStageError, match="'boxes'"):
        dm.set_curriculum_stage(2, name="boxes", answer_types=["bbox"], difficulties=None)


def test_bad_stages_error_clearly(tiny_models, synth_data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown answer type\(s\) \['essay'\]; valid answer types: yesno, choice, "
                                         r"math, open, bbox, multilabel"):
        CurriculumStage("x", answer_types=["essay"])
    with pytest.raises(ValueError, match=r"num_generations \(G\) must be an integer >= 2"):
        CurriculumStage("x", num_generations=1)
    with pytest.raises(ValueError, match="difficulties must be"):
        CurriculumStage("x", difficulties=[4])
    with pytest.raises(ValueError, match=r"stage 1 'b': unknown reward 'acuracy'\. Did you mean 'accuracy'\? Known "
                                         r"rewards: .*currreft_choice, currreft_open, currreft_yesno"):
        Curriculum([CurriculumStage("a", steps=1), CurriculumStage("b", rewards={"acuracy": 1.0})])
    with pytest.raises(ValueError, match="stage 0 'a' has no rule to end it"):
        Curriculum([CurriculumStage("a"), CurriculumStage("b")])

    def fit(stages, **kw):
        module = OPDGRPOModule(ModelSpec(str(tiny_models["student"])), export=False)
        dm = ReasoningDataModule(train=[DataSource(str(synth_data["train"]), limit=LIMIT)], batch_size=2)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Curriculum(stages)], default_root_dir=str(tmp_path),
                            **kw)
        trainer.fit(module, datamodule=dm)

    # A stage selecting nothing fails at fit start, naming the stage and what the source holds.
    boxes = [CurriculumStage("yesno", answer_types=["yesno"], steps=1), CurriculumStage("boxes", answer_types=["bbox"])]
    with pytest.raises(EmptyStageError, match=r"stage 'boxes' .*train: answer types \['choice', 'math', 'open', "
                                              r"'yesno'\]"):
        fit(boxes, max_steps=5)
    # Three step-based stages need at least three epochs (each change ends its epoch); max_epochs 2 is refused.
    three = [CurriculumStage("a", steps=1), CurriculumStage("b", steps=1), CurriculumStage("c")]
    with pytest.raises(ValueError, match=r"needs at least 3 epochs .*trainer.max_epochs=2 .*max_epochs: -1"):
        fit(three, max_epochs=2, max_steps=10)
    with pytest.raises(ValueError, match=r"needs at least 3 steps .*trainer.max_steps=2 "):
        fit(three, max_steps=2)


# ------------------------------------------------------------------------------------------ stage rewards
# What tests/test_rewards.py::test_currreft_rewards does not cover already.

def _wrap(answer: str) -> str:
    return f"<think>..</think><answer>{answer}</answer>"


def test_stage_rewards_by_hand():
    yes = Record(id="y", problem="?", answer="yes", answer_type="yesno")
    out = F.compute_rewards([_wrap("Yes"), "yes, it is", _wrap("yes, it is")], [yes] * 3,
                            {"currreft_yesno": 1.0, "format": 1.0})
    assert out.total.tolist() == [2.0, 0.0, 1.0]  # exact yes + format; neither; format only
    choices = ["3", "42", "7", "9"]
    assert F.currreft_choice_reward(_wrap("A, C"), Record(id="c", problem="?", answer="C,A", answer_type="choice",
                                                          choices=choices)) == 1.0
    b = Record(id="b", problem="?", answer="B", answer_type="choice", choices=choices)
    # The option's text is right for the lenient accuracy, but the stage teaches answering with the letter.
    assert F.accuracy_reward(_wrap("42"), b) == 1.0 and F.currreft_choice_reward(_wrap("42"), b) == 0.0
    assert F.currreft_open_reward(_wrap("\\frac{1}{2}"), Record(id="m", problem="?", answer="0.5",
                                                                answer_type="math")) == 1.0
    box = Record(id="x", problem="?", answer="[0, 0, 10, 10]", answer_type="bbox")
    # [0,0,10,h] inside the gold box: IoU = 10h / 100; [s,0,10+s,10]: (10-s)·10 / (200 - (10-s)·10)
    for pred, iou in [("[0, 0, 10, 5.1]", 0.51), ("[0, 0, 10, 5]", 0.5), ("[0, 0, 10, 4.9]", 0.49),
                      ("[3, 0, 13, 10]", 70 / 130), ("[4, 0, 14, 10]", 60 / 140)]:
        assert F.iou_reward(_wrap(pred), box) == pytest.approx(iou)
        assert F.currreft_open_reward(_wrap(pred), box) == float(iou > 0.5), pred
    labels = Record(id="l", problem="?", answer="dog, fish, bird, cow", answer_type="multilabel")
    assert F.currreft_open_reward(_wrap("cat, Dog, fish"), labels) == pytest.approx(2 / 5)  # {dog, fish} / 5 labels


# ------------------------------------------------------------------------------------------------ configs

def _run_cli(args: list[str]) -> None:
    from vold_pl.cli import main

    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), f"vold-pl {' '.join(args)} exited with {e.code}"


@pytest.mark.parametrize("config", ["currreft/curriculum_rl.yaml", "real/currreft_qwen2_5_vl_3b.yaml",
                                    "currreft/rejection_sample.yaml", "currreft/rejection_sft.yaml"])
def test_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    text = (REPO / "configs" / config).read_text()
    command = "predict" if "sample" in config else "fit"
    assert f"vold-pl {command} --config configs/{config}" in text  # the header names the exact command
    _run_cli([command, "--config", f"configs/{config}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    if config.endswith("rejection_sft.yaml"):
        assert printed["model"]["init_args"]["optim"]["lr"] <= 1e-5  # "a very low learning rate"
        assert printed["data"]["train"][0]["path"] == "runs/currreft/rejection/train.jsonl"
        return
    (cb,) = printed["trainer"]["callbacks"]
    if "sample" in config:
        args = cb["init_args"]
        assert cb["class_path"] == "vold_pl.callbacks.trace_writer.TraceWriter" and args["keep"] == "shortest"
        assert args["text_only_path"] == "artifacts/data/train_text.jsonl" and args["text_only_ratio"] == 0.3
        assert args["num_samples"] > 1 and printed["data"]["view"] == "student"
        return
    init = printed["model"]["init_args"]
    assert init["grpo"]["beta_ref"] == 0.04 and init["opd"]["lam"] == 0.0 and init["teacher"] is None
    assert init["sampling"]["temperature"] == 1.0 and printed["trainer"]["max_epochs"] in (-1, 4)
    stages = cb["init_args"]["stages"]
    assert [s["name"] for s in stages] == ["yesno", "choice", "open"]
    assert [s["num_generations"] for s in stages] == [4, 2, 4]
    assert stages[2]["answer_types"][:2] == ["math", "open"]
    for s, reward in zip(stages, ["currreft_yesno", "currreft_choice", "currreft_open"]):
        assert s["rewards"][reward] == 1.0 and s["rewards"]["format"] == 1.0
    rule = "epochs" if config.startswith("real/") else "steps"
    assert all(s[rule] for s in stages)
    if config.startswith("real/"):
        assert [s["epochs"] for s in stages] == [1, 1, 2] and printed["trainer"]["precision"] == "bf16-mixed"
        assert init["model"]["name_or_path"] == "Qwen/Qwen2.5-VL-3B-Instruct" and printed["trainer"]["max_epochs"] == 4


def test_shipped_curriculum_config_runs_all_stages(tiny_models, synth_data, tmp_path):
    config = yaml.safe_load((REPO / "configs/currreft/curriculum_rl.yaml").read_text())
    config["trainer"].update(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path / "run"),
                             logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(tmp_path / "logs"), "name": "rl"}})
    for stage in config["trainer"]["callbacks"][0]["init_args"]["stages"]:
        stage["steps"] = 1
    init = config["model"]["init_args"]
    init["model"]["name_or_path"] = str(tiny_models["student"])
    init["export_dir"] = str(tmp_path / "export")
    init["sampling"]["max_new_tokens"] = 6
    config["data"].update(train=[{"path": str(synth_data["train"]), "limit": LIMIT}], val=None, batch_size=2)
    cfg = tmp_path / "curriculum_rl.yaml"
    cfg.write_text(yaml.safe_dump(config))
    _run_cli(["fit", "--config", str(cfg)])
    rows = _train_rows(tmp_path / "logs" / "rl" / "version_0")
    assert [r["curriculum/stage"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["train/kl"]) for r in rows)  # the k3 KL to the reference (beta 0.04) is on
    assert (tmp_path / "export" / "model.safetensors").is_file()
