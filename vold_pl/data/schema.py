"""The one record schema every reasoning example in vold-pl follows.

A data file is JSONL (one JSON object per line) or an HF ``datasets`` directory saved with
``save_to_disk``. Each record:

==============  ===========================  ==========================================================
field           type                         meaning
==============  ===========================  ==========================================================
``id``          str, required                unique within the file
``problem``     str, required                the question shown to the student (no image placeholders)
``images``      list[str], default ``[]``    image paths, relative to the data file's folder
``answer``      str, required                gold answer; ``bbox``: ``"[x1, y1, x2, y2]"``;
                                             ``multilabel``: labels separated by commas
``answer_type`` str, required                one of ``yesno``, ``choice``, ``math``, ``open``, ``bbox``,
                                             ``multilabel``
``choices``     list[str] or null            options of a ``choice`` question, in letter order (A, B, …)
``trace``       str or null                  a reasoning trace for SFT (the text inside ``<think>``)
``text_view``   str or null                  the problem as text for a text-only teacher (caption +
                                             question); null for an image problem means "no OPD"
``difficulty``  int or null                  1 (easy) … 3 (hard)
``source``      str or null                  where the record came from (data set, generator, model)
``category``    str or null                  a grouping for per-category reports
==============  ===========================  ==========================================================

Validation names the file, the line and the field of every problem (see :func:`validate_record`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ANSWER_TYPES = ("yesno", "choice", "math", "open", "bbox", "multilabel")
REQUIRED_FIELDS = ("id", "problem", "answer", "answer_type")
OPTIONAL_FIELDS = ("images", "choices", "trace", "text_view", "difficulty", "source", "category")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
# Pixels above this count are refused: a 10k x 10k image would stall collation and blow memory.
MAX_IMAGE_PIXELS = 4096 * 4096


class RecordError(ValueError):
    """A malformed data record; the message names the file, the line and the field."""


@dataclass
class Record:
    id: str
    problem: str
    answer: str
    answer_type: str
    images: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    trace: str | None = None
    text_view: str | None = None
    difficulty: int | None = None
    source: str | None = None
    category: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _where(path: str | Path, line: int | None, rid: Any = None) -> str:
    loc = f"{path}:{line}" if line is not None else str(path)
    return f"{loc} (id={rid!r})" if rid is not None else loc


def validate_record(
    obj: Any, path: str | Path, line: int | None, base_dir: Path | None = None, check_images: bool = True
) -> Record:
    """Check one raw record and return it as a :class:`Record` with absolute image paths.

    Raises :class:`RecordError` whose message is ``<file>:<line> (id=...): field '<f>': <problem>. <fix>``.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"{_where(path, line)}: a record must be a JSON object, got {type(obj).__name__}.")
    rid = obj.get("id")

    def fail(fname: str, problem: str, fix: str) -> RecordError:
        return RecordError(f"{_where(path, line, rid)}: field '{fname}': {problem}. {fix}")

    unknown = sorted(set(obj) - set(ALL_FIELDS))
    if unknown:
        raise fail(unknown[0], "unknown field", f"Known fields are {', '.join(ALL_FIELDS)}; remove or rename it.")
    for name in REQUIRED_FIELDS:
        if name not in obj or obj[name] is None:
            raise fail(name, "missing required field", "Every record needs id, problem, answer and answer_type.")
    for name in ("id", "problem", "answer", "answer_type"):
        if not isinstance(obj[name], str):
            raise fail(name, f"expected a string, got {type(obj[name]).__name__} {obj[name]!r:.60}",
                       "Quote the value in the JSON (answers too: \"3\", not 3).")
    if not obj["id"].strip():
        raise fail("id", "empty id", "Give every record a unique non-empty id.")
    if not obj["problem"].strip():
        raise fail("problem", "empty problem text", "Write the question in 'problem'.")
    if obj["answer_type"] not in ANSWER_TYPES:
        raise fail("answer_type", f"unknown answer type {obj['answer_type']!r}", f"Use one of {', '.join(ANSWER_TYPES)}.")
    if not obj["answer"].strip():
        raise fail("answer", "empty answer", "Every record needs a gold answer.")

    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise fail("images", f"expected a list of path strings, got {images!r:.80}", "Write e.g. \"images\": [\"img/0001.png\"].")
    choices = obj.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise fail("choices", f"expected a list of strings or null, got {choices!r:.80}", "Write e.g. \"choices\": [\"3\", \"4\", \"5\"].")
    if obj["answer_type"] == "choice":
        if not choices or len(choices) < 2:
            raise fail("choices", "a 'choice' question needs at least two choices", "List the options in 'choices'.")
        letters = [c.strip().upper() for c in obj["answer"].replace(",", " ").split()]
        valid = {chr(ord("A") + i) for i in range(len(choices))}
        if not letters or any(letter not in valid for letter in letters):
            raise fail("answer", f"{obj['answer']!r} is not an option letter of {len(choices)} choices",
                       f"A 'choice' answer is letter(s) among {', '.join(sorted(valid))}.")
    if obj["answer_type"] == "yesno" and obj["answer"].strip().lower() not in ("yes", "no"):
        raise fail("answer", f"{obj['answer']!r} is not yes/no", "A 'yesno' answer is 'yes' or 'no'.")
    if obj["answer_type"] == "bbox":
        try:
            box = json.loads(obj["answer"])
            ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise fail("answer", f"{obj['answer']!r} is not a box", "A 'bbox' answer is \"[x1, y1, x2, y2]\".")
    for name in ("trace", "text_view", "source", "category"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise fail(name, f"expected a string or null, got {type(obj[name]).__name__}", "Quote the value or use null.")
    diff = obj.get("difficulty")
    if diff is not None and (isinstance(diff, bool) or not isinstance(diff, int) or not 1 <= diff <= 3):
        raise fail("difficulty", f"expected an integer 1..3 or null, got {diff!r}", "Use 1 (easy), 2 or 3 (hard).")

    resolved: list[str] = []
    for rel in images:
        p = Path(rel)
        if not p.is_absolute():
            p = (base_dir or Path(path).parent) / p
        if check_images:
            _check_image(p, fail)
        resolved.append(str(p))
    return Record(
        id=obj["id"], problem=obj["problem"], answer=obj["answer"], answer_type=obj["answer_type"],
        images=resolved, choices=choices, trace=obj.get("trace"), text_view=obj.get("text_view"),
        difficulty=diff, source=obj.get("source"), category=obj.get("category"),
    )


def _check_image(p: Path, fail) -> None:
    from PIL import Image, UnidentifiedImageError

    if not p.is_file():
        raise fail("images", f"image file not found: {p}", "Image paths are relative to the data file's folder.")
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise fail("images", f"image {p} is {w}x{h}, above the limit of {MAX_IMAGE_PIXELS} pixels",
                           "Downscale it before training (the processor resizes to a few hundred pixels anyway).")
            im.verify()
    except RecordError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise fail("images", f"unreadable image {p} ({type(e).__name__}: {e})", "Replace or remove the corrupt file.") from None


def read_jsonl(
    path: str | Path, on_bad_record: str = "error", check_images: bool = True
) -> tuple[list[Record], list[str]]:
    """Read and validate a JSONL file. Returns ``(records, skipped_messages)``.

    ``on_bad_record='error'`` raises on the first bad record; ``'skip'`` skips it and returns its message.
    """
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[Record] = []
    skipped: list[str] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                                      "Each line must be one JSON object.") from None
                rec = validate_record(obj, path, lineno, check_images=check_images)
                if rec.id in seen:
                    raise RecordError(f"{path}:{lineno} (id={rec.id!r}): field 'id': duplicate id. Ids must be unique.")
                seen.add(rec.id)
                records.append(rec)
            except RecordError as e:
                if on_bad_record == "error":
                    raise
                skipped.append(str(e))
    return records, skipped


def write_jsonl(records, path: str | Path) -> Path:
    """Write records (``Record`` or dicts) as JSONL; image paths are made relative to the file's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            d = r.to_json() if isinstance(r, Record) else dict(r)
            imgs = []
            for p in d.get("images") or []:
                # Relative to the written file (``../`` where needed), so the data set can move as a folder.
                imgs.append(os.path.relpath(Path(p).resolve(), path.parent.resolve()))
            d["images"] = imgs
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
