"""Small copies of the four benchmarks in their published layouts, written at test time.

HF parquet files carry the published column names and Arrow types (images as ``struct<bytes: binary, path:
string>``, MathVista's ``metadata`` struct, MMMU-Pro's options as a Python-list string); the GitHub layouts are
MATH-V's ``data/test.jsonl`` + ``images/`` and LogicVista's ``data/dataset.json`` + ``data/images/``. Each set holds
multiple-choice items, a multi-image item (MMMU-Pro), an image-only item (MATH-V ``<image1>``) and a row with an
empty answer (which a loader must skip and count).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color=(200, 30, 30), size=(8, 6), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


# ------------------------------------------------------------------------------------------------ MathVista
MATHVISTA_SCHEMA = pa.schema([
    ("pid", pa.string()), ("question", pa.string()), ("image", pa.string()), ("decoded_image", IMAGE),
    ("choices", pa.list_(pa.string())), ("unit", pa.string()), ("precision", pa.float64()), ("answer", pa.string()),
    ("question_type", pa.string()), ("answer_type", pa.string()),
    ("metadata", pa.struct([("category", pa.string()), ("context", pa.string()), ("grade", pa.string()),
                            ("img_height", pa.int64()), ("img_width", pa.int64()), ("language", pa.string()),
                            ("skills", pa.list_(pa.string())), ("source", pa.string()), ("split", pa.string()),
                            ("task", pa.string())])),
    ("query", pa.string()),
])


def _mv_row(pid, question, answer, qtype="free_form", atype="integer", choices=None, precision=None, unit=None,
            task="figure question answering", query=None):
    from vold_pl.data.benchmarks import mathvista_query

    return {"pid": pid, "question": question, "image": f"images/{pid}.jpg",
            "decoded_image": {"bytes": png(fmt="JPEG"), "path": f"images/{pid}.jpg"}, "choices": choices,
            "unit": unit, "precision": precision, "answer": answer, "question_type": qtype, "answer_type": atype,
            "metadata": {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
                         "img_height": 6, "img_width": 8, "language": "english", "skills": ["arithmetic reasoning"],
                         "source": "Geometry3K", "split": "testmini", "task": task},
            "query": query if query is not None else mathvista_query(
                question, qtype, atype, choices, int(precision) if precision else None, unit)}


def make_mathvista(root: Path) -> dict:
    rows = [
        _mv_row("1", "Which angle is largest?", "60", "multi_choice", "text", ["30", "45", "60", "90"],
                task="geometry problem solving"),
        _mv_row("2", "What is the length?", "1.45", atype="float", precision=2.0, unit="cm"),
        _mv_row("3", "How many cubes?", "7"),
        _mv_row("4", "List the values.", "[1, 2, 3]", atype="list", task="math word problem"),
        _mv_row("5", "What is shown?", "", atype="text"),  # empty answer: skipped
    ]
    _write(root / "data" / "testmini-00000-of-00001-6fd1ad8c.parquet", rows, MATHVISTA_SCHEMA)
    return {"published": 5, "scored": 4, "choices": {"1": ["30", "45", "60", "90"]}}


# ------------------------------------------------------------------------------------------------- MATH-V
MATHVISION_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())), ("image", pa.string()),
    ("decoded_image", IMAGE), ("answer", pa.string()), ("solution", pa.string()), ("level", pa.int64()),
    ("subject", pa.string()),
])


def _mathv_rows():
    return [
        {"id": "1001", "question": "Which shape comes next?\n<image1>", "options": ["A", "B", "C", "D", "E"],
         "image": "images/1001.jpg", "answer": "C", "solution": None, "level": 2, "subject": "logic"},
        {"id": "1002", "question": "<image1>", "options": ["2", "4", "6", "8", "10"], "image": "images/1002.jpg",
         "answer": "B", "solution": None, "level": 3, "subject": "metric geometry - area"},  # image-only
        {"id": "1003", "question": "<image1>", "options": [], "image": "images/1003.jpg", "answer": "12",
         "solution": None, "level": 4, "subject": "solid geometry"},  # image-only, free form
        {"id": "1004", "question": "How long is the side?\n<image1>", "options": [], "image": "images/1004.jpg",
         "answer": "", "solution": None, "level": 1, "subject": "arithmetic"},  # empty answer: skipped
    ]


def make_mathvision(root: Path, layout: str = "parquet") -> dict:
    rows = _mathv_rows()
    if layout == "parquet":
        for r in rows:
            r["decoded_image"] = {"bytes": png(fmt="JPEG"), "path": r["image"]}
        _write(root / "data" / "test-00000-of-00001-3532b8d3.parquet", rows, MATHVISION_SCHEMA)
    else:  # GitHub: data/test.jsonl + images/
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "images").mkdir(exist_ok=True)
        for r in rows:
            (root / r["image"]).write_bytes(png(fmt="JPEG"))
        (root / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"published": 4, "scored": 3, "choices": {"1001": list("ABCDE"), "1002": ["2", "4", "6", "8", "10"]}}


# ----------------------------------------------------------------------------------------------- MMMU-Pro
MMMU_STD_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                             ("explanation", pa.string())] + [(f"image_{k}", IMAGE) for k in range(1, 8)]
                            + [("img_type", pa.string()), ("answer", pa.string()), ("topic_difficulty", pa.string()),
                               ("subject", pa.string())])
MMMU_VISION_SCHEMA = pa.schema([("id", pa.string()), ("image", IMAGE), ("options", pa.string()),
                                ("answer", pa.string()), ("subject", pa.string())])
TEN = [f"${k}" for k in range(1, 11)]


def make_mmmu_pro(root: Path) -> dict:
    def std(rid, answer, n_images=1, subject="Accounting"):
        imgs = {f"image_{k}": ({"bytes": png((0, 0, 40 * k)), "path": None} if k <= n_images else None)
                for k in range(1, 8)}
        return {"id": rid, "question": "Compare <image 1> and <image 2>. Which price is right?", "options": str(TEN),
                "explanation": "", **imgs, "img_type": "['Tables']", "answer": answer, "topic_difficulty": "Medium",
                "subject": subject}

    _write(root / "standard (10 options)" / "test-00000-of-00001.parquet",
           [std("validation_Accounting_1", "C", n_images=2), std("validation_Art_2", "J", subject="Art"),
            std("validation_Art_3", "")], MMMU_STD_SCHEMA)  # the last: empty answer, skipped
    _write(root / "vision" / "test-00000-of-00001.parquet",
           [{"id": "validation_Math_1", "image": {"bytes": png(size=(20, 10)), "path": None}, "options": str(TEN),
             "answer": "D", "subject": "Math"}], MMMU_VISION_SCHEMA)
    return {"published": 3, "scored": 2, "choices": {"validation_Accounting_1": TEN, "validation_Art_2": TEN}}


# --------------------------------------------------------------------------------------------- LogicVista
def make_logicvista(root: Path) -> dict:
    def row(name, question, answer, skill):
        return {"imagename": f"{name}.png", "question": question, "answer": answer, "reasoning": "because",
                "skill": [skill], "capability": ["diagram"], "imagesource": "x", "sourcelink": "http://x"}

    rows = {"v1_1": row("v1_1", "Which choices in the image (A-D) belong together?", "A, C", "inductive"),
            "v1_2": row("v1_2", "What is the increase? (A) 33% (B) 17% (C) 25% (D) 50%", "D", "numerical"),
            "v1_3": row("v1_3", "", "", "spatial")}  # published empty: skipped
    (root / "data" / "images").mkdir(parents=True, exist_ok=True)
    for r in rows.values():
        (root / "data" / "images" / r["imagename"]).write_bytes(png())
    (root / "data" / "dataset.json").write_text(json.dumps(rows, indent=4))
    return {"published": 3, "scored": 2, "choices": {"v1_2": ["33%", "17%", "25%", "50%"]}}


def make_all(base: Path) -> dict[str, dict]:
    """The four benchmarks under ``base`` at the shipped config's relative paths (``data/benchmarks/...``)."""
    b = base / "data" / "benchmarks"
    return {"mathvista": make_mathvista(b / "MathVista"), "mathvision": make_mathvision(b / "MATH-V", "github"),
            "mmmu_pro": make_mmmu_pro(b / "MMMU_Pro"), "logicvista": make_logicvista(b / "LogicVista")}
