"""Option errors through the real ``vold-pl`` CLI (a subprocess): every invalid value or combination checked by a
module's constructor is the project's ``UserError``: one ``error:`` line naming the option, the value and what to
do, exit code 2, no traceback (``--debug`` shows it); a mistyped key is one line with the nearest valid keys, and
the usage text comes only with ``--help``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VOLD_PL_DEBUG="1" if debug else "")
    return subprocess.run([sys.executable, "-m", "vold_pl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _base(tiny_models, synth_data, tmp_path) -> list[str]:
    return ["fit", "--model", "OPDGRPOModule", "--model.model.name_or_path", str(tiny_models["student"]),
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.train", json.dumps([{"path": str(synth_data["train"]), "limit": 4}])]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a run that must stop with exit 2 and no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    # besides the error only Lightning's one-line seed notice may be printed
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 2, err[-3000:]
    return errors[0]


CASES = [  # (extra flags, what the error line must say)
    (["--model.grpo.micro_batch_size", "-1"], ["grpo.micro_batch_size", "-1", "use 0"]),
    (["--model.opd.lam", "0.5"], ["opd.lam > 0 needs a teacher", "teacher.name_or_path"]),
    (["--model.opd.lam", "0.5", "--model.teacher.name_or_path", "{teacher}", "--model.opd.gate_reward", "acc"],
     ["opd.gate_reward='acc'", "not among the rewards", "add it to model.init_args.rewards"]),
    (["--model.opd.estimator", "full", "--model.opd.mode", "advantage"],
     ["opd.estimator: full with opd.mode: advantage", "Use opd.estimator: k1"]),
    (["--model.max_consecutive_skips", "-1"], ["max_consecutive_skips", "-1"]),
]


@pytest.mark.parametrize("extra,needles", CASES, ids=["micro_batch", "no_teacher", "gate_reward", "full_adv",
                                                       "skips"])
def test_constructor_checks_are_one_line_user_errors(extra, needles, tiny_models, synth_data, tmp_path):
    extra = [a.format(teacher=tiny_models["teacher"]) for a in extra]
    line = _one_error_line(_cli([*_base(tiny_models, synth_data, tmp_path), *extra], tmp_path))
    for n in needles:
        assert n in line, line


def test_debug_shows_the_traceback(tiny_models, synth_data, tmp_path):
    proc = _cli([*_base(tiny_models, synth_data, tmp_path), "--model.grpo.micro_batch_size", "-1", "--debug"],
                 tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "UserError" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: grpo.micro_batch_size")


def test_mistyped_key_is_one_line_with_the_nearest_keys(tiny_models, synth_data, tmp_path):
    line = _one_error_line(_cli([*_base(tiny_models, synth_data, tmp_path), "--model.grpo.num_generation", "3"],
                                tmp_path))
    assert "'model.grpo.num_generation'" in line and "nearest valid: model.grpo.num_generations" in line, line
    assert "--model.help OPDGRPOModule" in line
    # the same key in a config file, and a trainer key
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  max_step: 3\nmodel:\n  class_path: OPDGRPOModule\n  init_args:\n"
                   f"    model:\n      name_or_path: {tiny_models['student']}\n")
    line = _one_error_line(_cli(["fit", "--config", str(cfg)], tmp_path))
    assert "unknown option 'trainer.max_step'" in line and "nearest valid: trainer.max_steps" in line, line
    # the usage comes with --help only
    proc = _cli(["fit", "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--trainer.max_steps" in proc.stdout
