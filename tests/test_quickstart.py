"""The quickstart reruns its stages when the artifacts they were made from have changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vold_pl.quickstart import JobKeys, artifacts_changed


def _artifacts(root: Path) -> Path:
    art = root / "art"
    (art / "data").mkdir(parents=True)
    (art / "tiny" / "student").mkdir(parents=True)
    (art / "data" / "train.jsonl").write_text('{"trace": "1 is option B."}\n')
    (art / "data" / "teacher_text.jsonl").write_text('{"trace": "x"}\n')
    (art / "tiny" / "student" / "tokenizer.json").write_text("{}")
    return art


def test_runs_are_reused_until_the_artifacts_change(tmp_path):
    art, runs = _artifacts(tmp_path), tmp_path / "runs"
    assert artifacts_changed(art, runs) is False  # first run: nothing to redo
    (runs / "teacher_sft").mkdir()  # a stage's output
    assert artifacts_changed(art, runs) is False  # same artifacts: an interrupted run resumes
    (art / "data" / "train.jsonl").write_text('{"trace": "Looking for 1: A. 2 no. B. 1 yes."}\n')
    assert artifacts_changed(art, runs) is True  # regenerated data: every stage reruns
    assert artifacts_changed(art, runs) is False  # ... once; the new fingerprint is kept
    (art / "tiny" / "student" / "tokenizer.json").write_text('{"v": 2}')
    assert artifacts_changed(art, runs) is True  # rebuilt models count too
    (art / "data" / "images").mkdir()
    (art / "data" / "images" / "a.png").write_bytes(b"png")  # images follow the JSONL; not hashed
    assert artifacts_changed(art, runs) is False


def test_an_output_is_reused_only_for_the_same_command_and_config(tmp_path):
    """A stage output is reused when the command and config that made it are the same; a changed argument or
    config text, a missing output, or an earlier job that ran (its outputs are later jobs' inputs) reruns it."""
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("trainer: {max_steps: 10}\n")
    outs = [tmp_path / name / "export" / "config.json" for name in ("a", "b")]
    jobs = [(["fit", "--config", str(cfg), "--x", name], out) for name, out in zip("ab", outs)]
    for _, out in jobs:
        out.parent.mkdir(parents=True)
        out.write_text("{}")
    keys = JobKeys(tmp_path / "job_keys.json")
    assert not any(keys.reusable(a, out) for a, out in jobs)  # outputs without a key are not reused
    keys.ran(jobs)

    again = JobKeys(tmp_path / "job_keys.json")  # a resumed run reads the keys back
    assert all(again.reusable(a, out) for a, out in jobs)
    assert not again.reusable(jobs[0][0][:-1] + ["other"], outs[0])  # another argument
    assert not JobKeys(tmp_path / "job_keys.json", fresh=True).reusable(*jobs[0])  # --fresh
    cfg.write_text("trainer: {max_steps: 20}\n")  # the same path, another config
    assert not again.reusable(*jobs[0])
    cfg.write_text("trainer: {max_steps: 10}\n")
    assert again.reusable(*jobs[0])
    again.ran([jobs[0]])  # a job ran: every later one reruns, even one whose key still matches
    assert not again.reusable(*jobs[1])
    outs[0].unlink()
    assert not JobKeys(tmp_path / "job_keys.json").reusable(*jobs[0])  # a missing output

    # A config edited while its job runs: the job read the text of its start, so the next run reruns it.
    during = JobKeys(tmp_path / "job_keys.json")
    assert during.reusable(*jobs[1])
    cfg.write_text("trainer: {max_steps: 30}\n")
    during.ran([jobs[1]])
    assert not JobKeys(tmp_path / "job_keys.json").reusable(*jobs[1])


def test_a_moved_checkout_reuses_the_outputs_it_made(tmp_path):
    """Keys leave the checkout's folder out of the command's paths: the same job from a checkout at another path
    reuses the output; a job whose paths differ inside the checkout does not; a key kept with the folder in it
    (before keys were portable) still counts in the checkout that made it."""
    before, after = tmp_path / "work" / "main", tmp_path / "elsewhere" / "vold-pl"
    for root in (before, after):
        (root / "configs").mkdir(parents=True)
        (root / "configs" / "stage.yaml").write_text("trainer: {max_steps: 10}\n")
    out = tmp_path / "runs" / "a" / "export" / "config.json"
    out.parent.mkdir(parents=True)
    out.write_text("{}")

    def job(root: Path, init: str = "pretrained/teacher") -> list[str]:
        return ["fit", "--config", str(root / "configs" / "stage.yaml"), "--model", str(root / init)]

    keys = JobKeys(tmp_path / "job_keys.json", root=before)
    assert not keys.reusable(job(before), out)
    keys.ran([(job(before), out)])
    assert JobKeys(tmp_path / "job_keys.json", root=after).reusable(job(after), out)  # moved: reused
    assert not JobKeys(tmp_path / "job_keys.json", root=after).reusable(job(after, "pretrained/perception"), out)
    assert not JobKeys(tmp_path / "job_keys.json", root=after).reusable(job(before), out)  # the old checkout's files

    old_key = hashlib.sha256(json.dumps(job(before)).encode())  # written out: arguments as given, then the config
    old_key.update((before / "configs" / "stage.yaml").read_bytes())
    (tmp_path / "job_keys.json").write_text(json.dumps({str(out): old_key.hexdigest()}))
    assert JobKeys(tmp_path / "job_keys.json", root=before).reusable(job(before), out)
    assert not JobKeys(tmp_path / "job_keys.json", root=after).reusable(job(after), out)


def test_a_seeds_runner_reads_the_artifacts_once_and_reuses_nothing_made_from_others(tmp_path, monkeypatch):
    """StageRunner is the one home of reuse: with ``art`` it takes the fingerprint once (the shipped models' check
    reads the same one), and outputs made from other artifacts make it fresh: no command key, no previous
    summary counts."""
    import vold_pl.quickstart as qs

    art, runs = _artifacts(tmp_path), tmp_path / "runs"
    out = runs / "cold_start" / "export"
    job = ["fit", "--model.init_args.export_dir", str(out)]
    first = qs.StageRunner(runs, 0, art=art)
    assert not first.fresh and first.fingerprint == qs.artifacts_fingerprint(art)
    out.mkdir(parents=True)  # the job's output
    assert not first.keys.reusable(job + first.seed_arg, out)  # no key yet: the job runs ...
    first.keys.ran([(job + first.seed_arg, out)])  # ... and its key is kept
    (runs / "summary.json").write_text(json.dumps({"stage_seconds": {"3 cold start": 60.0}}))

    configs, home = tmp_path / "configs", tmp_path / "shipped"
    configs.mkdir()
    for name in qs.PRETRAINING_CONFIGS:
        (configs / name).write_text(f"# {name}\n")
    start = qs.Pretrained(_export(tmp_path / "t", b"t"), _export(tmp_path / "p", b"p"), tmp_path / "base", [0.95],
                          shipped=False)
    qs.save_pretrained(art, start, 1.0, home, configs)

    calls = []
    real = qs.artifacts_fingerprint
    monkeypatch.setattr(qs, "artifacts_fingerprint", lambda a: calls.append(a) or real(a))
    again = qs.StageRunner(runs, 0, art=art)
    assert not again.fresh and again.keys.reusable(job + again.seed_arg, out) and again.before == {"3 cold start": 60.0}
    assert qs.shipped_pretrained(art, home, configs, fingerprint=again.fingerprint) is not None
    assert len(calls) == 1  # once per seed

    (art / "data" / "train.jsonl").write_text('{"trace": "regenerated"}\n')
    changed = qs.StageRunner(runs, 0, art=art)
    assert changed.fresh and not changed.keys.reusable(job + changed.seed_arg, out) and changed.before == {}
    assert not qs.StageRunner(runs, 0, art=art).fresh  # the new fingerprint is kept
    assert qs.StageRunner(runs, 0, fresh=True, art=art).fresh  # --fresh


def test_outputs_without_a_fingerprint_count_as_stale(tmp_path):
    art, runs = _artifacts(tmp_path), tmp_path / "runs"
    (runs / "teacher_sft" / "export").mkdir(parents=True)  # made before fingerprints existed
    assert artifacts_changed(art, runs) is True
    assert (runs / "artifacts.sha256").is_file() and artifacts_changed(art, runs) is False


# ---- the quickstart's figures, checked against independent computations on hand-made predictions ----

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vold_pl.quickstart import BENCH, accuracy_figures, perception_figures, stated_facts, teacher_on_target  # noqa: E402


def _write_predictions(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "benchmark_report.json").write_text("{}")
    (folder / "benchmark_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_accuracy_figures_interval_and_difficulty(tmp_path):
    rng = np.random.default_rng(3)
    correct = rng.random(300) < 0.6  # [300]
    diff = {f"p{i}": 1 + i % 3 for i in range(300)}
    rows = [{"benchmark": "synthetic", "id": f"p{i}", "sample": 0, "score": float(c), "official_score": float(c)}
            for i, c in enumerate(correct)]
    fig = accuracy_figures(_write_predictions(tmp_path / "b", rows), diff)
    p = correct.mean()
    assert fig["n"] == 300 and fig["accuracy"] == pytest.approx(p)
    half = 1.96 * math.sqrt(p * (1 - p) / 300)  # the normal approximation the bootstrap should be close to
    assert fig["ci95"][0] == pytest.approx(p - half, abs=0.012) and fig["ci95"][1] == pytest.approx(p + half, abs=0.012)
    for d in (1, 2, 3):
        sel = [c for i, c in enumerate(correct) if i % 3 == d - 1]
        assert fig["by_difficulty"][str(d)] == {"accuracy": pytest.approx(np.mean(sel)), "n": 100}


def test_perception_and_stated_facts(tmp_path):
    """A scene read exactly counts once; kind counts are scored over all 8 kinds (a left-out kind is a 0); the facts
    a student states in its reasoning are compared as counts, whatever their order."""
    rows = [
        {"benchmark": "perception", "id": "s0", "score": 1.0, "gold": "red squares 1, red circles 2",
         "extracted": "red squares 1, red circles 2"},
        {"benchmark": "perception", "id": "s1", "score": 0.0, "gold": "red squares 1, red circles 2",
         "extracted": "red circles 2"},  # red square missed: 7 of 8 kinds right
        {"benchmark": "perception", "id": "s2", "score": 0.0, "gold": "blue circles 3", "extracted": "garbled"},
        {"benchmark": "synthetic", "id": "t0", "score": 1.0,
         "completion": "<think> I see red circles 2, red squares 1. Red shapes: ... </think><answer> 3 </answer>"},
        {"benchmark": "synthetic", "id": "t1", "score": 0.0, "completion": "<think> I see red circles 1. </think>"},
        {"benchmark": "synthetic", "id": "t2", "score": 0.0, "completion": "<answer> 3 </answer>"},
    ]
    folder = _write_predictions(tmp_path / "b", rows)
    fig = perception_figures(folder)
    assert fig["n"] == 3 and fig["scenes_exact"] == pytest.approx(1 / 3)
    assert fig["kind_counts"] == pytest.approx((8 + 7 + 7) / 24)  # s2: every kind but blue circle is right (0)
    view = "The image shows 3 shapes on a white background: red squares 1, red circles 2.\nQ?"
    records = {t: {"text_view": view} for t in ("t0", "t1", "t2")}
    assert stated_facts(folder, records) == pytest.approx(1 / 3)


def test_each_seed_starts_from_its_own_weights(tiny_models, tmp_path):
    """Seed 0 is the artifacts' draw; another seed redraws the weights and keeps configs and tokenizer."""
    import torch
    from safetensors.torch import load_file

    from vold_pl.quickstart import initial_models

    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "tiny").symlink_to(tiny_models["student"].parent)  # the layout `make artifacts` writes
    art = tmp_path / "art" / "tiny"
    assert initial_models(tmp_path / "art", tmp_path / "s0", 0) == art
    redrawn = {seed: initial_models(tmp_path / "art", tmp_path / f"s{seed}", seed, fresh=True) for seed in (1, 2)}
    for name in ("student", "teacher"):
        saved = load_file(art / name / "model.safetensors")
        ones, twos = (load_file(redrawn[s] / name / "model.safetensors") for s in (1, 2))
        assert set(ones) == set(saved)
        weights = [k for k, v in saved.items() if v.dim() == 2]
        assert weights and not any(torch.equal(saved[k], ones[k]) for k in weights)
        assert not any(torch.equal(ones[k], twos[k]) for k in weights)
        assert all(ones[k].shape == saved[k].shape for k in saved)
        assert (redrawn[1] / name / "tokenizer.json").read_bytes() == (art / name / "tokenizer.json").read_bytes()
    from vold_pl.toy.tiny import reseed_tiny_models

    again = reseed_tiny_models(art, tmp_path / "zero", 0)  # seed 0 redrawn is the saved draw, bit for bit
    for name in ("student", "teacher"):
        a, b = load_file(art / name / "model.safetensors"), load_file(again[name] / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def _fake_stages(accuracies: list[float], calls: list):
    """A stand-in for run_seed's runner: a teacher check scores 100 validation items at the next of
    ``accuracies``; a fit job writes its export marker. Every job's arguments are recorded in ``calls``."""
    queue = list(accuracies)

    def stages(name, jobs):
        for args, _log, out in jobs:
            calls.append((name, args))
            out.parent.mkdir(parents=True, exist_ok=True)
            if args[0] == "validate":
                right = round(queue.pop(0) * 100)
                out.write_text("{}")
                (out.parent / "benchmark_predictions.jsonl").write_text("".join(
                    json.dumps({"benchmark": BENCH, "id": f"v{i}", "score": float(i < right)}) + "\n"
                    for i in range(100)))
            else:
                out.write_text("{}")
    return stages


@pytest.mark.parametrize("accuracies, top_ups", [([0.95], 0), ([0.85, 0.92], 1), ([0.80, 0.85, 0.85], 2)])
def test_a_teacher_under_target_trains_on_from_its_own_weights(tmp_path, accuracies, top_ups):
    runs, data, first = tmp_path / "runs", tmp_path / "data", tmp_path / "runs" / "teacher_sft" / "export"
    calls = []
    teacher, accs = teacher_on_target(runs, data, first, _fake_stages(accuracies, calls))
    assert accs == pytest.approx(accuracies)
    fits = [args for _, args in calls if args[0] == "fit"]
    assert len(fits) == top_ups  # the last check decides: no top-up after the TEACHER_TOP_UPS-th
    chain = [first] + [runs / f"teacher_sft_{k}" / "export" for k in range(1, top_ups + 1)]
    assert teacher == chain[-1]
    for k, args in enumerate(fits):  # each top-up starts from the teacher before it, and is checked after
        assert args[args.index("--model.init_args.model.name_or_path") + 1] == str(chain[k])
        assert args[args.index("--model.init_args.export_dir") + 1] == str(chain[k + 1])
    checks = [args[args.index("--model.init_args.model.name_or_path") + 1] for _, args in calls
              if args[0] == "validate"]
    assert checks == [str(t) for t in chain]
    assert all(str(data / "val.jsonl") in args[args.index("--trainer.callbacks.init_args.benchmarks") + 1]
               for _, args in calls if args[0] == "validate")  # validation, never the test split


# ---- the pretrained models shipped with the code ----

from vold_pl.quickstart import (  # noqa: E402
    CONFIGS,
    MANIFEST,
    PRETRAINED,
    PRETRAINING_CONFIGS,
    TEACHER_TARGET,
    TEACHER_TOP_UP_LR,
    TEACHER_TOP_UP_STEPS,
    TEACHER_TOP_UPS,
    Pretrained,
    artifacts_fingerprint,
    save_pretrained,
    shipped_pretrained,
)


def _export(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    return folder


def test_shipped_models_are_used_only_for_the_artifacts_and_configs_they_were_made_from(tmp_path, capsys):
    art, configs, home = _artifacts(tmp_path), tmp_path / "configs", tmp_path / "shipped"
    configs.mkdir()
    for name in PRETRAINING_CONFIGS:
        (configs / name).write_text(f"# {name}\ntrainer: {{max_steps: 10}}\n")
    start = Pretrained(_export(tmp_path / "t", b"teacher weights"), _export(tmp_path / "p", b"student weights"),
                       tmp_path / "base", [0.90, 0.95], shipped=False)
    home.mkdir()
    (home / "stale.bin").write_bytes(b"from an earlier ship")
    save_pretrained(art, start, 700.4, home, configs)
    assert not (home / "stale.bin").exists()  # the folder is replaced whole
    assert (home / "teacher" / "model.safetensors").read_bytes() == b"teacher weights"
    assert (home / "perception" / "model.safetensors").read_bytes() == b"student weights"
    manifest = shipped_pretrained(art, home, configs)
    assert manifest is not None and manifest["teacher_val"] == [0.90, 0.95] and manifest["seconds"] == 700
    assert set(manifest["files"]) == {f"{m}/{f}" for m in ("teacher", "perception")
                                      for f in ("model.safetensors", "config.json")}

    (configs / "sft_teacher.yaml").write_text("trainer: {max_steps: 20}\n")  # another teacher recipe
    assert shipped_pretrained(art, home, configs) is None
    assert "sft_teacher.yaml" in capsys.readouterr().out
    (configs / "sft_teacher.yaml").write_text("# sft_teacher.yaml\ntrainer: {max_steps: 10}\n")
    assert shipped_pretrained(art, home, configs) is not None

    train = art / "data" / "train.jsonl"
    train.write_text('{"trace": "regenerated"}\n')  # other data
    assert shipped_pretrained(art, home, configs) is None
    assert "artifacts" in capsys.readouterr().out
    train.write_text('{"trace": "1 is option B."}\n')
    assert shipped_pretrained(art, home, configs) is not None

    (home / "perception" / "model.safetensors").write_bytes(b"student weightz")  # a damaged file
    assert shipped_pretrained(art, home, configs) is None
    assert "perception/model.safetensors" in capsys.readouterr().out
    (home / MANIFEST).unlink()
    assert shipped_pretrained(art, home, configs) is None


def test_the_fingerprint_leaves_out_the_transformers_version_only(tmp_path):
    art = _artifacts(tmp_path)
    config = art / "tiny" / "student" / "config.json"
    config.write_text('{"hidden_size": 128, "transformers_version": "5.25.0"}')
    before = artifacts_fingerprint(art)
    config.write_text('{"transformers_version": "5.30.1", "hidden_size": 128}')
    assert artifacts_fingerprint(art) == before
    config.write_text('{"hidden_size": 64, "transformers_version": "5.25.0"}')
    assert artifacts_fingerprint(art) != before


def test_the_shipped_models_match_this_checkout(tmp_path):
    """The models in vold_pl/toy/pretrained were made from this checkout's configs and from the artifacts `make
    artifacts` builds (the Makefile's own commands, run here), so a fresh clone starts from them. When this fails
    after a change of the generator, the tiny models or the stage-1 configs: `make toy-pretrained`."""
    import re
    import subprocess
    import sys

    from safetensors.torch import load_file

    manifest = json.loads((PRETRAINED / MANIFEST).read_text())
    made = manifest["inputs"]
    now_configs = {name: hashlib.sha256((CONFIGS / name).read_bytes()).hexdigest() for name in PRETRAINING_CONFIGS}
    assert made["configs"] == now_configs, "configs/quickstart changed since the models were shipped"
    assert made["teacher_top_up"] == {"target": TEACHER_TARGET, "top_ups": TEACHER_TOP_UPS,
                                      "steps": TEACHER_TOP_UP_STEPS, "lr": TEACHER_TOP_UP_LR}
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((PRETRAINED / rel).read_bytes()).hexdigest() == digest, rel
    for model in ("teacher", "perception"):
        weights = load_file(PRETRAINED / model / "model.safetensors")
        assert weights and all(bool(w.isfinite().all()) for w in weights.values())
    assert manifest["teacher_val"][-1] >= TEACHER_TARGET  # the teacher that was shipped passed its check

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    for module in ("vold_pl.data.synthetic", "vold_pl.toy.tiny"):
        line = re.search(rf"\$\(PY\) -m {re.escape(module)} ((?:[^\n]*\\\n)*[^\n]*)", makefile).group(1)
        args = line.replace("\\\n", " ").replace("$(ART)", str(tmp_path)).split()
        subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True)
    assert made["artifacts"] == artifacts_fingerprint(tmp_path), \
        "`make artifacts` now builds other data or tiny models than the shipped models were made from"


# ---- a run's figures against the README's spread over seeds ----

from vold_pl.quickstart import (  # noqa: E402
    REFERENCE,
    STAGE_LABELS,
    pretrained_digest,
    print_against_reference,
    reference_spread,
)


def _reference(path: Path, manifest: str | None, rows: dict[str, list[float]]) -> Path:
    machine = {"torch": "2.13.0+cpu", "cpu_capability": "AVX512", "cores": 2}
    path.write_text(json.dumps({"seeds": [0, 1, 2], "quickstart_rows": rows, "pretrained_manifest": manifest,
                                "machines": {str(s): machine for s in range(3)}}))
    return path


def test_a_run_is_placed_in_the_prediction_interval_of_the_models_it_started_from(tmp_path, capsys):
    home = tmp_path / "shipped"
    home.mkdir()
    (home / MANIFEST).write_text('{"files": {"teacher/model.safetensors": "aa"}}')
    rows = {"teacher_greedy": [0.99, 0.99, 0.99], "cold_start": [0.40, 0.37, 0.42], "vold": [0.41, 0.385, 0.435],
            "base": [0.0, 0.0, 0.0]}
    ref_path = _reference(tmp_path / "ref.json", pretrained_digest(home), rows)
    ref = reference_spread(ref_path, home)

    def predicted(v):  # mean ± t(0.975, 2 df) · sd · sqrt(1 + 1/3), written out
        m = sum(v) / 3
        half = 4.303 * (sum((x - m) ** 2 for x in v) / 2) ** 0.5 * (4 / 3) ** 0.5
        return m - half, m + half

    for row, v in rows.items():
        assert ref["rows"][row]["range"] == [min(v), max(v)]
        lo, hi = predicted(v)
        assert ref["rows"][row]["predicted"] == pytest.approx([max(lo, 0.0), min(hi, 1.0)], abs=1e-4)
    lo, hi = ref["rows"]["cold_start"]["predicted"]
    assert lo < 0.37 and hi > 0.42  # one more run is expected wider than the seeds' lowest-highest

    summary = {"rows": {"teacher_greedy": {"accuracy": 0.99}, "cold_start": {"accuracy": 0.365},
                        "vold": {"accuracy": 0.60}, "grpo_only": {"accuracy": 0.5}, "base": {"accuracy": 0.0}},
               "machine": {"torch": "2.13.0+cpu", "cpu_capability": "AVX2", "cores": 4}}
    print_against_reference(summary, ref)
    out = capsys.readouterr().out
    assert "teacher 99.0 inside [99.0-99.0] (seeds 99.0-99.0)" in out  # seeds that all agree predict that value
    assert f"{STAGE_LABELS['cold_start']} 36.5 inside [27.2-52.2] (seeds 37.0-42.0)" in out  # outside the range
    assert f"{STAGE_LABELS['vold']} 60.0 OUTSIDE [28.6-53.4]" in out
    assert STAGE_LABELS["grpo_only"] not in out  # no reference for it: not placed
    assert STAGE_LABELS["base"] not in out  # a row that reads 0 on every seed is not placed either
    assert "3 seeds" in out and "AVX512 kernels, 2 cores" in out
    assert "this run: torch 2.13.0+cpu, AVX2 kernels, 4 cores" in out

    (home / MANIFEST).write_text('{"files": {"teacher/model.safetensors": "bb"}}')  # other shipped models
    assert reference_spread(ref_path, home) is None
    assert reference_spread(tmp_path / "missing.json", home) is None
    assert reference_spread(_reference(tmp_path / "old.json", pretrained_digest(home), {}), home) is None


def test_the_cores_of_the_thread_plan_are_a_positive_count(capsys):
    from vold_pl.quickstart import main

    with pytest.raises(SystemExit):
        main(["--cores", "0"])
    assert "--cores 0" in capsys.readouterr().err


def test_the_readme_figures_are_those_of_the_shipped_models():
    """The spread the README states (benchmarks/results/shipped_models) was made from the models shipped now; after
    `make toy-pretrained` it is stale: rerun `python benchmarks/toy_vold_ablation.py --seeds 0 1 2 3 4 5 6 --out
    benchmarks/results/shipped_models` and the README's figures."""
    ref = reference_spread()
    assert ref is not None, f"{REFERENCE} was made from other shipped models than vold_pl/toy/pretrained"
    assert set(ref["rows"]) >= {"teacher_greedy", *STAGE_LABELS}
    assert all(0.0 <= r["predicted"][0] <= r["range"][0] <= r["range"][1] <= r["predicted"][1] <= 1.0
               for r in ref["rows"].values())
    assert len(ref["machines"]) == len(ref["seeds"]) and all(ref["machines"].values())  # each seed's machine known


def test_rl_steps_reach_both_arms_and_keep_a_run_out_of_the_readme_spread(tmp_path):
    from vold_pl.quickstart import RL_CONFIGS, declared_rl_steps, placement_reference, rl_job

    n = declared_rl_steps()
    jobs = {name: rl_job(tmp_path, tmp_path, name, config, tmp_path / "cold") for name, config in RL_CONFIGS.items()}
    assert all("--trainer.max_steps" not in args for args, _, _ in jobs.values())
    # the configs' own count is not written out, so the keys of runs made before the option still match
    assert rl_job(tmp_path, tmp_path, "vold", RL_CONFIGS["vold"], tmp_path / "cold", steps=n)[0] == jobs["vold"][0]
    longer = rl_job(tmp_path, tmp_path, "vold", RL_CONFIGS["vold"], tmp_path / "cold", steps=4 * n)[0]
    assert longer[longer.index("--trainer.max_steps") + 1] == str(4 * n)

    home = tmp_path / "shipped"
    home.mkdir()
    (home / MANIFEST).write_text('{"files": {"teacher/model.safetensors": "aa"}}')
    ref_path = _reference(tmp_path / "ref.json", pretrained_digest(home), {"cold_start": [0.40, 0.37, 0.42]})
    summary = {"pretrained": {"shipped": True}, "rows": {"cold_start": {"accuracy": 0.4}}}
    assert placement_reference(summary, ref_path, home) is not None  # a summary from before the option
    assert placement_reference({**summary, "rl_steps": n}, ref_path, home) is not None
    assert placement_reference({**summary, "rl_steps": 4 * n}, ref_path, home) is None
    assert placement_reference({**summary, "pretrained": {"shipped": False}}, ref_path, home) is None

    configs = tmp_path / "configs"
    configs.mkdir()
    for name, config in RL_CONFIGS.items():
        (configs / config).write_text(f"trainer:\n  max_steps: {n if name == 'vold' else n + 1}\n")
    with pytest.raises(ValueError, match="different trainer.max_steps"):
        declared_rl_steps(configs)
