"""A training progress bar that counts toward ``max_steps``, and says so in log files too.

Runs bounded by ``trainer.max_steps`` leave ``trainer.max_epochs`` at -1, and Lightning's bar then reads
"Epoch 0/-2". This bar names the step budget instead ("Epoch 0 · 40 steps"); the bar's own count is the step
within the epoch, as before. When stdout is not a terminal (a log file, a recipe running the stage in the
background) a rich bar is only drawn at the end, so the bar also prints a plain line at most every
``LOG_INTERVAL_S`` seconds: ``[vold-pl] step 250/2000, 4.10 steps/s, ETA 7m04s``. ``vold-pl fit`` adds it unless
the config names a progress bar or turns it off.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import RichProgressBar

from vold_pl.progress import LOG_INTERVAL_S, format_eta


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar whose training description states the run's step budget when it has one."""

    def __init__(self, *args, log_interval_s: float = LOG_INTERVAL_S, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log_interval_s = log_interval_s
        self._started: tuple[float, int] | None = None  # (time, global step) when training began
        self._printed = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None and trainer.max_steps > 0:
            description = f"Epoch {trainer.current_epoch} · {trainer.max_steps} steps"
            self.progress.update(self.train_progress_bar_id, description=description)
            self.refresh()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._started, self._printed = (time.perf_counter(), trainer.global_step), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        now = time.perf_counter()
        if (self.is_disabled or sys.stdout.isatty() or trainer.max_steps <= 0 or self._started is None
                or now - self._printed < self.log_interval_s):
            return
        self._printed = now
        t0, step0 = self._started
        done = trainer.global_step - step0
        eta = format_eta(done, trainer.max_steps - step0, now - t0, unit="steps")
        print(f"[vold-pl] step {trainer.global_step}/{trainer.max_steps}, {eta}", flush=True)
