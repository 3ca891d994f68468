"""The whole VOLD recipe offline on tiny models: ``make quickstart`` (``python -m vold_pl.quickstart``).

The toy world holds VOLD's premise: a student that perceives well (as a pretrained VLM does) and reasons worse
than a text-only teacher that reads an exact description of the same image. Stages, each a plain ``vold-pl``
command printed before it runs (so every step can be rerun by hand); stages joined by ``‖`` run side by side,
one core each:

1. teacher SFT ‖ perception    the toy world's pretraining, as a real recipe starts from a pretrained LLM and VLM:
                               the tiny text-only teacher learns the text views of the synthetic problems; the
                               tiny Qwen2.5-VL student learns to read the scene's facts off images. A checkout
                               starts from the models of seed 0's stage 1 shipped in ``vold_pl/toy/pretrained``
                               (:func:`shipped_pretrained`: only when they were made from the same artifacts and
                               configs); ``--pretrain`` trains them from each seed's own initial weights. A teacher
                               under TEACHER_TARGET greedy on the validation text views trains on
                               (``teacher_on_target``);
2. teacher traces              ``vold-pl predict`` + TraceWriter: the teacher answers the *text views* of the
                               image problems; only verified traces are kept (VOLD's cold-start data);
3. cold start                  SFT of the perceiving student on those traces, with the images (it never sees
                               the text view);
4. GRPO only ‖ VOLD            RL from the cold start on problems it has not seen (``rl.jsonl``): accuracy
                               reward alone, and GRPO + on-policy distillation from the teacher on the
                               student's own rollouts (VOLD);
5. benchmarks                  ``vold-pl validate`` with the benchmark callback: the teacher on the test text
                               views (greedy, and at T = 1 as when it wrote the traces), every student stage on
                               the test images and on the held-out perception scenes; a final table with
                               bootstrap 95% intervals over problems and accuracy by difficulty.

``--seeds 0 1 2`` runs the recipe once per training seed and adds a table of mean and spread over seeds. The data
files and the pretrained models stay the same; the seed draws the order an SFT stage reads its data in and every
sample (with ``--pretrain``, also stage 1's initial weights). A stage whose output already exists, made by the same
command and config (:class:`JobKeys`), is skipped, so an interrupted quickstart resumes where it stopped; the first
stage that runs makes every later one run; when the artifacts or the shipped models have changed since (``make
artifacts`` after a change of the generator), every stage reruns (both decided by a seed's :class:`StageRunner`).
Each seed's figures and stage times are written to ``<runs>/seed<N>/summary.json``, with the machine its stages ran
on (:func:`machine`); its table ends with where its figures fall against the README's seeds: their 95% prediction
interval for one more run (:func:`reference_spread`). ``--cores N`` runs every stage with the threads it would get
on an N-core machine, the thread plan of figures made there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vold_pl.compare import bootstrap_mean_ci, prediction_interval, read_run
from vold_pl.pipeline import run_parallel, sources

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "quickstart"
BENCH = "synthetic"  # the benchmark name of the reasoning problems in every report
# Greedy accuracy on the validation text views the teacher reaches before writing traces. The teacher's target is
# 90% on the test split; val.jsonl has 200 problems (one standard error is about 2 points), hence a margin.
TEACHER_TARGET = 0.92
TEACHER_TOP_UPS = 2  # further SFT runs, at most, for a teacher under TEACHER_TARGET
TEACHER_TOP_UP_STEPS, TEACHER_TOP_UP_LR = 1000, 1.0e-3  # a third of sft_teacher.yaml's lr, cosine again
# The toy world's pretrained models, shipped with the code as a real recipe starts from a downloaded LLM and VLM: the
# text-only teacher and the perceiving student after stage 1 of seed 0, with a manifest of what they were made from
# (`make toy-pretrained` makes them again). The quickstart starts from them when they match this checkout's artifacts
# and configs, so a fresh clone runs the recipe itself (traces, cold start, RL) in minutes.
PRETRAINED = Path(__file__).resolve().parent / "toy" / "pretrained"
MANIFEST = "manifest.json"
PRETRAINING_CONFIGS = ("sft_teacher.yaml", "sft_perception.yaml")
# The README's spread over seeds of the quickstart from the shipped models (benchmarks/toy_vold_ablation.py writes
# it): a run's table places its figures in the 95% prediction interval it gives for one more run, when the run
# started from the same shipped models.
REFERENCE = ROOT / "benchmarks" / "results" / "shipped_models" / "toy_vold_ablation.json"
RL_CONFIGS = {"grpo_only": "grpo_only.yaml", "vold": "opd_grpo.yaml"}  # the RL arms, side by side in stage 4
PLACED_ROWS = ("teacher_greedy", "cold_start", "grpo_only", "vold")  # the rows placed in it (the others read 0)
STUDENT_STAGES = ("base", "perception", "cold_start", "grpo_only", "vold")
STAGE_LABELS = {"base": "base student (random init)", "perception": "after perception",
                "cold_start": "after cold start", "grpo_only": "GRPO only", "vold": "VOLD (GRPO + OPD)"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the offline VOLD quickstart on tiny models.")
    parser.add_argument("--artifacts", default="artifacts", help="folder with tiny/ models and data/ (make artifacts)")
    parser.add_argument("--runs", default="runs/quickstart", help="folder for every stage's outputs (one per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds: each draws the SFT data order and every sample (with --pretrain, also "
                             "stage 1's initial weights); several give a mean-and-spread table")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage even if its output exists")
    parser.add_argument("--cores", type=int, default=None,
                        help="run every stage with the threads it would get on a machine with this many cores (a "
                             "stage's thread count changes its bits; the README's figures: --cores 2); default: "
                             "the cores this process may use")
    parser.add_argument("--pretrain", action="store_true",
                        help="train the teacher and the perceiving student (stage 1) from each seed's own initial "
                             "weights instead of starting from the pretrained models shipped in vold_pl/toy/pretrained")
    parser.add_argument("--rl-steps", type=int, default=None,
                        help=f"optimizer steps of each RL arm (default: the configs' {declared_rl_steps()}, at which "
                             f"the README's figures and its spread were measured); the arms learn on with more "
                             f"(README \"More RL steps\"), at about 1 s a step each on 2 cores. Give another --runs "
                             f"to keep the default's runs")
    parser.add_argument("--save-pretrained", action="store_true",
                        help="train stage 1 on seed 0 and ship its models in vold_pl/toy/pretrained (make "
                             "toy-pretrained); runs nothing after it")
    args = parser.parse_args(argv)
    if args.rl_steps is not None and args.rl_steps < 1:
        parser.error(f"--rl-steps {args.rl_steps}: give a whole number of optimizer steps >= 1 (or leave it out for "
                     f"the configs' {declared_rl_steps()})")
    if args.cores is not None and args.cores < 1:
        parser.error(f"--cores {args.cores}: give the cores of the thread plan, a whole number >= 1 (or leave it out "
                     f"for this machine's)")
    art, runs = Path(args.artifacts), Path(args.runs)
    data, tiny = art / "data", art / "tiny"
    if not (tiny / "student" / "config.json").exists() or not (data / "train.jsonl").exists():
        raise SystemExit(f"no tiny models or data under {art}: run `make artifacts` first.")
    missing = [f for f in ("teacher_text.jsonl", "perception_train.jsonl", "perception_test.jsonl", "rl.jsonl")
               if not (data / f).exists()]
    if missing:
        raise SystemExit(f"{data} has no {', '.join(missing)} (written by the current generator): run `make artifacts` "
                         f"again.")
    if args.save_pretrained:
        seed_runs = runs / "seed0"
        stages = StageRunner(seed_runs, 0, args.fresh, cores=args.cores, art=art)
        start = pretrained_models(art, seed_runs, 0, stages, pretrain=True)
        home = save_pretrained(art, start, sum(stages.times.values()), fingerprint=stages.fingerprint)
        print(f"[quickstart] shipped the teacher ({start.teacher}) and the perceiving student ({start.perception}) "
              f"in {home}")
        return
    summaries = [run_seed(art, runs / f"seed{seed}", seed, args.fresh, pretrain=args.pretrain, cores=args.cores,
                          rl_steps=args.rl_steps) for seed in args.seeds]
    for s in summaries:
        print_table(s)
    if len(summaries) > 1:
        print_seed_table(summaries)


class StageRunner:
    """Runs a seed's stages: ``runner(name, jobs)`` runs side by side the jobs that :class:`JobKeys` cannot reuse,
    each with the seed's arguments and the threads of ``cores`` (:func:`vold_pl.pipeline.run_parallel`), and
    records the stage's wall time in ``times`` (a reused stage keeps the time it took when it ran, from the seed's
    previous ``summary.json``).

    The one home of what a seed reuses: with ``art``, the artifacts' fingerprint is taken once (``fingerprint``,
    which the shipped models' check reads too) and outputs made from other artifacts are not reused
    (:func:`artifacts_changed`); ``fresh`` (``--fresh``, or those artifacts) reuses nothing, and otherwise a job
    is reused only for the same command and config (:class:`JobKeys`)."""

    def __init__(self, runs: Path, seed: int, fresh: bool = False, in_process: bool = False,
                 cores: int | None = None, art: Path | None = None):
        # The seed drives every draw of a stage: sampling (seed_everything) and the order an SFT stage reads its
        # data in (data.seed); with --pretrain, initial_models gives each seed its own initial weights too.
        self.seed_arg = ["--seed_everything", str(seed), "--data.seed", str(seed)]
        self.in_process, self.cores = in_process, cores
        self.fingerprint = artifacts_fingerprint(art) if art is not None else None
        self.fresh = (art is not None and artifacts_changed(art, runs, self.fingerprint)) or fresh
        self.keys = JobKeys(runs / "job_keys.json", self.fresh)
        self.times: dict[str, float] = {}
        self.reused: list[float] = []  # seconds of the stages reused, counted in the seed's total
        self.previous = json.loads((runs / "summary.json").read_text()) \
            if (runs / "summary.json").exists() and not self.fresh else {}  # the seed's summary from its last run
        self.before = self.previous.get("stage_seconds", {})

    def __call__(self, name: str, jobs: list[tuple[list[str], Path, Path]]) -> None:
        todo = [(a + self.seed_arg, log, out) for a, log, out in jobs if not self.keys.reusable(a + self.seed_arg, out)]
        t0 = time.perf_counter()
        if todo:
            run_parallel([(a, log) for a, log, _ in todo], in_process=self.in_process, cores=self.cores)
            self.keys.ran([(a, out) for a, _, out in todo])
            self.times[name] = time.perf_counter() - t0
            print(f"[quickstart] stage {name}: {self.times[name]:.0f} s", flush=True)
        else:
            self.times[name] = self.before.get(name, 0.0)
            self.reused.append(self.times[name])
            print(f"[quickstart] stage {name}: reused ({self.times[name]:.0f} s when it ran)", flush=True)


@dataclass
class Pretrained:
    """The models the recipe starts from: the text-only teacher, the student that can see, and the untrained
    student the latter came from (the table's "base" row)."""

    teacher: Path
    perception: Path
    base: Path
    teacher_val: list[float]  # greedy on the validation text views, before and after each top-up
    shipped: bool  # the models shipped in PRETRAINED, not trained by this run


def pretrained_models(art: Path, runs: Path, seed: int, stages: StageRunner, pretrain: bool = False) -> Pretrained:
    """Stage 1, the toy world's pretraining: the shipped models (:func:`shipped_pretrained`) unless ``pretrain``
    or they were made from other artifacts or configs; otherwise the teacher's SFT beside the student's perception
    stage, from the seed's own initial weights. Either way the teacher is checked on validation before it writes
    traces (:func:`teacher_on_target`)."""
    data = art / "data"
    shipped = not pretrain and shipped_pretrained(art, fingerprint=stages.fingerprint) is not None
    if shipped:
        teacher, perceive, base = PRETRAINED / "teacher", PRETRAINED / "perception", art / "tiny" / "student"
        print(f"[quickstart] stage 1 teacher SFT ‖ perception: the pretrained models shipped in {PRETRAINED} "
              f"(seed 0; `--pretrain` trains them: 9-12 min on 2 cores)", flush=True)
    else:
        tiny = initial_models(art, runs, seed, stages.fresh)
        teacher, perceive, base = runs / "teacher_sft" / "export", runs / "perception" / "export", tiny / "student"
        stages("1 teacher SFT ‖ perception", [
            teacher_sft_job(runs, data, tiny / "teacher", "teacher_sft"),
            (["fit", "--config", str(CONFIGS / "sft_perception.yaml"),
              "--model.init_args.model.name_or_path", str(tiny / "student"), "--model.init_args.export_dir",
              str(perceive), "--data.train", sources(data / "perception_train.jsonl"),
              "--data.val", sources(data / "perception_test.jsonl"),
              "--trainer.default_root_dir", str(runs / "perception")],
             runs / "logs" / "1_perception.log", perceive / "config.json")])
    teacher, teacher_val = teacher_on_target(runs, data, teacher, stages)
    return Pretrained(teacher, perceive, base, teacher_val, shipped)


def run_seed(art: Path, runs: Path, seed: int, fresh: bool = False, in_process: bool = False,
             pretrain: bool = False, cores: int | None = None, rl_steps: int | None = None) -> dict:
    """Every stage of the recipe for one training seed under ``runs``, the RL arms for ``rl_steps`` optimizer steps
    (default the configs'); returns (and writes) the summary."""
    data = art / "data"
    t_start = time.perf_counter()
    stages = StageRunner(runs, seed, fresh, in_process, cores, art=art)
    start = pretrained_models(art, runs, seed, stages, pretrain)
    teacher, perceive = start.teacher, start.perception

    traces = runs / "traces" / "coldstart.jsonl"
    stages("2 teacher traces", [
        (["predict", "--config", str(CONFIGS / "traces_teacher.yaml"), "--model.init_args.model.name_or_path",
          str(teacher), "--data.predict", sources(data / "train.jsonl"),
          "--trainer.callbacks.init_args.out_path", str(traces)], runs / "logs" / "2_traces.log", traces)])

    # The cold start keeps a share of perception examples, as a VLM's SFT mixes its pretraining tasks in: the
    # traces alone would let the student's reading of the image drift while it learns to reason.
    cold = runs / "cold_start" / "export"
    stages("3 cold start", [
        (["fit", "--config", str(CONFIGS / "sft_student.yaml"),
          "--model.init_args.model.name_or_path", str(perceive), "--model.init_args.export_dir", str(cold),
          "--data.train", json.dumps([{"path": str(traces), "weight": 0.8},
                                      {"path": str(data / "perception_train.jsonl"), "weight": 0.2}]),
          "--data.val", sources(data / "val.jsonl"), "--trainer.default_root_dir", str(runs / "cold_start")],
         runs / "logs" / "3_cold_start.log", cold / "config.json")])

    rl = {name: runs / name / "export" for name in RL_CONFIGS}
    stages("4 GRPO only ‖ VOLD", [rl_job(runs, data, name, config, cold, teacher if name == "vold" else None,
                                         steps=rl_steps) for name, config in RL_CONFIGS.items()])

    models = {"base": start.base, "perception": perceive, "cold_start": cold, **rl}
    stages("5 benchmarks", [
        *benchmark_jobs(runs, "teacher_greedy", teacher, "bench_teacher.yaml", data / "test.jsonl", data),
        *benchmark_jobs(runs, "teacher_t1", teacher, "bench_teacher.yaml", data / "test.jsonl", data,
                        ["--trainer.callbacks.init_args.do_sample", "true",
                         "--trainer.callbacks.init_args.pass_k", "4"]),
        *(job for stage, path in models.items()
          for job in benchmark_jobs(runs, stage, path, "bench.yaml", data / "test.jsonl", data, perception=True))])

    summary = summarize(runs, data, seed, stages.times, time.perf_counter() - t_start + sum(stages.reused))
    summary["rl_steps"] = rl_steps or declared_rl_steps()
    summary["teacher_val"] = start.teacher_val  # greedy on the validation text views, before and after each top-up
    summary["pretrained"] = {"shipped": start.shipped, "teacher": str(teacher), "perception": str(perceive)}
    # The machine its stages ran on; when every stage was reused, that of the run which made them.
    made_before = stages.previous.get("machine") if not stages.keys.any_ran else None
    summary["machine"] = made_before or machine(cores)
    (runs / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def teacher_on_target(runs: Path, data: Path, teacher: Path, stages) -> tuple[Path, list[float]]:
    """The teacher that writes the cold start's traces, and its greedy accuracies on the validation text views.

    A teacher under TEACHER_TARGET there trains on, from its own weights, for TEACHER_TOP_UP_STEPS at
    TEACHER_TOP_UP_LR (a warm restart of the cosine schedule), at most TEACHER_TOP_UPS times: some initialisations
    take longer than 3,000 steps to learn to look a kind up in the facts list. ``stages(name, jobs)`` runs the
    jobs whose output it cannot reuse (``run_seed``'s runner, :class:`JobKeys`)."""
    accs: list[float] = []
    for k in range(TEACHER_TOP_UPS + 1):
        check = "teacher_val" + (f"_{k}" if k else "")
        stages(f"1{'abc'[k]} teacher check", benchmark_jobs(runs, check, teacher, "bench_teacher.yaml",
                                                             data / "val.jsonl", data))
        accs.append(float(np.mean([r["strict"] for r in read_run(runs / "bench" / check)[BENCH].values()])))
        print(f"[quickstart] teacher greedy on the validation text views: {_pct(accs[-1])}%"
              f" (target {_pct(TEACHER_TARGET)}%)", flush=True)
        if accs[-1] >= TEACHER_TARGET or k == TEACHER_TOP_UPS:
            break
        more = runs / f"teacher_sft_{k + 1}" / "export"
        stages(f"1{'abc'[k]} teacher SFT, top-up {k + 1}", [teacher_sft_job(
            runs, data, teacher, more.parent.name,
            ["--trainer.max_steps", str(TEACHER_TOP_UP_STEPS), "--model.init_args.optim.lr", str(TEACHER_TOP_UP_LR)])])
        teacher = more
    return teacher, accs


def teacher_sft_job(runs: Path, data: Path, init: Path, name: str,
                    extra: list[str] = ()) -> tuple[list[str], Path, Path]:
    """``vold-pl fit`` of the text-only teacher (configs/quickstart/sft_teacher.yaml plus ``extra``) from ``init``
    on the text views; it exports to ``<runs>/<name>/export`` and logs to ``<runs>/logs/1_<name>.log``."""
    export = runs / name / "export"
    return (["fit", "--config", str(CONFIGS / "sft_teacher.yaml"), "--model.init_args.model.name_or_path", str(init),
             "--model.init_args.export_dir", str(export), *extra,
             "--data.train", sources(data / "train_text.jsonl", data / "teacher_text.jsonl"),
             "--data.val", sources(data / "val_text.jsonl"), "--trainer.default_root_dir", str(runs / name)],
            runs / "logs" / f"1_{name}.log", export / "config.json")


def declared_rl_steps(configs: Path = CONFIGS) -> int:
    """The RL arms' optimizer steps in their configs (``trainer.max_steps``, the same in each)."""
    import yaml

    steps = {int(yaml.safe_load((configs / c).read_text())["trainer"]["max_steps"]) for c in RL_CONFIGS.values()}
    if len(steps) != 1:
        raise ValueError(f"the RL configs {sorted(RL_CONFIGS.values())} in {configs} set different trainer.max_steps "
                         f"{sorted(steps)}: the two arms must run as many steps")
    return steps.pop()


def rl_job(runs: Path, data: Path, name: str, config: str, init: Path,
           teacher: Path | None = None, steps: int | None = None) -> tuple[list[str], Path, Path]:
    """``vold-pl fit`` of an RL stage (``config`` in configs/quickstart) on ``rl.jsonl`` from the student ``init``,
    with ``teacher`` for OPD, for ``steps`` optimizer steps (default the config's); it exports to
    ``<runs>/<name>/export`` and logs to ``<runs>/logs/4_<name>.log``."""
    export = runs / name / "export"
    # The config's own step count is not written on the command line, so the job's key (JobKeys) stays that of the
    # runs made before --rl-steps existed, and they are reused.
    more = ["--trainer.max_steps", str(steps)] if steps is not None and steps != declared_rl_steps() else []
    return (["fit", "--config", str(CONFIGS / config), "--model.init_args.model.name_or_path", str(init),
             *(["--model.init_args.teacher.name_or_path", str(teacher)] if teacher else []), *more,
             "--model.init_args.export_dir", str(export),
             "--data.train", sources(data / "rl.jsonl"), "--data.val", sources(data / "val.jsonl"),
             "--trainer.default_root_dir", str(runs / name)], runs / "logs" / f"4_{name}.log", export / "config.json")


def benchmark_jobs(runs: Path, name: str, model: Path, config: str, test: Path, data: Path, extra: list[str] = (),
                   perception: bool = False) -> list[tuple[list[str], Path, Path]]:
    """``vold-pl validate`` of ``model`` on the test problems (and, for a student, on the held-out perception
    scenes as a second benchmark of the same run); its report lands in ``<runs>/bench/<name>``."""
    out = runs / "bench" / name
    specs = [{"name": BENCH, "path": str(test), "loader": "synthetic"}]
    if perception:
        specs.append({"name": "perception", "path": str(data / "perception_test.jsonl"), "loader": "synthetic"})
    return [(["validate", "--config", str(CONFIGS / config), "--model.init_args.model.name_or_path", str(model),
              "--trainer.callbacks.init_args.benchmarks", json.dumps(specs),
              "--data.val", json.dumps([{"path": str(data / "val.jsonl"), "limit": 8}]), *extra,
              "--trainer.callbacks.init_args.out_dir", str(out), "--trainer.default_root_dir", str(out)],
             runs / "logs" / f"bench_{name}.log", out / "benchmark_report.json")]


class JobKeys:
    """Which stage outputs a resumed quickstart may reuse: an output is reused only when it exists, the command
    that made it was the same (its arguments and the text of its ``--config`` file, kept by output path in
    ``path``), and no earlier stage of this run has run. A later stage reads an earlier one's outputs at the same
    paths, so once a job runs (a changed config, a teacher check that now asks for a top-up, a missing output),
    every job after it runs too. Outputs without a key (made before keys were kept) are not reused. A change
    of vold-pl's own code is not seen: ``--fresh`` reruns everything.

    The arguments are keyed with the checkout's folder (``root``) taken out of every path in them, so a checkout
    that moves, or a clone at another path given the runs folder, reuses what it made; keys kept before that
    (with the folder in them) still count for the checkout they were made in."""

    def __init__(self, path: Path, fresh: bool = False, root: Path = ROOT):
        self.path = path
        self.root = str(root)
        self.keys: dict[str, str] = {} if fresh or not path.is_file() else json.loads(path.read_text())
        self.any_ran = False
        self.started: dict[str, str] = {}  # output -> the key of its command when its stage started

    def key(self, args: list[str], portable: bool = True) -> str:
        """sha256 of ``args``, with the checkout's folder taken out of them (``portable``; without, the key kept
        before keys were portable), and of the text of their ``--config`` file."""
        prefix = self.root.rstrip("/") + "/"
        digest = hashlib.sha256(json.dumps([a.replace(prefix, "") if portable else a for a in args]).encode())
        for i, a in enumerate(args[:-1]):
            if a == "--config":
                digest.update(Path(args[i + 1]).read_bytes())
        return digest.hexdigest()

    def reusable(self, args: list[str], out: Path) -> bool:
        self.started[str(out)] = self.key(args)
        kept = self.keys.get(str(out))
        if self.any_ran or not Path(out).exists() or kept is None:
            return False
        # The key kept before keys were portable is computed only when the portable one does not match.
        return kept == self.started[str(out)] or kept == self.key(args, portable=False)

    def ran(self, jobs: list[tuple[list[str], Path]]) -> None:
        """Record the keys of jobs that have just run and succeeded: of the config as it was when their stage
        started (:meth:`reusable`), which is what the job read, not as it is now."""
        self.any_ran = self.any_ran or bool(jobs)
        self.keys.update({str(out): self.started.pop(str(out), None) or self.key(args) for args, out in jobs})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.keys, indent=1, sort_keys=True) + "\n")


def artifacts_fingerprint(art: Path) -> str:
    """sha256 of the data's JSONL files and the tiny models' JSON files (configs, tokenizer) under ``art``: what
    ``make artifacts`` writes from the generator, without the images (they follow the JSONL) and the tiny models'
    initial weights (a seeded draw from the configs). The version of transformers that wrote a model's config is
    left out: another release of it reads the same model."""
    digest = hashlib.sha256()
    for f in sorted((art / "data").glob("*.jsonl")):
        digest.update(f"{f.relative_to(art)}\n".encode())
        digest.update(f.read_bytes())
    for f in sorted((art / "tiny").glob("*/*.json")):
        content = json.loads(f.read_text(encoding="utf-8"))
        if isinstance(content, dict):
            content.pop("transformers_version", None)
        digest.update(f"{f.relative_to(art)}\n{json.dumps(content, sort_keys=True)}".encode())
    return digest.hexdigest()


def artifacts_changed(art: Path, runs: Path, fingerprint: str | None = None) -> bool:
    """True when ``runs`` holds outputs made from other artifacts than ``art`` holds now (a regenerated data set,
    e.g. after a change of the trace format, or rebuilt tiny models) or from other shipped pretrained models, so
    that no stage's stale output is reused. The fingerprint (:func:`artifacts_fingerprint` and the shipped models'
    manifest) is kept in ``runs/artifacts.sha256``; outputs without one predate it and count as changed. Writes
    the new fingerprint. ``fingerprint``: :func:`artifacts_fingerprint` of ``art`` when the caller has it."""
    digest = hashlib.sha256((fingerprint or artifacts_fingerprint(art)).encode())
    if (PRETRAINED / MANIFEST).is_file():
        digest.update((PRETRAINED / MANIFEST).read_bytes())
    stamp, new = runs / "artifacts.sha256", digest.hexdigest()
    old = stamp.read_text().strip() if stamp.is_file() else None
    changed = old != new and (old is not None or (runs.is_dir() and any(runs.iterdir())))
    if changed:
        print(f"the artifacts under {art} or the shipped pretrained models changed since the outputs under {runs} "
              f"were made: rerunning every stage")
    runs.mkdir(parents=True, exist_ok=True)
    stamp.write_text(new + "\n")
    return changed


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pretrained_digest(home: Path = PRETRAINED) -> str | None:
    """sha256 of the shipped pretrained models' manifest (it lists every file's sha256), None when none is shipped:
    what outputs and reference figures made from those models record."""
    return _sha256(home / MANIFEST) if (home / MANIFEST).is_file() else None


def pretraining_inputs(art: Path, configs: Path = CONFIGS, fingerprint: str | None = None) -> dict:
    """What the pretrained models of stage 1 are made from, besides vold-pl's code: the artifacts (``fingerprint``
    when the caller has it), the configs of the teacher's SFT and of the perception stage, and the teacher's
    top-up rule."""
    return {"artifacts": fingerprint or artifacts_fingerprint(art),
            "configs": {name: _sha256(configs / name) for name in PRETRAINING_CONFIGS},
            "teacher_top_up": {"target": TEACHER_TARGET, "top_ups": TEACHER_TOP_UPS, "steps": TEACHER_TOP_UP_STEPS,
                               "lr": TEACHER_TOP_UP_LR}}


def shipped_pretrained(art: Path, home: Path = PRETRAINED, configs: Path = CONFIGS,
                       fingerprint: str | None = None) -> dict | None:
    """The manifest of the pretrained models shipped in ``home`` (default PRETRAINED) when they were made from
    what ``art`` and ``configs`` hold now and every file is the one the manifest lists; otherwise None, after a
    line that says why (the quickstart then trains them)."""
    if not (home / MANIFEST).is_file():
        print(f"[quickstart] no pretrained models shipped in {home}: training them", flush=True)
        return None
    manifest = json.loads((home / MANIFEST).read_text())
    now, made = pretraining_inputs(art, configs, fingerprint), manifest["inputs"]
    stale = ([name for name in now["configs"] if made["configs"].get(name) != now["configs"][name]]
             + [key for key in ("artifacts", "teacher_top_up") if made.get(key) != now[key]])
    damaged = [rel for rel, digest in manifest["files"].items()
               if not (home / rel).is_file() or _sha256(home / rel) != digest]
    if stale or damaged:
        why = (f"were made from another {', '.join(stale)} than this checkout has (`make toy-pretrained` ships "
               f"new ones)" if stale else f"do not match their manifest ({', '.join(damaged)})")
        print(f"[quickstart] the pretrained models shipped in {home} {why}: training them", flush=True)
        return None
    return manifest


def save_pretrained(art: Path, start: Pretrained, seconds: float, home: Path = PRETRAINED,
                    configs: Path = CONFIGS, fingerprint: str | None = None) -> Path:
    """Ship ``start``'s teacher and perceiving student in ``home`` (default PRETRAINED) with a manifest of what
    they were made from (:func:`pretraining_inputs`), the teacher's validation accuracies, the time it took and
    every file's sha256; the folder is replaced whole."""
    import shutil

    import torch

    tmp = home.with_name(home.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, src in (("teacher", start.teacher), ("perception", start.perception)):
        shutil.copytree(src, tmp / name)
    files = {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    manifest = {"made_by": "make toy-pretrained (python -m vold_pl.quickstart --pretrain --save-pretrained)",
                "seed": 0, "inputs": pretraining_inputs(art, configs, fingerprint), "teacher_val": start.teacher_val,
                "seconds": round(seconds), "torch": torch.__version__, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(home, ignore_errors=True)
    tmp.rename(home)
    return home


def machine(cores: int | None = None) -> dict:
    """What a run's figures depend on besides the code, the data and the seed: torch's version, the CPU kernel
    path of torch's own kernels (AVX-512 and AVX2 give other bits; ``ATEN_CPU_CAPABILITY=avx2`` takes the latter
    on a CPU that has both) and the cores its thread plan was made for (``cores``, default those this process may
    use: a stage's thread count follows them, and so does the order of its sums)."""
    import torch

    from vold_pl.startup import available_cores

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": cores or available_cores()}


def _machine_text(m: dict | None) -> str:
    return f"torch {m['torch']}, {m['cpu_capability']} kernels, {m['cores']} cores" if m else "an unrecorded machine"


def reference_spread(path: Path = REFERENCE, home: Path = PRETRAINED) -> dict | None:
    """The README's figures over seeds (``path``: ``benchmarks/toy_vold_ablation.py``'s results) as ``{"seeds",
    "machines", "rows": {row: {"range": [lowest, highest], "predicted": [lo, hi]}}}`` for the table rows of every
    seed's summary, ``predicted`` being the 95% prediction interval for one more run (clipped to [0, 1]); None when
    there is no such file, it holds fewer than 2 seeds, or it was made from other shipped models than those in
    ``home``."""
    shipped = pretrained_digest(home)
    if not path.is_file() or shipped is None:
        return None
    res = json.loads(path.read_text())
    if res.get("pretrained_manifest") != shipped or not res.get("quickstart_rows") or len(res["seeds"]) < 2:
        return None

    def spread(v: list[float]) -> dict:
        lo, hi = prediction_interval(np.array(v))
        return {"range": [min(v), max(v)], "predicted": [max(lo, 0.0), min(hi, 1.0)]}

    return {"seeds": res["seeds"], "machines": res.get("machines", {}),
            "rows": {row: spread(v) for row, v in res["quickstart_rows"].items()}}


def placement_reference(summary: dict, path: Path = REFERENCE, home: Path = PRETRAINED) -> dict | None:
    """The README's spread a seed's summary is placed in (:func:`reference_spread`), or None where it does not
    apply: the run did not start from the shipped models, or its RL arms ran another number of steps than the
    configs' (those of the README's runs, :func:`other_rl_steps`)."""
    if not summary.get("pretrained", {}).get("shipped") or other_rl_steps(summary):
        return None
    return reference_spread(path, home)


def other_rl_steps(summary: dict) -> bool:
    """Whether a seed's RL arms ran another number of steps than the configs' (``--rl-steps``; a summary without
    ``rl_steps`` predates the option and ran the configs')."""
    declared = declared_rl_steps()
    return summary.get("rl_steps", declared) != declared


def print_against_reference(summary: dict, ref: dict) -> None:
    """Where a seed's figures fall against the README's runs over seeds (``ref``: :func:`reference_spread`): inside
    or outside the 95% prediction interval for one more run, beside the seeds' lowest-highest, and the machines of
    both (a machine whose kernels or cores differ from the reference's computes other bits: another draw)."""
    cells = []
    for row in PLACED_ROWS:
        label = STAGE_LABELS.get(row, "teacher")
        if row in summary["rows"] and row in ref["rows"]:
            acc, (lo, hi) = summary["rows"][row]["accuracy"], ref["rows"][row]["predicted"]
            seen = ref["rows"][row]["range"]
            cells.append(f"{label} {_pct(acc)} {'inside' if lo <= acc <= hi else 'OUTSIDE'} [{_pct(lo)}-{_pct(hi)}] "
                         f"(seeds {_pct(seen[0])}-{_pct(seen[1])})")
    theirs = "; ".join(sorted({_machine_text(m) for m in ref["machines"].values()}))
    print(f"against the README's {len(ref['seeds'])} seeds (95% prediction interval for one more run, and the seeds' "
          f"lowest-highest; {theirs}): " + "; ".join(cells))
    print(f"this run: {_machine_text(summary.get('machine'))}")


def _test_records(test: Path) -> dict[str, dict]:
    return {str(r["id"]): r for r in (json.loads(line) for line in test.read_text(encoding="utf-8").splitlines()
                                      if line.strip())}


def stated_facts(bench_dir: Path, records: dict[str, dict]) -> float:
    """The share of a student's test answers whose first sentence ("I see ...") states the scene's facts as the
    text view does: perception inside its reasoning, where the RL stages are trained (they never see the
    perception question itself)."""
    right = []
    for line in (bench_dir / "benchmark_predictions.jsonl").read_text().splitlines():
        p = json.loads(line) if line.strip() else {}
        if p.get("benchmark") != BENCH:
            continue
        caption = records[str(p["id"])]["text_view"].split("\n", 1)[0]
        gold = caption.split("background: ", 1)[-1].rstrip(".")
        m = re.search(r"I see (.*?)\.", p.get("completion") or "")
        right.append(float(bool(m) and _kind_counts(m.group(1)) == _kind_counts(gold)))
    return float(np.mean(right)) if right else 0.0


def initial_models(art: Path, runs: Path, seed: int, fresh: bool = False) -> Path:
    """The folder of the untrained tiny student and teacher for ``seed``.

    ``make artifacts`` saves the seed-0 draw; another seed gets the same configs and tokenizer with its own
    weights under ``<runs>/init``, so the spread over seeds covers every stage's training, the teacher's too.
    """
    if seed == 0:
        return art / "tiny"
    init = runs / "init"
    if fresh or not (init / "teacher" / "model.safetensors").exists():
        from vold_pl.toy.tiny import reseed_tiny_models

        reseed_tiny_models(art / "tiny", init, seed)
    return init


def accuracy_figures(bench_dir: Path, difficulty: dict[str, int], bench: str = BENCH, seed: int = 0) -> dict:
    """Greedy (or mean-over-samples) accuracy on ``bench`` with its bootstrap 95% interval over problems, and
    accuracy by difficulty level; from the run's predictions file."""
    items = read_run(bench_dir)[bench]
    ids = sorted(items)
    scores = np.array([items[i]["strict"] for i in ids])  # [n]
    lo, hi = bootstrap_mean_ci(scores, seed=seed)
    by = {}
    for d in sorted({difficulty.get(i) for i in ids if difficulty.get(i) is not None}):
        sel = [items[i]["strict"] for i in ids if difficulty.get(i) == d]
        by[str(d)] = {"accuracy": float(np.mean(sel)), "n": len(sel)}
    return {"accuracy": float(scores.mean()), "ci95": [lo, hi], "n": len(ids), "by_difficulty": by}


def perception_figures(bench_dir: Path) -> dict:
    """How well a student reads the held-out scenes: the share of scenes whose facts list it states exactly, and
    the share of (scene, kind) counts it gets right over the 8 kinds (a kind it leaves out counts as 0)."""
    from vold_pl.data.synthetic import KINDS

    preds = [json.loads(line) for line in (bench_dir / "benchmark_predictions.jsonl").read_text().splitlines()
             if line.strip()]
    preds = [p for p in preds if p["benchmark"] == "perception"]
    exact = [float(p["score"]) for p in preds]
    kinds_right = [float(_kind_counts(p.get("extracted") or "").get(k, 0) == _kind_counts(p["gold"]).get(k, 0))
                   for p in preds for k in KINDS]
    return {"scenes_exact": float(np.mean(exact)), "kind_counts": float(np.mean(kinds_right)), "n": len(preds)}


def _kind_counts(facts: str) -> dict[tuple[str, str], int]:
    """``"red squares 1, red circles 2"`` -> ``{("red", "square"): 1, ("red", "circle"): 2}``; unreadable parts
    are ignored (so a garbled list scores as missing kinds)."""
    out = {}
    for part in facts.split(","):
        words = part.strip().rstrip(".").split()
        if len(words) == 3 and words[2].isdigit():
            out[(words[0], words[1].removesuffix("s"))] = int(words[2])
    return out


def summarize(runs: Path, data: Path, seed: int, times: dict[str, float], seconds: float) -> dict:
    records = _test_records(data / "test.jsonl")
    diff = {i: r.get("difficulty") for i, r in records.items()}
    bench = runs / "bench"
    rows = {"teacher_greedy": accuracy_figures(bench / "teacher_greedy", diff, seed=seed),
            "teacher_t1": accuracy_figures(bench / "teacher_t1", diff, seed=seed)}
    for stage in STUDENT_STAGES:
        rows[stage] = {**accuracy_figures(bench / stage, diff, seed=seed),
                       "perception": {**perception_figures(bench / stage),
                                      "facts_stated_right": stated_facts(bench / stage, records)}}
    return {"seed": seed, "rows": rows, "stage_seconds": times, "total_seconds": seconds}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_table(summary: dict) -> None:
    rows = summary["rows"]
    levels = sorted(rows["teacher_greedy"]["by_difficulty"])
    head = (f"{'model':<28}{'reads':<11}{'accuracy [95% CI]':>22}"
            + "".join(f"{'d' + d:>7}" for d in levels) + f"{'scenes read':>13}{'facts stated':>14}")
    print(f"\nseed {summary['seed']}: accuracy (%) on the {rows['teacher_greedy']['n']} held-out test problems, greedy "
          f"(teacher T = 1: mean of 4 samples); d1-d3 by difficulty; scenes read: the held-out perception scenes "
          f"({rows['base']['perception']['n']}) whose facts it lists exactly; facts stated: its test answers whose "
          f"'I see ...' states the facts right\n{head}\n{'-' * len(head)}")

    def line(label, reads, r):
        ci = f"{_pct(r['accuracy'])} [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]"
        per = r.get("perception")
        tail = (f"{_pct(per['scenes_exact']):>13}{_pct(per['facts_stated_right']):>14}" if per
                else f"{'-':>13}{'-':>14}")
        print(f"{label:<28}{reads:<11}{ci:>22}" + "".join(f"{_pct(r['by_difficulty'][d]['accuracy']):>7}"
                                                       for d in levels) + tail)

    line("teacher, greedy", "text view", rows["teacher_greedy"])
    line("teacher, T = 1", "text view", rows["teacher_t1"])
    for stage in STUDENT_STAGES:
        line(STAGE_LABELS[stage], "image", rows[stage])
    times = "; ".join(f"{k}: {v:.0f} s" for k, v in summary["stage_seconds"].items())
    if summary.get("pretrained", {}).get("shipped"):
        print(f"teacher and perceiving student: the pretrained models shipped in {PRETRAINED.relative_to(ROOT)} "
              f"(seed 0's stage 1; --pretrain trains them)")
    if summary.get("teacher_val"):
        val = " -> ".join(f"{_pct(a)}%" for a in summary["teacher_val"])
        print(f"teacher greedy on the validation text views: {val} ({len(summary['teacher_val']) - 1} top-up(s); "
              f"target {_pct(TEACHER_TARGET)}%)")
    ref = placement_reference(summary)
    if ref:
        print_against_reference(summary, ref)
    elif other_rl_steps(summary):
        print(f"not placed against the README's seeds: its spread is of {declared_rl_steps()} RL steps, this run's "
              f"arms ran {summary['rl_steps']}")
    print(f"time per stage: {times}\nquickstart (seed {summary['seed']}) finished in "
          f"{summary['total_seconds'] / 60:.1f} min")


def print_seed_table(summaries: list[dict]) -> None:
    """Mean, standard deviation and range over seeds of each row's accuracy and perception."""
    seeds = [s["seed"] for s in summaries]
    print(f"\nover seeds {seeds}: mean ± sd (min-max), %")

    def stat(values):
        v = [100 * x for x in values]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):5.1f} ± {sd:3.1f} ({min(v):.1f}-{max(v):.1f})"

    print(f"{'model':<28}{'accuracy':>26}{'scenes read':>28}{'facts stated':>28}")
    for key, label in (("teacher_greedy", "teacher, greedy"), ("teacher_t1", "teacher, T = 1"),
                       *((s, STAGE_LABELS[s]) for s in STUDENT_STAGES)):
        acc = stat([s["rows"][key]["accuracy"] for s in summaries])
        per = summaries[0]["rows"][key].get("perception")
        facts = stat([s["rows"][key]["perception"]["facts_stated_right"] for s in summaries]) if per else "-"
        per = stat([s["rows"][key]["perception"]["scenes_exact"] for s in summaries]) if per else "-"
        print(f"{label:<28}{acc:>26}{per:>28}{facts:>28}")
    mins = [s["total_seconds"] / 60 for s in summaries]
    print(f"wall time per seed: {', '.join(f'{m:.1f}' for m in mins)} min")


if __name__ == "__main__":
    main()
