"""Process set-up done once where a program starts (the ``vold-pl`` CLI, the benchmark scripts), never by library
code: how many CPU threads torch's intra-op pool uses.

``vold-pl`` calls :func:`configure_cpu_threads` before it builds anything: ``$VOLD_NUM_THREADS`` when set, else
``$OMP_NUM_THREADS`` as the user set it (torch has read it already), else torch's default capped at the cores this
process may use (in a container, torch's default can count the whole host). Benchmarks ask for an exact count
with :func:`set_cpu_threads`.
"""

from __future__ import annotations

import os

from vold_pl.errors import UserError

__all__ = ["THREADS_ENV", "available_cores", "configure_cpu_threads", "set_cpu_threads"]

THREADS_ENV = "VOLD_NUM_THREADS"


def available_cores() -> int:
    """The CPU cores this process may run on (``sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def set_cpu_threads(num_threads: int | None = None) -> int:
    """Intra-op threads for CPU runs: ``num_threads``, else ``$VOLD_NUM_THREADS``, else the cores this process
    may use (:func:`available_cores`; torch's default can count hyper-threads or the whole host in containers).

    Returns the thread count now in effect. A no-op on CUDA runs beyond setting the CPU pool.
    """
    import torch  # here, not at the top: recipe drivers (vold_pl.pipeline) read this module without loading torch

    n = num_threads or _env_threads()
    if not n:
        n = available_cores()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def _env_threads() -> int:
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 0
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 1:
        raise UserError(f"environment variable {THREADS_ENV}={raw!r} must be a whole number >= 1 (the CPU threads "
                        f"torch may use); set it so, or unset it for the default.")
    return n


def configure_cpu_threads() -> int:
    """The thread count the CLI sets at start: ``$VOLD_NUM_THREADS`` when set; else, when ``$OMP_NUM_THREADS``
    is set, what torch took from it (left unchanged); else torch's default, capped at :func:`available_cores`.

    Returns the thread count now in effect.
    """
    import torch

    if _env_threads():
        return set_cpu_threads()
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    return set_cpu_threads(min(torch.get_num_threads(), available_cores()))
