"""The CLI records a run: ``--print_config`` shows every group's values; short class names resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _print_config(args: list[str], capsys) -> dict:
    from vold_pl.cli import main

    with pytest.raises(SystemExit) as e:
        main(args + ["--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_short_model_name_and_groups_print_their_values(capsys):
    from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig
    from vold_pl.rl.rollout_types import SamplingConfig

    printed = _print_config(["fit", "--model", "OPDGRPOModule", "--model.model.name_or_path", "some/model",
                             "--model.grpo.num_generations", "6"], capsys)
    assert printed["model"]["class_path"] == "vold_pl.modules.opd_grpo.OPDGRPOModule"
    args = printed["model"]["init_args"]
    for group in ("optim", "grpo", "opd", "sampling", "rewards"):
        assert isinstance(args[group], dict) and args[group], f"{group} printed as {args[group]!r}"
    # A flag changes one field; the group's other fields keep their defaults.
    assert args["grpo"] == {**GRPOConfig().__dict__, "num_generations": 6}
    assert args["opd"]["lam"] == OPDConfig().lam and args["opd"]["estimator"] == OPDConfig().estimator
    assert args["sampling"]["max_new_tokens"] == SamplingConfig().max_new_tokens
    assert args["rewards"] == {"accuracy": 1.0, "format": 0.1}
    assert args["optim"]["lr"] == 1e-4 and args["optim"]["schedule"] == "cosine"


def test_short_names_for_sft_and_callbacks_and_partial_groups_in_files(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    printed = _print_config(["fit", "--model", "SFTModule", "--model.model.name_or_path", "m",
                             "--trainer.callbacks+=BenchmarkCallback",
                             "--trainer.callbacks.benchmarks=[{name: synth, path: data/test.jsonl}]"], capsys)
    assert printed["model"]["class_path"] == "vold_pl.modules.sft.SFTModule"
    assert printed["model"]["init_args"]["optim"]["name"] == "adamw"
    cb = printed["trainer"]["callbacks"][0]
    assert cb["class_path"] == "vold_pl.callbacks.benchmark.BenchmarkCallback"
    assert cb["init_args"]["benchmarks"][0]["name"] == "synth"
    # A config file that sets a few fields of a group still records the group's whole content.
    printed = _print_config(["fit", "--config", "configs/quickstart/grpo_only.yaml"], capsys)
    args = printed["model"]["init_args"]
    assert args["opd"]["lam"] == 0.0 and args["opd"]["gate"] == "failed" and args["opd"]["mode"] == "loss"
    assert args["sampling"]["max_new_tokens"] == 128 and args["sampling"]["top_p"] == 1.0


def test_example_configs_parse_stacked(capsys, monkeypatch):
    """The example config with a reward plugin, plus the LoRA and TensorBoard overlays, in one command line."""
    monkeypatch.chdir(REPO)
    printed = _print_config(["fit", "--config", "configs/examples/custom_reward.yaml",
                             "--config", "configs/examples/lora_grpo.yaml",
                             "--config", "configs/examples/logger_tensorboard.yaml",
                             "--trainer.callbacks+=PushToHub", "--trainer.callbacks.repo_id=me/tiny"], capsys)
    args = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == "vold_pl.modules.opd_grpo.OPDGRPOModule"
    assert args["rewards"]["configs/examples/my_rewards.py:brevity"] == 0.05
    lora = args["model"]["lora"]
    assert (lora["r"], lora["vision"], lora["export"]) == (16, "frozen", "merged")
    assert args["grpo"]["beta_ref"] == 0.04 and args["grpo"]["num_generations"] == 8  # overlay + base both kept
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert args["log_completions_every_n_steps"] == 10
    push = printed["trainer"]["callbacks"][0]
    assert push["class_path"] == "vold_pl.export.PushToHub" and push["init_args"]["repo_id"] == "me/tiny"


def test_a_list_given_on_the_command_line_replaces_the_configs_list(capsys, monkeypatch):
    """jsonargparse merges a list given on the command line with the config's list of the same length, item by
    item: a benchmark given over configs/quickstart/bench.yaml kept its ``loader: synthetic`` and a val source its
    ``limit: 8``. Each item given is now whole: the fields it does not name take their defaults."""
    from dataclasses import asdict

    from vold_pl.callbacks.benchmark import BenchmarkSpec
    from vold_pl.data.sources import DataSource

    monkeypatch.chdir(REPO)
    base = ["validate", "--config", "configs/quickstart/bench.yaml"]
    printed = _print_config(base, capsys)  # what the config's items hold, which must not leak
    assert printed["trainer"]["callbacks"][0]["init_args"]["benchmarks"][0]["loader"] == "synthetic"
    assert printed["data"]["val"][0]["limit"] == 8
    printed = _print_config([*base, "--trainer.callbacks.init_args.benchmarks",
                             '[{"name": "mathvista", "path": "mv", "limit": 5}]',
                             "--data.val=[{path: v.jsonl, weight: 2.0}]"], capsys)
    assert printed["trainer"]["callbacks"][0]["init_args"]["benchmarks"] == [
        asdict(BenchmarkSpec("mathvista", "mv", limit=5))]
    assert printed["data"]["val"] == [asdict(DataSource("v.jsonl", weight=2.0))]


def test_whole_list_items_fills_only_lists_of_items_of_the_known_options():
    import json

    from vold_pl.cli import whole_list_items
    from vold_pl.data.curriculum import CurriculumStage

    argv = ["fit", "--trainer.callbacks.stages=[{name: yesno, steps: 3}]", "--data.train", "train.yaml",
            "--data.val", "[{path: v.jsonl}, {path: w.jsonl, limit: 2}]", "--model.model.name_or_path", "[{a: 1}]",
            "--data.test", "[{path: [unclosed"]
    out = whole_list_items(argv)
    stages = json.loads(out[1].split("=", 1)[1])
    assert [CurriculumStage(**s) for s in stages] == [CurriculumStage("yesno", steps=3)]
    assert set(stages[0]) == {f for f in CurriculumStage.__dataclass_fields__}  # every field written out
    assert out[2:4] == ["--data.train", "train.yaml"]  # a file or a path: as given
    val = json.loads(out[5])
    assert [(v["path"], v["limit"], v["weight"]) for v in val] == [("v.jsonl", None, 1.0), ("w.jsonl", 2, 1.0)]
    assert out[6:] == argv[6:]  # not a list option (model path), and a value the parser will refuse: untouched
