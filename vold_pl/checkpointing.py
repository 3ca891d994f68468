"""Checkpoints that survive preemption: atomic writes, a stable ``last`` checkpoint, a model-identity check.

- :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes ``<name>`` through a temporary file in
  the same folder, fsyncs it, then ``os.replace``\\ s it into place: a ``kill -9`` during the write leaves the old
  file intact (and a ``.<name>.tmp-<pid>`` leftover that no resume ever picks up). It also turns an unreadable
  checkpoint into an error that names the file and says what to do.
- :class:`ResumableCheckpoint` is ``ModelCheckpoint`` with ``save_last=True``, a stable folder
  (``<default_root_dir>/checkpoints``, so ``--ckpt_path last`` finds it from the next run, whose logger gets a new
  version folder) and the same write-then-rename for every checkpoint it saves, sharded (a folder, FSDP2's
  distributed checkpoint) or not.
- :func:`model_fingerprint` / :func:`check_fingerprint`: what model a checkpoint was written for, so resuming
  with a different model stops at once with both models named, not deep inside ``load_state_dict``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vold_pl.errors import UserError, UserFileNotFoundError
from vold_pl.io import atomic_torch_save, atomic_write_bytes, atomic_write_text, fsync_dir  # noqa: F401 (re-exported)

FINGERPRINT_KEY = "vold_pl"


def allow_in_checkpoints(*classes: type) -> None:
    """Let ``torch.load(weights_only=True)`` (Lightning's default on torch >= 2.6) rebuild these plain config
    dataclasses, which ``save_hyperparameters`` stores in every checkpoint. Nothing else is allowed: a checkpoint
    never runs code when it loads."""
    torch.serialization.add_safe_globals(list(classes))


class CheckpointMismatchError(UserError):
    """A checkpoint written for another model (or another kind of module) than the one this run builds."""


class UnreadableCheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read safely (Python objects ``weights_only=True`` refuses) or at all."""


class CheckpointWriteError(UserError):
    """A checkpoint that could not be written (disk full, no permission, file size limit): the message names the
    file, the reason, and says that the previous checkpoint of that name is intact."""


_WRITE_REMEDY = {
    errno.ENOSPC: "free space on the disk of {folder}",
    errno.EDQUOT: "free space (the disk quota is used up) on {folder}",
    errno.EACCES: "make {folder} writable for this user, or point the checkpoint dirpath / trainer.default_root_dir "
                  "at a folder you can write",
    errno.EPERM: "make {folder} writable for this user, or point the checkpoint dirpath / trainer.default_root_dir "
                 "at a folder you can write",
    errno.EROFS: "point the checkpoint dirpath / trainer.default_root_dir at a writable file system",
    errno.EFBIG: "raise the file size limit (ulimit -f) or save smaller checkpoints",
}


def write_failure(path: Any, e: BaseException) -> CheckpointWriteError | None:
    """The error to raise when writing checkpoint ``path`` failed with ``e`` because of the file system (an
    ``OSError`` in its chain: torch's zip writer reports a full disk as ``unexpected pos``, with the ``OSError``
    as its context), or ``None`` for any other failure. The writes are atomic, so ``path`` is as it was before."""
    if isinstance(e, CheckpointWriteError):
        e = e.__cause__ or e
    seen, os_error, cur = set(), None, e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and not isinstance(cur, UserError):
            os_error = cur
            break
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    if os_error is None:
        return None
    path = Path(str(path).removeprefix("file://"))
    code = os_error.errno
    why = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else str(os_error)
    if os_error.filename and Path(str(os_error.filename)).name not in (path.name, ""):
        why += f" on {os_error.filename}"
    kept = (f"the previous {path.name} is intact (nothing was replaced)" if path.exists()
            else f"no earlier {path.name} was there; nothing was replaced")
    remedy = _WRITE_REMEDY.get(code, "fix the cause above").format(folder=path.parent)
    return CheckpointWriteError(f"could not write checkpoint {path}: {why}. The write is atomic, so {kept}. To go "
                                f"on, {remedy}, then resume with --ckpt_path last.")


# ------------------------------------------------------------------------------------------------ atomic writes
# File writes live in vold_pl.io (re-exported here); checkpoints add folder swaps and the leftover clean-up.

def _is_local(path: Any) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


def swap_into_place(tmp: Path, path: Path) -> None:
    """Move a finished checkpoint (file or folder) ``tmp`` to ``path``, replacing what is there.

    A file goes with one atomic ``os.replace``. A folder cannot replace a folder atomically, so the old one is
    first renamed to ``.<name>.old`` and removed after; :func:`recover_interrupted_swap` undoes a crash between
    the two renames.
    """
    if tmp.is_dir():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)


def recover_interrupted_swap(folder: str | Path) -> None:
    """Clean up after writes that were killed, when a run starts (rank 0, before it writes anything).

    Puts back ``.<name>.old`` checkpoints whose replacement never arrived (a crash mid-swap) and removes the
    half-written ``.<name>.tmp-<pid>`` / ``.<name>.partial`` leftovers (never taken for a checkpoint anyway).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for old in folder.glob(".*.old"):
        target = folder / old.name[1 : -len(".old")]
        if not target.exists():
            os.rename(old, target)
    for junk in [*folder.glob(".*.tmp-*"), *folder.glob(".*.partial")]:
        shutil.rmtree(junk, ignore_errors=True) if junk.is_dir() else junk.unlink(missing_ok=True)


def save_atomically(trainer, filepath: str | Path, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` to a temporary name, then a rename: every rank must call it."""
    path = Path(filepath)
    if not _is_local(path):
        trainer.save_checkpoint(str(filepath), weights_only)
        return
    tmp = path.with_name(f".{path.name}.partial")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # a previous write that died
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    trainer.strategy.barrier("vold_pl.save_atomically.start")
    try:
        trainer.save_checkpoint(tmp, weights_only)  # ends with a barrier: every shard is written
        if trainer.is_global_zero:
            swap_into_place(tmp, path)
    except Exception as e:
        err = write_failure(path, e)
        if err is None:
            raise
        if trainer.is_global_zero and tmp.exists():  # (never the checkpoint itself: it is still the old one)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise err from e
    trainer.strategy.barrier("vold_pl.save_atomically.end")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are write-to-temp + fsync + rename, and whose load errors say what to do."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
        except Exception as e:
            err = write_failure(path, e)
            if err is None:
                raise
            raise err from e

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if _is_local(path) and not Path(str(path).removeprefix("file://")).exists():
            raise UserFileNotFoundError(
                f"checkpoint not found: {path}. Pass an existing file to --ckpt_path, or 'last' to resume from the "
                "newest last.ckpt of the checkpoint folder.")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:
            raise unreadable_checkpoint(path, e) from None


def unreadable_checkpoint(path: Any, e: BaseException) -> BaseException:
    """The error to raise for a checkpoint that failed to load with ``e``: refused Python objects and damaged
    files become :class:`UnreadableCheckpointError` saying what to do; anything else is returned unchanged."""
    if isinstance(e, pickle.UnpicklingError):
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        return UnreadableCheckpointError(
            f"checkpoint {path} cannot be read safely: it holds Python objects that torch.load(weights_only=True) "
            f"refuses to rebuild ({first}). vold-pl never runs code from a checkpoint; resume from a checkpoint "
            "written by vold-pl, or re-save this one with plain tensors and containers.")
    if isinstance(e, (RuntimeError, EOFError, OSError, ValueError)) and not isinstance(e, (FileNotFoundError,
                                                                                          UserError)):
        return UnreadableCheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}). It is truncated or not a "
            "Lightning checkpoint: resume from an earlier checkpoint of the same folder, or start without "
            "--ckpt_path.")
    return e


def read_hyperparameters(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` a checkpoint file was saved with, read with ``torch.load(weights_only=True)``
    (memory-mapped: the weights are not read), or :class:`UnreadableCheckpointError`."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as e:
        raise unreadable_checkpoint(path, e) from None
    if not isinstance(ckpt, dict):
        raise UnreadableCheckpointError(f"checkpoint {path} is not a Lightning checkpoint (it holds a "
                                        f"{type(ckpt).__name__}, not a dict): pass a checkpoint written by vold-pl.")
    return dict(ckpt.get("hyper_parameters") or {})


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (truncated, not a checkpoint, no training state), or None.
    A sharded checkpoint (a folder) is taken as complete: it is swapped into place whole
    (:func:`swap_into_place`). Reads only the file's index and small values (memory-mapped), not the weights."""
    path = Path(path)
    if path.is_dir():
        return None
    if not path.is_file():
        return "missing"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        return f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("global_step"), int) or "state_dict" not in ckpt:
        return "not a Lightning training checkpoint"
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a complete checkpoint file was saved at, or None when it cannot be resumed from."""
    if checkpoint_problem(path) is not None or Path(path).is_dir():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


# ------------------------------------------------------------------------------------------------ ModelCheckpoint

class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for preemptible runs: ``last.ckpt`` always, in a stable folder, written atomically.

    Args:
        dirpath: checkpoint folder; default ``<trainer.default_root_dir>/checkpoints`` (not the logger's
            version folder, so the next run's ``--ckpt_path last`` finds it).
        save_last: keep ``last.ckpt`` (the resume point) up to date.
        every_n_train_steps: save every this many optimizer steps.
        (every other argument as in ``lightning.pytorch.callbacks.ModelCheckpoint``)
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None, monitor: str | None = None,
                 save_last: bool = True, save_top_k: int = 1, mode: str = "min", save_weights_only: bool = False,
                 every_n_train_steps: int | None = 50, every_n_epochs: int | None = None,
                 save_on_train_epoch_end: bool | None = None, verbose: bool = False):
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, save_last=save_last,
                         save_top_k=save_top_k, mode=mode, save_weights_only=save_weights_only,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=save_on_train_epoch_end, verbose=verbose)

    def _stable_dir(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if getattr(trainer, "is_global_zero", True) and _is_local(self.dirpath):
            recover_interrupted_swap(self.dirpath)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stable_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        """What ``--ckpt_path last`` may resume from: the complete ``last*.ckpt`` files, or, when there is none (a
        run killed while it wrote its first ``last.ckpt``, a truncated copy), the newest complete checkpoint of
        the folder, with a message saying so."""
        self._stable_dir(trainer)
        found = super()._find_last_checkpoints(trainer)
        if not _is_local(self.dirpath):
            return found
        usable = {p for p in found if checkpoint_problem(p) is None}
        if usable or not os.path.isdir(self.dirpath):
            return usable
        others = [p for p in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}") if str(p) not in found]
        steps = {p: checkpoint_step(p) for p in others}
        complete = [p for p, step in steps.items() if step is not None]
        if not complete and not found:
            return set()
        broken = "; ".join(f"{Path(p).name}: {checkpoint_problem(p)}" for p in sorted(found)) or \
            f"no {self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        if not complete:
            print(f"[vold-pl] warning: --ckpt_path last: {self.dirpath} has no complete checkpoint ({broken}); the "
                  "run starts from step 0.", file=sys.stderr)
            return set()
        best = max(complete, key=lambda p: (steps[p], p.stat().st_mtime))
        print(f"[vold-pl] warning: --ckpt_path last: {self.dirpath} has no usable {self.CHECKPOINT_NAME_LAST}"
              f"{self.FILE_EXTENSION} ({broken}); resuming from the newest complete checkpoint {best} (step "
              f"{steps[best]}).", file=sys.stderr)
        return {os.path.normpath(str(best))}

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        from weakref import proxy

        save_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_last_now(self, trainer) -> str:
        """Write ``last.ckpt`` at this moment (the preemption callback calls it); returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path


# ------------------------------------------------------------------------------------------------ model identity

def model_fingerprint(module) -> dict[str, Any]:
    """What a checkpoint was written for: module class, model source, architecture summary, a hash of shapes."""
    model = module.model
    cfg = getattr(model, "config", None)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    shapes = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    n_params = sum(int(torch.Size(s).numel()) for _, s in shapes)
    summary = {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "num_hidden_layers": getattr(text_cfg, "num_hidden_layers", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "vision": getattr(cfg, "vision_config", None) is not None,
        "parameters": n_params,
    }
    return {"module": type(module).__name__, "model": str(module.model_spec.name_or_path),
            "summary": summary, "shapes_sha256": digest}


def fingerprint_from_state_dict(state_dict: dict[str, Any], module_name: str = "?") -> dict[str, Any]:
    """The part of a fingerprint a foreign checkpoint allows: shapes of its ``model.*`` weights."""
    shapes = sorted((k[len("model."):], tuple(v.shape)) for k, v in state_dict.items() if k.startswith("model."))
    digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
    return {"module": module_name, "model": "unknown (no vold-pl fingerprint in the checkpoint)",
            "summary": {"parameters": sum(int(torch.Size(s).numel()) for _, s in shapes)}, "shapes_sha256": digest}


def _describe(fp: dict[str, Any]) -> str:
    s = fp.get("summary", {})
    arch = ", ".join(f"{k}={v}" for k, v in s.items() if v is not None)
    return f"{fp.get('module', '?')} of {fp.get('model', '?')} ({arch})"


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], ckpt_path: Any = None) -> None:
    """Raise :class:`CheckpointMismatchError` naming both models when a checkpoint cannot resume this run."""
    where = f"checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
    if saved.get("shapes_sha256") != current.get("shapes_sha256"):
        raise CheckpointMismatchError(
            f"{where} was written for {_describe(saved)}, but this run builds {_describe(current)}: the weights "
            "do not fit. Resume with the model the checkpoint was trained from (model.init_args.model."
            "name_or_path), or drop --ckpt_path to start a new run (to start from those weights, export them and "
            "point name_or_path at the export).")
    if saved.get("module") not in (None, "?", current.get("module")):
        raise CheckpointMismatchError(
            f"{where} was written by {saved['module']}, but this run is {current['module']}: a resume restores "
            f"the optimizer and loop state of the same kind of run. To start {current['module']} from those "
            "weights, export them (the run's export folder) and set model.init_args.model.name_or_path to it, "
            "without --ckpt_path.")
