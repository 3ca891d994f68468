"""The Curriculum callback's rules on its own, through its hooks, with stand-ins for the trainer, the module
(``CurriculumModule``) and the data module (``CurriculumData``): which validation or batch ends a stage, what the
module is told (its settings, whether the running epoch ends), what a checkpoint holds. The tiny fits of
``tests/test_curriculum.py`` run the same rules inside Lightning."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from vold_pl.callbacks.curriculum import Curriculum
from vold_pl.data.curriculum import CurriculumStage


class _Data:
    def __init__(self):
        self.train_epoch, self.stages = 0, []

    def curriculum_pools(self, stage):
        return [[0]]

    def set_curriculum_stage(self, index, **record_filter):
        self.stages.append((index, record_filter.get("answer_types")))


class _Policy:
    """A module with two curriculum settings; it records what it is told."""

    def __init__(self):
        self.settings = {"num_generations": 4, "temperature": 1.0}
        self.applied, self.ended, self.logged = [], [], []

    def curriculum_settings(self):
        return dict(self.settings)

    def apply_curriculum_settings(self, **settings):
        self.applied.append(settings)
        self.settings.update(settings)

    def end_epoch_early(self, end=True):
        self.ended.append(end)

    def log(self, name, value, **kw):
        self.logged.append((name, value, kw.get("batch_size"), kw.get("on_step")))


def _setup(stages, metric=None, step=0, batches=4, max_steps=-1):
    cb, dm, module = Curriculum(stages), _Data(), _Policy()
    trainer = SimpleNamespace(datamodule=dm, reload_dataloaders_every_n_epochs=0, max_epochs=-1, max_steps=max_steps,
                              sanity_checking=False, state=SimpleNamespace(fn="fit"), global_step=step,
                              callback_metrics={} if metric is None else {"val/acc": torch.tensor(metric)},
                              is_global_zero=False, num_training_batches=batches)
    cb.setup(trainer, module, "fit")
    return cb, trainer, module, dm


def _by_val(threshold=0.5):
    return [CurriculumStage("easy", answer_types=["yesno"], val_threshold=threshold, val_metric="val/acc",
                            num_generations=2),
            CurriculumStage("hard", answer_types=["math"], temperature=0.7)]


def test_setup_applies_the_first_stage_and_the_module_keeps_its_other_settings():
    cb, trainer, module, dm = _setup(_by_val())
    assert dm.stages == [(0, ["yesno"])] and module.ended == [False]
    assert module.applied == [{"num_generations": 2, "temperature": 1.0}]  # unset: the module's own value
    assert trainer.reload_dataloaders_every_n_epochs == 1


def test_a_validation_before_the_stage_trained_does_not_count():
    cb, trainer, module, _ = _setup(_by_val(), metric=0.9, step=0)
    cb.on_validation_end(trainer, None)  # step 0 = the stage's start: its predecessor's score
    assert cb.stage == 0
    trainer.global_step = 1
    cb.on_validation_end(trainer, None)
    assert cb.stage == 1 and cb.start_step == 1


def test_stage_change_tells_the_module_its_settings_and_whether_the_epoch_ends():
    # mid-epoch (batch 1 of 4): the running epoch drew with the old filter, it ends
    cb, trainer, module, dm = _setup(_by_val(), metric=0.5, step=2)
    cb.on_train_batch_end(trainer, module, None, None, 1)
    cb.on_validation_end(trainer, None)
    assert cb.stage == 1 and dm.stages[-1] == (1, ["math"])
    assert module.applied[-1] == {"num_generations": 4, "temperature": 0.7} and module.ended[-1] is True
    assert cb.state_dict() == {"stage": 1, "start_step": 2, "start_epoch": 1, "end_epoch": True,
                               "names": ["easy", "hard"]}
    # at the epoch's last batch: nothing to end
    cb, trainer, module, _ = _setup(_by_val(), metric=0.5, step=2)
    cb.on_train_batch_end(trainer, module, None, None, 3)
    cb.on_validation_end(trainer, None)
    assert cb.stage == 1 and module.ended[-1] is False


def test_a_missing_metric_warns_once():
    cb, trainer, module, _ = _setup(_by_val(), metric=None, step=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.on_validation_end(trainer, None)
        cb.on_validation_end(trainer, None)
    assert [str(w.message)[:45] for w in caught] == ["curriculum stage 'easy' waits for 'val/acc', "]
    assert cb.stage == 0


def test_epochs_rule_counts_the_epochs_drawn_in_the_stage():
    stages = [CurriculumStage("a", epochs=1), CurriculumStage("b", epochs=2), CurriculumStage("c")]
    cb, trainer, module, dm = _setup(stages, step=1)
    cb.on_train_batch_end(trainer, module, None, None, 2)  # not the epoch's last batch
    assert cb.stage == 0
    cb.on_train_batch_end(trainer, module, None, None, 3)  # epoch 0's last batch: one epoch in stage a
    assert cb.stage == 1 and cb.start_epoch == 1 and module.ended[-1] is False
    dm.train_epoch = 1
    cb.on_train_batch_end(trainer, module, None, None, 3)  # one epoch of stage b: not yet two
    assert cb.stage == 1
    dm.train_epoch = 2
    cb.on_train_batch_end(trainer, module, None, None, 3)
    assert cb.stage == 2 and cb.start_epoch == 3


def test_steps_rule_ends_the_stage_at_exactly_its_steps():
    cb, trainer, module, _ = _setup([CurriculumStage("a", steps=2), CurriculumStage("b")])
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert cb.stage == 0
    trainer.global_step = 2
    cb.on_train_batch_end(trainer, module, None, None, 1)  # two optimizer steps in the stage, mid-epoch
    assert cb.stage == 1 and cb.start_step == 2 and module.ended[-1] is True
    cb.on_train_batch_end(trainer, module, None, None, 2)
    # the stage index is logged per step, one value per batch
    assert module.logged == [("curriculum/stage", 0.0, 1, True)] * 2 + [("curriculum/stage", 1.0, 1, True)]


def test_max_steps_that_leave_every_stage_a_step_are_enough():
    stages = [CurriculumStage("a", steps=2), CurriculumStage("b", steps=1)]
    _setup(stages, max_steps=3)  # 2 + 1: exactly enough
    with pytest.raises(ValueError, match=r"needs at least 3 steps .* trainer\.max_steps=2 ends training first"):
        _setup(stages, max_steps=2)


def test_no_stage_is_refused():
    with pytest.raises(ValueError, match="^Curriculum needs at least one stage.$"):
        Curriculum([])


def test_too_few_epochs_are_refused_with_the_reason_and_the_remedy():
    stages = [CurriculumStage("a", steps=2), CurriculumStage("b", steps=1)]
    cb, dm, module = Curriculum(stages), _Data(), _Policy()
    trainer = SimpleNamespace(datamodule=dm, reload_dataloaders_every_n_epochs=0, max_epochs=1, max_steps=-1)
    with pytest.raises(ValueError) as err:
        cb.setup(trainer, module, "fit")  # each stage spends at least one epoch: two are needed
    msg = str(err.value)
    assert "needs at least 2 epochs to run all its 2 stages, but trainer.max_epochs=1" in msg
    assert msg.endswith("Set trainer.max_epochs: -1 and bound the run with trainer.max_steps (or raise "
                        "trainer.max_epochs); a stage that ends mid-epoch ends that epoch, so a step-based curriculum "
                        "uses more epochs than the data alone suggests.")


def test_a_checkpoint_restores_the_stage_and_names_changed_stages(capsys):
    cb, trainer, module, _ = _setup([CurriculumStage("a", steps=2), CurriculumStage("b")])
    trainer.global_step = 2
    cb.on_train_batch_end(trainer, module, None, None, 1)
    state = cb.state_dict()
    fresh = Curriculum([CurriculumStage("a", steps=2), CurriculumStage("b")])
    fresh.load_state_dict(state)  # before setup, as Lightning restores a callback
    assert fresh.state_dict() == state and capsys.readouterr().out == ""
    renamed = Curriculum([CurriculumStage("a", steps=2), CurriculumStage("c")])
    renamed.load_state_dict(state)
    assert (renamed.stage, renamed.start_step, renamed.start_epoch, renamed.end_epoch) == (
        state["stage"], state["start_step"], state["start_epoch"], state["end_epoch"])
    assert "stages changed since the checkpoint (['a', 'b'] -> ['a', 'c']); continuing in stage 1" in (
        capsys.readouterr().out)
