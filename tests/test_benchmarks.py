"""Benchmark loaders against small fixtures written in each benchmark's published format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vold_pl.data.benchmarks import (
    BENCHMARK_LOADERS,
    MMMU_PRO_VISION_PROMPT,
    load_benchmark,
    load_logicvista,
    load_mathvision,
    load_mathvista,
    load_mmmu_pro,
)
from vold_pl.data.schema import MAX_IMAGE_PIXELS, RecordError, write_jsonl


def png(color=(200, 30, 30), size=(8, 6), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def hf_image(data: bytes, name: str = "x.png") -> dict:
    return {"bytes": data, "path": name}


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def assert_images_ok(rec, n=1):
    assert len(rec.images) == n
    for p in rec.images:
        assert Path(p).is_absolute() and Path(p).is_file()
        with Image.open(p) as im:
            im.load()


# ------------------------------------------------------------------------------------------ MathVista
def mathvista_row(pid, **kw):
    row = {
        "pid": pid, "question": f"Question {pid}?", "image": f"images/{pid}.jpg",
        "decoded_image": hf_image(png(fmt="JPEG"), f"images/{pid}.jpg"), "choices": None, "unit": None,
        "precision": None, "answer": "3", "question_type": "free_form", "answer_type": "integer",
        "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving", "skills": ["algebraic reasoning"]},
        "query": "Hint: ...",
    }
    row.update(kw)
    return row


def make_mathvista(root: Path, rows=None) -> Path:
    rows = rows or [
        mathvista_row("1", question="Which is largest?", choices=["3", "4", "5"], answer="4",
                      question_type="multi_choice", answer_type="text", query=None),
        mathvista_row("2", answer="1.2", answer_type="float", precision=2.0, unit="cm"),
        mathvista_row("3", answer="7", unit="g", query=None),
        mathvista_row("4", answer="Tom", answer_type="text", metadata={"category": "general-vqa", "task": "visual question answering"}),
        mathvista_row("5", answer="[1, 2]", answer_type="list"),
    ]
    return write_parquet(root / "data" / "testmini-00000-of-00001-abc.parquet", rows)


def test_mathvista_maps_answer_conventions(tmp_path):
    make_mathvista(tmp_path)
    recs = {r.id: r for r in load_mathvista(tmp_path)}
    assert (recs["1"].answer_type, recs["1"].answer, recs["1"].choices) == ("choice", "B", ["3", "4", "5"])
    assert recs["1"].category == "geometry problem solving" and recs["1"].source == "mathvista"
    # float gold is written with exactly `precision` decimals and the problem asks for that many
    assert (recs["2"].answer_type, recs["2"].answer) == ("math", "1.20")
    # a published `query` is the problem as is; without one it is built by MathVista's build_query rules
    assert recs["2"].problem == "Hint: ..."
    assert (recs["3"].answer_type, recs["3"].answer) == ("math", "7")
    assert recs["3"].problem == ("Hint: Please answer the question requiring an integer answer and provide the final "
                                 "value, e.g., 1, 2, 3, at the end.\nQuestion: Question 3? (Unit: g)")
    assert recs["1"].problem.endswith("Question: Which is largest?\nChoices:\n(A) 3\n(B) 4\n(C) 5")
    assert (recs["4"].answer_type, recs["4"].answer) == ("open", "Tom")
    assert recs["4"].category == "visual question answering"
    assert recs["5"].answer_type == "open"
    for r in recs.values():
        assert_images_ok(r)
        assert r.images[0].startswith(str(tmp_path / "images_cache" / "mathvista" / "testmini"))
        assert r.images[0].endswith(".jpg") and r.text_view is None and r.difficulty is None


def test_mathvista_cache_dir_limit_and_reuse(tmp_path):
    make_mathvista(tmp_path / "mv")
    recs = load_benchmark("mathvista", tmp_path / "mv", limit=2, cache_dir=tmp_path / "cache")
    assert [r.id for r in recs] == ["1", "2"]
    assert all(r.images[0].startswith(str(tmp_path / "cache")) for r in recs)
    mtime = Path(recs[0].images[0]).stat().st_mtime_ns
    again = load_benchmark("mathvista", tmp_path / "mv", limit=1, cache_dir=tmp_path / "cache")
    assert again[0].images == recs[0].images and Path(again[0].images[0]).stat().st_mtime_ns == mtime


def test_mathvista_malformed(tmp_path):
    f = make_mathvista(tmp_path / "a", [mathvista_row("9", choices=["1", "2"], answer="3",
                                                      question_type="multi_choice", answer_type="text")])
    with pytest.raises(RecordError, match=r"field 'answer'.*'3' is neither") as e:
        load_mathvista(tmp_path / "a", on_bad_record="error")
    assert str(f) in str(e.value) and "id='9'" in str(e.value)
    skipped = load_mathvista(tmp_path / "a")  # default: skipped and counted, not fatal
    assert (len(skipped), skipped.published, skipped.skipped[0]["id"]) == (0, 1, "9")
    assert "is neither" in skipped.skipped[0]["reason"]
    row = mathvista_row("1")
    del row["answer_type"]
    f = make_mathvista(tmp_path / "b", [row])
    with pytest.raises(RecordError, match="missing column.*answer_type") as e:
        load_mathvista(tmp_path / "b")
    assert str(f) in str(e.value)
    make_mathvista(tmp_path / "c", [mathvista_row("1", answer="2.5")])  # integer type, non-integer gold
    with pytest.raises(RecordError, match="not an integer"):
        load_mathvista(tmp_path / "c", on_bad_record="error")


def test_mathvista_falls_back_to_unzipped_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(png())
    make_mathvista(tmp_path, [mathvista_row("1", image="images/1.png", decoded_image=None)])
    assert load_mathvista(tmp_path)[0].images == [str(tmp_path / "images" / "1.png")]


# ----------------------------------------------------------------------------------------- MathVision
def mathvision_row(rid, **kw):
    row = {"id": rid, "question": "How many edges?\n<image1>", "options": [], "image": f"images/{rid}.jpg",
           "decoded_image": hf_image(png()), "answer": "12", "solution": None, "level": 3, "subject": "solid geometry"}
    row.update(kw)
    return row


def test_mathvision(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [
        mathvision_row("1", options=["A", "B", "C", "D", "E"], answer="C", level=1, subject="logic"),
        mathvision_row("2", level=4),
        mathvision_row("3", options=["2", "4", "6"], answer="6", level=5),
    ])
    recs = {r.id: r for r in load_benchmark("mathvision", tmp_path)}
    assert (recs["1"].answer_type, recs["1"].answer, recs["1"].difficulty, recs["1"].category) == ("choice", "C", 1, "logic")
    assert recs["1"].choices == ["A", "B", "C", "D", "E"]
    assert (recs["2"].answer_type, recs["2"].answer, recs["2"].difficulty) == ("math", "12", 3)
    assert recs["2"].problem == "How many edges?" and recs["2"].choices is None
    assert (recs["3"].answer, recs["3"].difficulty) == ("C", 3)  # gold given as option text
    for r in recs.values():
        assert_images_ok(r)


def test_mathvision_malformed(tmp_path):
    f = write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet",
                      [mathvision_row("1"), mathvision_row("2", options=list("ABCDE"), answer="F")])
    with pytest.raises(RecordError, match=r"id='2'.*field 'answer'.*'F'") as e:
        load_mathvision(tmp_path, on_bad_record="error")
    assert f"{f}:1" in str(e.value)  # file and 0-based row index
    write_parquet(tmp_path / "b" / "data" / "test-00000-of-00001.parquet", [mathvision_row("1", level=7)])
    with pytest.raises(RecordError, match="field 'level'"):
        load_mathvision(tmp_path / "b", on_bad_record="error")
    write_parquet(tmp_path / "c" / "data" / "test-00000-of-00001.parquet",
                  [mathvision_row("1", decoded_image=hf_image(b"not an image"))])
    with pytest.raises(RecordError, match="decoded_image.*cannot be decoded"):
        load_mathvision(tmp_path / "c", on_bad_record="error")


# ------------------------------------------------------------------------------------------- MMMU-Pro
STD = "standard (10 options)"


def mmmu_std_row(rid, **kw):
    row = {"id": rid, "question": "Compare <image 1> and <image 2>. Which is cheaper?",
           "options": str(["$1", "$2", "<image 2>", "$4"]), "explanation": "",
           "image_1": hf_image(png()), "image_2": hf_image(png((0, 0, 255))),
           **{f"image_{k}": None for k in range(3, 8)}, "img_type": "['Tables']", "answer": "C",
           "topic_difficulty": "Hard", "subject": "Accounting"}
    row.update(kw)
    return row


def test_mmmu_pro_standard(tmp_path):
    write_parquet(tmp_path / STD / "test-00000-of-00002.parquet", [mmmu_std_row("validation_Accounting_1")])
    write_parquet(tmp_path / STD / "test-00001-of-00002.parquet",
                  [mmmu_std_row("validation_Art_2", image_2=None, topic_difficulty="Easy", subject="Art", answer="A")])
    recs = load_benchmark("mmmu_pro_standard", tmp_path)
    a, b = recs
    assert (a.answer_type, a.answer, a.difficulty, a.category) == ("choice", "C", 3, "Accounting")
    assert a.problem == "Compare image 1 and image 2. Which is cheaper?\nA. $1\nB. $2\nC. image 2\nD. $4"
    assert a.choices == ["$1", "$2", "image 2", "$4"] and a.source == "mmmu_pro_standard"
    assert_images_ok(a, 2)
    assert a.images[0].endswith("validation_Accounting_1_1.png")
    assert (b.difficulty, b.category) == (1, "Art")
    assert_images_ok(b, 1)


def test_mmmu_pro_options_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    f = write_parquet(tmp_path / STD / "test-00000-of-00001.parquet",
                      [mmmu_std_row("x_1", options=f"__import__('os').system('touch {marker}')")])
    with pytest.raises(RecordError, match="field 'options'.*not a Python list literal") as e:
        load_mmmu_pro(tmp_path, on_bad_record="error")
    assert str(f) in str(e.value) and not marker.exists()


def test_mmmu_pro_vision_and_out_of_range(tmp_path):
    rows = [{"id": "v_1", "image": hf_image(png(size=(20, 10))), "options": str(list("wxyz")), "answer": "D",
             "subject": "Math"}]
    write_parquet(tmp_path / "vision" / "test-00000-of-00001.parquet", rows)
    (r,) = load_benchmark("mmmu_pro_vision", tmp_path)
    assert (r.problem, r.choices, r.answer, r.answer_type) == (MMMU_PRO_VISION_PROMPT, list("ABCD"), "D", "choice")
    assert r.category == "Math" and r.difficulty is None
    assert_images_ok(r)
    rows[0]["answer"] = "K"
    f = write_parquet(tmp_path / "bad" / "vision" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(RecordError, match=r"field 'answer'.*'K' is not one of the option letters A-D") as e:
        load_mmmu_pro(tmp_path / "bad", config="vision", on_bad_record="error")
    assert str(f) in str(e.value)


def test_oversized_image_is_downscaled(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 64
    rows = [{"id": "big", "image": hf_image(png(0, (side, side), mode="L")), "options": "['a', 'b']",
             "answer": "A", "subject": "Math"}]
    write_parquet(tmp_path / "vision" / "test-00000-of-00001.parquet", rows)
    (r,) = load_mmmu_pro(tmp_path, config="vision")
    with Image.open(r.images[0]) as im:
        assert im.size[0] * im.size[1] <= MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------------------- LogicVista
def make_logicvista(root: Path, rows: dict) -> Path:
    (root / "data" / "images").mkdir(parents=True)
    for row in rows.values():
        (root / "data" / "images" / row["imagename"]).write_bytes(png())
    f = root / "data" / "dataset.json"
    f.write_text(json.dumps(rows, indent=4))
    return f


def lv_row(name, question, answer, skill=("inductive",)):
    return {"imagename": f"{name}.png", "question": question, "answer": answer, "reasoning": "because",
            "skill": list(skill), "capability": ["diagram"], "imagesource": "x", "sourcelink": "http://x"}


def test_logicvista(tmp_path):
    make_logicvista(tmp_path, {
        "v1_1": lv_row("v1_1", "Which choices in the image (A-D) belong to the green category?", "A, C"),
        "v1_2": lv_row("v1_2", "What is the increase? Select from A, B, C, and D. (A) 33% (B) 17% (C) 25% (D) 50%",
                       "D", skill=["numerical"]),
        "v1_3": lv_row("v1_3", "Which choice (A, B, C, or D) completes the series?", "D"),
        "v1_4": lv_row("v1_4", "Who is the odd-one-out? Select answers from A-I", "G"),
        "v1_5": lv_row("v1_5", "Which is the correct answer according to the image? Select from 1-5", "3",
                       skill=["deductive"]),
        "v1_6": lv_row("v1_6", "What comes next?", "E", skill=["spatial", "mechanical"]),
        "v1_7": lv_row("v1_7", "The easiest way would be to: Select from (A), (B), (C). (A) Use a short spanner, "
                               "(B) Use a long spanner, (C) Hold it at A.", "B", skill=["mechanical"]),
        "v1_8": lv_row("v1_8", "How many triangles? Select answers from A-D. \n A) 10 B) 12 C) 14 D) 16", "C"),
    })
    recs = {r.id: r for r in load_benchmark("logicvista", tmp_path)}
    assert (recs["v1_1"].answer_type, recs["v1_1"].answer, recs["v1_1"].choices) == ("choice", "A, C", list("ABCD"))
    assert recs["v1_2"].choices == ["33%", "17%", "25%", "50%"] and recs["v1_2"].category == "numerical"
    assert recs["v1_3"].choices == list("ABCD")
    assert recs["v1_4"].choices == list("ABCDEFGHI")
    assert (recs["v1_5"].answer_type, recs["v1_5"].answer, recs["v1_5"].choices) == ("multilabel", "3", None)
    assert recs["v1_6"].choices == list("ABCDE") and recs["v1_6"].category == "spatial+mechanical"
    assert recs["v1_7"].choices == ["Use a short spanner", "Use a long spanner", "Hold it at A"]
    assert (recs["v1_8"].choices, recs["v1_8"].answer) == (["10", "12", "14", "16"], "C")
    for r in recs.values():
        assert_images_ok(r)
        assert r.source == "logicvista" and r.category


def test_logicvista_malformed(tmp_path):
    f = make_logicvista(tmp_path / "a", {"v1_0": lv_row("v1_0", "How fast? (A) 1 RPM, (B) 2 RPM, (C) 3 RPM", "D")})
    with pytest.raises(RecordError, match=r"id='v1_0'.*field 'answer'.*outside the 3 options A-C") as e:
        load_logicvista(tmp_path / "a", on_bad_record="error")
    assert str(f) in str(e.value)
    f = make_logicvista(tmp_path / "b", {"v1_0": lv_row("v1_0", "Which one? (A-D)", "B")})
    (f.parent / "images" / "v1_0.png").unlink()
    with pytest.raises(RecordError, match="field 'images': image file not found"):
        load_logicvista(tmp_path / "b", on_bad_record="error")
    make_logicvista(tmp_path / "c", {"v1_0": lv_row("v1_0", "Which one? (A-D)", "maybe B?")})
    with pytest.raises(RecordError, match="field 'answer'.*not option letters"):
        load_logicvista(tmp_path / "c", on_bad_record="error")


# ----------------------------------------------------------------------------------- synthetic, registry
def test_synthetic_reads_project_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    write_jsonl([{"id": "s1", "problem": "How many dots?", "answer": "3", "answer_type": "math",
                  "images": [str(tmp_path / "img" / "a.png")], "difficulty": 2, "source": "synthetic"},
                 {"id": "s2", "problem": "Is it red?", "answer": "yes", "answer_type": "yesno"}],
                tmp_path / "test.jsonl")
    recs = load_benchmark("synthetic", tmp_path / "test.jsonl")
    assert [r.id for r in recs] == ["s1", "s2"] and recs[0].images == [str(tmp_path / "img" / "a.png")]
    assert [r.id for r in load_benchmark("synthetic", tmp_path, limit=1)] == ["s1"]


@pytest.mark.parametrize("name, hint", [
    ("mathvista", "AI4Math/MathVista"), ("mathvision", "MathLLMs/MathVision"),
    ("mmmu_pro_standard", "MMMU/MMMU_Pro"), ("mmmu_pro_vision", "MMMU/MMMU_Pro"),
    ("logicvista", "Yijia-Xiao/LogicVista"), ("synthetic", "missing"),
])
def test_missing_directory(tmp_path, name, hint):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=hint) as e:
        load_benchmark(name, missing)
    assert str(missing) in str(e.value)


def test_empty_directory_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"standard \(10 options\)/test-\*\.parquet.*huggingface-cli download MMMU/MMMU_Pro"):
        load_benchmark("mmmu_pro_standard", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data/testmini-\*\.parquet"):
        load_benchmark("mathvista", tmp_path)


def test_registry_and_unknown_name(tmp_path):
    assert set(BENCHMARK_LOADERS) == {"mathvista", "mathvision", "mmmu_pro_standard", "mmmu_pro_vision",
                                      "logicvista", "synthetic"}
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'.*logicvista.*mathvista"):
        load_benchmark("mmmu", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("logicvista", tmp_path, limit=-1)
