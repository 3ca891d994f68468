"""Kill soak: a short tiny-model ``vold-pl fit`` is killed with SIGKILL at 5 seeded moments, some of them while a
checkpoint is being written, and resumed with ``--ckpt_path last`` after each; it ends with weights identical to
an uninterrupted run's.

The kills are real (``kill -9`` of the CLI process). To make "during a checkpoint write" a moment that can be hit
every time rather than by luck, the fit runs under a driver that makes each ``fsync`` of a checkpoint's temporary
file take a quarter of a second (the write and its rename are vold-pl's own code, unchanged); the test kills the
process as soon as such a temporary file appears. The other kills come at seeded random delays after progress.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from vold_pl.checkpointing import checkpoint_problem

REPO = Path(__file__).resolve().parents[1]
STEPS = 12

DRIVER = r'''
import os, sys, time
real_fsync = os.fsync

def slow_fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if ".tmp-" in os.path.basename(name):  # a checkpoint's temporary file, before its rename
        time.sleep(0.25)
    return real_fsync(fd)

os.fsync = slow_fsync
from vold_pl.cli import main
main()
'''


def _args(tiny_models, synth_data, root: Path) -> list[str]:
    return ["fit", "--model", "SFTModule", "--model.model.name_or_path", str(tiny_models["student"]),
            "--model.export", "false", "--model.optim.lr", "1e-3", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(STEPS), "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
            "--trainer.callbacks+=ResumableCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
            "--data.train", json.dumps([{"path": str(synth_data["train_text"])}]), "--data.batch_size", "2",
            "--data.epoch_size", "8"]  # 4 steps an epoch: the run crosses epoch boundaries


def _start(driver: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(driver), *args], cwd=log.parent, env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def _step(folder: Path) -> int:
    last = folder / "last.ckpt"
    if not last.is_file():
        return 0
    return torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def _writing(folder: Path) -> bool:
    return folder.is_dir() and any(".tmp-" in p.name or p.name.endswith(".partial") for p in folder.iterdir())


def test_kill_9_at_five_moments_then_resume_gives_the_uninterrupted_weights(tiny_models, synth_data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    rng = random.Random(25)
    plan = rng.sample(["write", "write", "write", "delay", "delay"], 5)  # seeded order of the kinds of moment
    delays = [rng.uniform(0.0, 1.5) for _ in plan]

    root = tmp_path / "killed"
    folder, log = root / "checkpoints", tmp_path / "killed.log"
    args = [*_args(tiny_models, synth_data, root), "--ckpt_path", "last"]
    kills, in_write = [], 0
    for kind, delay in zip(plan, delays):
        start = _step(folder)
        proc = _start(driver, args, log)
        deadline = time.time() + 300
        # wait for progress past the resume point, then for the moment
        while _step(folder) <= start and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if kind == "delay":
            time.sleep(delay)
        else:
            while not _writing(folder) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
        assert proc.poll() is None, f"the fit ended before kill {len(kills) + 1}:\n{log.read_text()[-3000:]}"
        during = _writing(folder)
        proc.kill()
        proc.wait()
        in_write += during
        kills.append((kind, _step(folder)))
        # what a kill leaves is always resumable: last.ckpt is the old or the new one, never half of one
        assert checkpoint_problem(folder / "last.ckpt") is None, kills
    assert in_write >= 2, kills
    assert kills[-1][1] < STEPS, kills

    proc = _start(driver, args, log)  # the last resume runs to the end
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]

    ref_root = tmp_path / "straight"
    proc = _start(driver, _args(tiny_models, synth_data, ref_root), tmp_path / "straight.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    got = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    ref = torch.load(ref_root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert got["global_step"] == ref["global_step"] == STEPS
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    first = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)  # the weights moved at all
    assert any(not torch.equal(first["state_dict"][k], v) for k, v in _initial(tiny_models).items() if k in
               first["state_dict"])


def _initial(tiny_models) -> dict:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_models["student"]))
    return {f"model.{k}": v for k, v in model.state_dict().items()}
