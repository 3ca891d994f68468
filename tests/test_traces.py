"""TraceWriter (``vold-pl predict``): filters as pure functions, then two end-to-end runs with a scripted policy.

The end-to-end runs go through the real CLI in-process; a callback of this module swaps the module's rollout
engine for a :class:`~tests.scripted_engine.ScriptedEngine` that answers each record with a known plan of
completions (right, wrong, reflective, long, untagged), so the kept set is known exactly and counted by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import yaml

from vold_pl.callbacks.trace_writer import select_traces, strip_reflections, think_text, verified_traces
from vold_pl.data.schema import read_jsonl

# ------------------------------------------------------------------------------------------- pure functions


def test_think_text():
    assert think_text("<think> a\nb </think><answer> 3 </answer>") == "a\nb"
    assert think_text("<THINK>x</Think> rest") == "x"
    assert think_text("<think> never closed <answer> 3 </answer>") is None
    assert think_text("no tags at all") is None and think_text("") is None and think_text(None) is None
    assert think_text("<think> first </think> <think> second </think>") == "first"


@pytest.mark.parametrize("trace, want", [
    ("Row 1 has two. Wait, that is wrong. Row 1 has three. So 3.", "Row 1 has two. Row 1 has three. So 3."),
    ("But wait, check. Hmm, fine. Let me double-check the sum. It is 4!", "It is 4!"),
    ("Actually, no. The waiting room is empty. Waiting is not a reflection.",
     "The waiting room is empty. Waiting is not a reflection."),
    ("Wait. Wait, what? Hmm, odd.", ""),  # all reflection: nothing left (such a trace is dropped, see below)
    ("One line without any end", "One line without any end"),
    ("The sum is 4. I actually, checked it.", "The sum is 4. I actually, checked it."),  # mid-sentence stays
])
def test_strip_reflections(trace, want):
    assert strip_reflections(trace) == want


def test_select_traces_modes():
    c = ["a medium one", "short", "the longest trace of all", "tiny"]
    assert select_traces(c, "shortest") == ["tiny"]
    assert select_traces(["ab", "cd"], "shortest") == ["ab"]  # a tie keeps sample order
    assert select_traces(c, "first") == ["a medium one"]
    assert select_traces(c, "drop_longest") == ["tiny", "short", "a medium one"]
    assert select_traces(["only"], "drop_longest") == ["only"]  # one candidate is kept, not dropped
    assert select_traces(c, "all") == c
    for mode in ("shortest", "first", "drop_longest", "all"):
        assert select_traces([], mode) == []
    with pytest.raises(ValueError, match="keep must be"):
        select_traces(c, "longest")


# A plan of sample kinds; {g} is the gold answer, {w} a wrong one. Traces after cutting reflections:
LONG = "First I look at every row of the grid. Then I count what I see."
KINDS = {
    "wrong": "<think> I guess. </think><answer> {w} </answer>",
    "short": "<think> Count them. </think><answer> {g} </answer>",  # -> "Count them." (11 chars)
    "long": "<think> " + LONG + " </think><answer> {g} </answer>",
    "reflect": "<think> Wait, let me look again. Row 2 has it. But wait, maybe not. Hmm, yes it does. </think>"
               "<answer> {g} </answer>",  # -> "Row 2 has it." (13 chars)
    "verbose": "<think> " + " ".join(["step"] * 30) + ". </think><answer> {g} </answer>",  # 30 words
    "notags": "The answer is {g}.",  # right answer, no <think>: not a trace
    "onlyreflect": "<think> Wait, what. </think><answer> {g} </answer>",  # nothing left after cutting
}
PLANS = [["wrong", "long", "short", "reflect"], ["wrong", "wrong", "notags", "wrong"],
         ["long", "reflect", "verbose", "wrong"], ["onlyreflect", "long", "wrong", "long"]]
CORRECT_KINDS = {"short", "long", "reflect", "verbose", "onlyreflect"}  # notags is right but has no trace
TRACE = {"short": "Count them.", "long": LONG, "reflect": "Row 2 has it.", "verbose": " ".join(["step"] * 30) + "."}


def wrong_answer(rec) -> str:
    if rec.answer_type == "yesno":
        return "no" if rec.answer.strip().lower() == "yes" else "yes"
    if rec.answer_type == "choice":
        return "B" if rec.answer.strip().upper() != "B" else "A"
    return "zzz"


def completions(rec, plan) -> list[str]:
    return [KINDS[k].format(g=rec.answer, w=wrong_answer(rec)) for k in plan]


def test_verified_traces_filters_and_word_cap(synth_data):
    rec = read_jsonl(synth_data["train"])[0][0]
    d = rec.to_json()
    texts = completions(rec, ["wrong", "long", "reflect", "verbose", "notags", "onlyreflect"])
    kept, dropped = verified_traces(texts, d, strip_reflection=True, max_words=20)
    assert kept == [LONG, "Row 2 has it."]
    assert dropped == {"wrong": 2, "too_long": 1, "empty": 1}
    kept, _ = verified_traces(texts, d, strip_reflection=True, max_words=30)  # the cap is inclusive
    assert kept[-1] == TRACE["verbose"]
    kept, dropped = verified_traces(texts, d, strip_reflection=False, max_words=0)
    assert kept[1].startswith("Wait, let me look again.") and kept[3] == "Wait, what." and "empty" not in dropped
    assert len(LONG.split()) == 15 and len(TRACE["verbose"].split()) == 30  # the word counts the plan relies on


# ------------------------------------------------------------------------------------------ end to end (CLI)


class ScriptedPlan(L.Callback):
    """Swap the module's rollout engine for a ScriptedEngine answering each record id from ``plan_file``."""

    def __init__(self, plan_file: str):
        self.plan_file = plan_file

    def on_predict_start(self, trainer, pl_module):
        from tests.scripted_engine import ScriptedEngine

        pl_module.rollout_engine = ScriptedEngine(pl_module.tokenizer, json.loads(Path(self.plan_file).read_text()))


def run_predict(tmp_path: Path, model: Path, data: Path, n: int, view: str, writer: dict) -> tuple[list, dict]:
    """``vold-pl predict`` in-process on the first ``n`` records of ``data``; returns (source records, summary)."""
    from vold_pl.cli import main

    records = read_jsonl(data)[0][:n]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({r.id: completions(r, PLANS[i % 4]) for i, r in enumerate(records)}))
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "vold_pl.callbacks.trace_writer.TraceWriter", "init_args": writer},
                                  {"class_path": f"{__name__}.ScriptedPlan", "init_args": {"plan_file": str(plan_file)}}]},
        "model": {"class_path": "vold_pl.modules.sft.SFTModule",
                  "init_args": {"model": {"name_or_path": str(model)}, "export": False}},
        "data": {"predict": [{"path": str(data), "limit": n}], "view": view, "val_batch_size": 3},
    }
    (tmp_path / "predict.yaml").write_text(yaml.safe_dump(cfg))
    try:
        main(["predict", "--config", str(tmp_path / "predict.yaml")])
    except SystemExit as e:
        assert e.code in (0, None)
    summary = json.loads(Path(writer["out_path"]).with_suffix(".summary.json").read_text())
    return records, summary


def check_written(out: Path, records: list, want: dict[str, list[str]], model: Path):
    """Every row validates, was answered correctly by the sample that wrote it, keeps the source's images."""
    rows, _ = read_jsonl(out)  # the schema reader: raises on any invalid record or missing image
    by_id = {r.id: (i, r) for i, r in enumerate(records)}
    got: dict[str, list[str]] = {}
    for row in rows:
        base, _, n = row.id.rpartition("-")
        base = base if n.isdigit() and base in by_id else row.id  # extra traces of one prompt: <id>-1, <id>-2
        if base not in by_id:
            continue  # a text-only mix row, checked by the caller
        i, src = by_id[base]
        got.setdefault(base, []).append(row.trace)
        # Independent re-score: the samples that produced this trace answered with exactly the gold string.
        producers = [k for k in PLANS[i % 4] if k in TRACE and TRACE[k] == row.trace]
        assert producers and all(k in CORRECT_KINDS for k in producers), (row.id, row.trace)
        assert (row.problem, row.answer, row.answer_type, row.choices) == (src.problem, src.answer, src.answer_type,
                                                                           src.choices)
        assert [Path(p).resolve() for p in row.images] == [Path(p).resolve() for p in src.images]
        assert row.images and all(Path(p).is_file() for p in row.images)
        assert row.source == f"{src.source}+traces({model})"
    assert got == want
    return rows


def test_predict_teacher_text_view_shortest_with_text_mix(tmp_path, tiny_models, synth_data, capsys):
    out = tmp_path / "traces" / "teacher.jsonl"
    writer = {"out_path": str(out), "num_samples": 4, "max_new_tokens": 256, "temperature": 1.0, "keep": "shortest",
              "strip_reflection": True, "max_words": 20, "text_only_path": str(synth_data["train_text"]),
              "text_only_ratio": 0.25, "seed": 3}
    records, summary = run_predict(tmp_path, tiny_models["teacher"], synth_data["train"], 8, "teacher", writer)
    # By hand from PLANS: 0 -> "Count them.", 1 -> nothing, 2 -> "Row 2 has it." (verbose is over 20 words),
    # 3 -> LONG (onlyreflect is empty after cutting); records 4..7 repeat the pattern.
    by_plan = {0: ["Count them."], 2: ["Row 2 has it."], 3: [LONG]}
    want = {r.id: by_plan[i % 4] for i, r in enumerate(records) if i % 4 in by_plan}
    rows = check_written(out, records, want, tiny_models["teacher"])
    # Text-only mix: r = 0.25 of the written set -> round(6 * 0.25 / 0.75) = 2 rows from the text pool.
    text_pool = {r.id: r for r in read_jsonl(synth_data["train_text"])[0]}
    mixed = [r for r in rows if r.id in text_pool]
    assert len(rows) == 8 and len(mixed) == 2 and all(not r.images for r in mixed)
    assert all(r == text_pool[r.id] for r in mixed)  # copied unchanged

    assert (summary["kept"], summary["total"], summary["verified_records"], summary["written"]) == (6, 8, 6, 8)
    assert summary["kept_per_source"] == {"synthetic": {"kept": 6, "total": 8, "rate": 0.75}}
    assert summary["text_only_mixed_in"] == 2
    c = summary["counts"]  # 8 prompts x 4 samples: dropped and kept samples add up
    assert (c["synthetic/wrong"], c["synthetic/too_long"], c["synthetic/empty"]) == (2 * 7, 2, 2)  # 1 + 4 + 1 + 1 per 4
    p = summary["provenance"]
    assert p["model"] == str(tiny_models["teacher"]) and p["checkpoint"] is None
    assert p["num_samples"] == 4 and p["keep"] == "shortest" and p["view"] == "teacher"
    assert p["sampling"]["temperature"] == 1.0 and p["sampling"]["max_new_tokens"] == 256 and p["sampling"]["do_sample"]
    assert p["filters"] == {"strip_reflection": True, "max_words": 20}
    assert p["text_only"] == {"path": str(synth_data["train_text"]), "ratio": 0.25, "seed": 3}
    assert p["data"] == [str(synth_data["train"])]
    printed = capsys.readouterr().out
    assert "[vold-pl] traces: 8/8 prompts" in printed and "kept 6/8 prompts" in printed


def test_predict_student_images_keep_all_greedy(tmp_path, tiny_models, synth_data, capsys):
    out = tmp_path / "student.jsonl"
    writer = {"out_path": str(out), "num_samples": 4, "max_new_tokens": 256, "temperature": 0.0, "keep": "all",
              "strip_reflection": True, "max_words": 0, "model_name": "round_0/grpo"}
    records, summary = run_predict(tmp_path, tiny_models["student"], synth_data["train"], 4, "student", writer)
    # keep all, no cap: 0 -> LONG, "Count them.", "Row 2 has it."; 1 -> nothing; 2 -> LONG, "Row 2 has it.",
    # the 30-word trace; 3 -> LONG twice (two samples).
    want = {records[0].id: [LONG, "Count them.", "Row 2 has it."],
            records[2].id: [LONG, "Row 2 has it.", TRACE["verbose"]], records[3].id: [LONG, LONG]}
    rows = check_written(out, records, want, "round_0/grpo")  # sample order within a prompt
    assert len(rows) == 8 and len({r.id for r in rows}) == 8  # extra rows of one prompt get -1, -2 ids
    assert all(r.images and all(Path(p).is_file() for p in r.images) for r in rows)
    assert all(r.source == "synthetic+traces(round_0/grpo)" for r in rows)
    assert summary["kept_per_source"] == {"synthetic": {"kept": 3, "total": 4, "rate": 0.75}}
    p = summary["provenance"]
    assert p["model"] == "round_0/grpo" and p["view"] == "student"
    assert p["sampling"]["temperature"] == 0.0 and not p["sampling"]["do_sample"]
    assert "kept 3/4 prompts" in capsys.readouterr().out
