"""Progress bars with rate and ETA for long stages outside a Trainer (inside one, Lightning's own bar is used).

One place decides how a bar looks: tqdm on stderr, on rank 0 only; in a terminal it redraws smoothly, in a log
file (stderr not a terminal) it writes a line at most every ``LOG_INTERVAL_S`` seconds, so logs show progress
without thousands of carriage-return updates.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 30.0


def is_rank_zero() -> bool:
    """True outside distributed runs and on global rank 0 (launcher environment or initialised process group)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "it", file=None, disable: bool | None = None, leave: bool = True, **kwargs) -> tqdm:
    """A tqdm bar (count, rate, elapsed and remaining time); disabled on ranks other than 0 unless told.

    ``leave=False`` clears the bar when done in a terminal; a log file always keeps its last line.
    """
    stream = file if file is not None else sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave or not tty,  # logs keep it
                disable=(not is_rank_zero()) if disable is None else disable,
                mininterval=0.1 if tty else LOG_INTERVAL_S, dynamic_ncols=tty, **kwargs)


def format_eta(done: int, total: int, elapsed_s: float, unit: str = "it") -> str:
    """``"12.50 prompts/s, ETA 3m20s"`` from a count, its total and the seconds spent (for plain log lines)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if rate <= 0 or total <= 0:
        return "rate unknown"
    left = max(total - done, 0) / rate
    m, s = divmod(int(round(left)), 60)
    h, m = divmod(m, 60)
    eta = f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
    return f"{rate:.2f} {unit}/s, ETA {eta}"
