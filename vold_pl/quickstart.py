"""The whole VOLD recipe offline on tiny models: ``make quickstart`` (``python -m vold_pl.quickstart``).

Stages, each a plain ``vold-pl`` command printed before it runs (so every step can be rerun by hand):

1. teacher SFT      the tiny text-only teacher learns the text twins of the synthetic problems;
2. teacher traces   ``vold-pl predict`` + TraceWriter: the teacher answers the *text views* of the image
                    problems; only verified traces are kept (VOLD's cold-start data);
3. cold start       SFT of the tiny Qwen2.5-VL student on those traces, with the images (it never sees the
                    text view);
4. VOLD             GRPO + on-policy distillation from the teacher on the student's own rollouts;
5. benchmarks       ``vold-pl validate`` with the benchmark callback on the held-out split for the base
                    student, the cold-start student and the VOLD student; a final table.

A stage whose output already exists is skipped, so an interrupted quickstart resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vold_pl.pipeline import run, sources  # noqa: F401  (importable from here too: benchmarks use it)

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "quickstart"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the offline VOLD quickstart on tiny models.")
    parser.add_argument("--artifacts", default="artifacts", help="folder with tiny/ models and data/ (make artifacts)")
    parser.add_argument("--runs", default="runs/quickstart", help="folder for every stage's outputs")
    parser.add_argument("--fresh", action="store_true", help="rerun every stage even if its output exists")
    args = parser.parse_args(argv)
    art, runs = Path(args.artifacts), Path(args.runs)
    data, tiny = art / "data", art / "tiny"
    if not (tiny / "student" / "config.json").exists() or not (data / "train.jsonl").exists():
        raise SystemExit(f"no tiny models or data under {art}: run `make artifacts` first.")
    t_start = time.perf_counter()
    done = lambda p: p.exists() and not args.fresh  # noqa: E731

    teacher = runs / "teacher_sft" / "export"
    if not done(teacher / "config.json"):
        run(["fit", "--config", str(CONFIGS / "sft_teacher.yaml"),
             "--model.init_args.model.name_or_path", str(tiny / "teacher"),
             "--model.init_args.export_dir", str(teacher),
             "--data.train", sources(data / "train_text.jsonl"), "--data.val", sources(data / "val_text.jsonl"),
             "--trainer.default_root_dir", str(runs / "teacher_sft")], runs / "logs" / "1_teacher_sft.log")

    traces = runs / "traces" / "coldstart.jsonl"
    if not done(traces):
        run(["predict", "--config", str(CONFIGS / "traces_teacher.yaml"),
             "--model.init_args.model.name_or_path", str(teacher),
             "--data.predict", sources(data / "train.jsonl"),
             "--trainer.callbacks.init_args.out_path", str(traces)], runs / "logs" / "2_traces.log")

    cold = runs / "student_sft" / "export"
    if not done(cold / "config.json"):
        run(["fit", "--config", str(CONFIGS / "sft_student.yaml"),
             "--model.init_args.model.name_or_path", str(tiny / "student"),
             "--model.init_args.export_dir", str(cold),
             "--data.train", sources(traces), "--data.val", sources(data / "val.jsonl"),
             "--trainer.default_root_dir", str(runs / "student_sft")], runs / "logs" / "3_student_sft.log")

    vold = runs / "vold" / "export"
    if not done(vold / "config.json"):
        run(["fit", "--config", str(CONFIGS / "opd_grpo.yaml"),
             "--model.init_args.model.name_or_path", str(cold),
             "--model.init_args.teacher.name_or_path", str(teacher),
             "--model.init_args.export_dir", str(vold),
             "--data.train", sources(data / "train.jsonl"), "--data.val", sources(data / "val.jsonl"),
             "--trainer.default_root_dir", str(runs / "vold")], runs / "logs" / "4_vold.log")

    rows = []
    for name, path in (("base student", tiny / "student"), ("after cold start", cold), ("after VOLD", vold)):
        out = runs / "bench" / name.replace(" ", "_")
        report = out / "benchmark_report.json"
        if not done(report):
            run(["validate", "--config", str(CONFIGS / "bench.yaml"),
                 "--model.init_args.model.name_or_path", str(path),
                 "--trainer.callbacks.init_args.out_dir", str(out),
                 "--trainer.default_root_dir", str(out)], runs / "logs" / f"5_bench_{out.name}.log")
        rows.append((name, json.loads(report.read_text()), report))
    print_table(rows, time.perf_counter() - t_start)


def print_table(rows, seconds: float) -> None:
    names = sorted({b for _, rep, _ in rows for b in rep.get("benchmarks", {})})
    head = f"{'model':<20}" + "".join(f"{n:>16}" for n in names)
    print("\n" + head + "\n" + "-" * len(head))
    for label, rep, _ in rows:
        accs = [rep["benchmarks"].get(n, {}).get("accuracy", float("nan")) for n in names]
        print(f"{label:<20}" + "".join(f"{100 * a:>15.1f}%" for a in accs))
    print(f"\nreports: {', '.join(str(p.parent) for *_, p in rows)}\nquickstart finished in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
