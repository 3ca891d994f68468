"""Faults (issue 6): non-finite losses and gradients skip the update without touching a weight; too many in a row
stop the run with a clear message; a raising reward is counted, not fatal; checkpoint writes survive kill -9."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch

from vold_pl.checkpointing import (AtomicCheckpointIO, ResumableCheckpoint, atomic_torch_save, recover_interrupted_swap,
                                   swap_into_place)
from vold_pl.data.datamodule import ReasoningDataModule
from vold_pl.data.sources import DataSource
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import NonFiniteStepsError, OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDGRPOModule
from vold_pl.modules.sft import SFTModule
from vold_pl.rewards import functions as reward_fns
from vold_pl.rl.rollout_types import SamplingConfig

NAN = float("nan")
RAISING_REWARD, HASH_REWARD, OVERFLOW_REWARD = "_test_faults_raises", "_test_faults_hash", "_test_faults_overflow"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# --------------------------------------------------------------------------------------------- poisoned modules

class PoisonedSFT(SFTModule):
    """SFT whose loss (``poison[batch_idx] == 'loss'``) or one gradient (``'grad'``) is NaN at chosen batches."""

    poison: dict[int, str] = {}

    def training_step(self, batch, batch_idx):
        kind = self.poison.get(batch_idx) if self.trainer.current_epoch == 0 else None
        self._hook = None
        if kind == "grad":  # a finite loss whose backward produces a NaN in one weight's gradient
            p = next(self.model.parameters())
            self._hook = p.register_hook(lambda g: g * NAN)
        if kind == "loss":
            loss = self._step(batch, "train") * NAN
            return loss if self.skip_step_unless_finite(loss) else None
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._hook is not None:
            self._hook.remove()
        super().on_train_batch_end(outputs, batch, batch_idx)


class PoisonedOPD(OPDGRPOModule):
    """OPD-GRPO whose loss is NaN at the optimizer steps in ``poison`` (injected where the step takes it)."""

    poison: set[int] = set()

    def _micro_batch_loss(self, step, mb, totals, world, entropy):
        loss, parts = super()._micro_batch_loss(step, mb, totals, world, entropy)
        return (loss * NAN if self.trainer.global_step in self.poison else loss), parts


class Snapshots(L.Callback):
    """Weights and optimizer state before and after every training batch."""

    def __init__(self):
        self.before, self.after = [], []

    @staticmethod
    def _snap(trainer, pl_module):
        return ({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._snap(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._snap(trainer, pl_module))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _fit(module, data, tmp_path, steps, **kw):
    snaps = Snapshots()
    dm = ReasoningDataModule(train=[DataSource(str(data["train"]))], batch_size=2, epoch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[snaps], default_root_dir=str(tmp_path), **kw)
    trainer.fit(module, datamodule=dm)
    return trainer, snaps


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_sft_nonfinite_loss_and_grad_skip_the_update(optim, tiny_models, synth_data, tmp_path, capsys):
    L.seed_everything(0)
    PoisonedSFT.poison = {1: "loss", 2: "grad"}
    module = PoisonedSFT(ModelSpec(str(tiny_models["student"])), optim=OptimConfig(name=optim, lr=1e-2), export=False)
    trainer, snaps = _fit(module, synth_data, tmp_path, 4, gradient_clip_val=1.0)
    for i in (1, 2):  # weights and optimizer moments are bit-identical across the poisoned steps
        (w0, o0), (w1, o1) = snaps.before[i], snaps.after[i]
        assert _same(w0, w1), f"batch {i}: a weight changed in a skipped step"
        assert _same(o0, o1), f"batch {i}: the optimizer state changed in a skipped step"
    for i in (0, 3):  # the healthy steps around them do update
        assert not _same(snaps.before[i][0], snaps.after[i][0])
    assert module.skipped_steps == 2 and module.consecutive_skips == 0
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2.0
    assert trainer.global_step == 4  # a skipped step still counts as a step
    out = capsys.readouterr().out
    assert "non-finite loss (nan)" in out and "non-finite gradient" in out and "no weight changed" in out


def test_consecutive_skips_stop_the_run_with_a_clear_message(tiny_models, synth_data, tmp_path):
    L.seed_everything(0)
    PoisonedSFT.poison = {i: "loss" for i in range(8)}
    module = PoisonedSFT(ModelSpec(str(tiny_models["student"])), export=False, max_consecutive_skips=3)
    with pytest.raises(NonFiniteStepsError) as ei:
        _fit(module, synth_data, tmp_path, 6)
    msg = str(ei.value)
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in msg
    assert "max_consecutive_skips" in msg and "lr" in msg and "batch ids" in msg
    assert module.skipped_steps == 3
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        SFTModule(ModelSpec(str(tiny_models["student"])), max_consecutive_skips=-1)


def test_opd_nonfinite_loss_skips_and_raising_reward_is_counted(tiny_models, synth_data, tmp_path):
    reward_fns.register_reward(RAISING_REWARD, overwrite=True)(lambda c, r: 1 / 0)
    reward_fns.register_reward(OVERFLOW_REWARD, overwrite=True)(lambda c, r: 1e39)  # finite float64, inf in float32
    # varies with the text, so the tiny model's rollouts get non-zero advantages and healthy steps move weights
    reward_fns.register_reward(HASH_REWARD, overwrite=True)(lambda c, r: (zlib.crc32(c.encode()) % 997) / 997)
    try:
        L.seed_everything(0)
        PoisonedOPD.poison = {1}
        module = PoisonedOPD(ModelSpec(str(tiny_models["student"])), optim=OptimConfig(lr=1e-2),
                             grpo=GRPOConfig(num_generations=2), sampling=SamplingConfig(max_new_tokens=4),
                             rewards={"accuracy": 1.0, HASH_REWARD: 1.0, RAISING_REWARD: 1.0, OVERFLOW_REWARD: 1.0},
                             export=False,
                             log_completions_every_n_steps=0)
        trainer, snaps = _fit(module, synth_data, tmp_path, 3)
    finally:
        for name in (RAISING_REWARD, HASH_REWARD, OVERFLOW_REWARD):
            reward_fns._REGISTRY.pop(name, None)
    (w0, o0), (w1, o1) = snaps.before[1], snaps.after[1]
    assert _same(w0, w1) and _same(o0, o1), "the NaN step changed weights or optimizer state"
    assert not _same(*[s[0] for s in (snaps.before[2], snaps.after[2])]), "training did not go on after the skip"
    assert module.skipped_steps == 1 and float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    # the raising and the overflowing reward scored 0 on every completion of the last step and were counted
    assert float(trainer.callback_metrics["train/rewards/errors"]) == 8.0
    assert int(trainer.callback_metrics["train/skipped_steps"]) == 1  # only the poisoned step, not the overflow


# --------------------------------------------------------------------------------------------- atomic checkpoints

WRITER = r'''
import sys, torch
sys.path.insert(0, {repo!r})
from vold_pl.checkpointing import atomic_torch_save
i = 0
while True:
    atomic_torch_save({{"i": i, "global_step": i, "state_dict": {{}}, "w": torch.full((4_000_000,), float(i))}}, {path!r})
    print(i, flush=True)
    i += 1
'''


def test_kill_9_during_checkpoint_writes_never_corrupts_last(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(Path(__file__).resolve().parents[1]), path=str(path)))
    for delay in (0.15, 0.4):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip().isdigit()  # one complete write
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = torch.load(path, weights_only=True)
        assert torch.equal(ckpt["w"], torch.full((4_000_000,), float(ckpt["i"]))), "last.ckpt is torn"
    # leftovers of a killed write are never taken for a checkpoint, and the next run clears them away
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert all(n.startswith(".last.ckpt.tmp-") for n in leftovers), leftovers
    assert {Path(p).name for p in ResumableCheckpoint(dirpath=str(path.parent))._find_last_checkpoints(None)} == {
        "last.ckpt"}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_failed_write_keeps_old_checkpoint_and_resume_ignores_partial(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    first = {"step": 1, "global_step": 1, "state_dict": {}}
    atomic_torch_save(first, path)

    def dying_save(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    # a sharded (folder) checkpoint is swapped in whole; a crash between the renames is undone on the next run
    old, new = tmp_path / "last_dir.ckpt", tmp_path / ".last_dir.ckpt.partial"
    old.mkdir(), new.mkdir()
    (old / "shard0").write_text("old"), (new / "shard0").write_text("new")
    swap_into_place(new, old)
    assert (old / "shard0").read_text() == "new" and not new.exists()
    os.rename(old, tmp_path / ".last_dir.ckpt.old")  # as if killed after the first rename
    recover_interrupted_swap(tmp_path)
    assert (old / "shard0").read_text() == "new"

    # ckpt_path="last" only ever considers complete last*.ckpt files
    cb = ResumableCheckpoint(dirpath=str(tmp_path))
    (tmp_path / ".last.ckpt.tmp-123").write_bytes(b"junk")
    (tmp_path / ".last.ckpt.partial").mkdir()
    assert {Path(p).name for p in cb._find_last_checkpoints(trainer=None)} == {"last.ckpt", "last_dir.ckpt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last_dir.ckpt"]


# --------------------------------------------------------------------------------------------- failed saves, `last`

def _sft_cli_args(tiny_models, synth_data, root: Path, steps: int) -> list[str]:
    return ["fit", "--model", "SFTModule", "--model.model.name_or_path", str(tiny_models["student"]),
            "--model.export", "false", "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
            "--data.train", json.dumps([{"path": str(synth_data["train_text"]), "limit": 8}]), "--data.batch_size",
            "2", "--data.epoch_size", "8"]


def _step_of(path: Path) -> int:
    return torch.load(path, weights_only=True, map_location="cpu")["global_step"]


def test_failed_save_names_the_file_and_keeps_the_previous_checkpoint(tiny_models, synth_data, tmp_path):
    """A real write failure from the kernel (the file size limit: ``write`` fails with EFBIG, as with a full disk
    torch's zip writer then ends in ``unexpected pos``), in a real ``vold-pl fit`` that resumes from step 1."""
    import resource

    from vold_pl.cli import main

    root = tmp_path / "run"
    main(_sft_cli_args(tiny_models, synth_data, root, 1))
    last = root / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    limit = len(before) // 2  # room for logs and caches, not for a checkpoint

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               VOLD_PL_DEBUG="")
    proc = subprocess.run([sys.executable, "-m", "vold_pl.cli", *_sft_cli_args(tiny_models, synth_data, root, 2),
                           "--ckpt_path", "last"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, preexec_fn=limited)
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "unexpected pos" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: could not write checkpoint {last}: File too large (EFBIG). The write is atomic, so the "
                      "previous last.ckpt is intact (nothing was replaced). To go on, raise the file size limit "
                      "(ulimit -f) or save smaller checkpoints, then resume with --ckpt_path last."], err[-3000:]
    assert last.read_bytes() == before and _step_of(last) == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no half-written leftovers


@pytest.mark.parametrize("code,name,remedy", [
    (errno.ENOSPC, "No space left on device (ENOSPC)", "free space on the disk of"),
    (errno.EACCES, "Permission denied (EACCES)", "make {folder} writable"),
])
def test_disk_full_or_no_permission_is_one_message(code, name, remedy, tiny_models, synth_data, tmp_path,
                                                    monkeypatch, capsys):
    """ENOSPC / EACCES raised by the operating system call that makes the temporary file (injected: this test
    runs as any user, on any disk), through the CLI in-process."""
    import tempfile

    from vold_pl.cli import main

    root = tmp_path / "run"
    main(_sft_cli_args(tiny_models, synth_data, root, 1))
    last = root / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    real_mkstemp = tempfile.mkstemp

    def failing_mkstemp(*a, dir=None, **k):
        if str(dir).startswith(str(last.parent)):
            raise OSError(code, os.strerror(code), str(dir))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp)
    monkeypatch.setenv("VOLD_PL_DEBUG", "")
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        main([*_sft_cli_args(tiny_models, synth_data, root, 2), "--ckpt_path", "last"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err, err[-3000:]
    assert line[0].startswith(f"error: could not write checkpoint {last}: {name}"), line
    assert "the previous last.ckpt is intact" in line[0] and remedy.format(folder=last.parent) in line[0], line
    assert last.read_bytes() == before


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_ckpt_path_last_without_a_usable_last_resumes_from_the_newest_complete(damage, tiny_models, synth_data,
                                                                               tmp_path, capsys):
    """A run killed while it wrote its first ``last.ckpt`` (so there is none), or a truncated ``last.ckpt``:
    ``--ckpt_path last`` resumes from the newest complete step checkpoint of the folder and says so."""
    from vold_pl.cli import main

    root = tmp_path / "run"
    every = ["--trainer.callbacks+=ResumableCheckpoint", "--trainer.callbacks.every_n_train_steps", "1",
             "--trainer.callbacks.save_top_k", "-1"]
    main([*_sft_cli_args(tiny_models, synth_data, root, 3), *every])
    folder = root / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in names and "epoch=0-step=2.ckpt" in names and "epoch=0-step=3.ckpt" in names, names
    _truncate(folder / "epoch=0-step=3.ckpt")  # the newest step checkpoint is broken too: step 2 is the newest good
    (folder / "last.ckpt").unlink() if damage == "missing" else _truncate(folder / "last.ckpt")
    capsys.readouterr()
    main([*_sft_cli_args(tiny_models, synth_data, root, 4), *every, "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert (f"--ckpt_path last: {folder} has no usable last.ckpt" in err
            and f"resuming from the newest complete checkpoint {folder / 'epoch=0-step=2.ckpt'} (step 2)" in err), err
    assert ("last.ckpt: unreadable" in err) if damage == "truncated" else ("(no last.ckpt)" in err), err
    # it resumed at step 2 (two more steps to 4), not from step 0 (four steps)
    assert _step_of(folder / "last.ckpt") == 4
    assert "epoch=0-step=4.ckpt" in {p.name for p in folder.iterdir()}
