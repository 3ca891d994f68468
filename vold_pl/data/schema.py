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

Validation names the file, the line and the field of every problem (see :func:`validate_record`): each line
is decoded as UTF-8 on its own (a line that is not is one bad record), image files must exist, stay below
``MAX_IMAGE_PIXELS`` (decompression bombs are refused before any pixel is decoded) and ``MAX_ASPECT_RATIO``
(the image processor's own limit) and, with ``check_images='decode'`` (the default), decode in full and convert to
RGB (:func:`vold_pl.data.images.to_rgb`). A path the file system refuses (a name too long, no permission, a
folder) is a problem of that record, never a crash.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from vold_pl.errors import UserError
from vold_pl.io import atomic_open

ANSWER_TYPES = ("yesno", "choice", "math", "open", "bbox", "multilabel")
REQUIRED_FIELDS = ("id", "problem", "answer", "answer_type")
OPTIONAL_FIELDS = ("images", "choices", "trace", "text_view", "difficulty", "source", "category")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
# Pixels above this count are refused: a 10k x 10k image would stall collation and blow memory.
MAX_IMAGE_PIXELS = 4096 * 4096
# Longest side over shortest side above this is refused: the Qwen2-VL / Qwen2.5-VL image processors' smart_resize
# raises for it (at batch time, where it would stop a run).
MAX_ASPECT_RATIO = 200
# How image files are checked when a record is validated: ``decode`` (open, verify and decode every pixel: a
# damaged pixel stream is found at setup), ``header`` (open and verify the chunks only: faster on large sets;
# pixels that fail to decode later are caught when the batch is drawn) or ``none`` (not even opened).
IMAGE_CHECKS = ("decode", "header", "none")


class RecordError(UserError):
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
    # Where the record was read: ``<file>:<line>`` or ``<file> row <n>``; not a schema field (never written).
    origin: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("origin")
        return d


def origin_of(path: str | Path, line: int | str | None) -> str:
    """``<file>:<line>`` for a line number, ``<file> <where>`` for a text such as ``row 17``."""
    if line is None:
        return str(path)
    return f"{path}:{line}" if isinstance(line, int) else f"{path} {line}"


def _where(path: str | Path, line: int | str | None, rid: Any = None) -> str:
    loc = origin_of(path, line)
    return f"{loc} (id={rid!r})" if rid is not None else loc


def validate_record(
    obj: Any, path: str | Path, line: int | str | None, base_dir: Path | None = None,
    check_images: bool | str = "decode",
) -> Record:
    """Check one raw record and return it as a :class:`Record` with absolute image paths.

    ``line`` is a line number (JSONL) or a text such as ``"row 17"`` (tables). ``check_images``: one of
    :data:`IMAGE_CHECKS` (``True`` = ``decode``, ``False`` = ``none``).

    Raises :class:`RecordError` whose message is ``<file>:<line> (id=...): field '<f>': <problem>. <fix>``.
    """
    check_images = {True: "decode", False: "none"}.get(check_images, check_images)
    if check_images not in IMAGE_CHECKS:
        raise UserError(f"check_images must be one of {', '.join(IMAGE_CHECKS)}, got {check_images!r}")
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
        raise fail("answer_type", f"unknown answer type {obj['answer_type']!r}",
                   f"Use one of {', '.join(ANSWER_TYPES)}.")
    if not obj["answer"].strip():
        raise fail("answer", "empty answer", "Every record needs a gold answer.")

    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise fail("images", f"expected a list of path strings, got {images!r:.80}",
                   "Write e.g. \"images\": [\"img/0001.png\"].")
    choices = obj.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise fail("choices", f"expected a list of strings or null, got {choices!r:.80}",
                   "Write e.g. \"choices\": [\"3\", \"4\", \"5\"].")
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
            ok = isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise fail("answer", f"{obj['answer']!r} is not a box", "A 'bbox' answer is \"[x1, y1, x2, y2]\".")
    for name in ("trace", "text_view", "source", "category"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise fail(name, f"expected a string or null, got {type(obj[name]).__name__}",
                       "Quote the value or use null.")
    diff = obj.get("difficulty")
    if diff is not None and (isinstance(diff, bool) or not isinstance(diff, int) or not 1 <= diff <= 3):
        raise fail("difficulty", f"expected an integer 1..3 or null, got {diff!r}", "Use 1 (easy), 2 or 3 (hard).")

    resolved: list[str] = []
    for rel in images:
        p = Path(rel)
        if not p.is_absolute():
            p = (base_dir or Path(path).parent) / p
        if check_images != "none":
            _check_image(p, fail, decode=check_images == "decode")
        resolved.append(str(p))
    return Record(
        id=obj["id"], problem=obj["problem"], answer=obj["answer"], answer_type=obj["answer_type"],
        images=resolved, choices=choices, trace=obj.get("trace"), text_view=obj.get("text_view"),
        difficulty=diff, source=obj.get("source"), category=obj.get("category"), origin=origin_of(path, line),
    )


def image_problem(p: str | Path, decode: bool = True) -> str | None:
    """Why the image file ``p`` cannot be used (a sentence naming the file), or ``None`` when it can.

    The size comes from the header before anything else is decoded, so a decompression bomb (a few KB that
    would inflate to gigabytes) is refused unread; ``decode`` then decodes every pixel, which is what finds a
    file whose chunks are intact (``verify`` passes) but whose compressed pixel stream is corrupt.
    """
    import stat
    import warnings

    from PIL import Image

    from vold_pl.data.images import to_rgb

    p = Path(p)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return f"image file not found: {p}"
    except (OSError, ValueError) as e:  # a name too long, a folder without permission, a NUL byte in the path
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return f"image path {_short(p)} cannot be used ({why})"
    if stat.S_ISDIR(mode):
        return f"image path {p} is a folder, not an image file"
    if not stat.S_ISREG(mode):
        return f"image path {p} is not a regular file"
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (and raises above twice it); ours is lower and checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return f"image {p} is {w}x{h}, above the limit of {MAX_IMAGE_PIXELS} pixels"
                if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                    return (f"image {p} is {w}x{h}: an aspect ratio above {MAX_ASPECT_RATIO}:1, which the "
                            "Qwen2-VL family's image processor refuses")
                im.verify()
            if decode:
                with Image.open(p) as im:
                    to_rgb(im).load()  # every pixel decoded, in the conversion the model's input gets
    except Image.DecompressionBombError as e:
        return f"image {p} is a decompression bomb ({e})"
    except OSError as e:
        if getattr(e, "errno", None) is not None:  # the file system, not the image format
            return f"image {p} cannot be read ({e.strerror or e})"
        return f"unreadable image {p} ({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001 - whatever PIL raises on a damaged file, the file is unusable
        return f"unreadable image {p} ({type(e).__name__}: {e})"
    return None


def _short(p: Path, keep: int = 160) -> str:
    """A path for a message: a name too long for the file system is cut in the middle."""
    s = str(p)
    return s if len(s) <= keep else f"{s[: keep // 2]}...{s[-keep // 2:]} ({len(s)} characters)"


def _check_image(p: Path, fail, decode: bool = True) -> None:
    problem = image_problem(p, decode)
    if problem is None:
        return
    if problem.startswith("image file not found"):
        raise fail("images", problem, "Image paths are relative to the data file's folder.")
    if problem.startswith("image path ") or " cannot be read (" in problem:
        raise fail("images", problem, "Point the record at a readable image file (relative to the data file's "
                                      "folder).")
    if " above the limit " in problem or "decompression bomb" in problem:
        raise fail("images", problem, "Downscale it before training (the processor resizes to a few hundred "
                                      "pixels anyway).")
    if "aspect ratio" in problem:
        raise fail("images", problem, "Crop or pad it to at most 200:1, or remove the record.")
    raise fail("images", problem, "Replace or remove the corrupt file.")


def read_jsonl(
    path: str | Path, on_bad_record: str = "error", check_images: bool | str = "decode"
) -> tuple[list[Record], list[str]]:
    """Read and validate a JSONL file. Returns ``(records, skipped_messages)``.

    ``on_bad_record='error'`` raises on the first bad record; ``'skip'`` skips it and returns its message. Each
    line is decoded on its own, so a line that is not UTF-8 is one bad record and the rest of the file is kept.
    """
    if on_bad_record not in ("error", "skip"):
        raise UserError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path = Path(path)
    if not path.is_file():
        from vold_pl.errors import UserFileNotFoundError

        raise UserFileNotFoundError(f"data file not found: {path}")
    out = RecordCollector(on_bad_record,
                          lambda obj, lineno: validate_record(obj, path, lineno, check_images=check_images),
                          lambda lineno: f"{path}:{lineno}")
    for lineno, obj in iter_jsonl(path):
        out.add(obj, lineno)
    return out.records, out.skipped


class RecordCollector:
    """The records of a source, read one by one: ids must be unique; a bad record raises
    (``on_bad_record='error'``) or is listed in ``skipped`` (``'skip'``).

    Args:
        on_bad_record: ``error`` or ``skip``.
        validate: ``(raw row, where) -> Record``, raising :class:`RecordError` for a bad row.
        origin: ``where -> text`` naming the row in the duplicate-id message.
        duplicate_hint: appended to that message (how to fix it for this kind of source).
    """

    def __init__(self, on_bad_record: str, validate: Callable[[Any, Any], Record], origin: Callable[[Any], str],
                 duplicate_hint: str = ""):
        self.on_bad_record, self.duplicate_hint = on_bad_record, duplicate_hint
        self.validate, self.origin = validate, origin
        self.records: list[Record] = []
        self.skipped: list[str] = []
        self._seen: set[str] = set()

    def add(self, obj: Any, where: Any) -> None:
        """Validate and keep the raw row ``obj`` found at ``where`` (a :class:`RecordError` for a row that could not
        even be parsed)."""
        try:
            if isinstance(obj, RecordError):
                raise obj
            rec = self.validate(obj, where)
            if rec.id in self._seen:
                raise RecordError(f"{self.origin(where)} (id={rec.id!r}): field 'id': duplicate id. Ids must be unique"
                                  f"{self.duplicate_hint}.")
            self._seen.add(rec.id)
            self.records.append(rec)
        except RecordError as e:
            if self.on_bad_record == "error":
                raise e from None
            self.skipped.append(str(e))


def iter_jsonl(path: str | Path):
    """``(line number, parsed object)`` of every non-blank line, or ``(line, RecordError)`` for a line that is not
    UTF-8 or not JSON: one bad line never hides the others."""
    path = Path(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(_decode_line(raw, path, lineno))
            except json.JSONDecodeError as e:
                yield lineno, RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                                          "Each line must be one JSON object.")
            except RecordError as e:
                yield lineno, e


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark may open the file
    except UnicodeDecodeError as e:
        raise RecordError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line). Save "
            "the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set data.on_bad_record: skip to skip the "
            "line.") from None


def write_jsonl(records, path: str | Path) -> Path:
    """Write records (``Record`` or dicts) as JSONL; image paths are made relative to the file's folder."""
    path = Path(path)
    with atomic_open(path, "w") as fh:
        for r in records:
            d = r.to_json() if isinstance(r, Record) else dict(r)
            imgs = []
            for p in d.get("images") or []:
                # Relative to the written file (``../`` where needed), so the data set can move as a folder.
                imgs.append(os.path.relpath(Path(p).resolve(), path.parent.resolve()))
            d["images"] = imgs
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path
