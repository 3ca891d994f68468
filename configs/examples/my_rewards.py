"""Example reward plugin for configs/examples/custom_reward.yaml.

A reward is any function ``fn(completion: str, record) -> float``; ``record`` carries ``answer``,
``answer_type``, ``choices`` and ``id``. Name it in a config as ``path/to/file.py:function`` (this file) or,
when it is importable, ``package.module:function``.
"""

from vold_pl.rewards.extract import extract_answer


def brevity(completion: str, record) -> float:
    """1.0 for an answer with at most 40 words of reasoning, falling linearly to 0.0 at 200 words."""
    words = len(completion.split())
    return max(0.0, min(1.0, (200 - words) / 160))


def answered(completion: str, record) -> float:
    """1.0 when the completion gives any extractable answer (a softer format reward)."""
    return float(extract_answer(completion) is not None)
