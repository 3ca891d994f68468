"""A rehearsal of every real recipe config (``configs/real/*.yaml``) on CPU, at tiny size, with real shapes.

The models are the real architectures scaled down, with the real tokenizers, token ids, chat templates,
151936 embedding rows and Qwen2.5-VL's vision layout (``real_shape_models`` in conftest.py,
``vold_pl/toy/qwen_shapes.py``). Each config runs through the CLI as a user runs it, with only model paths,
data paths, device, strategy size and sizes (steps, lengths, batches) overridden: two optimizer steps of each
fit, a validation where the recipe validates, a predict where it samples. The FSDP configs run
``ModelParallelStrategy`` / ``FSDP2Strategy`` (``fully_shard``) in one gloo process. Every stage's prompts are
checked as the models receive them, decoded from their ids under the real chat templates
(``tests/prompt_checks.py``): the student's training and validation batches, the teacher's inputs, the batches
trace writing samples from and the benchmark's, each with its problem (or text view), options and instruction
exactly once and one image placeholder per image the view shows.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.prompt_checks import PromptRecorder

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "configs" / "real"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# fp32 on CPU: this CPU has no fast bf16 (one backward of the 151936-row LM head: ~150 s under bf16 autocast, ~3 s in
# fp32). bf16-mixed itself is tested on the tiny models (tests/test_real_precision.py).
DEVICE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
          "--trainer.precision", "32-true"]
SIZES = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
         "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
RL_SIZES = ["--model.init_args.grpo.num_generations", "2", "--model.init_args.sampling.max_new_tokens", "8",
            "--data.batch_size", "2", "--data.val_batch_size", "2", "--model.init_args.logprob_chunk_size", "64"]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder that sees the repo's configs: relative outputs (runs/...) land here."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # ModelParallelStrategy's group
        torch.distributed.destroy_process_group()


def cli(args: list[str]) -> None:
    from vold_pl.cli import main

    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), f"vold-pl {' '.join(args)} exited with {e.code}"


def data_sources(config: Path, split: str, paths: list[Path], limit: int) -> str:
    """The config's ``data.<split>`` list with each path replaced (weights and options kept) and a size limit."""
    entries = yaml.safe_load(config.read_text())["data"][split]
    assert len(entries) == len(paths), (config, split)
    return json.dumps([{**e, "path": str(p), "limit": limit} for e, p in zip(entries, paths)])


def metrics(log_dir: Path) -> list[dict]:
    (path,) = sorted(log_dir.glob("**/metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


def assert_exported_aligned(export: Path) -> None:
    """A save_pretrained folder whose tokenizer carries Qwen3's tokens at Qwen3's ids (read from tokenizer.json:
    loading the 151k-token tokenizer takes seconds; test_tokenizer_alignment.py reloads one)."""
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    added = {t["content"]: t["id"] for t in json.loads((export / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<think>"] == 151667 and added["</think>"] == 151668 and max(added.values()) == 151668


def test_sft_real_config(workdir, real_shape_models, synth_data, monkeypatch):
    config = REAL / "sft_qwen2_5_vl_3b.yaml"
    prompts = PromptRecorder().install(monkeypatch)
    cli(["fit", "--config", str(config), *DEVICE, *SIZES,
         "--model.init_args.model.name_or_path", str(real_shape_models["student"]),
         "--model.init_args.model.align_tokens_with", str(real_shape_models["teacher"]),
         "--data.train", data_sources(config, "train", [synth_data["train"]], 8),
         "--data.val", data_sources(config, "val", [synth_data["val"]], 2),
         "--data.batch_size", "2", "--data.max_length", "160", "--trainer.accumulate_grad_batches", "1",
         "--trainer.val_check_interval", "2"])
    rows = metrics(workdir / "runs" / "sft_qwen2_5_vl_3b")
    assert len(column(rows, "train/loss")) >= 1 and all(math.isfinite(x) for x in column(rows, "train/loss"))
    assert len(column(rows, "val/loss")) == 1  # validated once, after the 2 optimizer steps
    assert_exported_aligned(workdir / "runs" / "sft_qwen2_5_vl_3b" / "export")
    prompts.check("sft", "synthetic-train", at_least=4)  # 2 steps x 2 rows, images and all
    prompts.check("sft", "synthetic-val")


def opd_args(config: Path, real_shape_models, synth_data) -> list[str]:
    return ["fit", "--config", str(config), *DEVICE, *SIZES, *RL_SIZES,
            "--model.init_args.model.name_or_path", str(real_shape_models["student"]),
            "--model.init_args.teacher.name_or_path", str(real_shape_models["teacher"]),
            "--data.train", data_sources(config, "train", [synth_data["train"], synth_data["train_text"]], 8),
            "--data.val", data_sources(config, "val", [synth_data["val"]], 2),
            "--trainer.val_check_interval", "2"]


@pytest.mark.parametrize("name, strategy_size", [
    ("opd_grpo_qwen2_5_vl_3b", ["--trainer.strategy.init_args.data_parallel_size", "1"]),  # ModelParallelStrategy
    ("opd_grpo_qwen2_5_vl_3b_fsdp", []),  # FSDP2Strategy: data_parallel_size auto = 1 node x 1 device
])
def test_opd_grpo_real_configs(name, strategy_size, workdir, real_shape_models, synth_data, monkeypatch):
    """The base Qwen2.5-VL tokenizer is aligned with the Qwen3 teacher at load time (align_tokens_with: teacher).
    The student reads image and text-only problems, the teacher (Qwen3's template) their text views."""
    config = REAL / f"{name}.yaml"
    prompts = PromptRecorder().install(monkeypatch)
    cli([*opd_args(config, real_shape_models, synth_data), *strategy_size])
    run = workdir / "runs" / name
    rows = metrics(run)
    assert column(rows, "step")[-1] >= 1 and len(column(rows, "train/loss")) == 2
    assert all(math.isfinite(x) for x in column(rows, "train/loss"))
    kl = column(rows, "train/opd/reverse_kl")  # the teacher scored the student's tokens
    assert len(kl) == 2 and all(math.isfinite(x) for x in kl)
    assert len(column(rows, "val/accuracy")) == 1
    assert_exported_aligned(run / "export")
    student = prompts.check("prompt", "synthetic-train", at_least=4)
    assert {bool(s.record["has_image"]) for s in student} == {True, False}  # both sources were drawn
    prompts.check("prompt", "synthetic-val")
    teacher = prompts.check("teacher", "synthetic-train", view="teacher", at_least=4)
    assert {bool(s.record["has_image"]) for s in teacher} == {True, False}  # text views and text problems


def test_currreft_real_config_and_rejection_sampling(workdir, real_shape_models, synth_data, monkeypatch):
    """Curriculum RL (ModelParallelStrategy, k3 KL to the frozen initial weights), then the rejection sampling
    predict on its export, as the config's header says."""
    config = REAL / "currreft_qwen2_5_vl_3b.yaml"
    prompts = PromptRecorder().install(monkeypatch)
    # 8 records, 2 per answer type: each stage's epoch is one step of 2 prompts; 3 steps (the curriculum refuses
    # fewer steps than stages), one per stage.
    cli(["fit", "--config", str(config), *DEVICE, *SIZES, *RL_SIZES, "--trainer.max_steps", "3",
         "--trainer.strategy.init_args.data_parallel_size", "1",
         "--model.init_args.model.name_or_path", str(real_shape_models["student"]),
         "--data.train", data_sources(config, "train", [synth_data["train"]], 8),
         "--data.val", data_sources(config, "val", [synth_data["val"]], 2)])
    run = workdir / "runs" / "currreft_qwen2_5_vl_3b"
    rows = metrics(run)
    assert column(rows, "curriculum/stage") == [0.0, 1.0, 2.0]
    assert len(column(rows, "train/kl")) == 3 and all(math.isfinite(x) for x in column(rows, "train/kl"))
    assert len(column(rows, "val/reward")) >= 1
    export = run / "export"
    assert (export / "model.safetensors").is_file()
    prompts.check("prompt", "synthetic-train", at_least=6)
    prompts.seen.clear()
    cli(["predict", "--config", "configs/currreft/rejection_sample.yaml", *DEVICE,
         "--model.init_args.model.name_or_path", str(export),
         "--data.predict", json.dumps([{"path": str(synth_data["train"]), "limit": 4}]),
         "--trainer.callbacks.init_args.text_only_path", str(synth_data["train_text"]),
         "--trainer.callbacks.init_args.num_samples", "2", "--trainer.callbacks.init_args.max_new_tokens", "8",
         "--data.val_batch_size", "4"])
    summary = json.loads((workdir / "runs/currreft/rejection/train.summary.json").read_text())
    assert summary["total"] == 4  # every prompt sampled (random tiny weights verify nothing: kept may be 0)
    assert (workdir / "runs/currreft/rejection/train.jsonl").is_file()
    sampled = prompts.check("traces", "synthetic-train", at_least=4)  # the student's image view, as configured
    assert len({s.record["id"] for s in sampled}) == 4


def test_openvlthinker_real_config(workdir, real_shape_models, synth_data, monkeypatch):
    """The rounds driver on the real stage configs: SFT, benchmark, GRPO, benchmark, then the next SFT set."""
    from vold_pl.rounds import main as rounds_main

    prompts = PromptRecorder().install(monkeypatch)

    bench = json.dumps([{"name": "synthetic", "path": str(synth_data["test"]), "loader": "synthetic", "limit": 4}])
    val = json.dumps([{"path": str(synth_data["val"]), "limit": 2}])
    fit = [*DEVICE, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
           "--trainer.num_sanity_val_steps", "0", "--data.num_workers", "0", "--trainer.log_every_n_steps", "1"]
    rounds_main([
        "--config", "configs/real/openvlthinker_qwen2_5_vl_3b.yaml", "--in_process", "true", "--stop_after", "0:traces",
        "--base_model", str(real_shape_models["student"]), "--initial_sft_data", str(synth_data["train"]),
        "--train_data", json.dumps([{"path": str(synth_data["train"]), "limit": 4}]), "--val_data", val,
        "--min_traces", "1", "--on_empty", "reuse_previous",
        "--sft_args", json.dumps([*fit, "--data.batch_size", "2", "--data.max_length", "160",
                                  "--trainer.accumulate_grad_batches", "1"]),
        "--grpo_args", json.dumps([*fit, *RL_SIZES]),
        "--sample_args", json.dumps([*DEVICE, "--trainer.callbacks.init_args.max_new_tokens", "8",
                                     "--data.val_batch_size", "4"]),
        "--bench_args", json.dumps([*DEVICE, "--trainer.callbacks.init_args.benchmarks", bench,
                                    "--trainer.callbacks.init_args.max_new_tokens", "8",
                                    "--trainer.callbacks.init_args.batch_size", "4", "--data.val", val]),
    ])
    out = workdir / "runs" / "openvlthinker_qwen2_5_vl_3b"
    state = json.loads((out / "rounds.json").read_text())
    assert [(e["round"], e["stage"]) for e in state["stages"]] == [
        (0, "sft"), (0, "bench_sft"), (0, "grpo"), (0, "bench_grpo"), (0, "traces")]
    assert (out / "round_0" / "grpo" / "export" / "model.safetensors").is_file()
    prompts.check("sft", "synthetic-train", at_least=4)
    prompts.check("prompt", "synthetic-test", at_least=8)  # the benchmark: 4 problems after SFT, 4 after GRPO
    prompts.check("prompt", "synthetic-train", at_least=4)  # GRPO's rollouts
    prompts.check("traces", "synthetic-train", at_least=4)  # the next SFT set
