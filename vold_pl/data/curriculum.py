"""Curriculum stages (Curr-ReFT, arXiv 2503.07065, METHODS.md §4): which records a stage trains on, what RL
settings it uses and when it ends — the pure data side, with no trainer in sight.

A stage is a plain dataclass so that a YAML config can list stages under the ``Curriculum`` callback
(``vold_pl.callbacks.curriculum``), which applies them to the data module and the LightningModule.
:func:`eligible_indices` and :func:`stage_pools` say which records of each training source a stage draws from;
the data module's sampler calls them when an epoch's iterator is created.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from vold_pl.data.schema import ANSWER_TYPES
from vold_pl.errors import UserError

DIFFICULTIES = (1, 2, 3)


class EmptyStageError(UserError):
    """A curriculum stage whose filter selects no record of any training source."""


@dataclass
class CurriculumStage:
    """One stage of a curriculum: a record filter, RL settings, and the rule that ends it."""

    name: str
    """Label in logs and messages (e.g. ``yesno``, ``choice``, ``open``)."""

    answer_types: list[str] | None = None
    """Train only on records of these answer types (``yesno``, ``choice``, ``math``, ``open``, ``bbox``,
    ``multilabel``); ``None`` keeps every type."""

    difficulties: list[int] | None = None
    """Train only on records of these difficulties (1 easy … 3 hard); ``None`` keeps every record, also those
    without a difficulty (which a difficulty filter drops)."""

    num_generations: int | None = None
    """G, completions sampled per prompt in this stage (Curr-ReFT: 4 / 2 / 4); ``None`` keeps the module's
    ``grpo.num_generations``. At least 2: one completion has no group baseline, so its advantage is 0."""

    rewards: dict[str, float] | None = None
    """Reward name → weight in this stage (names from ``vold_pl.rewards.functions``, e.g.
    ``{currreft_yesno: 1.0, format: 1.0}``); ``None`` keeps the module's ``rewards``."""

    max_new_tokens: int | None = None
    """Completion length cap while sampling in this stage; ``None`` keeps the module's ``sampling.max_new_tokens``."""

    temperature: float | None = None
    """Sampling temperature in this stage (the loss scores at the same temperature); ``None`` keeps the module's."""

    steps: int | None = None
    """End the stage after this many optimizer steps in it (checked after every training batch, so with
    ``grpo.num_iterations`` = μ > 1 it ends at the first multiple of μ at or above this)."""

    epochs: int | None = None
    """End the stage after this many epochs drawn with its filter (checked after each epoch's last batch). An epoch
    is one pass over the stage's eligible records unless ``data.epoch_size`` fixes it (Curr-ReFT: 1 / 1 / 2)."""

    val_threshold: float | None = None
    """End the stage at the first validation whose ``val_metric`` is at least this (higher is better), counting only
    validations after the stage's first optimizer step (sanity checks never count)."""

    val_metric: str = "val/reward"
    """The logged validation metric compared with ``val_threshold``."""

    def __post_init__(self) -> None:
        where = f"curriculum stage {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError(f"a curriculum stage needs a non-empty name, got {self.name!r}")
        if self.answer_types is not None:
            bad = [t for t in self.answer_types if t not in ANSWER_TYPES]
            if bad or not self.answer_types:
                raise UserError(f"{where}: unknown answer type(s) {bad or '[] (empty list)'}; valid answer types: "
                                 f"{', '.join(ANSWER_TYPES)} (or leave answer_types unset for all).")
            self.answer_types = list(self.answer_types)
        if self.difficulties is not None:
            bad = [d for d in self.difficulties if isinstance(d, bool) or d not in DIFFICULTIES]
            if bad or not self.difficulties:
                raise UserError(f"{where}: difficulties must be a non-empty list of {DIFFICULTIES}, got "
                                 f"{self.difficulties!r}.")
            self.difficulties = [int(d) for d in self.difficulties]
        if self.num_generations is not None and not _int_at_least(self.num_generations, 2):
            raise UserError(f"{where}: num_generations (G) must be an integer >= 2, got {self.num_generations!r}: "
                             "with one completion per prompt the group advantage is always 0 and nothing is learned.")
        if self.rewards is not None:
            if not isinstance(self.rewards, dict) or not self.rewards:
                raise UserError(f"{where}: rewards must be a non-empty mapping name -> weight, got {self.rewards!r}")
            for k, w in self.rewards.items():
                if not _finite(w):
                    raise UserError(f"{where}: weight of reward {k!r} must be a finite number, got {w!r}")
        if self.max_new_tokens is not None and not _int_at_least(self.max_new_tokens, 1):
            raise UserError(f"{where}: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature is not None and not (_finite(self.temperature) and self.temperature > 0):
            raise UserError(f"{where}: temperature must be > 0, got {self.temperature!r}")
        for field_name in ("steps", "epochs"):
            v = getattr(self, field_name)
            if v is not None and not _int_at_least(v, 1):
                raise UserError(f"{where}: {field_name} must be an integer >= 1 (or unset), got {v!r}")
        if self.val_threshold is not None and not _finite(self.val_threshold):
            raise UserError(f"{where}: val_threshold must be a finite number, got {self.val_threshold!r}")
        if not isinstance(self.val_metric, str) or not self.val_metric:
            raise UserError(f"{where}: val_metric must name a logged metric, got {self.val_metric!r}")

    @property
    def has_end_rule(self) -> bool:
        return self.steps is not None or self.epochs is not None or self.val_threshold is not None

    def record_filter(self) -> dict[str, Any]:
        """The filter as plain data (it travels in checkpoints, which hold only plain values)."""
        return {"name": self.name, "answer_types": self.answer_types, "difficulties": self.difficulties}


def _int_at_least(v: Any, low: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _column(records: Any, name: str) -> list:
    """One field of every record: a ``datasets.Dataset`` column (read without decoding images), dict keys or
    attributes (``Record``)."""
    if hasattr(records, "column_names"):
        return list(records.select_columns([name])[name]) if name in records.column_names else [None] * len(records)
    return [r.get(name) if isinstance(r, dict) else getattr(r, name, None) for r in records]


def _get(stage: Any, key: str) -> Any:
    return stage.get(key) if isinstance(stage, dict) else getattr(stage, key, None)


def eligible_indices(records: Any, stage: Any) -> list[int]:
    """Indices of the records a stage trains on, in order.

    ``records``: a ``datasets.Dataset`` or a sequence of dicts / ``Record``s; ``stage``: a
    :class:`CurriculumStage`, or its :meth:`~CurriculumStage.record_filter` dict (``None`` fields = no filter).
    """
    types, diffs = _get(stage, "answer_types"), _get(stage, "difficulties")
    if types is None and diffs is None:
        return list(range(len(records)))
    want_t, want_d = set(types) if types is not None else None, set(diffs) if diffs is not None else None
    t_col = _column(records, "answer_type") if want_t is not None else [None] * len(records)
    d_col = _column(records, "difficulty") if want_d is not None else [None] * len(records)
    return [i for i, (t, d) in enumerate(zip(t_col, d_col))
            if (want_t is None or t in want_t) and (want_d is None or d in want_d)]


def stage_pools(sources: Sequence[tuple[str, Any]], stage: Any) -> list[list[int]]:
    """Eligible indices of each ``(label, records)`` source; :class:`EmptyStageError` when all are empty.

    A source with no eligible record simply drops out of the stage's mix; only a stage that selects nothing at
    all is an error, raised with the stage, its filter and what each source holds.
    """
    pools = [eligible_indices(records, stage) for _, records in sources]
    if any(pools):
        return pools
    have = []
    for label, records in sources:
        types = sorted({t for t in _column(records, "answer_type") if t is not None})
        diffs = sorted({d for d in _column(records, "difficulty") if d is not None})
        have.append(f"{label}: answer types {types}, difficulties {diffs}")
    raise EmptyStageError(
        f"curriculum stage {_get(stage, 'name')!r} (answer_types={_get(stage, 'answer_types')}, "
        f"difficulties={_get(stage, 'difficulties')}) selects no record from any training source ("
        + "; ".join(have) + "). Change the stage's filter or add data of those types.")
