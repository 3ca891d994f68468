"""``Curriculum``: Curr-ReFT's staged RL (arXiv 2503.07065, METHODS.md §4) as a Lightning callback.

Each :class:`~vold_pl.data.curriculum.CurriculumStage` restricts the training draws to some records (by answer
type and difficulty) and may set the RL step's G, reward weights, completion length and temperature. The callback
applies the current stage to the data module and the LightningModule and moves to the next stage by the stage's
rules: ``steps`` (after each training batch), ``epochs`` (after each epoch's last batch), ``val_threshold`` (at each
validation end, once the stage has trained). In YAML::

    trainer:
      max_epochs: -1        # a stage that ends mid-epoch ends that epoch: let max_steps bound the run
      max_steps: 300
      callbacks:
        - class_path: vold_pl.callbacks.curriculum.Curriculum
          init_args:
            stages:
              - {name: yesno, answer_types: [yesno], num_generations: 4,
                 rewards: {currreft_yesno: 1.0, format: 1.0}, steps: 100}
              - ...

The stage filter takes effect when an epoch's loader is built: the callback needs
``trainer.reload_dataloaders_every_n_epochs`` = 1 (it turns it on when it is 0), so Lightning asks the data module
for a new train loader at every epoch start and reads that epoch's length from it (a stage with fewer eligible
records has shorter epochs). A stage that ends mid-epoch therefore ends the epoch through the policy module's
``end_epoch_early()`` (its ``on_train_batch_start`` then returns -1). The stage, the step and epoch it began and
that flag are saved in checkpoints, so a resumed run continues in the same stage with the same stage-relative
counters. List the callback before ``PreemptionCallback`` (``vold-pl fit`` appends
that one after the configured callbacks) so that a checkpoint written at a batch end includes a stage change
made at that batch end.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L

from vold_pl.callbacks.contracts import CurriculumData, CurriculumModule
from vold_pl.data.curriculum import CurriculumStage
from vold_pl.errors import UserError
from vold_pl.rewards.functions import validate_weights

# The stage fields that set the module (the rest filter the records or end the stage).
STAGE_SETTINGS = ("num_generations", "rewards", "max_new_tokens", "temperature")


class Curriculum(L.Callback):
    """Train through curriculum stages, easy to hard (Curr-ReFT: yes/no → multiple choice → open-ended).

    Args:
        stages: the stages in order. Every stage but the last needs an end rule (``steps``, ``epochs`` or
            ``val_threshold``; any rule that is met ends it); the last stage runs until training ends, and its
            ``steps``/``epochs`` only count in the fit-start check that ``trainer.max_steps``/``max_epochs``
            leave room for every stage.
    """

    def __init__(self, stages: list[CurriculumStage]):
        if not stages:
            raise UserError("Curriculum needs at least one stage.")
        self.stages = [s if isinstance(s, CurriculumStage) else CurriculumStage(**s) for s in stages]
        for i, s in enumerate(self.stages):
            if s.rewards is not None:
                try:
                    validate_weights(s.rewards)
                except ValueError as e:
                    raise UserError(f"curriculum stage {i} {s.name!r}: {e}") from None
            if i < len(self.stages) - 1 and not s.has_end_rule:
                raise UserError(f"curriculum stage {i} {s.name!r} has no rule to end it, so the stages after it "
                                 "would never run: set its steps, epochs or val_threshold (only the last stage "
                                 "runs until training ends).")
        self.stage, self.start_step, self.start_epoch, self.end_epoch = 0, 0, 0, False
        self._dm: Any = None
        self._module: Any = None
        self._base: dict[str, Any] = {}
        self._missing_metric_warned = False
        self._at_last_batch = False  # the latest training batch was its epoch's last

    @property
    def current(self) -> CurriculumStage:
        return self.stages[self.stage]

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if not isinstance(dm, CurriculumData):
            raise UserError("the Curriculum callback filters the training data through the data module: use it "
                            "with vold_pl.data.datamodule.ReasoningDataModule (data: in the config).")
        for s in self.stages:  # a stage that selects nothing fails now, not hours into training
            dm.curriculum_pools(s)
        reload = trainer.reload_dataloaders_every_n_epochs
        if reload not in (0, 1):
            raise UserError(f"the Curriculum callback needs trainer.reload_dataloaders_every_n_epochs: 1 (each "
                             f"epoch's train loader is built for the stage it trains), got {reload}.")
        # A public Trainer setting, read by the fit loop after setup: every epoch gets a loader built for its stage.
        trainer.reload_dataloaders_every_n_epochs = 1
        if not isinstance(pl_module, CurriculumModule):
            raise UserError(f"the Curriculum callback sets the module through curriculum_settings(), "
                            f"apply_curriculum_settings() and end_epoch_early(); {type(pl_module).__name__} lacks "
                            f"them (use a vold_pl PolicyModule).")
        self._check_limits(trainer)
        self._dm, self._module = dm, pl_module
        self._base = {k: v for k, v in pl_module.curriculum_settings().items() if k in STAGE_SETTINGS}
        ignored = sorted({k for s in self.stages for k in STAGE_SETTINGS if getattr(s, k) is not None}
                         - set(self._base))
        if ignored:
            warnings.warn(f"{type(pl_module).__name__} has no {', '.join(ignored)}: the curriculum applies its stages' "
                          "record filters only.", stacklevel=2)
        self._apply()

    def _check_limits(self, trainer: L.Trainer) -> None:
        """Refuse ``max_epochs``/``max_steps`` that end training before the last stage has run.

        Lower bounds: a stage that is not last spends at least one epoch (one that ends mid-epoch ends that epoch)
        and one step, or exactly its ``epochs``/``steps`` when that is its only rule; the last stage adds its own
        ``epochs``/``steps`` (or one).
        """
        def need(rule: str) -> int:
            total = 0
            for s in self.stages[:-1]:
                only = getattr(s, rule) is not None and sum(
                    getattr(s, r) is not None for r in ("steps", "epochs", "val_threshold")) == 1
                total += getattr(s, rule) if only else 1
            return total + (getattr(self.stages[-1], rule) or 1)

        for rule, limit in (("epochs", trainer.max_epochs), ("steps", trainer.max_steps)):
            if limit is not None and limit != -1 and limit < need(rule):
                raise UserError(
                    f"the curriculum needs at least {need(rule)} {rule} to run all its {len(self.stages)} stages, "
                    f"but trainer.max_{rule}={limit} ends training first. Set trainer.max_epochs: -1 and bound the "
                    f"run with trainer.max_steps (or raise trainer.max_{rule}); a stage that ends mid-epoch ends "
                    "that epoch, so a step-based curriculum uses more epochs than the data alone suggests.")

    def _apply(self) -> None:
        """Push the current stage into the data module (record filter) and the module (RL settings, flag)."""
        s = self.current
        self._dm.set_curriculum_stage(self.stage, **s.record_filter())
        self._module.apply_curriculum_settings(
            **{k: base if getattr(s, k) is None else getattr(s, k) for k, base in self._base.items()})
        self._module.end_epoch_early(self.end_epoch)

    # -- the rules ----------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end_epoch = False
        pl_module.end_epoch_early(False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("curriculum/stage", float(self.stage), on_step=True, on_epoch=False, batch_size=1,
                      prog_bar=True)
        # batch_idx counts from the epoch's start, also in a resumed epoch; num_training_batches is this epoch's
        # length (its loader was built for the stage).
        s, last = self.current, batch_idx + 1 >= trainer.num_training_batches
        self._at_last_batch = last
        steps, epochs = trainer.global_step - self.start_step, self._epoch() + 1 - self.start_epoch
        if s.steps is not None and steps >= s.steps:
            self._advance(trainer, f"steps: {steps} optimizer steps in the stage", mid_epoch=not last)
        elif s.epochs is not None and last and epochs >= s.epochs:
            # At the epoch's last batch, not at epoch end: a checkpoint written at this batch end already holds
            # the new stage (Lightning does not rerun epoch-end hooks for an epoch a checkpoint finished).
            self._advance(trainer, f"epochs: {epochs} epoch(s) in the stage", mid_epoch=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = self.current
        if s.val_threshold is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.global_step <= self.start_step:  # the stage has not trained yet: this score is its predecessor's
            return
        value = trainer.callback_metrics.get(s.val_metric)
        if value is None:
            if not self._missing_metric_warned:
                self._missing_metric_warned = True
                warnings.warn(f"curriculum stage {s.name!r} waits for {s.val_metric!r}, which validation did not log "
                              f"(logged: {sorted(trainer.callback_metrics)}); set the stage's val_metric.",
                              stacklevel=2)
            return
        if float(value) >= s.val_threshold:
            # Validation runs after the batch-end hooks of the batch it follows.
            self._advance(trainer, f"{s.val_metric} {float(value):.4g} >= {s.val_threshold:g}",
                          mid_epoch=not self._at_last_batch)

    def _advance(self, trainer: L.Trainer, why: str, mid_epoch: bool) -> None:
        if self.stage >= len(self.stages) - 1:  # the last stage never advances
            return
        old = self.current
        self.stage += 1
        self.start_step, self.start_epoch = trainer.global_step, self._epoch() + 1
        self.end_epoch = mid_epoch  # the running epoch drew with the old filter: end it
        self._apply()
        if trainer.is_global_zero:
            print(f"[vold-pl] curriculum: stage {self.stage - 1} {old.name!r} -> stage {self.stage} "
                  f"{self.current.name!r} at step {trainer.global_step} ({why})", flush=True)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stage": self.stage, "start_step": self.start_step, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch, "names": [s.name for s in self.stages]}

    def load_state_dict(self, state: dict) -> None:
        stage = int(state["stage"])
        if stage >= len(self.stages):
            raise UserError(f"the checkpoint is in curriculum stage {stage} ({state.get('names')}), but this run "
                             f"defines only {len(self.stages)} stages ({[s.name for s in self.stages]}).")
        if state.get("names") != [s.name for s in self.stages]:
            print(f"[vold-pl] curriculum stages changed since the checkpoint ({state.get('names')} -> "
                  f"{[s.name for s in self.stages]}); continuing in stage {stage}.")
        self.stage, self.start_step = stage, int(state["start_step"])
        self.start_epoch, self.end_epoch = int(state["start_epoch"]), bool(state["end_epoch"])
        if self._dm is not None:  # set up already (Lightning restores after setup): re-apply the restored stage
            self._apply()

    def _epoch(self) -> int:
        """Index of the running epoch: the one Lightning gave the train sampler (``set_epoch``). Unlike
        ``trainer.current_epoch`` it does not lag by one after a resume from an epoch-end checkpoint of a
        step-bounded run."""
        return self._dm.train_epoch
