"""Data sources: a validated JSONL file or a ``datasets`` directory, as a ``datasets.Dataset`` with images.

Images are an ``Image()`` feature (decoded to PIL on access), so the same code reads local files and
folders written with ``save_to_disk``, offline (``HF_DATASETS_OFFLINE=1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vold_pl.data.schema import ALL_FIELDS, Record, RecordError, read_jsonl, validate_record


@dataclass
class DataSource:
    """One source of a mix.

    Args:
        path: a JSONL file in the record schema (``vold_pl/data/schema.py``) or a ``save_to_disk`` folder.
        weight: relative share of this source in each epoch of the mix.
        name: label in logs and reports; defaults to the file name.
        limit: use only the first ``limit`` records (quick runs).
        answer_types: keep only these answer types (e.g. ``[yesno]`` for a curriculum stage).
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    limit: int | None = None
    answer_types: list[str] | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name.split(".")[0]


def _features():
    from datasets import Features, Image, List, Value

    return Features({
        "id": Value("string"), "problem": Value("string"), "answer": Value("string"),
        "answer_type": Value("string"), "images": List(Image()), "choices": List(Value("string")),
        "trace": Value("string"), "text_view": Value("string"), "difficulty": Value("int32"),
        "source": Value("string"), "category": Value("string"),
        # The files behind ``images``, kept so writers (traces, rejection sampling) can re-emit records.
        "image_paths": List(Value("string")),
    })


def read_records(path: str | Path, on_bad_record: str = "error") -> tuple[list[Record], list[str]]:
    """Validated records of a JSONL file or a ``datasets`` folder; ``(records, skipped messages)``."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        records, skipped = [], []
        for i, row in enumerate(ds.cast_column("images", _image_paths_feature()) if "images" in ds.column_names else ds):
            row = {k: v for k, v in row.items() if k in ALL_FIELDS}
            row["images"] = [im["path"] if isinstance(im, dict) else im for im in row.get("images") or []]
            try:
                records.append(validate_record(row, path, i))
            except RecordError as e:
                if on_bad_record == "error":
                    raise
                skipped.append(str(e))
        return records, skipped
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}. Generate the synthetic data with "
                                "`python -m vold_pl.data.synthetic --out <dir>` or point 'path' at your JSONL file.")
    return read_jsonl(path, on_bad_record=on_bad_record)


def _image_paths_feature():
    from datasets import Image, List

    return List(Image(decode=False))


def to_dataset(records: list[Record]):
    """Records → ``datasets.Dataset`` whose ``images`` column decodes to PIL images."""
    from datasets import Dataset

    rows = [r.to_json() for r in records]
    for r in rows:
        r["choices"] = r["choices"] or []
        r["image_paths"] = list(r["images"])
    return Dataset.from_list(rows, features=_features())


def load_source(src: DataSource, on_bad_record: str = "error"):
    """``(dataset, skipped messages)`` for one source, filtered and limited as configured."""
    records, skipped = read_records(src.path, on_bad_record)
    if src.answer_types:
        records = [r for r in records if r.answer_type in src.answer_types]
    if src.limit is not None:
        records = records[: src.limit]
    if not records:
        raise ValueError(f"data source {src.path} has no usable records"
                         + (f" of answer types {src.answer_types}" if src.answer_types else "") + ".")
    return to_dataset(records), skipped
