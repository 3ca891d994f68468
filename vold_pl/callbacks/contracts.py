"""What callbacks ask of the LightningModule and the data module, as protocols (docs/architecture.md).

Declared apart from the callbacks so that a callback's own code (and a mutation tool that rewrites it) never
changes the contract the objects are checked against.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from vold_pl.data.curriculum import CurriculumStage

__all__ = ["CurriculumModule", "CurriculumData"]


@runtime_checkable
class CurriculumModule(Protocol):
    """What the curriculum asks of the LightningModule (vold-pl's ``PolicyModule``s provide it):

    - ``curriculum_settings()``: the settings a stage may set (``num_generations``, ``rewards``,
      ``max_new_tokens``, ``temperature``) that it has, with their current values (read once at setup: a stage
      that leaves a setting unset restores this value);
    - ``apply_curriculum_settings(**settings)``: set them (each stage change);
    - ``end_epoch_early(end)``: end the running epoch before its next batch (a stage that ended mid-epoch).
    """

    def curriculum_settings(self) -> dict[str, Any]: ...

    def apply_curriculum_settings(self, **settings: Any) -> None: ...

    def end_epoch_early(self, end: bool = True) -> None: ...


@runtime_checkable
class CurriculumData(Protocol):
    """What the curriculum asks of the data module (``ReasoningDataModule`` provides it): the pools a stage
    draws from (checked at setup), the stage filter, and the epoch Lightning gave the train sampler."""

    train_epoch: int

    def curriculum_pools(self, stage: CurriculumStage) -> Any: ...

    def set_curriculum_stage(self, index: int, **record_filter: Any) -> None: ...
