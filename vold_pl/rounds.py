"""OpenVLThinker's iterative self-improvement (arXiv 2503.17352, METHODS.md §5) as one restartable command.

    python -m vold_pl.rounds --config configs/openvlthinker/rounds.yaml      (or: vold-pl-rounds --config ...)

Each round r runs five stages, each a plain ``vold-pl`` command (base config + overrides, printed before it
runs so it can be rerun by hand), with outputs under ``<out_dir>/round_<r>/``:

    sft         SFT on the round's SFT set, from the base model (``sft_init: base``, as the paper does) or from
                the previous round's GRPO model (``sft_init: continue``)              -> sft/export/
    bench_sft   ``vold-pl validate`` with the benchmark callback on the SFT model
                                                                          -> bench_sft/benchmark_report.json
    grpo        GRPO from the SFT model (the grpo config: opd.lam 0, accuracy reward) -> grpo/export/
    bench_grpo  the same benchmark on the GRPO model                      -> bench_grpo/benchmark_report.json
    traces      ``vold-pl predict`` + TraceWriter: the GRPO model answers the training problems; verified,
                shortest, reflection-free traces become round r+1's SFT set           -> traces/sft.jsonl
                (not run in the last round: there is no next round to feed)

Round 0's SFT set is ``initial_sft_data`` (e.g. the quickstart's teacher traces). A stage is done when its
output exists; every output appears atomically (fits export to ``export.partial/`` and rename it; the trace
writer and the benchmark report write through a temporary file), so a stopped loop resumes at the round and
stage where it stopped, and a fit interrupted mid-way resumes from its ``checkpoints/last.ckpt``. State and a
table of benchmark accuracy per round and stage go to ``<out_dir>/rounds.json`` and ``rounds.md``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vold_pl.io import atomic_write_text
from vold_pl.pipeline import command_line, run
from vold_pl.progress import progress

STAGES = ("sft", "bench_sft", "grpo", "bench_grpo", "traces")


@dataclass
class RoundsConfig:
    """The rounds driver's settings (a small YAML; every field is also a command-line flag).

    Args:
        out_dir: where every round's data, checkpoints, exports, benchmark reports and logs are kept.
        rounds: how many SFT → GRPO rounds to run (the paper: 2-3). Raising it and rerunning extends a finished loop.
        base_model: the model round 0 starts from, and every round's SFT with ``sft_init: base``.
        initial_sft_data: round 0's SFT set: a JSONL in the record schema whose records carry a ``trace``.
        sft_config: base ``vold-pl fit`` config of the SFT stages (an ``SFTModule``).
        grpo_config: base ``vold-pl fit`` config of the GRPO stages (``OPDGRPOModule`` with ``opd.lam: 0`` and
            accuracy-only rewards, per the paper).
        sample_config: base ``vold-pl predict`` config with a ``TraceWriter`` callback (how many samples,
            temperature, keep shortest, reflections stripped, word cap).
        bench_config: base ``vold-pl validate`` config with a ``BenchmarkCallback``.
        sft_init: ``base`` (the paper: each round's SFT starts again from the base model) or ``continue``
            (from the previous round's GRPO model).
        train_data: GRPO's training problems (data sources, e.g. ``[{path: data/train.jsonl}]``), also the
            prompts the next SFT set is sampled from; null keeps the base configs' own data.
        val_data: SFT and GRPO validation sources; null keeps the base configs' own.
        sample_data: prompts of the trace stage; default ``train_data``.
        sft_args: extra ``vold-pl`` arguments appended to every SFT command (e.g. ``[--trainer.max_steps, "500"]``).
        grpo_args: extra arguments of every GRPO command.
        sample_args: extra arguments of every trace-sampling command.
        bench_args: extra arguments of every benchmark command.
        min_traces: a round whose sampled set has fewer verified traces than this counts as empty.
        on_empty: what an empty sampled set does: ``error`` (stop and say what to try) or ``reuse_previous``
            (the next round trains on the previous round's SFT set again, said loudly).
        stop_after: stop once this stage is done, as ``<round>:<stage>`` (e.g. ``0:grpo``); for tests and debugging.
        in_process: run the stages inside this process instead of subprocesses (faster start; tests).
        dry_run: print the commands of every stage that is not done yet, run nothing.
    """

    out_dir: str = "runs/openvlthinker"
    rounds: int = 2
    base_model: str = "artifacts/tiny/student"
    initial_sft_data: str = "runs/quickstart/seed0/traces/coldstart.jsonl"
    sft_config: str = "configs/openvlthinker/sft.yaml"
    grpo_config: str = "configs/openvlthinker/grpo.yaml"
    sample_config: str = "configs/openvlthinker/sample.yaml"
    bench_config: str = "configs/openvlthinker/bench.yaml"
    sft_init: str = "base"
    train_data: list[dict[str, Any]] | None = None
    val_data: list[dict[str, Any]] | None = None
    sample_data: list[dict[str, Any]] | None = None
    sft_args: list[str] = field(default_factory=list)
    grpo_args: list[str] = field(default_factory=list)
    sample_args: list[str] = field(default_factory=list)
    bench_args: list[str] = field(default_factory=list)
    min_traces: int = 1
    on_empty: str = "error"
    stop_after: str | None = None
    in_process: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.sft_init not in ("base", "continue"):
            raise SystemExit(f"sft_init must be 'base' (every round's SFT starts from base_model, as the paper "
                             f"does) or 'continue' (from the previous round's GRPO model); got {self.sft_init!r}.")
        if self.on_empty not in ("error", "reuse_previous"):
            raise SystemExit(f"on_empty must be 'error' or 'reuse_previous', got {self.on_empty!r}.")
        if self.rounds < 1 or self.min_traces < 0:
            raise SystemExit(f"rounds must be >= 1 and min_traces >= 0, got {self.rounds} and {self.min_traces}.")
        if self.stop_after is not None:
            r, _, stage = str(self.stop_after).partition(":")
            if not r.isdigit() or stage not in STAGES:
                raise SystemExit(f"stop_after must be '<round>:<stage>' with a stage among {', '.join(STAGES)} "
                                 f"(e.g. '0:grpo'); got {self.stop_after!r}.")
        for name in ("sft_config", "grpo_config", "sample_config", "bench_config"):
            if not Path(getattr(self, name)).is_file():
                raise SystemExit(f"{name}: config file not found: {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------- layout


def round_dir(cfg: RoundsConfig, r: int) -> Path:
    return Path(cfg.out_dir) / f"round_{r}"


def stage_dir(cfg: RoundsConfig, r: int, stage: str) -> Path:
    return round_dir(cfg, r) / stage


def marker(cfg: RoundsConfig, r: int, stage: str) -> Path:
    """The file whose existence means the stage is done (each appears atomically, see the module docstring)."""
    d = stage_dir(cfg, r, stage)
    return {"sft": d / "export" / "config.json", "grpo": d / "export" / "config.json",
            "traces": d / "sft.jsonl"}.get(stage, d / "benchmark_report.json")


def model_after(cfg: RoundsConfig, r: int, stage: str) -> Path:
    return stage_dir(cfg, r, stage) / "export"


def sft_init_model(cfg: RoundsConfig, r: int) -> str:
    """Round r's SFT starts from the base model, or (``continue``, r > 0) from round r-1's GRPO model."""
    return cfg.base_model if r == 0 or cfg.sft_init == "base" else str(model_after(cfg, r - 1, "grpo"))


def sft_set(cfg: RoundsConfig, r: int) -> tuple[Path, str]:
    """Round r's SFT set and why: the initial set, round r-1's sampled traces, or (on_empty) the previous set."""
    if r == 0:
        return Path(cfg.initial_sft_data), "initial SFT data"
    traces = marker(cfg, r - 1, "traces")
    if cfg.dry_run and not traces.exists():
        return traces, f"sampled by round {r - 1}'s GRPO model"
    summary = json.loads(traces.with_suffix(".summary.json").read_text())
    kept = int(summary.get("verified_records", summary.get("written", 0)))
    if kept >= max(cfg.min_traces, 1):
        return traces, f"{kept} verified traces sampled by round {r - 1}'s GRPO model"
    what = (f"round {r - 1}: the GRPO model wrote {kept} verified traces ({summary.get('kept', 0)}/"
            f"{summary.get('total', 0)} prompts; min_traces {cfg.min_traces}) in {traces}")
    if cfg.on_empty == "error":
        raise SystemExit(f"{what}. Try more samples (sample_args: [--trainer.callbacks.init_args.num_samples, '8']), "
                         "a higher temperature (--trainer.callbacks.init_args.temperature 1.0), a longer "
                         "max_new_tokens, more GRPO steps, or on_empty: reuse_previous to train round "
                         f"{r} on the previous SFT set again. Delete {traces} to sample again.")
    previous, _ = sft_set(cfg, r - 1)
    return previous, f"REUSED from round {r - 1} ({what}; on_empty: reuse_previous)"


# ---------------------------------------------------------------------------------------------- commands


def _data_flag(flag: str, value: list[dict] | None) -> list[str]:
    return [flag, json.dumps(value)] if value else []


def _fit_args(cfg: RoundsConfig, r: int, stage: str) -> list[str]:
    d = stage_dir(cfg, r, stage)
    if stage == "sft":
        path, _ = sft_set(cfg, r)
        base, init, extra = cfg.sft_config, sft_init_model(cfg, r), cfg.sft_args
        data = ["--data.train", json.dumps([{"path": str(path)}])]
    else:
        base, init, extra = cfg.grpo_config, str(model_after(cfg, r, "sft")), cfg.grpo_args
        data = _data_flag("--data.train", cfg.train_data)
    args = ["fit", "--config", base, "--model.init_args.model.name_or_path", init,
            "--model.init_args.export_dir", str(d / "export.partial"), *data,
            *_data_flag("--data.val", cfg.val_data), "--trainer.default_root_dir", str(d)]
    last = d / "checkpoints" / "last.ckpt"
    if last.exists():  # interrupted mid-fit: continue from the last checkpoint (optimizer, data position, RNG)
        args += ["--ckpt_path", str(last)]
    return args + list(extra)


def stage_args(cfg: RoundsConfig, r: int, stage: str) -> list[str]:
    """The ``vold-pl`` arguments of one stage (what is printed and run)."""
    if stage in ("sft", "grpo"):
        return _fit_args(cfg, r, stage)
    d = stage_dir(cfg, r, stage)
    if stage == "traces":
        return ["predict", "--config", cfg.sample_config,
                "--model.init_args.model.name_or_path", str(model_after(cfg, r, "grpo")),
                *_data_flag("--data.predict", cfg.sample_data or cfg.train_data),
                "--trainer.callbacks.init_args.out_path", str(marker(cfg, r, "traces")),
                "--trainer.default_root_dir", str(d), *cfg.sample_args]
    model = model_after(cfg, r, stage.removeprefix("bench_"))
    return ["validate", "--config", cfg.bench_config, "--model.init_args.model.name_or_path", str(model),
            "--trainer.callbacks.init_args.out_dir", str(d), "--trainer.default_root_dir", str(d), *cfg.bench_args]


def finish_stage(cfg: RoundsConfig, r: int, stage: str) -> None:
    """After a fit: ``export.partial/`` → ``export/`` in one rename, the stage's done marker."""
    if stage in ("sft", "grpo"):
        partial, final = stage_dir(cfg, r, stage) / "export.partial", model_after(cfg, r, stage)
        if not (partial / "config.json").exists():
            raise SystemExit(f"round {r} {stage}: the fit ended without an export in {partial} (preempted?). Rerun "
                             "the same command to resume from its last checkpoint.")
        if final.exists():  # a stray folder without its config.json: an unfinished export of an older run
            shutil.rmtree(final)
        partial.replace(final)


# ---------------------------------------------------------------------------------------------- driver


def run_rounds(cfg: RoundsConfig) -> dict:
    """Run (or resume) every round; returns the state written to ``rounds.json``."""
    if not Path(cfg.initial_sft_data).is_file() and not marker(cfg, 0, "sft").exists():
        raise SystemExit(f"initial_sft_data not found: {cfg.initial_sft_data}. Round 0 trains on it: give a JSONL "
                         "of records with a 'trace' (e.g. `make quickstart` writes runs/quickstart/seed0/traces/"
                         "coldstart.jsonl).")
    out = Path(cfg.out_dir)
    state: dict = {"config": asdict(cfg), "stages": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    earlier = _earlier_stages(out)
    stop = None if cfg.stop_after is None else (int(cfg.stop_after.split(":")[0]), cfg.stop_after.split(":")[1])
    plan = [(r, s) for r in range(cfg.rounds) for s in STAGES if not (s == "traces" and r == cfg.rounds - 1)]
    done = sum(marker(cfg, r, s).exists() for r, s in plan)
    # Stages done / planned, seconds per stage and time left, over the whole loop (each stage logs its own file).
    with progress(total=len(plan), initial=done, desc="rounds", unit="stage", disable=True if cfg.dry_run else None,
                  smoothing=0) as bar:
        return _run_plan(cfg, state, out, earlier, stop, bar)


def _run_plan(cfg: RoundsConfig, state: dict, out: Path, earlier: dict, stop, bar) -> dict:
    for r in range(cfg.rounds):
        for stage in STAGES:
            if stage == "traces" and r == cfg.rounds - 1:
                continue
            entry = {"round": r, "stage": stage, "output": str(marker(cfg, r, stage))}
            if marker(cfg, r, stage).exists():
                entry = dict(earlier.get((r, stage), entry), status="done before")  # keeps its command
                print(f"[rounds] round {r} {stage}: done ({marker(cfg, r, stage)}), skipped", flush=True)
            else:
                if stage == "sft":
                    path, why = sft_set(cfg, r)
                    entry["sft_data"] = str(path)
                    print(f"[rounds] round {r} SFT set: {path} ({why})", flush=True)
                args = stage_args(cfg, r, stage)
                entry["command"] = command_line(args)
                if cfg.dry_run:
                    print(f"\n[rounds] round {r} {stage} (dry run):\n$ {entry['command']}", flush=True)
                    entry["status"] = "dry run"
                else:
                    t0 = time.perf_counter()
                    run(args, round_dir(cfg, r) / "logs" / f"{stage}.log", in_process=cfg.in_process)
                    finish_stage(cfg, r, stage)
                    entry.update(status="ran", seconds=round(time.perf_counter() - t0, 1))
                    bar.set_postfix_str(f"round {r} {stage} done", refresh=False)
                    bar.update(1)
            state["stages"].append(entry)
            if not cfg.dry_run:
                write_state(out, state, cfg)
            if stop == (r, stage):
                print(f"[rounds] stopped after round {r} {stage} (stop_after); rerun without stop_after to go on.")
                return state
    if not cfg.dry_run:
        print("\n" + write_state(out, state, cfg))
    return state


def _earlier_stages(out: Path) -> dict[tuple[int, str], dict]:
    """The stage entries of an earlier run's ``rounds.json`` (their commands and timings), by (round, stage)."""
    try:
        old = json.loads((out / "rounds.json").read_text())
    except (OSError, ValueError):
        return {}
    return {(e["round"], e["stage"]): e for e in old.get("stages", []) if "command" in e}


def accuracy(report_path: Path) -> dict[str, float]:
    """Accuracy per benchmark of one report; ``{}`` when the report does not exist yet."""
    try:
        rep = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: float(b.get("accuracy", math.nan)) for name, b in rep.get("benchmarks", {}).items()}


def table(cfg: RoundsConfig) -> list[dict]:
    """One row per round: its SFT set, the traces it sampled, benchmark accuracy after SFT and after GRPO."""
    rows = []
    for r in range(cfg.rounds):
        summary = marker(cfg, r, "traces").with_suffix(".summary.json")
        s = json.loads(summary.read_text()) if summary.exists() else None
        try:
            data = str(sft_set(cfg, r)[0])
        except (OSError, ValueError, SystemExit):
            data = None
        rows.append({"round": r, "sft_data": data,
                     "traces": f"{s['kept']}/{s['total']}" if s else None,
                     "sft": accuracy(marker(cfg, r, "bench_sft")), "grpo": accuracy(marker(cfg, r, "bench_grpo"))})
    return rows


def render_table(rows: list[dict]) -> str:
    names = sorted({n for row in rows for st in ("sft", "grpo") for n in row[st]})
    cols = [f"{n} after {st.upper()}" for n in names for st in ("sft", "grpo")]
    lines = ["| round | " + " | ".join(cols) + " | traces kept (prompts) | SFT set |",
             "|---|" + "---:|" * len(cols) + "---:|---|"]
    for row in rows:
        accs = [row[st].get(n) for n in names for st in ("sft", "grpo")]
        cells = ["—" if a is None else f"{100 * a:.1f}" for a in accs]
        lines.append(f"| {row['round']} | " + " | ".join(cells) + f" | {row['traces'] or '—'} | {row['sft_data']} |")
    return "\n".join(lines)


def write_state(out: Path, state: dict, cfg: RoundsConfig) -> str:
    """``rounds.json`` (config, stage log, table) and ``rounds.md`` (the table), both atomically; returns the table."""
    rows = table(cfg)
    state = dict(state, table=rows, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    atomic_write_text(out / "rounds.json", json.dumps(state, indent=2) + "\n")
    md = (f"# OpenVLThinker rounds: {out}\n\nbenchmark accuracy (%) per round, after SFT and after GRPO "
          f"(sft_init: {cfg.sft_init})\n\n{render_table(rows)}\n")
    atomic_write_text(out / "rounds.md", md)
    return md


def parse_config(argv: list[str] | None = None) -> RoundsConfig:
    """``--config rounds.yaml`` plus any field as a flag (``--rounds 3``, ``--stop_after 0:grpo``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="vold-pl-rounds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a rounds YAML (configs/openvlthinker/rounds.yaml)")
    parser.add_class_arguments(RoundsConfig)
    ns = parser.parse_args(argv)
    return RoundsConfig(**{f.name: ns[f.name] for f in fields(RoundsConfig)})


def main(argv: list[str] | None = None) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_rounds(parse_config(argv))


if __name__ == "__main__":
    main()
