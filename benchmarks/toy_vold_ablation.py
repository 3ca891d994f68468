"""VOLD's ablation at toy scale: does OPD help, and only after a cold start?

Arms (same RL budget for every RL arm; each arm evaluated on the held-out synthetic test problems, greedy):
  (a) cold-start SFT only
  (b) cold-start SFT + GRPO (λ_opd = 0)
  (c) cold-start SFT + GRPO + OPD (VOLD)
  (d) GRPO + OPD from the base student, without cold start
and, with ``--hard``, the same b and c on the hard split only (difficulty 3: trained on the difficulty-3
training problems, scored on the difficulty-3 test problems), where the cold-start student solves few problems,
most GRPO groups are all-zero (sparse reward) and the teacher's dense signal has the most to add. Row a_hard is
the cold start scored on the same hard test problems.

The teacher SFT and its verified traces come from the quickstart stages (reused when present). Each seed
trains its own cold start, shared by a, b, c, b_hard and c_hard of that seed. The script writes
``<out>/ablation.json`` (per arm: accuracy per seed, mean ± std; every paired difference with a 95% interval)
and ``<out>/ablation.png`` (accuracies with intervals, and the learning curves of reward, reverse KL to the
teacher and ``frac_reward_zero_std`` from each RL run's CSV log).

Paired differences: every arm of one seed is scored on the same problems, so a difference is taken problem by
problem and seed by seed (``correct_x − correct_y`` ∈ {−1, 0, 1}); its interval is a percentile bootstrap that
resamples problems (each drawn problem carries its results on every seed), which covers the test-set noise and,
with several seeds, the training noise through the per-seed rows. With ≥ 2 seeds the t interval of the per-seed
mean differences is given too.

    python benchmarks/toy_vold_ablation.py --seeds 0 1 --rl-steps 60 --hard
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vold_pl.quickstart import CONFIGS, run, sources  # noqa: E402

ARMS = {
    "a_sft": "(a) cold-start SFT only",
    "b_sft_grpo": "(b) SFT + GRPO (λ=0)",
    "c_sft_grpo_opd": "(c) SFT + GRPO + OPD (VOLD)",
    "d_grpo_opd": "(d) GRPO + OPD, no cold start",
    "a_hard": "hard split: (a) cold start",
    "b_hard": "hard split: (b) SFT + GRPO",
    "c_hard": "hard split: (c) SFT + GRPO + OPD",
}
RL_ARMS = ("b_sft_grpo", "c_sft_grpo_opd", "d_grpo_opd", "b_hard", "c_hard")
# (x, y): report x − y paired by seed and problem.
PAIRS = [("b_sft_grpo", "a_sft"), ("c_sft_grpo_opd", "a_sft"), ("c_sft_grpo_opd", "b_sft_grpo"),
         ("d_grpo_opd", "a_sft"), ("b_hard", "a_hard"), ("c_hard", "a_hard"), ("c_hard", "b_hard")]
COLORS = {"a": "#999999", "b": "#4a90d9", "c": "#d94a4a", "d": "#e0a030"}
CURVES = [("train/reward", "reward (accuracy + 0.1·format)"),
          ("train/opd/reverse_kl", "reverse KL to the teacher (distilled tokens)"),
          ("train/frac_reward_zero_std", "frac_reward_zero_std")]
SHORT = {"a_sft": "a: cold start", "b_sft_grpo": "b: +GRPO", "c_sft_grpo_opd": "c: +GRPO+OPD",
         "d_grpo_opd": "d: GRPO+OPD,\nno cold start", "a_hard": "a: cold start", "b_hard": "b: +GRPO",
         "c_hard": "c: +GRPO+OPD"}


def bench_args(out: Path, tests: dict[str, Path], every: int | None, limit: int | None = None) -> list[str]:
    """Benchmark callback arguments: every ``tests`` file (name → JSONL) scored, the first ``limit`` problems."""
    specs = [{"name": name, "path": str(path), "loader": "synthetic", **({"limit": limit} if limit else {})}
             for name, path in tests.items()]
    args = ["--trainer.callbacks+=vold_pl.callbacks.benchmark.BenchmarkCallback",
            f"--trainer.callbacks.benchmarks={json.dumps(specs)}", f"--trainer.callbacks.out_dir={out}",
            "--trainer.callbacks.max_new_tokens=96", "--trainer.callbacks.batch_size=50"]
    if every:
        args.append(f"--trainer.callbacks.every_n_steps={every}")
    return args


def rl_arm(start: Path, teacher: Path, lam: float, seed: int, a: argparse.Namespace, train: Path,
           tests: dict[str, Path], out: Path, limit: int | None = None) -> None:
    args = ["fit", "--config", str(CONFIGS / "opd_grpo.yaml"), f"--seed_everything={seed}",
            f"--model.init_args.model.name_or_path={start}", f"--model.init_args.teacher.name_or_path={teacher}",
            f"--model.init_args.opd.lam={lam}", f"--model.init_args.export_dir={out / 'export'}",
            f"--model.init_args.optim.lr={a.lr}", f"--model.init_args.sampling.max_new_tokens={a.max_new_tokens}",
            f"--trainer.max_steps={a.rl_steps}", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={out}", "--trainer.enable_checkpointing=false",
            # a CSV log whatever logger is installed: the learning curves are read from it
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.logger.init_args.name=lightning_logs",
            "--data.train", sources(train), f"--data.seed={seed}",
            "--data.val", json.dumps([{"path": str(Path(a.artifacts) / "data" / "val.jsonl"), "limit": 8}])]
    run(args + bench_args(out, tests, a.eval_every, limit), out / "run.log")


def finished(out: Path, steps: int) -> bool:
    """An arm is done once its report is the end-of-fit one (the report is rewritten at every evaluation)."""
    path = out / "benchmark_report.json"
    return path.exists() and json.loads(path.read_text()).get("step", -1) >= steps


def load_arm(out: Path, bench: str = "synthetic") -> dict:
    """Accuracy, per-problem correctness (first sample) and the accuracy curve of one benchmark of a finished arm."""
    rep = json.loads((out / "benchmark_report.json").read_text())
    correct = {}
    for line in (out / "benchmark_predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        if p.get("sample", 0) == 0 and p.get("benchmark") == bench:
            correct[p["id"]] = bool(p["correct"])
    curve = [(h["step"], h["accuracy"]) for h in rep.get("history", []) if h.get("benchmark") == bench]
    return {"accuracy": rep["benchmarks"][bench]["accuracy"], "correct": correct, "curve": curve}


def read_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The CURVES metrics of an RL run's CSV log (newest ``lightning_logs/version_*``), by optimizer step."""
    logs = sorted((out / "lightning_logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not logs:
        return {}
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k, _ in CURVES}
    with logs[-1].open() as fh:
        for row in csv.DictReader(fh):
            for k in curves:
                if row.get(k) not in (None, ""):
                    curves[k].append((int(row["step"]), float(row[k])))
    return {k: v for k, v in curves.items() if v}


def write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` already holds it: seeds may run as parallel processes on one output folder,
    and rewriting a file another process is reading could hand it a truncated file."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def hard_files(data: Path, test: Path, out: Path, difficulty: int,
               answer_types: list[str] | None = None) -> tuple[Path, Path]:
    """The training and test problems of one difficulty (and of ``answer_types`` when given), written once to
    ``out`` (image paths are absolute)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for src, name in ((data / "train.jsonl", "train.jsonl"), (test, "test.jsonl")):
        keep = []
        for ln in src.read_text().splitlines():
            rec = json.loads(ln) if ln.strip() else {}
            keep_type = not answer_types or rec.get("answer_type") in answer_types
            if rec.get("difficulty") == difficulty and keep_type:  # image paths become absolute below
                rec["images"] = [str((src.parent / im).resolve()) for im in rec.get("images") or []]
                keep.append(json.dumps(rec))
        write_if_changed(out / name, "\n".join(keep) + "\n")
        paths.append(out / name)
    return paths[0], paths[1]


def larger_test(data: Path, n_test: int, out: Path, seed: int = 0) -> Path:
    """A test split of ``n_test`` problems for ``data`` (the quickstart's artifacts): the generator run again with
    more test problems (its first problems are the quickstart's test split), minus any problem whose text view
    (scene + question) is in ``data``'s train or val split. A larger test split shifts the generator's later
    draws, so a later test problem can equal a training problem of the smaller run; those are dropped."""
    from vold_pl.data.synthetic import generate_dataset

    path = out / "test_clean.jsonl"
    if path.exists():
        return path
    manifest = json.loads((data / "manifest.json").read_text())
    n = {s: manifest["splits"][s]["n"] for s in ("train", "val")}
    paths = generate_dataset(out, seed=manifest.get("seed", seed), n_train=n["train"], n_val=n["val"], n_test=n_test)
    seen = {json.loads(ln)["text_view"] for split in ("train", "val", "teacher_text")
            if (data / f"{split}.jsonl").exists()  # teacher_text: the teacher's extra SFT problems
            for ln in (data / f"{split}.jsonl").read_text().splitlines() if ln.strip()}
    lines = [ln for ln in paths["test"].read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["text_view"] not in seen]
    path.write_text("\n".join(keep) + "\n")
    print(f"test split: {len(keep)} of {len(lines)} problems kept ({len(lines) - len(keep)} also in train/val) -> {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts", help="tiny models and synthetic data (make artifacts)")
    p.add_argument("--quickstart-runs", default="runs/quickstart", help="where the teacher SFT and traces live")
    p.add_argument("--test", default=None, help="test JSONL scored by every arm; default <artifacts>/data/test.jsonl")
    p.add_argument("--n-test", type=int, default=0,
                   help="generate a test split of this many problems instead (see larger_test()); 0: use --test")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of arms a, b, c (and the hard arms)")
    p.add_argument("--d-seeds", type=int, nargs="*", default=None, help="seeds of arm d; default all of --seeds")
    p.add_argument("--rl-steps", type=int, default=100, help="RL optimizer steps of every RL arm")
    p.add_argument("--cold-steps", type=int, default=0, help="cold-start SFT steps; 0: sft_student.yaml's")
    p.add_argument("--lam", type=float, default=0.5, help="λ_opd of arms c, d and c_hard")
    p.add_argument("--lr", type=float, default=1e-4, help="RL learning rate")
    p.add_argument("--max-new-tokens", type=int, default=96, help="rollout length cap of the RL arms")
    p.add_argument("--eval-every", type=int, default=0, help="also benchmark every N RL steps (accuracy curves); 0: end only")
    p.add_argument("--limit-test", type=int, default=0, help="score only the first N test records; 0: all")
    p.add_argument("--d-limit-test", type=int, default=0,
                   help="arm d scores only the first N test records (a student without cold start writes to the "
                        "length cap, which makes its evaluation the slowest); 0: as --limit-test")
    p.add_argument("--hard", action="store_true", help="add arms b and c on the hard split (b_hard, c_hard)")
    p.add_argument("--hard-difficulty", type=int, default=3, help="difficulty of the hard split")
    p.add_argument("--hard-answer-types", nargs="*", default=[],
                   help="answer types of the hard split (e.g. math: open numeric answers, no option to guess, so "
                        "most groups of a weak student are all-wrong); empty: every type")
    p.add_argument("--bootstrap", type=int, default=5000, help="bootstrap resamples of the paired intervals")
    p.add_argument("--arms", nargs="*", default=None, choices=RL_ARMS,
                   help="train only these RL arms (the others are summarised if finished); default all")
    p.add_argument("--no-run", action="store_true",
                   help="train nothing: summarise the arms that have finished (a partial run's table and plot)")
    p.add_argument("--diagnose", action="store_true",
                   help="also measure, on the first seed, the teacher's agreement with the student's rollouts, the "
                        "share of the OPD signal on answer tokens and the gradient norms of the two terms, at the "
                        "cold start and after arm c (and c_hard) (see diagnose())")
    p.add_argument("--diagnose-hard", action="store_true", help="diagnose the hard-split runs too")
    p.add_argument("--diagnose-batches", type=int, default=4, help="RL batches of 4 prompts × G=8 per diagnosis")
    a = p.parse_args(argv)
    art, qs, out = Path(a.artifacts), Path(a.quickstart_runs), Path(a.out)
    data, teacher, traces = art / "data", qs / "teacher_sft" / "export", qs / "traces" / "coldstart.jsonl"
    test = Path(a.test) if a.test else data / "test.jsonl"
    if a.n_test:
        test = larger_test(data, a.n_test, out / "data_test")
    if not (teacher / "config.json").exists() or not traces.exists():
        from vold_pl.quickstart import main as quickstart

        print("teacher SFT / traces missing: running the quickstart's first stages")
        quickstart(["--artifacts", str(art), "--runs", str(qs)])
    d_seeds = a.seeds if a.d_seeds is None else a.d_seeds
    hard_train = hard_test = None
    if a.hard:  # every hard problem of the test split, whatever --limit-test
        hard_train, hard_test = hard_files(data, test, out / "data_hard", a.hard_difficulty,
                                          a.hard_answer_types)
    main_test = test
    if a.limit_test:  # the first N problems, as a file: arm a scores it and the hard problems in one run
        main_test = out / "data_test" / f"test_first{a.limit_test}.jsonl"
        main_test.parent.mkdir(parents=True, exist_ok=True)
        write_if_changed(main_test, "\n".join(test.read_text().splitlines()[: a.limit_test]) + "\n")
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict]] = {k: {} for k in ARMS}
    curves: dict[str, dict[int, dict]] = {k: {} for k in RL_ARMS}
    for seed in a.seeds:
        sd = out / f"seed{seed}"
        cold = sd / "cold_start" / "export"
        if not (cold / "config.json").exists() and not a.no_run:
            run(["fit", "--config", str(CONFIGS / "sft_student.yaml"), f"--seed_everything={seed}",
                 f"--model.init_args.model.name_or_path={art / 'tiny' / 'student'}",
                 f"--model.init_args.export_dir={cold}", "--data.train", sources(traces),
                 "--data.val", sources(data / "val.jsonl"), f"--data.seed={seed}", "--trainer.limit_val_batches=0",
                 f"--trainer.default_root_dir={sd / 'cold_start'}", "--trainer.enable_checkpointing=false"]
                + ([f"--trainer.max_steps={a.cold_steps}"] if a.cold_steps else [])
                + bench_args(sd / "a_sft", {"synthetic": main_test, **({"hard": hard_test} if a.hard else {})},
                             None), sd / "cold_start.log")
        a_tests = {"synthetic": main_test, **({"hard": hard_test} if a.hard else {})}
        if (cold / "config.json").exists() and not (sd / "a_sft" / "benchmark_report.json").exists() and not a.no_run:
            # a cold start trained elsewhere (e.g. the quickstart's, linked here): score it on its own
            run(["validate", "--config", str(CONFIGS / "bench.yaml"), f"--model.init_args.model.name_or_path={cold}",
                 "--trainer.callbacks.init_args.benchmarks", json.dumps(
                     [{"name": k, "path": str(v), "loader": "synthetic"} for k, v in a_tests.items()]),
                 "--data.val", json.dumps([{"path": str(data / "val.jsonl"), "limit": 8}]),
                 f"--trainer.callbacks.init_args.out_dir={sd / 'a_sft'}", f"--trainer.default_root_dir={sd / 'a_sft'}"],
                sd / "a_sft.log")
        main_tests, hard_tests = {"synthetic": main_test}, {"hard": hard_test}
        arms = {"b_sft_grpo": (cold, 0.0, data / "train.jsonl", main_tests, None),
                "c_sft_grpo_opd": (cold, a.lam, data / "train.jsonl", main_tests, None)}
        if a.hard:
            arms["b_hard"] = (cold, 0.0, hard_train, hard_tests, None)
            arms["c_hard"] = (cold, a.lam, hard_train, hard_tests, None)
        if seed in d_seeds:  # last: its outcome (no learning without a cold start) is the least in doubt
            arms["d_grpo_opd"] = (art / "tiny" / "student", a.lam, data / "train.jsonl", main_tests,
                                  a.d_limit_test or None)
        for arm, (start, lam, train, tests, limit) in arms.items():
            if not finished(sd / arm, a.rl_steps) and not a.no_run and (a.arms is None or arm in a.arms):
                rl_arm(start, teacher, lam, seed, a, train, tests, sd / arm, limit)
        if a.no_run or a.arms is not None:  # only what has finished
            arms = {k: v for k, v in arms.items() if finished(sd / k, a.rl_steps)}
            if not (sd / "a_sft" / "benchmark_report.json").exists():
                continue
        results["a_sft"][seed] = load_arm(sd / "a_sft")
        if a.hard:
            results["a_hard"][seed] = load_arm(sd / "a_sft", "hard")
        for arm in arms:
            hard = arm.endswith("_hard")
            results[arm][seed] = load_arm(sd / arm, "hard" if hard else "synthetic")
            curves[arm][seed] = read_curves(sd / arm)
            if arm != "d_grpo_opd":  # RL starts from the cold-start model: its step-0 point
                start_acc = results["a_hard" if hard else "a_sft"][seed]["accuracy"]
                results[arm][seed]["curve"] = [(0, start_acc)] + results[arm][seed]["curve"]
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v[seed]['accuracy']:.1f}%" for k, v in results.items()
                                           if seed in v), flush=True)
    results = {k: v for k, v in results.items() if v}
    summary = summarize(results)
    paired = [paired_delta(results, x, y, a.bootstrap) for x, y in PAIRS if x in results and y in results]
    diagnostics = {}
    if (out / "diagnostics.json").exists():
        diagnostics = json.loads((out / "diagnostics.json").read_text())
    if a.diagnose and not a.no_run:
        sd = out / f"seed{a.seeds[0]}"
        points = {"cold_start": (sd / "cold_start" / "export", data / "train.jsonl"),
                  "after_c": (sd / "c_sft_grpo_opd" / "export", data / "train.jsonl")}
        if a.hard and a.diagnose_hard:
            points |= {"cold_start_hard": (sd / "cold_start" / "export", hard_train),
                       "after_c_hard": (sd / "c_hard" / "export", hard_train)}
        for name, (model, train) in points.items():
            if name in diagnostics or not (model / "config.json").exists():
                continue
            diagnostics[name] = diagnose(model, teacher, train, lam=a.lam, seed=a.seeds[0],
                                         batches=a.diagnose_batches, max_new_tokens=a.max_new_tokens)
            print(f"diagnostics {name}: " + json.dumps({k: round(v, 4) for k, v in diagnostics[name].items()}),
                  flush=True)
            (out / "diagnostics.json").write_text(json.dumps(diagnostics, indent=1))
    minutes = (time.perf_counter() - t0) / 60
    cmd = "python benchmarks/toy_vold_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    per_seed = {arm: {s: {"accuracy": v["accuracy"], "n": len(v["correct"]), "curve": v["curve"]}
                      for s, v in by_seed.items()} for arm, by_seed in results.items()}
    (out / "ablation.json").write_text(json.dumps(
        {"command": cmd, "minutes": minutes, "settings": vars(a), "arms": summary, "paired": paired,
         "per_seed": per_seed, "diagnostics": diagnostics, "curves": {k: v for k, v in curves.items() if v}},
        indent=1))
    hard_title = f"hard split (difficulty {a.hard_difficulty}" + (
        f", {'/'.join(a.hard_answer_types)} answers)" if a.hard_answer_types else ")")
    plot(results, summary, paired, curves, out / "ablation.png", hard_title)
    print_table(summary, paired, minutes)


def summarize(results) -> dict[str, dict]:
    """Accuracy per arm: mean ± std over seeds and the number of problems scored per seed."""
    out = {}
    for arm, by_seed in results.items():
        accs = [v["accuracy"] for v in by_seed.values()]
        out[arm] = {"label": ARMS[arm], "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n_seeds": len(accs),
                    "seeds": sorted(by_seed), "n_problems": len(next(iter(by_seed.values()))["correct"])}
    return out


def paired_delta(results, x: str, y: str, n_boot: int, seed: int = 0) -> dict:
    """Mean of ``correct_x − correct_y`` over the seeds both arms ran and the problems both scored, with a 95%
    percentile-bootstrap interval that resamples problems (keeping each problem's rows of every seed), and, with
    ≥ 2 seeds, the t interval of the per-seed mean differences."""
    seeds = sorted(set(results[x]) & set(results[y]))
    ids = sorted(set.intersection(*(set(results[x][s]["correct"]) & set(results[y][s]["correct"]) for s in seeds)))
    # diff[i][j]: problem i, seed j
    diff = [[int(results[x][s]["correct"][i]) - int(results[y][s]["correct"][i]) for s in seeds] for i in ids]
    n, k = len(ids), len(seeds)
    mean = sum(map(sum, diff)) / (n * k)
    rng = random.Random(seed)
    boots = sorted(sum(sum(diff[rng.randrange(n)]) for _ in range(n)) / (n * k) for _ in range(n_boot))
    lo, hi = boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]
    per_seed = [sum(d[j] for d in diff) / n for j in range(k)]
    res = {"x": x, "y": y, "label": f"{ARMS[x]} − {ARMS[y]}", "seeds": seeds, "n_problems": n, "delta": mean,
           "ci95_bootstrap": [lo, hi], "per_seed": per_seed,
           "discordant": sum(v != 0 for d in diff for v in d) / (n * k)}
    if k >= 2:
        se = statistics.stdev(per_seed) / k ** 0.5
        t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(k, 2.0)
        res["ci95_t_over_seeds"] = [mean - t * se, mean + t * se]
    return res


def print_table(summary: dict, paired: list[dict], minutes: float) -> None:
    print(f"\n{'arm':<36}{'accuracy (mean ± std)':>24}{'seeds':>8}{'problems':>10}")
    for s in summary.values():
        print(f"{s['label']:<36}{100 * s['mean']:>14.1f} ± {100 * s['std']:.1f} %{s['n_seeds']:>8}{s['n_problems']:>10}")
    print(f"\n{'paired difference':<72}{'Δ (points)':>12}  95% interval (bootstrap over problems)")
    for d in paired:
        lo, hi = d["ci95_bootstrap"]
        extra = ""
        if "ci95_t_over_seeds" in d:
            tl, th = d["ci95_t_over_seeds"]
            extra = f"   t over seeds [{100 * tl:+.1f}, {100 * th:+.1f}]"
        print(f"{d['label']:<72}{100 * d['delta']:>+12.1f}  [{100 * lo:+.1f}, {100 * hi:+.1f}]{extra}")
    print(f"\ntook {minutes:.1f} min")


def _smooth(ys: list[float], w: int = 5) -> list[float]:
    return [statistics.mean(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]


def plot(results, summary, paired, curves, path: Path, hard_title: str = "hard split (difficulty 3)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax = axes[0, 0]
    arms = [k for k in summary if k in ("a_sft", "b_sft_grpo", "c_sft_grpo_opd", "d_grpo_opd")]
    _bars(ax, arms, summary, "full test split")
    ax = axes[0, 1]
    hard = [k for k in summary if k.endswith("_hard")]
    if hard:
        _bars(ax, hard, summary, hard_title)
    else:
        ax.axis("off")
    ax = axes[0, 2]
    labels = [f"{d['x'].split('_')[0]} − {d['y'].split('_')[0]}" + (" (hard)" if d["x"].endswith("hard") else "")
              for d in paired]
    ys = [100 * d["delta"] for d in paired]
    err = [[100 * (d["delta"] - d["ci95_bootstrap"][0]) for d in paired],
           [100 * (d["ci95_bootstrap"][1] - d["delta"]) for d in paired]]
    ax.errorbar(ys, range(len(ys)), xerr=err, fmt="o", color="k", capsize=3)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_yticks(range(len(ys)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired Δ accuracy (points), 95% bootstrap interval")
    ax.set_title("paired differences")
    for ax, (key, title) in zip(axes[1], CURVES):
        for arm, by_seed in curves.items():
            for i, (s, cv) in enumerate(sorted(by_seed.items())):
                if key in cv:
                    xs, vals = zip(*cv[key])
                    ax.plot(xs, _smooth(list(vals)), color=COLORS[arm[0]], ls="--" if arm.endswith("hard") else "-",
                            alpha=0.8, lw=1.2, label=ARMS[arm] if i == 0 else None)
        ax.set_xlabel("RL step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Toy VOLD ablation. Bottom: learning curves from the RL runs' CSV logs (5-step moving mean; "
                 "dashed: hard split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _bars(ax, arms: list[str], summary: dict, title: str) -> None:
    means = [100 * summary[k]["mean"] for k in arms]
    stds = [100 * summary[k]["std"] for k in arms]
    bars = ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color=[COLORS[k[0]] for k in arms])
    for b, m in zip(bars, means):
        ax.text(b.get_x() + b.get_width() / 2, m + 1, f"{m:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(arms)), [SHORT[k] for k in arms], fontsize=8)
    ax.set_ylabel("accuracy (%), greedy")
    ax.set_title(f"{title}\n(mean ± std over seeds)", fontsize=10)


# ------------------------------------------------------------------------------------------------ diagnostics

def diagnose(student: Path, teacher: Path, train: Path, *, lam: float, seed: int, batches: int = 4,
             batch_size: int = 4, group_size: int = 8, max_new_tokens: int = 96) -> dict:
    """Why OPD helps or not, measured on ``batches`` RL batches of the student's own rollouts (the quickstart's
    RL settings: T = 1, G = ``group_size``, k1 in loss mode, gate ``failed``, token aggregation):

    - ``teacher_agreement``: the teacher's mean probability of the student's sampled tokens, and the share of
      tokens the teacher gives > 0.5, on correct and on failed rollouts, on answer tokens and on the rest;
    - ``opd_share_answer``: share of the OPD signal Σ g·|k1| (the per-token weight of ∇log π in the k1
      gradient) on the answer tokens (from ``<answer>`` to ``</answer>``), and the same share of the OPD
      term's gradient norm (the answer-only term's norm over the whole term's);
    - ``grad_norm``: the gradient norms of the GRPO term and of the λ-weighted OPD term, each alone, on the
      same batch, and the cosine between the two gradients.
    Means over batches."""
    import torch

    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource
    from vold_pl.models.factory import ModelSpec, load_model
    from vold_pl.rewards.functions import compute_rewards
    from vold_pl.rl.advantages import group_advantages
    from vold_pl.rl.objective import Experience, LossSettings, opd_grpo_loss
    from vold_pl.rl.logprobs import rollout_token_logprobs
    from vold_pl.rl.rollout_types import SamplingConfig
    from vold_pl.rl.cached_sampler import default_engine
    from vold_pl.rl.teacher import build_teacher_inputs, teacher_token_logprobs

    torch.manual_seed(seed)
    policy, processor = load_model(ModelSpec(str(student)))
    tmodel, _ = load_model(ModelSpec(str(teacher)), with_processor=False)
    tmodel.eval()
    tok = getattr(processor, "tokenizer", processor)
    dm = ReasoningDataModule(train=[DataSource(path=str(train))], batch_size=batch_size, collate="prompt",
                             processor=str(student), seed=seed)
    dm.setup("fit")
    engine, sampling = default_engine(tok), SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
    settings = LossSettings(aggregation="token", max_len=max_new_tokens, epsilon_low=0.2, epsilon_high=0.28,
                            lam=lam, gate="failed", estimator="k1", mode="loss")
    grpo_only = LossSettings(**{**settings.__dict__, "lam": 0.0})
    open_id, close_id = tok.convert_tokens_to_ids("<answer>"), tok.convert_tokens_to_ids("</answer>")
    params = [q for q in policy.parameters() if q.requires_grad]
    acc: dict[str, list[float]] = {}

    def add(k: str, v) -> None:
        v = float(v)
        if v == v:  # skip NaN (an empty subset)
            acc.setdefault(k, []).append(v)

    def grad(loss) -> torch.Tensor:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(q)).flatten() for g, q in zip(gs, params)])

    for b, batch in enumerate(dm.train_dataloader()):
        if b >= batches:
            break
        records = batch["records"]
        with torch.no_grad():
            policy.eval()
            rollout = engine.generate(policy, batch, group_size, sampling)
        policy.train()
        rec_objs = [argparse.Namespace(**r) for r in records for _ in range(group_size)]
        rw = compute_rewards(rollout.texts, rec_objs, {"accuracy": 1.0, "format": 0.1})
        adv, zero_std = group_advantages(rw.total, group_size, "group")
        success = rw.named["accuracy"]
        mask = rollout.completion_mask.float()  # [N, L]
        tin = build_teacher_inputs(tok, records, rollout.completion_ids, rollout.completion_mask, group_size)
        t_logp = teacher_token_logprobs(tmodel, tin, 1.0, 1024, tuple(rollout.blocked_ids))  # [N, L]
        logp = rollout_token_logprobs(policy, rollout, temperature=1.0)  # [N, L], differentiable
        ids = rollout.completion_ids
        opened = (ids == open_id).long().cumsum(-1) > 0
        closed_before = ((ids == close_id).long().cumsum(-1) - (ids == close_id).long()) > 0
        ans = (opened & ~closed_before).float() * mask  # [N, L] answer tokens, tags included
        rest = mask - ans
        p_t = t_logp.exp()
        ok = (success > 0.5).float()[:, None]
        for name, sel in (("correct", ok * mask), ("failed", (1 - ok) * mask), ("correct_answer", ok * ans),
                          ("failed_answer", (1 - ok) * ans), ("failed_rest", (1 - ok) * rest)):
            n = sel.sum()
            add(f"teacher_agreement/{name}/mean_p", (p_t * sel).sum() / n)
            add(f"teacher_agreement/{name}/frac_p_gt_0.5", ((p_t > 0.5).float() * sel).sum() / n)
            add(f"teacher_agreement/{name}/tokens", n)
        gate = (1 - ok) * tin.available.float()[:, None]  # [N, 1]
        k1 = (logp.detach() - t_logp).abs() * mask * gate
        add("opd_share_answer/abs_k1", (k1 * ans).sum() / k1.sum())
        add("rollouts/accuracy", success.mean())
        add("rollouts/frac_reward_zero_std", zero_std.float().mean())
        add("rollouts/mean_length", mask.sum(-1).mean())
        exp = Experience(logp=logp, old_logp=logp.detach(), advantages=adv, mask=mask, teacher_logp=t_logp,
                         success=success, teacher_available=tin.available)
        g_grpo = grad(opd_grpo_loss(exp, grpo_only)[0])
        zero = Experience(**{**exp.__dict__, "advantages": torch.zeros_like(adv)})
        g_opd = grad(opd_grpo_loss(zero, settings)[0])
        zero_ans = Experience(**{**zero.__dict__, "mask": ans})
        g_opd_ans = grad(opd_grpo_loss(zero_ans, settings)[0]) if ans.sum() > 0 else torch.zeros_like(g_opd)
        add("grad_norm/grpo", g_grpo.norm())
        add("grad_norm/opd_lambda", g_opd.norm())
        add("grad_norm/cosine_grpo_opd", torch.nn.functional.cosine_similarity(g_grpo, g_opd, dim=0))
        # the answer-only term is normalised by its own token count; rescale to the whole term's normaliser
        add("opd_share_answer/grad_norm", g_opd_ans.norm() * ans.sum() / mask.sum().clamp(min=1) / g_opd.norm())
    return {k: statistics.mean(v) for k, v in sorted(acc.items())}


if __name__ == "__main__":
    main()
