"""DAPO's dynamic sampling (arXiv 2503.14476, §3.2): train only on groups whose rewards differ.

A group whose G rewards are all equal has zero advantage, so it adds nothing to the policy gradient and, under a
token-mean loss, dilutes the step's update by its tokens. As training goes on more groups are all right (or all
wrong) and the update shrinks. Dynamic sampling drops those groups and samples further batches of prompts, under
the same weights (no optimizer step in between, so every kept rollout is on-policy), until the step has a full
batch of groups with differing rewards, then trains on exactly that many; as verl's ``filter_groups``, it gives up
after ``max_gen_batches`` generation batches and tops the step up with dropped groups of the last one.

:class:`Sampled` is a rollout batch with its rewards, before the frozen models score it; :class:`GroupFilter`
keeps the informative groups of successive ones until a step's worth is there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from vold_pl.rewards.functions import RewardOutput
from vold_pl.rl.advantages import group_advantages
from vold_pl.rl.rollout_types import Rollout, concat_rollouts, select_groups


@dataclass
class Sampled:
    """B prompts' rollouts and rewards (rows group-contiguous, N = B·G), not yet scored by any frozen model."""

    rollout: Rollout
    records: list[dict]  # [B] the prompts' records, one per group
    rewards: RewardOutput  # total and named [N]
    instruction: str  # the data module's answer instruction, which the teacher's prompt ends with too
    t_roll: float  # seconds spent generating (every generation batch of the step)
    # [B_gen] bool over every group generated for the step (all generation batches): True where its rewards are all
    # equal. None: the step trains on every generated group, and its advantages say which had equal rewards.
    generated_zero_std: torch.Tensor | None = None
    gen_batches: int = 1  # generation batches the step's groups were drawn from

    @property
    def num_groups(self) -> int:
        return len(self.records)

    def groups(self, idx: list[int], pad_id: int) -> Sampled:
        """Groups ``idx`` (in that order), their rows, records and rewards."""
        G = self.rollout.group_size
        rows = torch.tensor([g * G + k for g in idx for k in range(G)], dtype=torch.long)  # [len(idx)·G]
        rw = RewardOutput(self.rewards.total[rows], {k: v[rows] for k, v in self.rewards.named.items()},
                          dict(self.rewards.errors))
        return replace(self, rollout=select_groups(self.rollout, idx, pad_id), records=[self.records[g] for g in idx],
                       rewards=rw)


def concat_sampled(parts: list[Sampled], pad_id: int, errors: dict[str, int]) -> Sampled:
    """Several :class:`Sampled` of one group size as one; ``errors``: the reward failures to report with it (those
    of every generation batch the parts came from, which the parts cannot add up: two may share a batch)."""
    names = parts[0].rewards.named
    rw = RewardOutput(torch.cat([p.rewards.total for p in parts]),
                      {k: torch.cat([p.rewards.named[k] for p in parts]) for k in names}, dict(errors))
    return replace(parts[0], rollout=concat_rollouts([p.rollout for p in parts], pad_id),
                   records=[r for p in parts for r in p.records], rewards=rw)


class GroupFilter:
    """Collects the groups with differing rewards of successive generation batches until a step's worth is there.

    Args:
        max_gen_batches: generation batches a step may draw from (≥ 1); at this many the step goes ahead with the
            groups kept so far, topped up with dropped groups of the last batch.
        pad_id: the padding token of joined rollouts.
    """

    def __init__(self, max_gen_batches: int, pad_id: int):
        if max_gen_batches < 1:
            raise ValueError(f"max_gen_batches must be >= 1, got {max_gen_batches}")
        self.max_gen_batches, self.pad_id = max_gen_batches, pad_id
        self.reset()

    def reset(self) -> None:
        """Forget the groups kept so far (a curriculum stage that changes G or the rewards starts afresh)."""
        self._kept: list[Sampled] = []
        self._zero_std: list[torch.Tensor] = []
        self._errors: dict[str, int] = {}
        self._t_roll = 0.0
        self._target = 0

    @property
    def pending_groups(self) -> int:
        return sum(p.num_groups for p in self._kept)

    def add(self, sampled: Sampled, fewest_over_ranks: Callable[[int], int] = lambda n: n) -> Sampled | None:
        """Take one generation batch; return the step's groups when there are enough, else ``None`` (sample another
        batch under the same weights). The target is the first batch's prompt count. ``fewest_over_ranks(n)``:
        the smallest ``n`` over the data-parallel ranks, so every rank decides alike and trains on as many groups
        (every rank's step runs the same collectives)."""
        G = sampled.rollout.group_size
        zero = group_advantages(sampled.rewards.total, G)[1].cpu()  # [B] True: the group's rewards are all equal
        self._target = self._target or sampled.num_groups
        self._zero_std.append(zero)
        self._t_roll += sampled.t_roll
        for k, v in sampled.rewards.errors.items():
            self._errors[k] = self._errors.get(k, 0) + v
        kept = [g for g in range(sampled.num_groups) if not zero[g]]
        if kept:
            self._kept.append(sampled.groups(kept, self.pad_id))
        enough = fewest_over_ranks(self.pending_groups) >= self._target
        if not enough and len(self._zero_std) < self.max_gen_batches:
            return None
        parts, missing = list(self._kept), self._target - self.pending_groups
        dropped = [g for g in range(sampled.num_groups) if zero[g]][: max(missing, 0)]
        if dropped:  # gave up: dropped groups of this batch fill the step (zero advantage; OPD still sees them)
            parts.append(sampled.groups(dropped, self.pad_id))
        step = concat_sampled(parts, self.pad_id, self._errors)
        if step.num_groups > self._target:  # as verl: exactly a batch's worth, the first groups kept
            step = step.groups(list(range(self._target)), self.pad_id)
        step = replace(step, t_roll=self._t_roll, generated_zero_std=torch.cat(self._zero_std),
                       gen_batches=len(self._zero_std))
        self.reset()
        return step
