"""A training progress bar that counts toward ``max_steps``.

Runs bounded by ``trainer.max_steps`` leave ``trainer.max_epochs`` at -1, and Lightning's bar then reads
"Epoch 0/-2". This bar names the step budget instead ("Epoch 0 · 40 steps"); the bar's own count is the step
within the epoch, as before. ``vold-pl fit`` adds it unless the config names a progress bar or turns it off.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar whose training description states the run's step budget when it has one."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None and trainer.max_steps > 0:
            description = f"Epoch {trainer.current_epoch} · {trainer.max_steps} steps"
            self.progress.update(self.train_progress_bar_id, description=description)
            self.refresh()
