"""Tests of the synthetic visual-reasoning generator.

The checks of answers and pixels parse the caption with their own regexes and recompute everything, so they
test the generator against an independent reading of its text view, not against its own helpers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vold_pl.data import synthetic as syn
from vold_pl.data.schema import read_jsonl

SMALL = dict(n_train=96, n_val=24, n_test=24)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "seed0"
    syn.generate_dataset(out, seed=0, **SMALL)
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _load(d: Path, name: str):
    recs, skipped = read_jsonl(d / f"{name}.jsonl")
    assert skipped == []
    return recs


# ---- an independent reader of the text view ----

def parse_caption(text_view: str) -> tuple[str, dict[tuple[str, str], int], str]:
    """(background, {(colour, shape): count}, question) from a text view."""
    caption, question = text_view.split("\n", 1)
    m = re.fullmatch(r"The image shows (\d+) shapes? on a (\w+) background: (.*)\.", caption)
    n, bg, facts = int(m.group(1)), m.group(2), m.group(3)
    kinds = {}
    for part in facts.split(", "):
        color, shape, k = re.fullmatch(r"(\w+) (square|circle)s (\d+)", part).groups()
        kinds[color, shape] = int(k)
    assert sum(kinds.values()) == n and all(v > 0 for v in kinds.values())
    return bg, kinds, question


def solve(kinds: dict, question: str) -> str:
    """Answer any generated question from the parsed facts (raises on an unknown template)."""
    objs = [k for k, m in kinds.items() for _ in range(m)]

    def count(phrase: str) -> int:  # "red squares", "circles", "blue shapes"
        words = phrase.split()
        color = words[0] if len(words) == 2 else None
        shape = words[-1][:-1]
        return sum((color in (None, c)) and (shape in ("shape", s)) for c, s in objs)

    q = question.split(" Options:")[0]
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    if m := re.fullmatch(r"How many ((?:\w+ )?\w+) are there\?", q):
        return str(count(m.group(1)))
    if m := re.fullmatch(r"How many shapes are (\w+) or (\w+)\?", q):
        return str(count(f"{m.group(1)} shapes") + count(f"{m.group(2)} shapes"))
    if q == "How many shapes are there in total?":
        return str(len(objs))
    if m := re.fullmatch(r"What is the number of (.+) times the number of (.+) plus (\d)\?", q):
        return str(count(m.group(1)) * count(m.group(2)) + int(m.group(3)))
    if m := re.fullmatch(r"What is the total number of shapes minus the number of (\w+ shapes)\?", q):
        return str(len(objs) - count(m.group(1)))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        return yn(count(f"{m.group(1)} {m.group(2)}s") > 0)
    if m := re.fullmatch(r"Are there more (.+) than (.+)\?", q):
        return yn(count(m.group(1)) > count(m.group(2)))
    if m := re.fullmatch(r"Is the number of (\w+ shapes) plus the number of (\w+ shapes) greater than the number of (\w+)\?", q):
        return yn(count(m.group(1)) + count(m.group(2)) > count(m.group(3)))
    if m := re.fullmatch(r"Is the number of ((?:\w+ )?\w+) even or odd\?", q):
        return "odd" if count(m.group(1)) % 2 else "even"
    if q == "Which are there more of, squares or circles?":
        a, b = count("squares"), count("circles")
        assert a != b
        return "squares" if a > b else "circles"
    if q == "Which colour has the most shapes?":
        counts = {c: count(f"{c} shapes") for c in ("red", "green", "blue", "yellow")}
        best = [c for c, n in counts.items() if n == max(counts.values())]
        assert len(best) == 1
        return best[0]
    raise AssertionError(f"unknown question template: {q!r}")


# ---- tests ----

def test_read_jsonl_validates_all_output(data_dir):
    for split in syn.SPLITS:
        assert len(_load(data_dir, split)) == SMALL[f"n_{split}"]
        assert len(_load(data_dir, f"{split}_text")) == SMALL[f"n_{split}"]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["splits"]["train"]["n"] == SMALL["n_train"]


def test_deterministic_and_idempotent(data_dir, tmp_path):
    # Write a different, larger data set first: regenerating over it must leave exactly the seed-0 files.
    syn.generate_dataset(tmp_path, seed=1, n_train=120, n_val=30, n_test=30)
    other = _files(tmp_path)
    syn.generate_dataset(tmp_path, seed=0, **SMALL)
    assert _files(tmp_path) == _files(data_dir)  # jsonl, manifest and image bytes
    assert other["train.jsonl"] != _files(data_dir)["train.jsonl"]
    assert other["images/train-00000.png"] != _files(data_dir)["images/train-00000.png"]


def test_test_split_independent_of_n_train():
    a = syn.generate_items(seed=3, n_train=10, n_val=5, n_test=12)
    b = syn.generate_items(seed=3, n_train=50, n_val=5, n_test=12)
    assert a["test"] == b["test"] and a["val"] == b["val"]


def test_splits_disjoint(data_dir):
    keys = {}
    for split in syn.SPLITS:
        recs = _load(data_dir, split)
        ks = {(r.text_view.split("\n")[0], r.problem.split(" Options:")[0]) for r in recs}
        assert len(ks) == len(recs), f"duplicate (scene, question) inside {split}"
        keys[split] = ks
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_every_answer_type_and_difficulty_appears(data_dir):
    recs = _load(data_dir, "train")
    assert {(r.answer_type, r.difficulty) for r in recs} == {(t, d) for t in syn.ANSWER_TYPES for d in (1, 2, 3)}
    assert {r.category for r in recs} >= {"count", "compare", "arith", "parity", "exist"}
    for r in recs:
        assert r.source == "synthetic" and r.trace and r.trace.endswith(f"The answer is {r.answer}.")
    yes = sum(r.answer == "yes" for r in recs if r.answer_type == "yesno")
    assert 0 < yes < sum(r.answer_type == "yesno" for r in recs)  # both answers occur
    assert len({r.answer for r in recs if r.answer_type == "choice"}) >= 3  # the gold letter is no constant


def test_text_view_determines_answer(data_dir):
    for split in syn.SPLITS:
        for r in _load(data_dir, split) + _load(data_dir, f"{split}_text"):
            _, kinds, question = parse_caption(r.text_view)
            assert r.problem in (question, r.text_view)  # image record: the question; text twin: the text view
            gold = solve(kinds, question)
            if r.answer_type == "choice":
                assert len(r.choices) == 4 and r.choices[ord(r.answer) - ord("A")] == gold
                assert "Options: " + " ".join(f"{L}. {c}" for L, c in zip("ABCD", r.choices)) in r.problem
            else:
                assert r.answer == gold, (r.id, question)


def test_traces_state_the_facts_then_reason_over_them(data_dir):
    """Every trace starts with the caption's facts list, word for word ("I see red squares 1, red circles 2."): the
    perception step. Every per-kind count it states later is an entry of that list (a kind the list does not
    name is never claimed), each count sentence lists exactly the kinds its phrase covers and ends with their
    sum, and a total sums the whole list."""
    for r in _load(data_dir, "train_text") + _load(data_dir, "test_text"):
        caption = r.text_view.split("\n", 1)[0]
        facts = caption.split("background: ", 1)[1].rstrip(".")
        assert r.trace.startswith(f"I see {facts}. "), (r.id, r.trace)
        totals = facts.split(", ")
        rest = r.trace[len(f"I see {facts}. "):]
        for name, body, tail in re.findall(r"(\w+ ?\w*): ((?:\w+ \w+ \d+(?:, )?)+|none)\. ([^.]*)\.", rest):
            if name == "in total":  # "Shapes in total: that makes 1." is checked below
                continue
            entries = [] if body == "none" else body.split(", ")
            assert all(e in totals for e in entries), (r.id, body, totals)
            n = sum(int(e.split()[2]) for e in entries)
            assert tail == f"That makes {n}" or tail.endswith(f"= {n}"), (r.id, name, body, tail)
            want = name.lower().split()  # "Red shapes" / "Squares" / "Green circles": the kinds it must list
            colour = want[0] if len(want) == 2 else None
            shape = want[-1].rstrip("s") if want[-1] != "shapes" else None
            listed = [t for t in totals if (colour in (None, t.split()[0])) and (shape in (None, t.split()[1][:-1]))]
            assert entries == listed, (r.id, name, entries, listed)
        if m := re.search(r"Shapes in total: (?:that makes (\d+)|([\d + ]+) = (\d+))\.", rest):
            counts = [int(t.split()[2]) for t in totals]
            if m.group(1):
                assert counts == [int(m.group(1))], (r.id, rest)
            else:
                assert [int(x) for x in m.group(2).split(" + ")] == counts and int(m.group(3)) == sum(counts)


def test_choice_traces_check_the_options_in_order(data_dir):
    """A multiple-choice trace states the value, then copies the options in order, each marked yes/no against
    that value, and stops at the first match, whose letter is the answer: every step is a copy or a comparison
    of adjacent text, nothing a small reader has to search for."""
    recs = [r for r in _load(data_dir, "train_text") + _load(data_dir, "test_text") if r.answer_type == "choice"]
    assert recs
    for r in recs:
        value, checks = re.search(r"Looking for (\d+):((?: [A-D]\. \d+ vs \d+ (?:yes|no)\.)+) The answer is [A-D]\.$",
                                  r.trace).groups()
        assert set(re.findall(r" vs (\d+) ", checks)) == {value}, (r.id, checks)  # every check restates the value
        steps = re.findall(r"([A-D])\. (\d+) vs \d+ (yes|no)\.", checks)
        assert [(L, c) for L, c, _ in steps] == list(zip("ABCD", r.choices))[:len(steps)], (r.id, checks)
        assert [v for _, _, v in steps] == ["no"] * (len(steps) - 1) + ["yes"] and steps[-1][1] == value
        assert steps[-1][0] == r.answer and r.choices[ord(r.answer) - ord("A")] == value


def _read_pixels(im: Image.Image, bg: str) -> dict[tuple[str, str], int]:
    """{(colour, shape): count} read off the image: a cell's centre pixel gives the colour, its corner probe the
    shape (a square fills it, a circle leaves it background); an empty cell is background at both."""
    px, kinds = im.load(), {}
    for row in range(4):
        for col in range(4):
            x0, y0 = col * 28, row * 28
            centre, corner = px[x0 + 14, y0 + 14], px[x0 + 5, y0 + 5]
            if centre == corner == syn.BACKGROUNDS[bg]:
                continue
            color = next(c for c, v in syn.COLORS.items() if v == centre)
            shape = "square" if corner == centre else "circle"
            assert shape == "square" or corner == syn.BACKGROUNDS[bg]
            kinds[color, shape] = kinds.get((color, shape), 0) + 1
    return kinds


def test_pixels_match_caption(data_dir):
    for split in syn.SPLITS:
        for r in _load(data_dir, split):
            bg, kinds, _ = parse_caption(r.text_view)
            with Image.open(r.images[0]) as im:
                assert im.size == (112, 112) and im.mode == "RGB"
                assert _read_pixels(im, bg) == kinds, r.id


def test_perception_split_reads_as_its_answer(tmp_path):
    """The perception files: held-out scenes none of which is a scene of the other files, every answer the facts
    list that the pixels show, stated in the trace as the reasoning traces state it."""
    paths = syn.generate_dataset(tmp_path, seed=0, n_train=24, n_val=8, n_test=8, n_perception=40,
                                 n_perception_test=12)
    train, test = _load(tmp_path, "perception_train"), _load(tmp_path, "perception_test")
    assert (len(train), len(test)) == (40, 12) and paths["perception_test"].name == "perception_test.jsonl"
    for r in train + test:
        bg, kinds, question = parse_caption(r.text_view)
        assert question == r.problem == syn.PERCEPTION_QUESTION and r.answer_type == "open"
        with Image.open(r.images[0]) as im:
            assert _read_pixels(im, bg) == kinds, r.id
        assert r.answer == r.text_view.split("background: ", 1)[1].split(".\n")[0] and r.trace == f"I see {r.answer}."
    scenes = lambda recs: {open(x.images[0], "rb").read() for x in recs}  # noqa: E731
    others = scenes(_load(tmp_path, "train") + _load(tmp_path, "val") + _load(tmp_path, "test"))
    assert not scenes(test) & scenes(train) and not scenes(test) & others
    again = syn.generate_dataset(tmp_path / "more", seed=0, n_train=24, n_val=8, n_test=8, n_perception=80,
                                 n_perception_test=12)
    assert again["perception_test"].read_text().replace("/more/", "/") == paths["perception_test"].read_text()


def test_text_twins(data_dir):
    for split in syn.SPLITS:
        recs, twins = _load(data_dir, split), _load(data_dir, f"{split}_text")
        for r, t in zip(recs, twins):
            assert t.id == f"{r.id}-text" and t.images == [] and len(r.images) == 1
            assert t.source == "synthetic-text" and t.problem == t.text_view == r.text_view
            assert (t.answer, t.answer_type, t.choices, t.trace, t.difficulty, t.category) == (
                r.answer, r.answer_type, r.choices, r.trace, r.difficulty, r.category)


def test_filters_and_errors():
    items = syn.generate_items(seed=0, n_train=12, n_val=0, n_test=0, answer_types=["yesno"], difficulties=[2])
    assert {(q["answer_type"], q["difficulty"]) for _, q in items["train"]} == {("yesno", 2)}
    with pytest.raises(ValueError):
        syn.generate_items(answer_types=["essay"])


def test_corpus_texts_deterministic():
    a, b = list(syn.corpus_texts(seed=0, n=24)), list(syn.corpus_texts(seed=0, n=24))
    assert a == b and len(a) == 1 + 4 * 24 and all(isinstance(s, str) and s for s in a)
    assert a != list(syn.corpus_texts(seed=1, n=24))


def test_cli(tmp_path, capsys):
    paths = syn.main(["--out", str(tmp_path), "--seed", "2", "--n-train", "12", "--n-val", "4", "--n-test", "4"])
    assert "12/4/4" in capsys.readouterr().out and paths["train"].is_file()
    assert len(_load(tmp_path, "test_text")) == 4


def test_teacher_text_is_extra_disjoint_and_leaves_splits_alone(data_dir, tmp_path):
    paths = syn.main(["--out", str(tmp_path), "--seed", "0", "--n-train", str(SMALL["n_train"]), "--n-val",
                      str(SMALL["n_val"]), "--n-test", str(SMALL["n_test"]), "--n-teacher-text", "300"])
    for split in syn.SPLITS:  # the image splits and their twins are byte-identical to a run without the option
        for name in (f"{split}.jsonl", f"{split}_text.jsonl"):
            assert (tmp_path / name).read_bytes() == (data_dir / name).read_bytes()
    extra = _load(tmp_path, "teacher_text")
    assert len(extra) == 300 and all(r.images == [] and r.problem == r.text_view for r in extra)
    key = lambda r: (r.text_view.split("\n")[0], r.problem.split(" Options:")[0].split("\n")[-1])  # noqa: E731
    taken = {key(r) for split in syn.SPLITS for r in _load(data_dir, f"{split}_text")}
    assert len({key(r) for r in extra}) == 300 and not {key(r) for r in extra} & taken
    assert json.loads(paths["manifest"].read_text())["splits"]["teacher_text"]["n"] == 300
