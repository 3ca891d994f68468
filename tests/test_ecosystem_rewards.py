"""Reward plugins: ``module.path:function`` and ``path/to/file.py:function`` names in ``rewards:``."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vold_pl.data.schema import Record
from vold_pl.errors import UserError
from vold_pl.rewards import plugins as P
from vold_pl.rewards.functions import compute_rewards, get_reward, validate_weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_plugins(monkeypatch):
    """Each test starts with no plugin enabled or loaded (and restores the process state after)."""
    monkeypatch.setattr(P, "_loaded", {})
    monkeypatch.setattr(P, "_enabled", set())
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    yield


def _write(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def _rec(answer="4"):
    return Record(id="r0", problem="q", answer=answer, answer_type="math")


def test_file_plugin_scores_like_its_formula_and_loads_once(tmp_path):
    counter = tmp_path / "imports.txt"
    f = _write(tmp_path / "my_rewards.py", f"""
        with open({str(counter)!r}, "a") as fh:
            fh.write("x")
        def brevity(completion, record):
            return 1.0 / (1 + len(completion))
    """)
    name = f"{f}:brevity"
    P.load_reward_plugins([name])
    texts = ["<think>a</think> <answer>4</answer>", "<answer>5</answer>", "no answer"]
    out = compute_rewards(texts, [_rec()] * 3, {"accuracy": 1.0, name: 0.5})
    acc = torch.tensor([1.0, 0.0, 0.0])
    brev = torch.tensor([1 / (1 + len(t)) for t in texts])
    torch.testing.assert_close(out.named[name], brev)
    torch.testing.assert_close(out.total, acc + 0.5 * brev)
    assert get_reward(name) is get_reward(name)
    P.load_reward_plugins([name])
    compute_rewards(texts, [_rec()] * 3, {name: 1.0})
    assert counter.read_text() == "x", "the plugin file must be executed once per process"
    assert name in json.loads(os.environ[P.ENV_VAR]), "other ranks learn the enabled names from the environment"


def test_module_plugin_and_env_enabled(tmp_path, monkeypatch):
    _write(tmp_path / "eco_reward_mod.py", """
        def length(completion: str, record, scale: float = 2.0) -> float:
            return scale * len(completion)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "eco_reward_mod", raising=False)
    name = "eco_reward_mod:length"
    with pytest.raises(P.RewardPluginError, match="not enabled"):
        validate_weights({name: 1.0})
    monkeypatch.setenv(P.ENV_VAR, json.dumps([name]))  # what a child rank inherits
    assert validate_weights({name: 1.0}) == {name: 1.0}
    out = compute_rewards(["abc"], [_rec()], {name: 1.0})
    assert out.total.tolist() == [6.0]


@pytest.mark.parametrize("case, body, match", [
    ("missing_fn", "def other(c, r):\n    return 0.0\n", r"has no function 'brevity'.*other"),
    ("one_param", "def brevity(c):\n    return 0.0\n", r"signature brevity\(c\).*fn\(completion: str, record\)"),
    ("three_params", "def brevity(c, r, k):\n    return 0.0\n", r"signature brevity\(c, r, k\)"),
    ("not_callable", "brevity = 3\n", "not a function"),
    ("raises", "raise RuntimeError('boom at import')\n", "raised RuntimeError: boom at import"),
])
def test_bad_file_plugins_are_user_errors(tmp_path, case, body, match):
    f = _write(tmp_path / f"{case}.py", body)
    with pytest.raises(UserError, match=match):
        P.load_reward_plugins([f"{f}:brevity"])


def test_missing_module_and_file_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="module 'no_such_reward_pkg' not found on the Python path"):
        P.load_reward_plugins(["no_such_reward_pkg.rewards:fn"])
    with pytest.raises(UserError, match=r"file .*nowhere\.py not found"):
        P.load_reward_plugins([f"{tmp_path}/nowhere.py:fn"])
    with pytest.raises(UserError, match="unknown reward 'acuracy'.*Did you mean 'accuracy'"):
        validate_weights({"acuracy": 1.0})


def test_plugin_names_found_in_nested_configs():
    cfg = {"model": {"init_args": {"rewards": {"accuracy": 1.0, "a.b:c": 0.1}}},
           "trainer": {"callbacks": [{"init_args": {"stages": [{"rewards": {"x.py:f": 1.0, "format": 1.0}}]}}]},
           "other": {"not_rewards": {"d.e:f": 1.0}}}
    assert P.plugin_names_in(cfg) == ["a.b:c", "x.py:f"]


def test_checkpoint_hparams_cannot_bring_a_plugin(tmp_path, tiny_models, synth_data, monkeypatch):
    """A --ckpt_path whose saved hyperparameters name a plugin file the user's config does not: never run."""
    from vold_pl.cli import VoldCLI
    from vold_pl.data.datamodule import ReasoningDataModule

    marker = tmp_path / "EVIL_RAN"
    evil = _write(tmp_path / "evil.py", f"""
        open({str(marker)!r}, "w").write("ran")
        def fn(completion, record):
            return 1.0
    """)
    mine = _write(tmp_path / "mine.py", "def fn(completion, record):\n    return 0.5\n")
    ckpt = tmp_path / "fake.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "vold_pl.modules.opd_grpo.OPDGRPOModule",
                                     "model": {"name_or_path": str(tiny_models["student"])},
                                     "rewards": {f"{evil}:fn": 1.0}}}, ckpt)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False},
        "model": {"class_path": "vold_pl.modules.opd_grpo.OPDGRPOModule",
                  "init_args": {"model": {"name_or_path": str(tiny_models["student"])},
                                "rewards": {"accuracy": 1.0, f"{mine}:fn": 0.5}, "export": False}},
        "data": {"train": [{"path": str(synth_data["train"])}]}}))

    class _Stop(Exception):
        pass

    built = {}

    class NoFit(VoldCLI):
        def after_instantiate_classes(self):
            built["rewards"] = dict(self.model.reward_weights)
            raise _Stop

    try:
        NoFit(model_class=None, datamodule_class=ReasoningDataModule, subclass_mode_model=True,
              auto_configure_optimizers=False, args=["fit", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    except (_Stop, SystemExit, UserError):
        pass
    assert P.get_plugin(f"{mine}:fn")("x", None) == 0.5  # the user's own plugin was enabled by the CLI
    assert not marker.exists(), "a checkpoint's hyperparameters ran a plugin file"
    assert f"{evil}:fn" not in built.get("rewards", {})
    assert f"{evil}:fn" not in P.enabled_plugins()


def test_example_config_plugin_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    import yaml

    cfg = yaml.safe_load((REPO / "configs/examples/custom_reward.yaml").read_text())
    names = P.plugin_names_in(cfg)
    assert names == ["configs/examples/my_rewards.py:brevity"]
    fns = P.load_reward_plugins(names)
    assert fns[names[0]]("word " * 40, None) == 1.0 and fns[names[0]]("word " * 200, None) == 0.0
