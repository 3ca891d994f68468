"""The whole VOLD recipe offline on tiny models: ``make quickstart`` (``python -m vold_pl.quickstart``).

Stages, each a plain ``vold-pl`` command printed before it runs (so every step can be rerun by hand):

1. teacher SFT      the tiny text-only teacher learns the text twins of the synthetic problems and the
                    extra text-only problems of ``teacher_text.jsonl``;
2. teacher traces   ``vold-pl predict`` + TraceWriter: the teacher answers the *text views* of the image
                    problems; only verified traces are kept (VOLD's cold-start data);
3. cold start       SFT of the tiny Qwen2.5-VL student on those traces, with the images (it never sees the
                    text view);
4. VOLD             GRPO + on-policy distillation from the teacher on the student's own rollouts;
5. benchmarks       ``vold-pl validate`` with the benchmark callback on the held-out split: the teacher on the
                    text views (greedy, and at temperature 1 as when it wrote the traces), then the base
                    student, the cold-start student and the VOLD student on the images; a final table.

A stage whose output already exists is skipped, so an interrupted quickstart resumes where it stopped; when
the artifacts have changed since (``make artifacts`` after a change of the generator), every stage reruns.
"""

from __future__ import annotations

import argparse
import hashlib
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
    if not (data / "teacher_text.jsonl").exists():
        raise SystemExit(f"{data} has no teacher_text.jsonl (the teacher's extra text problems): run `make artifacts` "
                         f"again, which adds it and leaves the other files as they are.")
    t_start = time.perf_counter()
    fresh = args.fresh or artifacts_changed(art, runs)
    done = lambda p: p.exists() and not fresh  # noqa: E731

    teacher = runs / "teacher_sft" / "export"
    # The teacher reads the text twins of the training problems plus many extra text-only problems: with only
    # 2000 scenes a tiny reader memorises them instead of learning to look the facts up in the caption, and a
    # teacher weaker than its student has nothing to distil.
    teacher_train = [data / "train_text.jsonl", data / "teacher_text.jsonl"]
    if not done(teacher / "config.json"):
        run(["fit", "--config", str(CONFIGS / "sft_teacher.yaml"),
             "--model.init_args.model.name_or_path", str(tiny / "teacher"),
             "--model.init_args.export_dir", str(teacher),
             "--data.train", sources(*teacher_train), "--data.val", sources(data / "val_text.jsonl"),
             "--trainer.default_root_dir", str(runs / "teacher_sft")], runs / "logs" / "1_teacher_sft.log")

    bench = ["--trainer.callbacks.init_args.benchmarks",
             json.dumps([{"name": "synthetic", "path": str(data / "test.jsonl"), "loader": "synthetic"}]),
             "--data.val", json.dumps([{"path": str(data / "val.jsonl"), "limit": 8}])]
    reports: dict[str, Path] = {}

    def benchmark(name: str, path: Path, config: str, extra: list[str] = ()) -> None:
        out = runs / "bench" / name
        reports[name] = out / "benchmark_report.json"
        if not done(reports[name]):
            run(["validate", "--config", str(CONFIGS / config), "--model.init_args.model.name_or_path", str(path),
                 *bench, *extra, "--trainer.callbacks.init_args.out_dir", str(out),
                 "--trainer.default_root_dir", str(out)], runs / "logs" / f"bench_{name}.log")

    # The teacher is measured before it writes traces: on the test split's text views, greedy and at T = 1
    # (the temperature it samples its traces at; 4 samples per problem).
    benchmark("teacher_text_greedy", teacher, "bench_teacher.yaml")
    benchmark("teacher_text_t1", teacher, "bench_teacher.yaml",
              ["--trainer.callbacks.init_args.do_sample", "true", "--trainer.callbacks.init_args.pass_k", "4"])

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

    for name, path in (("base_student", tiny / "student"), ("after_cold_start", cold), ("after_VOLD", vold)):
        benchmark(name, path, "bench.yaml")
    print_table(table_rows(reports), time.perf_counter() - t_start, list(reports.values()))


def artifacts_changed(art: Path, runs: Path) -> bool:
    """True when ``runs`` holds outputs made from other artifacts than ``art`` holds now (a regenerated data set,
    e.g. after a change of the trace format, or rebuilt tiny models), so that no stage's stale output is reused.
    The fingerprint (sha256 of the data's JSONL files and the models' JSON files) is kept in
    ``runs/artifacts.sha256``; outputs without one predate it and count as changed. Writes the new fingerprint."""
    digest = hashlib.sha256()
    for f in sorted([*(art / "data").glob("*.jsonl"), *(art / "tiny").glob("*/*.json")]):
        digest.update(f"{f.relative_to(art)}\n".encode())
        digest.update(f.read_bytes())
    stamp, new = runs / "artifacts.sha256", digest.hexdigest()
    old = stamp.read_text().strip() if stamp.is_file() else None
    changed = old != new and (old is not None or (runs.is_dir() and any(runs.iterdir())))
    if changed:
        print(f"the artifacts under {art} changed since the outputs under {runs} were made: rerunning every stage")
    runs.mkdir(parents=True, exist_ok=True)
    stamp.write_text(new + "\n")
    return changed


def _accuracy(report: Path) -> float:
    return json.loads(Path(report).read_text())["benchmarks"]["synthetic"]["accuracy"]


def table_rows(reports: dict[str, Path]) -> list[tuple[str, str, float, float | None]]:
    """``(model, input, greedy accuracy, accuracy at T = 1 or None)`` per row of the quickstart's table."""
    return [("teacher", "text view", _accuracy(reports["teacher_text_greedy"]), _accuracy(reports["teacher_text_t1"])),
            ("base student", "image", _accuracy(reports["base_student"]), None),
            ("after cold start", "image", _accuracy(reports["after_cold_start"]), None),
            ("after VOLD", "image", _accuracy(reports["after_VOLD"]), None)]


def print_table(rows, seconds: float, reports: list[Path]) -> None:
    head = f"{'model':<20}{'reads':<12}{'greedy':>10}{'T=1':>10}"
    print("\naccuracy on the held-out synthetic test split\n" + head + "\n" + "-" * len(head))
    for label, reads, greedy, sampled in rows:
        t1 = f"{100 * sampled:>9.1f}%" if sampled is not None else f"{'-':>10}"
        print(f"{label:<20}{reads:<12}{100 * greedy:>9.1f}%{t1}")
    print(f"\nreports: {', '.join(str(p.parent) for p in reports)}\nquickstart finished in {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
