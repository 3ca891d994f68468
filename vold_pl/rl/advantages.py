"""Group-relative advantages for GRPO (METHODS.md §2).

GRPO replaces a learned value baseline by the mean reward of the G completions sampled for the same prompt
(Shao et al., "DeepSeekMath", arXiv 2402.03300, §4.1). The three scalings offered here:

* ``"group"``: ``A_i = (r_i - mean_G r) / (std_G r + eps)``, the original GRPO.
* ``"batch"``: ``A_i = (r_i - mean_G r) / (std_B r + eps)`` with the std over every reward of the batch; this
  keeps the group baseline but avoids up-weighting near-uniform groups (the same option as TRL's
  ``scale_rewards="batch"``).
* ``"none"``: ``A_i = r_i - mean_G r``, Dr. GRPO (Liu et al., "Understanding R1-Zero-Like Training",
  arXiv 2503.20783), which argues the std division biases learning towards too-easy / too-hard prompts.

A group whose rewards are all equal carries no preference signal. Its advantage is forced to exactly 0
(instead of relying on ``0 / (0 + eps) = 0``, which fails for "batch" scaling and leaves float residue
if the mean is not exactly representable), and it is flagged so the trainer can log the fraction of such
groups (DAPO, arXiv 2503.14476, filters them by dynamic sampling for the same reason).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["group_advantages", "ADVANTAGE_SCALES"]


def _group_std(grouped: torch.Tensor, unbiased: bool) -> torch.Tensor:
    # grouped: [B, G] -> [B, 1]
    return grouped.std(dim=1, keepdim=True, unbiased=unbiased)


def _batch_std(grouped: torch.Tensor, unbiased: bool) -> torch.Tensor:
    # [B, G] -> [1, 1]; std of the raw rewards over the whole batch, as TRL's scale_rewards="batch".
    return grouped.reshape(-1).std(unbiased=unbiased).reshape(1, 1)


def _no_std(grouped: torch.Tensor, unbiased: bool) -> torch.Tensor | None:
    return None


# Name -> denominator function; ``None`` means "do not divide" (Dr. GRPO).
ADVANTAGE_SCALES: dict[str, Callable[..., torch.Tensor | None]] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": _no_std,
}


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-6,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages, GRPO (arXiv 2402.03300) / Dr. GRPO (arXiv 2503.20783).

    Args:
        rewards: ``[B*G]`` scalar reward per completion, laid out group-contiguous: rows ``i*G .. i*G+G-1``
            are the G completions of prompt ``i``.
        group_size: G, completions per prompt.
        scale: ``"group"``, ``"batch"`` or ``"none"`` (see module docstring).
        eps: added to the std before dividing.
        unbiased: Bessel-corrected std (divide by ``n - 1``) as ``torch.std`` and TRL do by default. With the
            small G of GRPO (4-16) this makes advantages ``sqrt((G-1)/G)`` times smaller than the biased
            (population) std the DeepSeekMath formula may also be read as; both are scale-only differences.

    Returns:
        ``(advantages [B*G], zero_std_mask [B] bool)``; ``zero_std_mask[i]`` is True when every reward of
        group ``i`` is equal, and those groups get advantage exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards length {rewards.numel()} is not a multiple of group_size={group_size}")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; choose from {sorted(ADVANTAGE_SCALES)}")

    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if group_size == 1:  # a lone completion has no baseline to compare with (and no unbiased std)
        n = rewards.numel()
        return rewards.new_zeros(n, dtype=dtype), torch.ones(n, dtype=torch.bool, device=rewards.device)
    grouped = rewards.to(dtype).reshape(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]

    # Exact comparison on purpose: rewards are sums of the same weights, so "equal" is bitwise equal.
    zero_std_mask = (grouped.amax(dim=1) == grouped.amin(dim=1))  # [B]

    std = ADVANTAGE_SCALES[scale](grouped, unbiased)  # [B, 1], [1, 1] or None
    adv = centered if std is None else centered / (std + eps)  # [B, G]
    adv = torch.where(zero_std_mask.unsqueeze(1), torch.zeros_like(adv), adv)  # [B, G]
    return adv.reshape(-1), zero_std_mask
