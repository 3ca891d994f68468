"""Property-based tests of untrusted input (hypothesis, seeded and bounded): record fields, chat ``messages`` rows,
image bytes and reward strings. Every input ends as a loaded record, a counted skip, or a ``UserError`` naming
the file and line (and the field, where there is one) — never another exception."""

from __future__ import annotations

import io
import json
import math
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vold_pl.data.schema import ALL_FIELDS, ANSWER_TYPES, Record, RecordError, read_jsonl
from vold_pl.data.sources import DataSource, read_records
from vold_pl.errors import UserError

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_WORK = Path(tempfile.mkdtemp(prefix="vold_pl_fuzz_"))

json_leaf = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=30)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=10)
field_value = {
    "id": st.text(max_size=12) | json_value, "problem": st.text(max_size=40) | json_value,
    "answer": st.sampled_from(["yes", "no", "A", "B,C", "[1, 2, 3, 4]", "3/4", "dog, cat", ""]) | json_value,
    "answer_type": st.sampled_from(ANSWER_TYPES) | json_value,
    "images": st.lists(st.sampled_from(["ok.png", "missing.png", "", "/", "..", "a\u0000b", "x" * 300,
                                        "bad.png"]) | json_value, max_size=3) | json_value,
    "choices": st.lists(st.text(max_size=6), max_size=4) | json_value,
    "difficulty": st.integers(-2, 5) | json_value,
}
VALID = [  # one valid record of each answer type; the fuzz changes or drops a few fields of one
    {"id": "m", "problem": "2+2?", "answer": "4", "answer_type": "math", "trace": "add", "difficulty": 1},
    {"id": "y", "problem": "Red?", "answer": "yes", "answer_type": "yesno", "images": ["ok.png"]},
    {"id": "c", "problem": "Which?", "answer": "B", "answer_type": "choice", "choices": ["1", "2", "3"]},
    {"id": "o", "problem": "What?", "answer": "a square", "answer_type": "open", "text_view": "a picture"},
    {"id": "b", "problem": "Where?", "answer": "[1, 2, 3, 4]", "answer_type": "bbox", "images": ["ok.png"]},
    {"id": "l", "problem": "Which?", "answer": "dog, cat", "answer_type": "multilabel", "category": "pets"},
]


@st.composite
def records(draw):
    obj = dict(draw(st.sampled_from(VALID)))
    for k in draw(st.lists(st.sampled_from((*ALL_FIELDS, "unknown_key")), max_size=2, unique=True)):
        if k in obj and draw(st.booleans()):
            del obj[k]
        else:
            obj[k] = draw(field_value.get(k, json_value))
    return obj


def _setup_images() -> None:
    from PIL import Image

    Image.new("RGB", (28, 28), (10, 200, 30)).save(_WORK / "ok.png")
    (_WORK / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


_setup_images()


def _ends_well(path: Path, read) -> None:
    """``read(on_bad_record)`` over the one-record file ``path``: a record, or a RecordError naming the file and
    line, and the same input under ``skip`` is one counted skip with that message."""
    try:
        recs, skipped = read("error")
    except RecordError as e:
        text = str(e)
        assert f"{path}:1" in text or f"{path} row 0" in text, text
        whole_line = any(s in text for s in ("not valid JSON", "not UTF-8", "must be a JSON object"))
        assert whole_line or "field '" in text, text
        assert "\n" not in text.strip() or "Traceback" not in text
        recs, skipped = read("skip")
        assert recs == [] and skipped == [text]
        return
    except UserError as e:  # a source-level problem (e.g. a table that does not parse): it must name the file
        assert str(path) in str(e), str(e)
        return
    assert len(recs) == 1 and skipped == [] and isinstance(recs[0], Record)
    for p in recs[0].images:
        assert Path(p).is_file()


@FUZZ
@given(records())
def test_record_fields(obj):
    path = _WORK / "records.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    _ends_well(path, lambda mode: read_jsonl(path, on_bad_record=mode))


image_path = (st.sampled_from(["ok.png", "missing.png", "", ".", "/", "..", "bad.png", "ok.png/", "a\u0000b.png",
                               "x" * 300 + ".png", "/".join(["d" * 250] * 20), "/proc/self/mem", "/dev/null"])
              | st.text(max_size=300) | st.text(alphabet="x/.\u0000", max_size=600))


@FUZZ
@given(st.lists(image_path, min_size=1, max_size=3))
def test_image_paths(paths):
    path = _WORK / "paths.jsonl"
    path.write_text(json.dumps({**VALID[1], "images": paths}) + "\n")
    _ends_well(path, lambda mode: read_jsonl(path, on_bad_record=mode))


@FUZZ
@given(st.binary(min_size=1, max_size=200).filter(lambda b: b"\n" not in b and b.strip()))
def test_raw_lines(raw):
    path = _WORK / "raw.jsonl"
    path.write_bytes(raw + b"\n")
    _ends_well(path, lambda mode: read_jsonl(path, on_bad_record=mode))


content = st.text(max_size=60) | st.sampled_from(["<think>so</think> \\boxed{4}", "\\boxed{", "</think>x",
                                                  "<think>a</think>", "\\boxed{\\frac{1}{2}}"]) | json_value
turn = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_value,
                                           "content": content | st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["text", "image"]),
                                                "text": content}), max_size=2)})
messages_rows = st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_value},
                                      optional={"id": json_value, "answer": json_value,
                                                "answer_type": st.sampled_from(ANSWER_TYPES) | json_value,
                                                "images": json_value})


@FUZZ
@given(messages_rows, st.sampled_from(["math", "open"]))
def test_messages_rows(row, answer_type):
    path = _WORK / "messages.jsonl"
    path.write_text(json.dumps(row) + "\n")
    src = DataSource(str(path), format="messages", answer_type=answer_type)
    _ends_well(path, lambda mode: read_records(path, on_bad_record=mode, src=src))


def _png_bytes(draw_size: int, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (draw_size, max(1, draw_size // 3))).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["random", "mutated", "truncated", "valid"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    base = _png_bytes(draw(st.integers(1, 40)), draw(st.sampled_from(["RGB", "L", "I;16", "P", "RGBA", "1", "LA"])))
    if kind == "valid":
        return base
    if kind == "truncated":
        return base[: draw(st.integers(0, len(base)))]
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):  # keep the CRCs valid, so only the content is wrong
        data = _fix_crcs(bytes(data))
    return bytes(data)


def _fix_crcs(png: bytes) -> bytes:
    out, i = bytearray(png[:8]), 8
    while i + 8 <= len(png):
        n = int.from_bytes(png[i:i + 4], "big")
        kind, body = png[i + 4:i + 8], png[i + 8:i + 8 + n]
        out += png[i:i + 8] + body + (zlib.crc32(kind + body) & 0xFFFFFFFF).to_bytes(4, "big")
        i += 12 + n
    return bytes(out + png[i:])


@FUZZ
@given(image_bytes(), st.sampled_from(["decode", "header"]))
def test_image_bytes(data, check):
    img = _WORK / "fuzz.png"
    img.write_bytes(data)
    path = _WORK / "image.jsonl"
    path.write_text(json.dumps({"id": "r", "problem": "What is it?", "answer": "yes", "answer_type": "yesno",
                                "images": ["fuzz.png"]}) + "\n")
    _ends_well(path, lambda mode: read_jsonl(path, on_bad_record=mode, check_images=check))
    if check == "decode":
        try:
            recs, _ = read_jsonl(path, check_images="decode")
        except RecordError:
            return
        from PIL import Image

        from vold_pl.data.images import to_rgb

        with Image.open(recs[0].images[0]) as im:  # what the collator will do with it
            assert to_rgb(im).mode == "RGB"


completion = st.text(max_size=80) | st.builds(
    lambda a, b, c: f"<think>{a}</think> {b}\\boxed{{{c}}}", st.text(max_size=20), st.text(max_size=10),
    st.text(max_size=15) | st.sampled_from(["1e999", "nan", "inf", "\\frac{1}{0}", "10^{10^{10}}", "[1,2,3,4]",
                                             "A, B", "yes", "9" * 400]))
REWARD_RECORDS = [Record(id="m", problem="?", answer="3/4", answer_type="math"),
                  Record(id="y", problem="?", answer="yes", answer_type="yesno"),
                  Record(id="c", problem="?", answer="B", answer_type="choice", choices=["x", "y", "z"]),
                  Record(id="o", problem="?", answer="a red square", answer_type="open"),
                  Record(id="b", problem="?", answer="[1, 2, 30, 40]", answer_type="bbox"),
                  Record(id="l", problem="?", answer="dog, cat", answer_type="multilabel")]


@settings(max_examples=80, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(completion)
def test_reward_strings(text):
    """Every built-in reward scores any completion as a finite number, without raising (compute_rewards would
    count a raise as an error; a built-in must not need that)."""
    from vold_pl.rewards.functions import get_reward, list_rewards

    for name in list_rewards():
        for rec in REWARD_RECORDS:
            v = get_reward(name)(text, rec)
            assert isinstance(v, (int, float)) and math.isfinite(v), (name, rec.answer_type, text, v)


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    import shutil

    shutil.rmtree(_WORK, ignore_errors=True)
