"""``PreemptionCallback``: on SIGTERM / SIGUSR1, finish the current step, write ``last.ckpt``, exit cleanly.

Clusters announce preemption with a signal some seconds to minutes before the kill. Lightning's own SIGTERM
handling raises ``SIGTERMException`` after the batch (a crash, no checkpoint); this callback replaces it for the
duration of training:

1. the signal handler only records the signal (and forwards it to DDP child processes, like Lightning's);
2. at the end of the current training batch every rank agrees (one boolean all-reduce) that a signal arrived
   on some rank, so all ranks stop at the same step;
3. all ranks write ``last.ckpt`` through the checkpoint callback (atomically, see :mod:`vold_pl.checkpointing`)
   or, without one, to ``<default_root_dir>/checkpoints/last.ckpt``;
4. ``trainer.should_stop`` ends the fit normally; the module skips its export (a preempted run is unfinished)
   and the process exits with code 0. Resume with ``vold-pl fit ... --ckpt_path last``.

On SLURM with Lightning's auto-requeue, SIGUSR1 stays Lightning's (it checkpoints and requeues the job itself).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from vold_pl.checkpointing import ResumableCheckpoint, save_atomically
from vold_pl.errors import UserError


class PreemptionCallback(L.Callback):
    """Save ``last.ckpt`` and stop cleanly when the job is told to go away.

    Args:
        signals: signal names that mean "preempted" (``SIGTERM``, ``SIGUSR1``, ``SIGINT``...).
        dirpath: where to write ``last.ckpt`` when the trainer has no ``ModelCheckpoint`` with ``save_last``;
            default ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, signals: list[str] | None = None, dirpath: str | None = None):
        self.signals = list(signals) if signals is not None else ["SIGTERM", "SIGUSR1"]
        for name in self.signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise UserError(f"unknown signal {name!r} in PreemptionCallback.signals; use names like SIGTERM.")
        self.dirpath = dirpath
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict[int, object] = {}

    # -- handlers ----------------------------------------------------------------------------------------------
    def _handler(self, trainer):
        def handle(signum, frame):
            if self.received is None:
                self.received = signum
                launcher = trainer.strategy.launcher
                if launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)  # DDP children started by this process get it too
        return handle

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its handlers when fit started; ours replace them for training.
        if threading.current_thread() is not threading.main_thread():
            return
        env = getattr(trainer.strategy, "cluster_environment", None)  # parallel strategies have one
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if trainer.received_sigterm:  # arrived between fit start and now
            self.received = signal.SIGTERM
        handler = self._handler(trainer)
        for name in self.signals:
            signum = getattr(signal, name)
            if slurm_requeue and signum in (signal.SIGUSR1, env.requeue_signal):
                continue
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)

    def _restore(self) -> None:
        for signum, old in self._previous.items():
            try:
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    # -- the stop ----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        path, findable = self._save(trainer)
        self.saved_path = path
        pl_module.mark_unfinished()
        trainer.should_stop = True
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        how = "--ckpt_path last" if findable else f"--ckpt_path {path}"
        rank_zero_info(f"[vold-pl] preempted ({name}): saved {path} at global step {trainer.global_step}; "
                       f"stopping. Resume with `vold-pl fit <same options> {how}`.")

    def _save(self, trainer) -> tuple[str, bool]:
        """Write the checkpoint; returns its path and whether ``--ckpt_path last`` will find it."""
        cbs = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
        if cbs:
            # Through the callback, not trainer.save_checkpoint: the callback must record this save (its
            # last_model_path and last-saved step), or it writes a second last-v1.ckpt at this same step (at epoch
            # end, holding a finished epoch) that ``--ckpt_path last`` would then pick. Lightning has no public
            # "save last now"; see docs/architecture.md.
            cb = cbs[0]
            if isinstance(cb, ResumableCheckpoint):
                return cb.save_last_now(trainer), True
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            return cb.last_model_path, cb.dirpath is not None
        # No checkpoint callback ("last" looks only in theirs): the message gives the path to resume from.
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        path = folder / "last.ckpt"
        save_atomically(trainer, path)
        return str(path), False
