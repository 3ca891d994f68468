"""The OpenVLThinker rounds driver (``vold_pl/rounds.py``): a stopped and resumed two-round loop on the tiny
models (stages in-process, a handful of steps each), the SFT starting model of ``base`` / ``continue``, the
clear errors, and the shipped rounds configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vold_pl.rounds import RoundsConfig, marker, parse_config, run_rounds, sft_set, stage_args

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CONFIGS = REPO / "configs" / "openvlthinker"


def tiny_config(tmp_path: Path, tiny_models, synth_data, **kw) -> RoundsConfig:
    """Two rounds on the tiny models with a few steps per stage; round 0 trains on the synthetic gold traces."""
    val = json.dumps([{"path": str(synth_data["val"]), "limit": 2}])
    bench = json.dumps([{"name": "synthetic", "path": str(synth_data["test"]), "loader": "synthetic", "limit": 4}])
    quiet = ["--trainer.enable_checkpointing", "false", "--trainer.logger", "false"]
    base = dict(
        out_dir=str(tmp_path / "ovt"), rounds=2, base_model=str(tiny_models["student"]),
        initial_sft_data=str(synth_data["train"]), sft_config=str(CONFIGS / "sft.yaml"),
        grpo_config=str(CONFIGS / "grpo.yaml"), sample_config=str(CONFIGS / "sample.yaml"),
        bench_config=str(CONFIGS / "bench.yaml"), sft_init="continue",
        train_data=[{"path": str(synth_data["train"]), "limit": 16}], val_data=[{"path": str(synth_data["val"]), "limit": 4}],
        sample_data=[{"path": str(synth_data["train"]), "limit": 6}],
        sft_args=["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                  "--data.batch_size", "4", *quiet],
        grpo_args=["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                   "--data.batch_size", "2", "--data.val_batch_size", "4", "--model.init_args.grpo.num_generations",
                   "2", "--model.init_args.sampling.max_new_tokens", "12", *quiet],
        sample_args=["--trainer.callbacks.init_args.num_samples", "4", "--trainer.callbacks.init_args.max_new_tokens",
                     "16", "--data.val_batch_size", "6"],
        bench_args=["--trainer.callbacks.init_args.benchmarks", bench, "--trainer.callbacks.init_args.max_new_tokens",
                    "12", "--data.val", val],
        min_traces=1, on_empty="reuse_previous", in_process=True)
    return RoundsConfig(**{**base, **kw})


def test_two_rounds_stop_resume_and_table(tmp_path, tiny_models, synth_data, capsys):
    cfg = tiny_config(tmp_path, tiny_models, synth_data, stop_after="0:traces")
    run_rounds(cfg)
    out = capsys.readouterr().out
    assert "stopped after round 0 traces" in out
    done0 = {s: marker(cfg, 0, s) for s in ("sft", "bench_sft", "grpo", "bench_grpo", "traces")}
    assert all(p.exists() for p in done0.values()) and not marker(cfg, 1, "sft").exists()
    assert not (Path(cfg.out_dir) / "round_0" / "grpo" / "export.partial").exists()  # renamed into place
    mtimes = {s: p.stat().st_mtime_ns for s, p in done0.items()}

    cfg.stop_after = None
    state = run_rounds(cfg)
    out = capsys.readouterr().out
    assert {s: p.stat().st_mtime_ns for s, p in done0.items()} == mtimes  # round 0 was not redone
    for s in done0:
        assert f"[rounds] round 0 {s}: done" in out
    assert [(e["round"], e["stage"], e["status"]) for e in state["stages"]][5:] == [
        (1, "sft", "ran"), (1, "bench_sft", "ran"), (1, "grpo", "ran"), (1, "bench_grpo", "ran")]
    assert not marker(cfg, 1, "traces").exists()  # no round after the last one to sample for

    # sft_init: continue -> round 1's SFT starts from round 0's GRPO export (printed command and rounds.json).
    sft1 = next(e for e in state["stages"] if (e["round"], e["stage"]) == (1, "sft"))
    grpo0 = str(Path(cfg.out_dir) / "round_0" / "grpo" / "export")
    assert f"--model.init_args.model.name_or_path {grpo0} " in sft1["command"] and sft1["command"] in out
    # Round 1's SFT set: round 0's traces when any verified trace was kept, else (on_empty) the initial set again.
    summary = json.loads(marker(cfg, 0, "traces").with_suffix(".summary.json").read_text())
    if summary["verified_records"] >= 1:
        assert sft1["sft_data"] == str(marker(cfg, 0, "traces"))
    else:
        assert sft1["sft_data"] == cfg.initial_sft_data and "REUSED from round 0" in out

    saved = json.loads((Path(cfg.out_dir) / "rounds.json").read_text())
    assert [row["round"] for row in saved["table"]] == [0, 1]
    for row in saved["table"]:
        for stage in ("sft", "grpo"):
            assert set(row[stage]) == {"synthetic"} and math.isfinite(row[stage]["synthetic"])
            assert 0.0 <= row[stage]["synthetic"] <= 1.0
    # stages run before the stop keep their commands in the resumed run's state
    assert all("command" in e for e in saved["stages"])
    md = (Path(cfg.out_dir) / "rounds.md").read_text()
    assert "| round | synthetic after SFT | synthetic after GRPO |" in md and "\n| 1 | " in md and md in out


@pytest.mark.parametrize("sft_init", ["base", "continue"])
def test_sft_init_chooses_the_starting_model(tmp_path, tiny_models, synth_data, sft_init, capsys):
    cfg = tiny_config(tmp_path, tiny_models, synth_data, sft_init=sft_init, rounds=3, dry_run=True)
    state = run_rounds(cfg)
    printed = capsys.readouterr().out
    sfts = [e["command"] for e in state["stages"] if e["stage"] == "sft"]
    starts = [c.split("--model.init_args.model.name_or_path ")[1].split()[0] for c in sfts]
    grpo = [str(Path(cfg.out_dir) / f"round_{r}" / "grpo" / "export") for r in range(2)]
    want = [cfg.base_model] * 3 if sft_init == "base" else [cfg.base_model, *grpo]
    assert starts == want and all(c in printed for c in sfts)
    assert not Path(cfg.out_dir).exists()  # a dry run writes nothing


def test_resume_mid_fit_passes_last_checkpoint(tmp_path, tiny_models, synth_data):
    cfg = tiny_config(tmp_path, tiny_models, synth_data)
    assert "--ckpt_path" not in stage_args(cfg, 0, "grpo")
    last = Path(cfg.out_dir) / "round_0" / "grpo" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    args = stage_args(cfg, 0, "grpo")
    assert args[args.index("--ckpt_path") + 1] == str(last)


def test_clear_errors(tmp_path, tiny_models, synth_data):
    with pytest.raises(SystemExit, match="sft_init must be 'base'.*or 'continue'"):
        tiny_config(tmp_path, tiny_models, synth_data, sft_init="resume")
    with pytest.raises(SystemExit, match="initial_sft_data not found: .*nope.jsonl"):
        run_rounds(tiny_config(tmp_path, tiny_models, synth_data, initial_sft_data=str(tmp_path / "nope.jsonl")))
    with pytest.raises(SystemExit, match="stop_after must be"):
        tiny_config(tmp_path, tiny_models, synth_data, stop_after="grpo")
    # A round whose GRPO model kept no verified trace: on_empty error says what to try; reuse_previous falls back.
    traces = marker(tiny_config(tmp_path, tiny_models, synth_data), 0, "traces")
    traces.parent.mkdir(parents=True)
    traces.write_text("")
    traces.with_suffix(".summary.json").write_text(json.dumps({"verified_records": 0, "kept": 0, "total": 6}))
    with pytest.raises(SystemExit, match=r"wrote 0 verified traces \(0/6 prompts.*more samples.*temperature"):
        sft_set(tiny_config(tmp_path, tiny_models, synth_data, on_empty="error"), 1)
    path, why = sft_set(tiny_config(tmp_path, tiny_models, synth_data, on_empty="reuse_previous"), 1)
    assert path == Path(synth_data["train"]) and "REUSED from round 0" in why
    traces.with_suffix(".summary.json").write_text(json.dumps({"verified_records": 3, "kept": 3, "total": 6}))
    path, why = sft_set(tiny_config(tmp_path, tiny_models, synth_data, on_empty="error"), 1)
    assert path == traces and why.startswith("3 verified traces")


@pytest.mark.parametrize("config", ["configs/openvlthinker/rounds.yaml", "configs/real/openvlthinker_qwen2_5_vl_3b.yaml"])
def test_shipped_rounds_configs_parse(config, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = parse_config(["--config", config, "--rounds", "3"])
    assert cfg.rounds == 3 and cfg.sft_init == "base" and cfg.train_data
    for name in ("sft_config", "grpo_config", "sample_config", "bench_config"):
        assert (REPO / getattr(cfg, name)).is_file()
