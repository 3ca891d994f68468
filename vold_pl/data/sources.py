"""Data sources: files in the record schema or in chat ``messages``, as a ``datasets.Dataset`` with images.

A source's ``path`` may be

- a JSONL file (read line by line: every error names the line);
- any file ``datasets.load_dataset`` reads by its extension: ``.parquet``, ``.json``, ``.arrow``, ``.csv``
  (errors name the 0-based row);
- a folder: one written with ``save_to_disk``, or a folder of such files;
- a hub data set id (``open-r1/Mixture-of-Thoughts``) when it is not a local path, downloaded by ``datasets``
  (only online: with ``HF_DATASETS_OFFLINE=1`` download it first and give the folder).

Two formats:

- ``records`` (default): rows hold the schema's fields (``vold_pl/data/schema.py``), possibly under other
  column names (``fields: {problem: question, answer: solution}``). A JSONL file without ``fields`` is checked
  strictly (an unknown key is an error); other inputs keep the schema's columns and ignore the rest.
- ``messages``: chat rows as published for reasoning SFT (Mixture-of-Thoughts, OpenThoughts, ...): a
  ``messages`` list of ``{role, content}`` turns. The first ``user`` turn is the ``problem``; the ``assistant``
  turn after it gives the ``trace`` (the text inside ``<think> ... </think>``) and the ``answer`` (the last
  ``\\boxed{...}`` after ``</think>``, or an ``answer`` column when ``fields`` maps one). Rows lacking an id get
  ``<label>-<row>``.

Every row then goes through :func:`~vold_pl.data.schema.validate_record`, so a bad row is named by file, row
(or line) and field, and ``on_bad_record: skip`` skips it. Images may be paths (relative to the data file's
folder) or embedded bytes (``datasets.Image`` cells), which are written once under ``image_dir``.

Images are an ``Image()`` feature of the returned data set (decoded to PIL on access).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from vold_pl.data.schema import (
    ALL_FIELDS,
    Record,
    RecordCollector,
    RecordError,
    iter_jsonl,
    origin_of,
    read_jsonl,
    validate_record,
)
from vold_pl.errors import UserError, UserFileNotFoundError

# Extensions ``datasets.load_dataset`` reads as local files, and the builder that reads each.
TABLE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}
MESSAGE_FIELDS = ("messages",)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass
class DataSource:
    """One source of a mix.

    Args:
        path: a JSONL file in the record schema (``vold_pl/data/schema.py``), a ``.parquet`` / ``.json`` /
            ``.arrow`` / ``.csv`` file, a folder (``save_to_disk`` or data files), or a hub data set id (online).
        weight: relative share of this source in each epoch of the mix.
        name: label in logs and reports; defaults to the file name.
        limit: use only the first ``limit`` records (quick runs).
        answer_types: keep only these answer types (e.g. ``[yesno]`` for a curriculum stage).
        format: ``records`` (rows in the record schema) or ``messages`` (chat turns with ``<think>`` reasoning,
            as in Mixture-of-Thoughts).
        fields: schema field -> column name in the file, for columns named otherwise (e.g.
            ``{problem: question, id: uuid}``; with ``format: messages`` also ``messages: conversations``).
        answer_type: the answer type of rows without an ``answer_type`` column (``math``: the answer is the last
            ``\\boxed{}`` of the assistant turn; ``open``: the whole text after ``</think>`` when there is no box).
        split: the split of a hub data set or of a folder holding several.
        subset: the configuration (subset) of a hub data set, e.g. ``math`` of Mixture-of-Thoughts; empty for
            its default.
        image_dir: where embedded image bytes are written as files; empty: ``images_cache/<label>`` next to the
            data file (in the working directory for a hub id).
    """

    path: str
    weight: float = 1.0
    name: str | None = None
    limit: int | None = None
    answer_types: list[str] | None = None
    format: Literal["records", "messages"] = "records"
    fields: dict[str, str] = field(default_factory=dict)
    answer_type: str = "math"
    split: str = "train"
    subset: str = ""
    image_dir: str = ""

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
        # Where each record was read (``<file>:<line>`` / ``<file> row <n>``), for errors met at batch time.
        "origin": Value("string"),
    })


def _is_jsonl(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".jsonl"


def read_records(path: str | Path, on_bad_record: str = "error", check_images: bool | str = "decode",
                 src: DataSource | None = None) -> tuple[list[Record], list[str]]:
    """Validated records of a source (see the module docstring for what ``path`` may be);
    ``(records, skipped messages)``. ``src`` carries the format and field options (default: ``records``)."""
    src = src or DataSource(str(path))
    path = Path(path)
    unknown = sorted(set(src.fields) - set(ALL_FIELDS) - set(MESSAGE_FIELDS))
    if unknown:
        raise UserError(f"data source {src.path}: 'fields' maps {unknown[0]!r}, which is not a record field. Map "
                        f"record fields ({', '.join(ALL_FIELDS + MESSAGE_FIELDS)}) to your column names.")
    if src.format == "records" and not src.fields and _is_jsonl(path):
        return read_jsonl(path, on_bad_record=on_bad_record, check_images=check_images)
    rows, base_dir = _raw_rows(src, path)
    def validate(obj: Any, where: Any) -> Record:
        return validate_record(_adapt(obj, src, path, where, base_dir), path, where, base_dir=base_dir,
                               check_images=check_images)

    out = RecordCollector(on_bad_record, validate, lambda where: origin_of(path, where),
                          duplicate_hint=" (map an id column with fields: {id: <column>})")
    for where, obj in rows:
        out.add(obj, where)
        if src.limit is not None and not src.answer_types and len(out.records) >= src.limit:
            break  # a quick run over a large file reads only what it uses
    return out.records, out.skipped


# ------------------------------------------------------------------------------------------------ reading rows

def _raw_rows(src: DataSource, path: Path) -> tuple[Iterator[tuple[int | str, Any]], Path]:
    """``((where, row) iterator, folder that relative image paths start from)``; ``where`` is a JSONL line
    number or ``"row <n>"``."""
    if _is_jsonl(path):
        return iter_jsonl(path), path.parent
    ds = _load_table(src, path)
    base = path if path.is_dir() else path.parent if path.exists() else Path.cwd()
    return _table_rows(ds), base


def _load_table(src: DataSource, path: Path):
    import datasets

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"data source {path}: cannot read a '{path.suffix}' file. Use JSONL (the record schema) "
                            f"or one of {', '.join(sorted(TABLE_BUILDERS))}.")
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow / json parse errors of many kinds
            raise UserError(f"data source {path}: not a readable {builder} file ({type(e).__name__}: "
                            f"{str(e)[:300]}). Check the file, or convert it to JSONL.") from None
    elif path.is_dir():
        ds = _load_or_explain(src, str(path), lambda: datasets.load_dataset(str(path), split=src.split))
    elif _looks_like_hub_id(src.path):
        ds = _load_or_explain(src, src.path, lambda: datasets.load_dataset(src.path, src.subset or None,
                                                                         split=src.split))
    else:
        raise UserFileNotFoundError(
            f"data source not found: {path}. Generate the synthetic data with `python -m vold_pl.data.synthetic "
            "--out <dir>` or point 'path' at your JSONL / parquet file, folder or hub data set id.")
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise UserError(f"data source {src.path} has no split {src.split!r} (splits: {', '.join(ds)}). Set "
                            "'split' to one of them.")
        ds = ds[src.split]
    missing = sorted({col for f, col in src.fields.items()} - set(ds.column_names))
    if missing:
        raise UserError(f"data source {src.path}: 'fields' names column {missing[0]!r}, which the data does not "
                        f"have (columns: {', '.join(ds.column_names)}).")
    # Image cells as {bytes, path}, not decoded: paths are checked (and bytes written) like any image.
    for name, feat in ds.features.items():
        if _is_image_feature(feat):
            ds = ds.cast_column(name, _undecoded(feat))
    return ds


def _is_image_feature(feat) -> bool:
    from datasets import Image

    return isinstance(feat, Image) or isinstance(getattr(feat, "feature", None), Image)


def _undecoded(feat):
    from datasets import Image, List

    return Image(decode=False) if isinstance(feat, Image) else List(Image(decode=False))


def _looks_like_hub_id(s: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None and not s.endswith(tuple(TABLE_BUILDERS))


def _load_or_explain(src: DataSource, what: str, load):
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - offline, not found, gated: one message with the fix
        raise UserError(
            f"data source {what}: cannot load it with datasets.load_dataset ({type(e).__name__}: {str(e)[:300]}). "
            f"For a hub data set, download it while online (`huggingface-cli download {src.path} --repo-type "
            "dataset --local-dir <dir>`) and set 'path' to that folder's file(s); otherwise check the path.") from None


def _table_rows(ds) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(ds):
        yield f"row {i}", row


# ------------------------------------------------------------------------------------------------ adapting rows

def _adapt(obj: Any, src: DataSource, path: Path, where, base_dir: Path) -> Any:
    """A raw row as a record dict (field names of the schema), before validation."""
    if not isinstance(obj, dict):
        return obj  # validate_record names the problem
    if src.format == "messages":
        out = _from_messages(obj, src, path, where)
    else:  # the schema's fields, found under their mapped names; other columns are not the schema's business
        out = {f: obj[src.fields.get(f, f)] for f in ALL_FIELDS if src.fields.get(f, f) in obj}
    for f in ("id", "answer"):  # tables often store ids and numeric answers as numbers
        if isinstance(out.get(f), (int, float)) and not isinstance(out.get(f), bool):
            out[f] = str(out[f])
    if out.get("id") is None:
        out["id"] = f"{src.label}-{where if isinstance(where, int) else str(where).split()[-1]}"
    if "images" in out:
        out["images"] = _image_paths(out["images"], src, path, where, out.get("id"), base_dir)
    if "choices" in out and out["choices"] == [] and out.get("answer_type") != "choice":
        out["choices"] = None  # tables store a missing list as []
    return out


def _from_messages(row: dict, src: DataSource, path: Path, where) -> dict:
    def fail(problem: str, fix: str) -> RecordError:
        rid = row.get(src.fields.get("id", "id"))
        return RecordError(f"{origin_of(path, where)}" + (f" (id={rid!r})" if rid is not None else "")
                           + f": field '{col}': {problem}. {fix}")

    col = src.fields.get("messages", "messages")
    msgs = row.get(col)
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise fail(f"expected a list of {{role, content}} turns, got {type(msgs).__name__}",
                   "Point fields: {messages: <column>} at the chat column, or use format: records.")
    user = next((i for i, m in enumerate(msgs) if m.get("role") == "user"), None)
    if user is None:
        raise fail("no 'user' turn", "The first user turn is the problem; every row needs one.")
    problem = _content_text(msgs[user].get("content"))
    if problem is None:
        raise fail("the user turn's content is not text", "Only text turns are read; image problems need the "
                                                           "records format with an 'images' field.")
    reply = next((m for m in msgs[user + 1:] if m.get("role") == "assistant"), None)
    reply_text = _content_text(reply.get("content")) if reply is not None else None
    trace, final = None, reply_text
    if reply_text is not None:
        m = _THINK_RE.search(reply_text)
        if m:
            trace, final = m.group(1).strip() or None, reply_text[m.end():]
        elif "</think>" in reply_text:  # templates that open the think block in the prompt
            head, _, final = reply_text.partition("</think>")
            trace = head.strip() or None
    out = {f: row[src.fields.get(f, f)] for f in ALL_FIELDS
           if f not in ("problem", "trace") and src.fields.get(f, f) in row}
    out.setdefault("answer_type", src.answer_type)
    if out.get("answer") is None:
        from vold_pl.rewards.extract import find_boxed

        if final is None:
            raise fail("no assistant turn after the user turn, and no answer column",
                       "Add the assistant's reply, or map an answer column with fields: {answer: <column>}.")
        boxed = find_boxed(final)
        if boxed is not None:
            out["answer"] = boxed
        elif out["answer_type"] == "open" and final.strip():
            out["answer"] = final.strip()
        else:
            raise fail("no \\boxed{...} final answer after </think> in the assistant turn",
                       "Map an answer column with fields: {answer: <column>}, or set answer_type: open to take the "
                       "whole text after </think> as the answer.")
    out["problem"], out["trace"] = problem, trace
    out.setdefault("source", src.label)
    return out


def _content_text(content: Any) -> str | None:
    """A turn's text: a string, or the ``text`` parts of an OpenAI-style list of parts (``None`` if an image
    part is present or nothing is text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") not in (None, "text") for p in content):
            return None
        texts = [p.get("text") for p in content]
        return "\n".join(texts) if texts and all(isinstance(t, str) for t in texts) else None
    return None


def _image_paths(value: Any, src: DataSource, path: Path, where, rid, base_dir: Path) -> Any:
    """Image cells (paths, ``{bytes, path}`` dicts, PIL images; one or a list) as file paths; embedded bytes are
    written once under the source's image folder. Anything else is returned for validation to name."""
    items = value if isinstance(value, list) else [value] if value is not None else []
    out = []
    for k, v in enumerate(items):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict) and (v.get("bytes") or v.get("path")):
            p = v.get("path")
            if p and not v.get("bytes") or p and _is_file(Path(p) if Path(p).is_absolute() else base_dir / p):
                out.append(p)  # a file on disk (validation says so if it is missing)
            else:
                out.append(_write_image(v["bytes"], src, path, where, rid, k))
        elif hasattr(v, "save") and hasattr(v, "size"):  # a decoded PIL image
            import io

            buf = io.BytesIO()
            v.save(buf, format="PNG")
            out.append(_write_image(buf.getvalue(), src, path, where, rid, k))
        else:
            return value
    return out


def _is_file(p: Path) -> bool:
    """``p.is_file()``, False where the file system refuses the path (too long, no permission, a NUL byte)."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def _write_image(data: bytes, src: DataSource, path: Path, where, rid, k: int) -> str:
    import hashlib

    from vold_pl.data.benchmarks import _save_image

    folder = Path(src.image_dir) if src.image_dir else (
        (path.parent if path.is_file() else path if path.is_dir() else Path.cwd()) / "images_cache" / src.label)
    stem = folder / f"{hashlib.sha256(data).hexdigest()[:24]}"  # content-addressed: rereads reuse the file

    def fail(fname: str, problem: str, fix: str) -> RecordError:
        return RecordError(f"{origin_of(path, where)} (id={rid!r}): field '{fname}': {problem} (image {k}). {fix}")

    return _save_image({"bytes": data}, stem, fail, "images")


# ------------------------------------------------------------------------------------------------ to datasets

def to_dataset(records: list[Record]):
    """Records → ``datasets.Dataset`` whose ``images`` column decodes to PIL images."""
    from datasets import Dataset

    rows = []
    for r in records:
        row = r.to_json()
        row["choices"] = row["choices"] or []
        row["image_paths"] = list(row["images"])
        row["origin"] = r.origin
        rows.append(row)
    return Dataset.from_list(rows, features=_features())


def load_source(src: DataSource, on_bad_record: str = "error", check_images: bool | str = "decode"):
    """``(dataset, skipped messages)`` for one source, filtered and limited as configured."""
    records, skipped = read_records(src.path, on_bad_record, check_images=check_images, src=src)
    if src.answer_types:
        records = [r for r in records if r.answer_type in src.answer_types]
    if src.limit is not None:
        records = records[: src.limit]
    if not records:
        raise UserError(f"data source {src.path} has no usable records"
                        + (f" of answer types {src.answer_types}" if src.answer_types else "")
                        + (f" ({len(skipped)} skipped as malformed)" if skipped else "") + ".")
    return to_dataset(records), skipped
