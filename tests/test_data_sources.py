"""Real data in: chat ``messages`` files shaped like Mixture-of-Thoughts, parquet benchmark files with embedded
images and other column names, processor pixel bounds, and the check of trace lengths against ``max_length`` /
``max_new_tokens``. Every file is written by the test (no hub access)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vold_pl.data.collate import IGNORE_INDEX, PromptCollator, SFTCollator
from vold_pl.data.datamodule import ReasoningDataModule, prompt_lengths
from vold_pl.data.schema import RecordError
from vold_pl.data.sources import DataSource, read_records
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec, load_processor

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _mot_row(i: int, answer: str | None = None, reasoning: str | None = None) -> dict:
    """One row as Mixture-of-Thoughts publishes it: a system prompt, the user's problem, the assistant's
    ``<think>`` reasoning and a boxed answer, plus the data set's own metadata columns."""
    reasoning = reasoning or f"We add {i} and {i}. That gives {2 * i}."
    final = f"The sum is \\boxed{{{2 * i}}}." if answer is None else answer
    return {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{final}"}],
        "num_tokens": 40 + i, "source": "math"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mixture_of_thoughts_messages_load_through_the_data_module(tmp_path, tiny_models, monkeypatch):
    rows = [_mot_row(i) for i in range(6)]
    rows[3] = _mot_row(3, answer="I am not sure.")  # no boxed answer: a named, skippable record
    path = _write_jsonl(tmp_path / "mot_math.jsonl", rows)
    with pytest.raises(RecordError) as ei:
        read_records(path, src=DataSource(str(path), format="messages"))
    text = str(ei.value)
    assert f"{path}:4" in text and "field 'messages'" in text and "\\boxed" in text and "answer_type: open" in text

    monkeypatch.chdir(tmp_path)
    src = DataSource(str(path), format="messages")
    dm = ReasoningDataModule(train=[src], processor=str(tiny_models["student"]), collate="sft", batch_size=5,
                             max_length=256, on_bad_record="skip")
    dm.setup("fit")
    ds = dm.datasets["train"]
    got = [ds[i] for i in range(len(ds))]
    assert [r["id"] for r in got] == ["mot_math-1", "mot_math-2", "mot_math-3", "mot_math-5", "mot_math-6"]
    first = got[0]
    assert first["problem"] == "What is 0 + 0?" and first["answer"] == "0" and first["answer_type"] == "math"
    assert first["trace"] == "We add 0 and 0. That gives 0." and first["source"] == "math"
    assert first["origin"] == f"{path}:1" and len(dm.skipped) == 1 and f"{path}:4" in dm.skipped[0]

    batch = next(iter(dm.train_dataloader()))
    tok = dm._processor().tokenizer
    learned = [tok.decode([t for t in row if t != IGNORE_INDEX]) for row in batch["labels"].tolist()]
    by_id = {r["id"]: r for r in got}
    for rec, text in zip(batch["records"], learned):
        assert by_id[rec["id"]]["trace"] in text and f"<answer> {by_id[rec['id']]['answer']} </answer>" in text

    # answer_type open takes the whole text after </think> when it has no box; an answer column wins over both
    src = DataSource(str(path), format="messages", answer_type="open", limit=4)
    recs, _ = read_records(path, src=src)
    assert recs[3].answer == "I am not sure." and recs[0].answer == "0"  # a box still wins
    with_answers = [dict(r, gold=str(100 + i)) for i, r in enumerate(rows)]
    path2 = _write_jsonl(tmp_path / "with_gold.jsonl", with_answers)
    recs, _ = read_records(path2, src=DataSource(str(path2), format="messages", fields={"answer": "gold"}))
    assert [r.answer for r in recs] == [str(100 + i) for i in range(6)]


def test_messages_parquet_and_row_errors(tmp_path):
    from datasets import Dataset

    rows = [_mot_row(i) for i in range(4)]
    rows[2] = {"messages": [{"role": "assistant", "content": "<think>x</think> \\boxed{1}"}], "num_tokens": 3,
               "source": "math"}
    path = tmp_path / "mot.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(RecordError, match=rf"{path} row 2: field 'messages': no 'user' turn"):
        read_records(path, src=DataSource(str(path), format="messages"))
    recs, skipped = read_records(path, "skip", src=DataSource(str(path), format="messages"))
    assert [r.id for r in recs] == ["mot-0", "mot-1", "mot-3"] and len(skipped) == 1
    assert recs[1].origin == f"{path} row 1"


def _png_bytes(w: int, h: int, color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _benchmark_parquet(path: Path, bad_row: int | None = None) -> Path:
    """A benchmark shard as published on the hub: its own column names, images embedded as bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(4):
        rows.append({"pid": f"q{i}", "question": f"Which color fills image {i}?", "options": ["red", "green", "blue"],
                     "gold": "ABC"[i % 3] if i != bad_row else "Z", "kind": "choice",
                     "image": {"bytes": _png_bytes(60 + i, 40, (255 * (i % 2), 0, 0)), "path": f"img{i}.png"}})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_benchmark_loads_through_the_data_module(tmp_path, tiny_models):
    path = _benchmark_parquet(tmp_path / "test-00000-of-00001.parquet")
    fields = {"id": "pid", "problem": "question", "choices": "options", "answer": "gold", "answer_type": "kind",
              "images": "image"}
    src = DataSource(str(path), name="bench", fields=fields, image_dir=str(tmp_path / "imgs"))
    dm = ReasoningDataModule(val=[src], processor=str(tiny_models["student"]), collate="prompt", val_batch_size=4)
    dm.setup("validate")
    ds = dm.datasets["val"]
    assert [ds[i]["id"] for i in range(4)] == ["q0", "q1", "q2", "q3"]
    assert ds[1]["answer"] == "B" and ds[1]["choices"] == ["red", "green", "blue"]
    files = sorted((tmp_path / "imgs").iterdir())
    assert len(files) == 4 and all(f.suffix == ".png" for f in files)  # the embedded bytes, written once each
    assert ds[2]["images"][0].size == (62, 40)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape == (4, 3)
    assert [r["origin"] for r in batch["records"]] == [f"{path} row {i}" for i in range(4)]

    bad = _benchmark_parquet(tmp_path / "bad.parquet", bad_row=2)
    with pytest.raises(RecordError) as ei:
        read_records(bad, src=DataSource(str(bad), fields=fields, image_dir=str(tmp_path / "imgs")))
    assert f"{bad} row 2 (id='q2'): field 'answer'" in str(ei.value)


def test_source_options_that_cannot_work_are_named(tmp_path):
    path = _benchmark_parquet(tmp_path / "b.parquet")
    with pytest.raises(UserError, match="'fields' names column 'prompt'.*columns: pid, question"):
        read_records(path, src=DataSource(str(path), fields={"problem": "prompt"}))
    with pytest.raises(UserError, match="'fields' maps 'question', which is not a record field"):
        read_records(path, src=DataSource(str(path), fields={"question": "question"}))
    odd = tmp_path / "data.xlsx"
    odd.write_bytes(b"PK")
    with pytest.raises(UserError, match=r"cannot read a '\.xlsx' file"):
        read_records(odd, src=DataSource(str(odd)))
    # a hub id with the hub unreachable (HF_DATASETS_OFFLINE=1): what to download, and how
    with pytest.raises(UserError, match=r"no-such-org/no-such-set.*huggingface-cli download no-such-org/no-such-set"):
        read_records("no-such-org/no-such-set", src=DataSource("no-such-org/no-such-set", format="messages"))


def test_min_and_max_pixels_bound_the_image_tokens(tmp_path, tiny_models):
    from PIL import Image

    img = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (0, 0, 255)).save(img)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "problem": "Color?", "answer": "blue",
                                                "answer_type": "open", "images": ["big.png"]}])
    dm = ReasoningDataModule(train=[DataSource(str(path))])
    dm.setup("fit")
    ds = dm.datasets["train"].datasets[0]
    student = str(tiny_models["student"])
    default = load_processor(ModelSpec(student))
    small = load_processor(ModelSpec(student, min_pixels=56 * 56, max_pixels=56 * 56))
    n_default, n_small = prompt_lengths(default, ds)[0], prompt_lengths(small, ds)[0]
    # Qwen's resize keeps the aspect in multiples of 28 px under the pixel cap: the tiny folder's 12544 px turn
    # 300x200 into 112x84 (4x3 merged patches = 12 tokens); 3136 px into 56x28 (2x1 = 2 tokens)
    assert n_default - n_small == 12 - 2
    batch = PromptCollator(small)([ds[0]])
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4]] and batch["input_ids"].shape[1] == n_small
    with pytest.raises(UserError, match="min_pixels <= max_pixels"):
        load_processor(ModelSpec(student, min_pixels=5000, max_pixels=4000))


def test_trace_lengths_are_checked_against_max_length_and_max_new_tokens(tmp_path, tiny_models, capsys):
    long_trace = " ".join(f"step {i}: add one more square." for i in range(40))
    rows = [{"id": f"r{i}", "problem": f"How many squares in set {i}?", "answer": str(i), "answer_type": "math",
             "trace": long_trace if i < 6 else "Count them."} for i in range(8)]
    path = _write_jsonl(tmp_path / "traces.jsonl", rows)
    student = str(tiny_models["student"])

    def setup(collate: str, max_length: int, max_new_tokens: int = 0) -> str:
        dm = ReasoningDataModule(train=[DataSource(str(path))], processor=student, collate=collate,
                                 max_length=max_length)
        if max_new_tokens:  # what an OPD-GRPO module attached by the trainer exposes (the DataConsumer contract)
            dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(
                processor=None, collate_mode="prompt", completion_budget=max_new_tokens, teacher_tokenizer=None),
                log_dir=str(tmp_path))
        dm.setup("fit")
        return capsys.readouterr().err

    err = setup("sft", 128)
    assert "6 of 8 sampled traces are longer than data.max_length=128 tokens" in err, err
    assert "Raise data.max_length to about" in err
    assert "sampled traces" not in setup("sft", 1024)
    err = setup("prompt", 1024, max_new_tokens=32)
    assert "6 of 8 sampled traces are longer than model.sampling.max_new_tokens=32" in err, err
    assert "sampled traces" not in setup("prompt", 1024, max_new_tokens=4096)
    # a trace's own SFT target is cut where max_length ends, with the cut counted
    proc = load_processor(ModelSpec(student))
    batch = SFTCollator(proc, max_length=100)([dict(rows[0], images=[])])
    assert batch["input_ids"].shape[1] == 100 and batch["truncated"] == 1
    assert torch.equal(batch["labels"][0, -1:], batch["input_ids"][0, -1:])
