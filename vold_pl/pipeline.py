"""Running recipes as chains of plain ``vold-pl`` commands (the quickstart, the OpenVLThinker rounds, benchmarks).

Every stage of a recipe is one ``vold-pl`` command line, printed before it runs so that it can be rerun by
hand; its output is teed into a log file, and a failing stage stops the recipe with the last lines of its log.
Stages normally run as subprocesses (a crash or an out-of-memory kill cannot take the driver with it, and each
stage starts with fresh global state); ``in_process=True`` runs them inside the driver, which saves the few
seconds of interpreter start per stage that tests and debugging care about.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vold_pl.startup import THREADS_ENV, available_cores


def command_line(args: list[str]) -> str:
    """The shell form of a ``vold-pl`` command, quoted so it can be pasted back into a shell."""
    return "vold-pl " + " ".join(shlex.quote(a) for a in args)


def run(args: list[str], log: Path, in_process: bool = False, threads: int | None = None) -> None:
    """Run one ``vold-pl`` command, its output teed into ``log``; raise ``SystemExit`` naming the log if it fails.
    ``threads``: torch's CPU threads in the command (default: the CLI's own choice, :mod:`vold_pl.startup`)."""
    print(f"\n$ {command_line(args)}", flush=True)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rc = _run_in_process(args, log) if in_process else _run_subprocess(args, log, threads)
    print(f"  ({time.perf_counter() - t0:.0f} s, log: {log})", flush=True)
    if rc != 0:
        _stage_failed(rc, args, log)


def run_parallel(jobs: list[tuple[list[str], Path]], in_process: bool = False,
                 cores: int | None = None) -> list[float]:
    """Run independent ``vold-pl`` commands side by side and return each one's seconds (from the stage's start).

    At most ``cores`` run at once, each a subprocess with ``cores // min(len(jobs), cores)`` threads (at least 1);
    the next waiting command starts when one ends. Tiny models use one core poorly, so two stages on two cores
    take about the time of one. ``cores`` defaults to those this process may use, and a lone command then keeps
    the CLI's own thread choice; given, it fixes every command's threads, so that a machine with more cores can
    run the thread plan of another (a command's thread count changes the order of its sums, hence its bits).
    Each command's output goes to its own log only (interleaved lines would be unreadable); a failing command
    stops the recipe with the last lines of its log once the running ones have ended. ``in_process=True``
    (tests) runs them one after the other in this process."""
    if in_process or len(jobs) == 1:
        seconds = []
        for args, log in jobs:
            t0 = time.perf_counter()
            run(args, log, in_process=in_process, threads=cores)
            seconds.append(time.perf_counter() - t0)
        return seconds
    cores = cores or available_cores()
    width = min(len(jobs), cores)
    threads = max(1, cores // width)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **_thread_env(threads))
    waiting, running, failed = list(enumerate(jobs)), {}, []
    seconds, t0, shown = [0.0] * len(jobs), time.perf_counter(), time.perf_counter()
    while waiting or running:
        while waiting and len(running) < width and not failed:
            i, (args, log) = waiting.pop(0)
            log = Path(log)
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"\n$ {command_line(args)}   (side by side, {threads} thread(s), log: {log})", flush=True)
            fh = log.open("w")
            running[i] = (args, log, fh, subprocess.Popen(_cli_command(args), stdout=fh, stderr=subprocess.STDOUT,
                                                          env=env))
        if failed and not running:
            break
        for i, (args, log, fh, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            seconds[i] = time.perf_counter() - t0
            del running[i]
            print(f"  ({seconds[i]:.0f} s, exit {proc.returncode}, log: {log})", flush=True)
            if proc.returncode != 0:
                failed.append((proc.returncode, args, log))
        if running and time.perf_counter() - shown >= PROGRESS_EVERY_S:
            shown = time.perf_counter()
            print(f"  [{shown - t0:.0f} s] " + "; ".join(f"{log.stem}: {last_progress(log)}"
                                                      for _, log, _, _ in running.values()), flush=True)
        time.sleep(0.5)
    if failed:
        _stage_failed(*failed[0])
    return seconds


def _stage_failed(rc: int, args: list[str], log: Path) -> None:
    """Stop the recipe: the failing command and the last lines of its log."""
    tail = Path(log).read_text(errors="replace").splitlines()[-25:]
    raise SystemExit(f"stage failed (exit {rc}): {command_line(args)}\nlast lines of {log}:\n" + "\n".join(tail))


PROGRESS_EVERY_S = 60.0
_COUNT = re.compile(r"\[vold-pl\] (?:step|traces:) (\d+)/(\d+)")


def last_progress(log: Path) -> str:
    """The newest ``done/total`` count a stage has logged ("[vold-pl] step 750/2000" from the training bar,
    "[vold-pl] traces: 832/2000" from trace writing), or "running" before the first."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return "running"
    counts = _COUNT.findall(tail)
    return f"{counts[-1][0]}/{counts[-1][1]}" if counts else "running"


def _cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "vold_pl.cli", *args]


def _thread_env(threads: int) -> dict[str, str]:
    """Environment variables that give a ``vold-pl`` command ``threads`` CPU threads: the CLI's own setting
    (:mod:`vold_pl.startup`) wins over OMP's, so both are set."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), THREADS_ENV: str(threads)}


def _run_subprocess(args: list[str], log: Path, threads: int | None = None) -> int:
    cmd = _cli_command(args)
    with log.open("w") as fh:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(_thread_env(threads) if threads else {}))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("[vold-pl]") or "Error" in line:
                print("  " + line.rstrip(), flush=True)
        return proc.wait()


class _Tee:
    """A stdout stand-in writing to the log and to the real stdout (``[vold-pl]`` lines are what users read)."""

    def __init__(self, fh, out):
        self.fh, self.out = fh, out

    def write(self, s: str) -> int:
        self.fh.write(s)
        return self.out.write(s)

    def flush(self) -> None:
        self.fh.flush()
        self.out.flush()

    def isatty(self) -> bool:
        return False


def _run_in_process(args: list[str], log: Path) -> int:
    """``vold_pl.cli.main(args)`` in this process; stdout is teed into the log (stderr stays as it is)."""
    from vold_pl.cli import main

    with log.open("w") as fh:
        real = sys.stdout
        sys.stdout = _Tee(fh, real)
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if code:
                fh.write(f"SystemExit: {e.code}\n")
            return code
        finally:
            sys.stdout = real
    return 0


def sources(*paths: str | Path) -> str:
    """A ``--data.train`` / ``--data.val`` value: the given files as a JSON list of data sources."""
    return json.dumps([{"path": str(p)} for p in paths])
