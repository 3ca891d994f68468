"""VOLD's ablation at toy scale: does OPD help, and only after a cold start?

Arms (same RL budget for b, c, d; every arm evaluated on the held-out synthetic test split):
  (a) cold-start SFT only
  (b) cold-start SFT + GRPO (λ_opd = 0)
  (c) cold-start SFT + GRPO + OPD (VOLD)
  (d) GRPO + OPD from the base student, without cold start

The teacher SFT and its verified traces come from the quickstart stages (reused when present). Each arm
runs for every seed; the script prints mean ± std accuracy per arm, and each arm's difference to (a) paired by
seed (a, b and c of one seed share its cold start), and writes
``<out>/ablation.json`` and ``<out>/ablation.png`` (final accuracy per arm and the accuracy curves).

    python benchmarks/toy_vold_ablation.py --seeds 0 1 2 --rl-steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vold_pl.quickstart import CONFIGS, run, sources  # noqa: E402

ARMS = {
    "a_sft": "cold-start SFT only",
    "b_sft_grpo": "SFT + GRPO (λ=0)",
    "c_sft_grpo_opd": "SFT + GRPO + OPD (VOLD)",
    "d_grpo_opd": "GRPO + OPD, no cold start",
}


def bench_args(out: Path, test: Path, every: int | None, limit: int) -> list[str]:
    bench = json.dumps([{"name": "synthetic", "path": str(test), "loader": "synthetic", "limit": limit}])
    args = ["--trainer.callbacks+=vold_pl.callbacks.benchmark.BenchmarkCallback",
            f"--trainer.callbacks.benchmarks={bench}", f"--trainer.callbacks.out_dir={out}",
            "--trainer.callbacks.max_new_tokens=96", "--trainer.callbacks.batch_size=50"]
    if every:
        args.append(f"--trainer.callbacks.every_n_steps={every}")
    return args


def rl_arm(name: str, start: Path, teacher: Path, lam: float, seed: int, a: argparse.Namespace, data: Path,
           out: Path) -> None:
    args = ["fit", "--config", str(CONFIGS / "opd_grpo.yaml"), f"--seed_everything={seed}",
            f"--model.init_args.model.name_or_path={start}", f"--model.init_args.teacher.name_or_path={teacher}",
            f"--model.init_args.opd.lam={lam}", "--model.init_args.export=false",
            f"--model.init_args.optim.lr={a.lr}", f"--model.init_args.sampling.max_new_tokens={a.max_new_tokens}",
            f"--trainer.max_steps={a.rl_steps}", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={out}", "--trainer.enable_checkpointing=false",
            "--data.train", sources(data / "train.jsonl"), f"--data.seed={seed}"]
    run(args + bench_args(out, data / "test.jsonl", a.eval_every, a.limit_test), out / "run.log")


def finished(out: Path, steps: int) -> bool:
    """An arm is done once its report is the end-of-fit one (the report is rewritten at every evaluation)."""
    path = out / "benchmark_report.json"
    return path.exists() and json.loads(path.read_text()).get("step", -1) >= steps


def final_and_curve(out: Path) -> tuple[float, list[tuple[int, float]]]:
    rep = json.loads((out / "benchmark_report.json").read_text())
    acc = rep["benchmarks"]["synthetic"]["accuracy"]
    curve = [(h["step"], h["accuracy"]) for h in rep.get("history", []) if h.get("benchmark") == "synthetic"]
    return acc, curve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts", help="tiny models and synthetic data (make artifacts)")
    p.add_argument("--quickstart-runs", default="runs/quickstart", help="where the teacher SFT and traces live")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per arm")
    p.add_argument("--rl-steps", type=int, default=100, help="RL optimizer steps of arms b, c, d")
    p.add_argument("--lam", type=float, default=0.5, help="λ_opd of arms c and d")
    p.add_argument("--lr", type=float, default=1e-4, help="RL learning rate of arms b, c, d")
    p.add_argument("--max-new-tokens", type=int, default=96, help="rollout length cap of arms b, c, d")
    p.add_argument("--eval-every", type=int, default=25, help="benchmark every N RL steps (accuracy curves)")
    p.add_argument("--limit-test", type=int, default=200, help="test records evaluated")
    a = p.parse_args(argv)
    art, qs, out = Path(a.artifacts), Path(a.quickstart_runs), Path(a.out)
    data, teacher, traces = art / "data", qs / "teacher_sft" / "export", qs / "traces" / "coldstart.jsonl"
    if not (teacher / "config.json").exists() or not traces.exists():
        from vold_pl.quickstart import main as quickstart

        print("teacher SFT / traces missing: running the quickstart's first stages")
        quickstart(["--artifacts", str(art), "--runs", str(qs)])
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict]] = {k: {} for k in ARMS}
    for seed in a.seeds:
        sd = out / f"seed{seed}"
        cold = sd / "cold_start" / "export"
        if not (cold / "config.json").exists():
            run(["fit", "--config", str(CONFIGS / "sft_student.yaml"), f"--seed_everything={seed}",
                 f"--model.init_args.model.name_or_path={art / 'tiny' / 'student'}",
                 f"--model.init_args.export_dir={cold}", "--data.train", sources(traces),
                 "--data.val", sources(data / "val.jsonl"), f"--data.seed={seed}",
                 f"--trainer.default_root_dir={sd / 'cold_start'}", "--trainer.enable_checkpointing=false"]
                + bench_args(sd / "a_sft", data / "test.jsonl", None, a.limit_test), sd / "cold_start.log")
        arms = {"b_sft_grpo": (cold, 0.0), "c_sft_grpo_opd": (cold, a.lam), "d_grpo_opd": (art / "tiny" / "student", a.lam)}
        for arm, (start, lam) in arms.items():
            if not finished(sd / arm, a.rl_steps):
                rl_arm(arm, start, teacher, lam, seed, a, data, sd / arm)
        for arm in ARMS:
            acc, curve = final_and_curve(sd / arm)
            if arm in ("b_sft_grpo", "c_sft_grpo_opd"):  # RL starts from the cold-start model: its step-0 point
                curve = [(0, results["a_sft"][seed]["accuracy"])] + curve
            results[arm][seed] = {"accuracy": acc, "curve": curve}
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * results[k][seed]['accuracy']:.1f}%" for k in ARMS), flush=True)
    summary = summarize(results)
    minutes = (time.perf_counter() - t0) / 60
    cmd = "python benchmarks/toy_vold_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "ablation.json").write_text(json.dumps({"command": cmd, "minutes": minutes, "arms": summary,
                                                   "per_seed": results}, indent=2))
    plot(results, summary, out / "ablation.png")
    print_table(summary, minutes)


def summarize(results) -> dict[str, dict]:
    """Mean ± std per arm, and the paired difference to arm (a) on the same seed (the cold start is shared by
    a, b and c of one seed, so the paired difference removes its seed-to-seed spread)."""
    out = {}
    for arm, by_seed in results.items():
        accs = [v["accuracy"] for v in by_seed.values()]
        deltas = [v["accuracy"] - results["a_sft"][s]["accuracy"] for s, v in by_seed.items()]
        out[arm] = {"label": ARMS[arm], "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n_seeds": len(accs),
                    "delta_vs_a_mean": statistics.mean(deltas),
                    "delta_vs_a_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0}
    return out


def print_table(summary: dict, minutes: float) -> None:
    print(f"\n{'arm':<32}{'accuracy (mean ± std)':>24}{'paired Δ vs (a)':>22}")
    for arm, s in summary.items():
        print(f"{s['label']:<32}{100 * s['mean']:>14.1f} ± {100 * s['std']:.1f} %"
              f"{100 * s['delta_vs_a_mean']:>+12.1f} ± {100 * s['delta_vs_a_std']:.1f}  (n={s['n_seeds']})")
    print(f"\ntook {minutes:.1f} min")


def plot(results, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [summary[k]["label"] for k in ARMS]
    means = [100 * summary[k]["mean"] for k in ARMS]
    stds = [100 * summary[k]["std"] for k in ARMS]
    bars = ax1.bar(range(len(ARMS)), means, yerr=stds, capsize=4, color=["#999", "#4a90d9", "#d94a4a", "#e0a030"])
    for b, m in zip(bars, means):
        ax1.text(b.get_x() + b.get_width() / 2, m + 1, f"{m:.1f}", ha="center")
    ax1.set_xticks(range(len(ARMS)), labels, rotation=15, ha="right", fontsize=8)
    ax1.set_ylabel("held-out accuracy (%)")
    ax1.set_title("final accuracy, mean ± std over seeds")
    for arm, color in zip(["b_sft_grpo", "c_sft_grpo_opd", "d_grpo_opd"], ["#4a90d9", "#d94a4a", "#e0a030"]):
        for i, v in enumerate(results[arm].values()):
            if v["curve"]:
                xs, ys = zip(*v["curve"])
                ax2.plot(xs, [100 * y for y in ys], color=color, alpha=0.8, label=ARMS[arm] if i == 0 else None)
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy during RL (each line a seed)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
