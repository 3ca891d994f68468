"""Loaders for published visual-reasoning benchmarks, read offline from what the user downloaded.

Every loader maps its benchmark's own answer conventions onto :class:`~vold_pl.data.schema.Record`, builds the
question text the benchmark's authors show a model (options listed with their letters: :func:`benchmark_problem`,
the one home of that text) and runs each mapped row through :func:`~vold_pl.data.schema.validate_record`.
A row that cannot be used (no gold answer, broken fields, an image that does not decode) is skipped and listed
with its id and reason in :attr:`BenchmarkRecords.skipped` (``on_bad_record='skip'``, the default), or raises
:class:`~vold_pl.data.schema.RecordError` naming ``<file>:<row> (id=...)`` and the field
(``on_bad_record='error'``). A missing folder or an unrecognised layout raises one error line listing the
layouts that are recognised.

``path`` is a folder, a file, or a hub id such as ``AI4Math/MathVista``. A relative ``path`` (and
``cache_dir``) is resolved once, against the working directory. Recognised layouts (see docs/benchmarks.md):

========================  ==================================================================
``mathvista``             HF parquet: ``<dir>/data/testmini-*.parquet``; hub id ``AI4Math/MathVista``
``mathvision``            HF parquet: ``<dir>/data/test-*.parquet`` (and testmini); GitHub release
                          (github.com/mathllm/MATH-V): ``<dir>/data/test.jsonl`` + ``<dir>/images/``;
                          hub id ``MathLLMs/MathVision``
``mmmu_pro_standard``     HF parquet: ``<dir>/standard (10 options)/test-*.parquet``;
``mmmu_pro_vision``       ``<dir>/vision/test-*.parquet``; hub id ``MMMU/MMMU_Pro``
``logicvista``            GitHub (github.com/Yijia-Xiao/LogicVista): ``<dir>/data/dataset.json`` +
                          ``<dir>/data/images/*.png``
``synthetic``             a JSONL file in the project schema (or a folder holding one)
========================  ==================================================================

A parquet folder may also be given directly (``<dir>`` holding the ``*.parquet`` shards). A hub id is read with
``datasets.load_dataset`` (from the local HF cache when offline). Records hold image *paths*, so embedded image
bytes are written once to ``<cache_dir>/<benchmark>/<split>/`` (default ``cache_dir``: ``<dir>/images_cache``,
for a hub id ``<HF datasets cache>/vold_pl_images``), stored and read back by one absolute path; an existing
file of the same size is reused. Images above ``MAX_IMAGE_PIXELS`` are downscaled on the way out, because the
schema refuses them and the processor shrinks them to a few hundred pixels anyway.

``text_view`` stays null: these problems cannot be solved without the image, so there is no
faithful text-only view for a text teacher. Reference solutions are not copied into ``trace``:
these are evaluation sets and must not leak into SFT data.
"""

from __future__ import annotations

import ast
import io
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from vold_pl.data.schema import MAX_IMAGE_PIXELS, RecordError, _where, read_jsonl, validate_record
from vold_pl.errors import UserError, UserFileNotFoundError
from vold_pl.io import atomic_open, atomic_write_bytes

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_IMAGE_TAG = re.compile(r"\s*<image\s*(\d*)>\s*")
_EXTS = {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp", "bmp": "bmp"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
ON_BAD_RECORD = ("skip", "error")


class BenchmarkRecords(list):
    """The usable records of a benchmark (a plain list of :class:`Record`) and what was left out.

    Attributes:
        published: rows read from the published files (usable + skipped).
        skipped: ``[{"id", "reason"}]`` of every row left out.
    """

    def __init__(self, records=(), published: int = 0, skipped: list[dict] | None = None):
        super().__init__(records)
        self.published, self.skipped = published, list(skipped or [])


# ---------------------------------------------------------------------------------------------- prompts
# The answer instruction each benchmark's authors (or the harnesses that reproduce their numbers) append to the
# question; used with ``prompt_style='official'`` in place of the training instruction. MathVista's published
# ``query`` already carries its hint, so nothing is appended there.
OFFICIAL_INSTRUCTIONS = {
    "mathvista": "",
    # MATH-V README / evaluation prompt
    "mathvision": ('Please solve the problem step by step and put your answer in one "\\boxed{}". If it is a '
                   'multiple choice question, only one letter is allowed in the "\\boxed{}".'),
    # MMMU-Benchmark/MMMU mmmu-pro/prompts.yaml, cot
    "mmmu_pro_standard": ("Answer the preceding multiple choice question. The last line of your response should "
                          "be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of "
                          "options. Think step by step before answering."),
    "mmmu_pro_vision": ("Write out the multiple-choice question in the image and then solve it. The last line of "
                        "your response should be of the following format: 'Answer: $LETTER' (without quotes) "
                        "where LETTER is one of options. Think step by step before answering."),
    "logicvista": "",
}
PROMPT_STYLES = ("training", "official")
MMMU_PRO_VISION_PROMPT = "The question and its options are shown in the image."
IMAGE_ONLY_PROMPT = "The question is shown in the image."


def benchmark_instruction(benchmark: str, style: str, training_instruction: str) -> str:
    """The instruction appended to a benchmark's question: the training one, or (``official``) the benchmark's."""
    if style not in PROMPT_STYLES:
        raise UserError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style == "official" and benchmark in OFFICIAL_INSTRUCTIONS:
        return OFFICIAL_INSTRUCTIONS[benchmark]
    return training_instruction


def benchmark_problem(benchmark: str, question: str, choices: list[str] | None = None) -> str:
    """The question text a benchmark shows the model, its options listed with their letters.

    The one home of benchmark prompt text (the chat itself is :func:`vold_pl.prompts.student_messages`):

    * ``mathvista``: ``Choices:`` then ``(A) text`` lines (MathVista's ``build_query.py``; the loader passes the
      published ``query`` through unchanged when the row has one);
    * ``mathvision``: ``Options:`` then ``(A) text`` lines, as in MATH-V's evaluation prompt;
    * ``mmmu_pro_standard``: ``A. text`` lines after the question (MMMU-Pro ``infer`` scripts);
    * anything else: the question as published (LogicVista draws its options in the image or the question).
    """
    question = question.strip()
    if not choices:
        return question
    if benchmark == "mathvista":
        return question + "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    if benchmark == "mathvision":
        return question + "\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    if benchmark == "mmmu_pro_standard":
        return question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return question


_MV_PLACES = {1: "one decimal place", 2: "two decimal places", 3: "three decimal places"}


def mathvista_query(question: str, question_type: str, answer_type: str, choices: list[str] | None,
                    precision: int | None, unit: str | None) -> str:
    """MathVista's zero-shot query (``evaluation/build_query.py``) for a row published without ``query``."""
    if question_type == "multi_choice":
        hint = "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    elif answer_type == "integer":
        hint = "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, " \
               "at the end."
    elif answer_type == "float":
        p = precision if precision is not None else 1
        examples = {1: "1.2, 1.3, 1.4", 2: "1.23, 1.34, 1.45"}.get(p, "1.234, 1.345, 1.456")
        places = _MV_PLACES.get(p, f"{p} decimal places")
        hint = (f"Please answer the question requiring a floating-point number with {places} and provide the "
                f"final value, e.g., {examples}, at the end.")
    elif answer_type == "list":
        hint = ("Please answer the question requiring a Python list as an answer and provide the final list, "
                "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    else:
        hint = "Please answer the question and provide the final answer at the end."
    q = question.strip() + (f" (Unit: {unit})" if unit and question_type == "free_form" else "")
    return benchmark_problem("mathvista", f"Hint: {hint}\nQuestion: {q}", choices)


# --------------------------------------------------------------------------------------------- sources
def _resolve(path) -> Path:
    """A relative path resolves once, against the working directory (never again against a data file)."""
    return Path(path).expanduser().resolve()


def layouts_error(benchmark: str, path, layouts: list[str]) -> UserFileNotFoundError:
    return UserFileNotFoundError(f"{benchmark}: no recognised layout at {path}. Recognised: " + "; ".join(layouts)
                                 + ". See docs/benchmarks.md for the download commands.")


def _parquet_files(root: Path, subdir: str, split: str) -> list[Path]:
    for folder in (root / subdir, root):
        files = sorted(folder.glob(f"{split}-*.parquet"))
        if files:
            return files
    return []


def _is_hub_id(path) -> bool:
    return isinstance(path, str) and not Path(path).exists() and _HUB_ID.fullmatch(path) is not None


def _parquet_rows(files: list[Path], required: tuple[str, ...], limit: int | None) -> Iterator[tuple[Path, int, dict]]:
    """Yield ``(file, row_index, row)``; batches keep memory flat on shards of hundreds of MB."""
    import pyarrow.parquet as pq

    from vold_pl.progress import progress

    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # footers only: cheap
    bar = progress(total=total if limit is None else min(total, limit), desc="benchmark rows (images cached)",
                   unit="row", leave=False)
    n = 0
    try:
        for f in files:
            pf = pq.ParquetFile(f)
            missing = [c for c in required if c not in pf.schema_arrow.names]
            if missing:
                raise RecordError(f"{f}: missing column(s) {', '.join(missing)} (found "
                                  f"{', '.join(pf.schema_arrow.names)}). Is this the right benchmark, config and "
                                  "split, as published on the hub?")
            i = 0
            for batch in pf.iter_batches(batch_size=32):
                for row in batch.to_pylist():
                    if limit is not None and n >= limit:
                        return
                    yield f, i, row
                    bar.update(1)
                    i += 1
                    n += 1
    finally:
        bar.close()


def _jsonl_rows(file: Path, limit: int | None) -> Iterator[tuple[Path, int, Any]]:
    """Yield ``(file, line_number, parsed line)``; a line that is not JSON yields a :class:`RecordError`."""
    n = 0
    with open(file, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            try:
                yield file, lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield file, lineno, RecordError(f"{file}:{lineno}: not valid JSON ({e.msg}). Re-download the file.")


def _hub_rows(repo: str, config: str | None, split: str, required: tuple[str, ...],
              limit: int | None) -> Iterator[tuple[str, int, dict]]:
    """Rows of a hub dataset through ``datasets.load_dataset`` (the local cache when offline); image columns are
    read undecoded (``{'bytes', 'path'}``, as in the parquet files)."""
    import datasets

    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # datasets raises many types for a missing/offline dataset
        raise UserFileNotFoundError(f"hub dataset {repo!r} (config {config!r}, split {split!r}) cannot be loaded: "
                                    f"{type(e).__name__}: {str(e)[:300]}. Download it once with network access "
                                    "(it is then read from the HF cache offline), or pass a local folder.") from None
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise RecordError(f"{repo} ({config}, {split}): missing column(s) {', '.join(missing)} (found "
                          f"{', '.join(ds.column_names)}).")
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        yield f"{repo}[{split}]", i, row


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise UserError(f"limit must be a non-negative integer or None, got {limit!r}")


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ON_BAD_RECORD:
        raise UserError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {on_bad_record!r}")


def _failer(file, row: int | None, rid: Any) -> Callable[[str, str, str], RecordError]:
    def fail(fname: str, problem: str, fix: str) -> RecordError:
        return RecordError(f"{_where(file, row, rid)}: field '{fname}': {problem}. {fix}")
    return fail


def _text(row: dict, name: str, fail, fix: str = "This row cannot be evaluated.") -> str:
    v = row.get(name)
    if not isinstance(v, str) or not v.strip():
        raise fail(name, f"expected a non-empty string, got {v!r:.60}", fix)
    return v


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _cache_root(root: Path | None, cache_dir) -> Path:
    if cache_dir is not None:
        return _resolve(cache_dir)
    if root is not None:
        return root / "images_cache"
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE).resolve() / "vold_pl_images"


def _save_image(value: Any, dest_stem: Path, fail, field: str, fallback: Path | None = None) -> str:
    """Write an HF ``Image`` cell (``{'bytes', 'path'}``) to ``dest_stem.<ext>``; return its absolute path.

    Without bytes, ``fallback`` (the published relative ``image`` path, e.g. from an unzipped
    ``images.zip`` or a GitHub release's ``images/``) is used if it exists.
    """
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    if not data:
        if fallback is not None and fallback.is_file():
            return str(fallback)
        raise fail(field, "no image bytes" + (f" and no file at {fallback}" if fallback else ""),
                   "The published file embeds the image; re-download it.")
    from PIL import Image

    from vold_pl.data.images import to_rgb

    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        ext = _EXTS.get((im.format or "").lower())
    except Exception as e:  # PIL raises many types for garbage bytes
        raise fail(field, f"image bytes cannot be decoded ({type(e).__name__}: {e})", "Re-download the file.") from None
    # re-encode to PNG when too big for the schema or in a format the processors may not read
    convert = w * h > MAX_IMAGE_PIXELS or ext is None
    dest = dest_stem.parent / f"{dest_stem.name}.{'png' if convert else ext}"
    if dest.is_file() and (convert or dest.stat().st_size == len(data)):
        return str(dest)
    if convert:
        scale = min(1.0, (MAX_IMAGE_PIXELS / (w * h)) ** 0.5)
        im = im.convert("RGBA") if "A" in im.getbands() else to_rgb(im)  # (16-bit grey scaled, not clipped)
        with atomic_open(dest, "wb") as fh:
            im.resize((max(1, int(w * scale)), max(1, int(h * scale)))).save(fh, format="PNG")
    else:
        atomic_write_bytes(dest, data)
    return str(dest)


class _Collector:
    """Records of one benchmark, row by row: a row whose mapping raises :class:`RecordError` is skipped with its
    id and reason (``skip``) or re-raised (``error``); ids must be unique."""

    def __init__(self, on_bad_record: str):
        _check_policy(on_bad_record)
        self.on_bad_record, self.out, self.seen = on_bad_record, BenchmarkRecords(), set()

    def add(self, file, row: int | None, rid: Any, build: Callable[[], dict]) -> None:
        self.out.published += 1
        try:
            obj = build()
            rec = validate_record(obj, file, row, check_images=True)
            if rec.id in self.seen:
                raise RecordError(f"{_where(file, row, rec.id)}: field 'id': duplicate id. Ids must be unique within "
                                  "a benchmark.")
        except RecordError as e:
            if self.on_bad_record == "error":
                raise
            self.out.skipped.append({"id": str(rid), "reason": str(e)})
            return
        self.seen.add(rec.id)
        self.out.append(rec)

    def skip(self, rid: Any, err: RecordError) -> None:
        """A row that could not even be read (e.g. a line that is not JSON)."""
        self.out.published += 1
        if self.on_bad_record == "error":
            raise err
        self.out.skipped.append({"id": str(rid), "reason": str(err)})


def _collect(rows: Iterator[tuple[Any, int, Any]], on_bad_record: str, id_field: str,
             build: Callable[..., dict]) -> BenchmarkRecords:
    """Every row through ``build(row, file, index, id)`` into a :class:`_Collector` (a row that could not even be
    parsed arrives as its :class:`RecordError`)."""
    col = _Collector(on_bad_record)
    for f, i, row in rows:
        if isinstance(row, RecordError):
            col.skip(f"line {i}", row)
            continue
        rid = str(row.get(id_field)) if isinstance(row, dict) else f"row {i}"
        col.add(f, i, rid, partial(build, row, f, i, rid))
    return col.out


def _letter_of(ans: str, choices: list[str], fail, text_first: bool = False) -> str:
    """The option letter of ``ans``, given as a letter or as the option's text.

    ``text_first`` is for benchmarks whose gold is the option text (MathVista): a gold "B" among
    options ["A", "C", "B"] then means the third option, not the second.
    """
    a = ans.strip()
    by_text = next((LETTERS[i] for i, c in enumerate(choices) if c.strip() == a), None)
    by_letter = a.upper() if len(a) == 1 and a.upper() in LETTERS[: len(choices)] else None
    found = (by_text or by_letter) if text_first else (by_letter or by_text)
    if found:
        return found
    raise fail("answer", f"{ans!r} is neither an option letter (A-{LETTERS[len(choices) - 1]}) nor one of the "
                         f"{len(choices)} options {choices!r:.120}", "Fix the answer or the options of this row.")


def _rows_for(benchmark: str, path, *, subdir: str, split: str, repo: str, required: tuple[str, ...],
              limit: int | None, config: str | None = None, jsonl: str | None = None):
    """``(root or None, row iterator, is_jsonl)`` for the first layout found at ``path``, else one error line."""
    layouts = [f"HF parquet <dir>/{subdir}/{split}-*.parquet or the shards' folder (huggingface-cli download {repo} "
               "--repo-type dataset --local-dir <dir>)"]
    if jsonl:
        layouts.append(f"GitHub <dir>/{jsonl} + <dir>/images/")
    layouts.append(f"hub id {repo} (local HF cache when offline)")
    if _is_hub_id(path):
        return None, _hub_rows(path, config, split, required, limit), False
    root = _resolve(path)
    if not root.exists():
        raise layouts_error(benchmark, root, layouts)
    files = _parquet_files(root, subdir, split) if root.is_dir() else []
    if files:
        return root, _parquet_rows(files, required, limit), False
    if jsonl and root.is_dir() and (root / jsonl).is_file():
        return root, _jsonl_rows(root / jsonl, limit), True
    raise layouts_error(benchmark, root, layouts)


def _precision(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and v != v):  # NaN means unset
        return None
    return int(v)


# ---------------------------------------------------------------------------------------- MathVista
MATHVISTA_COLUMNS = ("pid", "question", "decoded_image", "choices", "precision", "answer", "question_type",
                     "answer_type")


def load_mathvista(path, split: str = "testmini", limit: int | None = None, cache_dir=None,
                   on_bad_record: str = "skip") -> BenchmarkRecords:
    """MathVista (``AI4Math/MathVista``), split ``testmini`` (``test`` has no public answers).

    The problem is the published ``query`` (MathVista's own prompt, hint and choices included), or for a row
    without one the query :func:`mathvista_query` builds by the same rules.

    * ``multi_choice``: the gold option text becomes its letter -> ``choice``.
    * ``free_form`` ``integer`` -> ``math``; ``float`` -> ``math`` with the gold formatted to exactly
      ``precision`` decimals (``"1.2"`` at precision 2 -> ``"1.20"``): the official scorer rounds the prediction
      to that many decimals (:mod:`vold_pl.rewards.official`). ``text``/``list`` -> ``open``.
    * ``category`` is ``metadata['task']`` (figure QA, geometry problem solving, ...), the grouping
      MathVista reports by; ``difficulty`` is null (MathVista has none).
    """
    _check_limit(limit)
    root, rows, _ = _rows_for("mathvista", path, subdir="data", split=split, repo="AI4Math/MathVista",
                              required=MATHVISTA_COLUMNS, limit=limit)
    cache = _cache_root(root, cache_dir) / "mathvista" / _safe(split)
    return _collect(rows, on_bad_record, "pid", partial(_mathvista_record, root=root, cache=cache))


def _mathvista_record(row: dict, f, i: int, pid: str, *, root: Path | None, cache: Path) -> dict:
    fail = _failer(f, i, pid)
    question = _text(row, "question", fail)
    ans = str(row["answer"] if row["answer"] is not None else "").strip()
    if not ans:
        raise fail("answer", "empty answer", "Only 'testmini' has public answers; load split='testmini'.")
    qtype, atype, choices = row["question_type"], row["answer_type"], None
    precision = _precision(row.get("precision"))
    if qtype == "multi_choice":
        choices = [str(c) for c in (row["choices"] or [])]
        if len(choices) < 2:
            raise fail("choices", f"a multi_choice row needs >= 2 choices, got {choices!r}", "Re-download the file.")
        ans, kind = _letter_of(ans, choices, fail, text_first=True), "choice"
    elif qtype != "free_form":
        raise fail("question_type", f"unknown question type {qtype!r}", "Expected 'multi_choice' or 'free_form'.")
    elif atype in ("integer", "float"):
        try:
            value = float(ans)
        except ValueError:
            raise fail("answer", f"{ans!r} is not a number but answer_type is {atype!r}", "Fix the row.") from None
        if atype == "integer" and not value.is_integer():
            raise fail("answer", f"{ans!r} is not an integer", "Fix the row or its answer_type.")
        if atype == "float" and precision is not None:
            ans = f"{value:.{precision}f}"
        kind = "math"
    elif atype in ("text", "list"):
        kind = "open"
    else:
        raise fail("answer_type", f"unknown answer type {atype!r}", "Expected integer, float, text or list.")
    query = row.get("query")
    problem = query.strip() if isinstance(query, str) and query.strip() else mathvista_query(
        question, qtype, atype, choices, precision, row.get("unit"))
    meta = row.get("metadata")
    if isinstance(meta, str):
        meta = json.loads(meta) if meta.strip().startswith("{") else None
    fallback = root / row["image"] if root is not None and isinstance(row.get("image"), str) else None
    image = _save_image(row["decoded_image"], cache / _safe(pid), fail, "decoded_image", fallback)
    return {"id": pid, "problem": problem, "answer": ans, "answer_type": kind, "images": [image],
            "choices": choices, "source": "mathvista",
            "category": meta.get("task") if isinstance(meta, dict) else None}


# --------------------------------------------------------------------------------------- MathVision
MATHVISION_COLUMNS = ("id", "question", "options", "answer", "level", "subject")
_LEVEL_TO_DIFFICULTY = {1: 1, 2: 1, 3: 2, 4: 3, 5: 3}


def load_mathvision(path, split: str = "test", limit: int | None = None, cache_dir=None,
                    on_bad_record: str = "skip") -> BenchmarkRecords:
    """MATH-Vision (``MathLLMs/MathVision``), split ``test`` (3040) or ``testmini`` (304).

    Layouts: HF parquet (``decoded_image`` embedded), the GitHub release (``data/<split>.jsonl`` with
    ``image: images/<id>.jpg``) or a hub id. Non-empty ``options`` -> ``choice`` (letters A-E, listed in the
    problem as ``(A) ...``; a gold given as option text is mapped to its letter); empty -> ``math``.
    ``<image1>`` placeholders are removed (the image is passed separately); a question that is only the
    placeholder (the question is in the image) is a valid item. ``level`` 1-2/3/4-5 -> difficulty 1/2/3;
    ``subject`` -> category.
    """
    _check_limit(limit)
    root, rows, is_jsonl = _rows_for("mathvision", path, subdir="data", split=split, repo="MathLLMs/MathVision",
                                     required=MATHVISION_COLUMNS, limit=limit, jsonl=f"data/{split}.jsonl")
    cache = _cache_root(root, cache_dir) / "mathvision" / _safe(split)
    return _collect(rows, on_bad_record, "id", partial(_mathvision_record, root=root, cache=cache))


def _mathvision_record(row: Any, f, i: int, rid: str, *, root: Path | None, cache: Path) -> dict:
    fail = _failer(f, i, rid)
    if not isinstance(row, dict):
        raise fail("(row)", f"expected an object, got {type(row).__name__}", "Re-download the file.")
    missing = [c for c in MATHVISION_COLUMNS if c not in row]
    if missing:
        raise fail(missing[0], "missing", "Re-download the file.")
    question = _IMAGE_TAG.sub(" ", str(row["question"] or "")).strip()
    ans = str(row["answer"] if row["answer"] is not None else "").strip()
    if not ans:
        raise fail("answer", "empty answer", "This row cannot be scored.")
    options = [str(o) for o in (row["options"] or [])]
    if options:
        if len(options) < 2 or len(options) > len(LETTERS):
            raise fail("options", f"{len(options)} options", "A choice question needs 2..26 options.")
        ans, kind = _letter_of(ans, options, fail), "choice"
    else:
        kind = "math"
    level = row["level"]
    if level not in _LEVEL_TO_DIFFICULTY:
        raise fail("level", f"expected an integer 1..5, got {level!r}", "Fix the row's level.")
    fallback = root / row["image"] if root is not None and isinstance(row.get("image"), str) else None
    image = _save_image(row.get("decoded_image"), cache / _safe(rid), fail, "decoded_image", fallback)
    problem = benchmark_problem("mathvision", question or IMAGE_ONLY_PROMPT, options)
    return {"id": rid, "problem": problem, "answer": ans, "answer_type": kind, "images": [image],
            "choices": options or None, "difficulty": _LEVEL_TO_DIFFICULTY[level],
            "source": "mathvision", "category": row["subject"]}


# ----------------------------------------------------------------------------------------- MMMU-Pro
_TOPIC_DIFFICULTY = {"easy": 1, "medium": 2, "hard": 3}


def _parse_options(raw: Any, fail) -> list[str]:
    """MMMU-Pro stores options as the *repr* of a Python list; parse it without ever evaluating code."""
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise fail("options", f"not a Python list literal ({type(e).__name__}: {e})",
                       "Re-download the file.") from None
    if not isinstance(raw, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in raw):
        raise fail("options", f"expected a list of option strings, got {raw!r:.80}", "Re-download the file.")
    if not 2 <= len(raw) <= len(LETTERS):
        raise fail("options", f"{len(raw)} options", "A choice question needs 2..26 options.")
    return [str(o) for o in raw]


def _untag(s: str) -> str:
    return re.sub(r"<image\s*(\d+)>", r"image \1", s).strip()


def load_mmmu_pro(path, config: str = "standard (10 options)", limit: int | None = None,
                  cache_dir=None, on_bad_record: str = "skip") -> BenchmarkRecords:
    """MMMU-Pro (``MMMU/MMMU_Pro``), config ``standard (10 options)``, ``standard (4 options)`` or ``vision``.

    Standard: the problem is the question followed by its options as ``A. text`` lines (MMMU-Pro's inference
    prompt); ``<image k>`` references are rewritten to plain ``image k`` (Record.images holds
    ``image_1..image_7`` in number order); ``topic_difficulty`` Easy/Medium/Hard -> 1/2/3.
    Vision: the whole question, options included, is the screenshot, so the model gets the image and the
    instruction only (the problem is the fixed sentence :data:`MMMU_PRO_VISION_PROMPT`) and ``choices`` are
    the bare letters. Both: ``answer`` is the letter, ``subject`` -> category.
    """
    _check_limit(limit)
    vision = config == "vision"
    required = ("id", "image", "options", "answer") if vision else ("id", "question", "options", "answer", "image_1")
    root, rows, _ = _rows_for("mmmu_pro_vision" if vision else "mmmu_pro_standard", path, subdir=config,
                              split="test", repo="MMMU/MMMU_Pro", required=required, limit=limit, config=config)
    cache = _cache_root(root, cache_dir) / "mmmu_pro" / _safe(config)
    return _collect(rows, on_bad_record, "id", partial(_mmmu_pro_record, vision=vision, cache=cache))


def _mmmu_pro_record(row: dict, f, i: int, rid: str, *, vision: bool, cache: Path) -> dict:
    fail = _failer(f, i, rid)
    options = _parse_options(row["options"], fail)
    ans = str(row["answer"] or "").strip()
    if len(ans) != 1 or ans not in LETTERS[: len(options)]:
        raise fail("answer", f"{ans!r} is not one of the option letters A-{LETTERS[len(options) - 1]}",
                   "This row cannot be scored.")
    if vision:
        problem, choices = MMMU_PRO_VISION_PROMPT, list(LETTERS[: len(options)])
        images = [_save_image(row["image"], cache / _safe(rid), fail, "image")]
    else:
        choices = [_untag(o) for o in options]
        problem = benchmark_problem("mmmu_pro_standard", _untag(_text(row, "question", fail)), choices)
        images = [_save_image(row[f"image_{k}"], cache / f"{_safe(rid)}_{k}", fail, f"image_{k}")
                  for k in range(1, 8) if row.get(f"image_{k}") is not None]
    diff = _TOPIC_DIFFICULTY.get(str(row.get("topic_difficulty") or "").strip().lower())
    return {"id": rid, "problem": problem, "answer": ans, "answer_type": "choice", "images": images,
            "choices": choices, "difficulty": diff, "source": "mmmu_pro_vision" if vision else "mmmu_pro_standard",
            "category": row.get("subject")}


# --------------------------------------------------------------------------------------- LogicVista
def _inline_options(q: str) -> list[str] | None:
    """Options spelled out in the question, ``(A) 33%, (B) 17%`` or ``A) 10 B) 12``, else None.

    The *last* run of consecutive markers A, B, C... wins, and every text must hold a letter or digit:
    "Select from (A), (B), (C). (A) Use a short spanner, ..." lists the letters before the options.
    """
    marks = list(re.finditer(r"(?:^|(?<=[\s.?:;,]))\(?([A-Z])\)", q))
    for start in reversed([k for k, m in enumerate(marks) if m.group(1) == "A"]):
        seq = [marks[start]]
        for m in marks[start + 1:]:
            if m.group(1) == LETTERS[len(seq)]:
                seq.append(m)
        ends = [m.start() for m in seq[1:]] + [len(q)]
        texts = [q[m.end():e].strip().rstrip(",;.").strip() for m, e in zip(seq, ends)]
        if len(seq) >= 2 and all(re.search(r"[A-Za-z0-9]", t) for t in texts):
            return texts
    return None


def _option_count(q: str) -> int:
    """How many lettered options the question announces ("A-D", "A to F", "A, B, C, or D"); 0 if unsaid."""
    n = 0
    for a, b in re.findall(r"\b([A-Z])\s*(?:-|–|—|to|through)\s*([A-Z])\b", q):
        if a == "A":
            n = max(n, ord(b) - 64)
    for b in re.findall(r"\bA(?:\s*,\s*[B-Z])*\s*,?\s*(?:or|and)\s+([B-Z])\b", q):
        n = max(n, ord(b) - 64)
    return n


def load_logicvista(path, limit: int | None = None, cache_dir=None, on_bad_record: str = "skip") -> BenchmarkRecords:
    """LogicVista (github.com/Yijia-Xiao/LogicVista): ``data/dataset.json`` + ``data/images/``.

    ``dataset.json`` maps ids to ``{imagename, question, answer, reasoning, skill, capability, ...}``; the
    question is shown as published. The options are drawn in the image or spelled out in the question, and golds
    are letters, possibly several (``"A, C"``): -> ``choice`` with all gold letters. ``choices`` are the option
    texts when the question spells them out (``(A) 33% (B) 17%``; a gold beyond them is an error), else the bare
    letters up to the announced range ("A-D", "A, B, C, or D"; at least up to the highest gold letter, 4 when
    the question announces nothing). A few questions number their options ("Select from 1-5", gold ``"3"``):
    those keep the gold as written -> ``multilabel``. ``skill`` -> category (joined with ``+`` if several).
    ``cache_dir`` is unused (images are files). A row with an empty question or answer is skipped.
    """
    _check_limit(limit)
    root = _resolve(path)
    file = next((p for p in (root / "data" / "dataset.json", root / "dataset.json", root) if p.is_file()), None)
    if file is None:
        raise layouts_error("logicvista", root, ["GitHub <dir>/data/dataset.json + <dir>/data/images/ (git clone "
                                                 "https://github.com/Yijia-Xiao/LogicVista <dir>)",
                                                 "<dir>/dataset.json + <dir>/images/", "the dataset.json file"])
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{file}: not valid JSON ({e}). Re-download the file.") from None
    if not isinstance(data, dict):
        raise RecordError(f"{file}: expected a JSON object mapping ids to questions, got {type(data).__name__}.")
    col = _Collector(on_bad_record)
    for key, row in list(data.items())[:limit]:
        col.add(file, None, key, partial(_logicvista_record, row, file, key))
    return col.out


def _logicvista_record(row: Any, file: Path, key: str) -> dict:
    fail = _failer(file, None, key)
    if not isinstance(row, dict):
        raise fail("(row)", f"expected an object, got {type(row).__name__}", "Re-download the file.")
    question, ans = _text(row, "question", fail).strip(), _text(row, "answer", fail)
    tokens = re.findall(r"[A-Za-z0-9]+", ans)
    choices = None
    if tokens and all(t.isdigit() for t in tokens):
        kind, ans = "multilabel", ", ".join(tokens)
    elif tokens and all(len(t) == 1 and t.isalpha() for t in tokens):
        letters = sorted({t.upper() for t in tokens})
        top = ord(letters[-1]) - 64
        inline = _inline_options(question)
        if inline and top > len(inline):
            raise fail("answer", f"{ans!r} is outside the {len(inline)} options A-{LETTERS[len(inline) - 1]} "
                                 "the question spells out", "Fix the answer or the question text.")
        # an announced range only widens the letters: "from A to B" can also be question content
        announced = _option_count(question)
        choices = inline or list(LETTERS[: max(announced, top, 0 if announced else 4)])
        kind, ans = "choice", ", ".join(letters)
    else:
        raise fail("answer", f"{ans!r} is not option letters (e.g. 'A' or 'A, C') or numbers", "Fix the answer.")
    skill = row.get("skill")
    category = "+".join(skill) if isinstance(skill, list) and skill else skill if isinstance(skill, str) else None
    image = _text(row, "imagename", fail)
    return {"id": str(key), "problem": benchmark_problem("logicvista", question), "answer": ans,
            "answer_type": kind, "images": [str(file.parent / "images" / image)], "choices": choices,
            "source": "logicvista", "category": category}


# ---------------------------------------------------------------------------------------- synthetic
def load_synthetic(path, limit: int | None = None, cache_dir=None, on_bad_record: str = "skip") -> BenchmarkRecords:
    """The bundled synthetic benchmark's held-out split: a JSONL in the project schema.

    ``path`` is the file, or a folder holding ``test.jsonl`` or exactly one ``*.jsonl``.
    """
    _check_limit(limit)
    _check_policy(on_bad_record)
    p = _resolve(path)
    if p.is_dir():
        found = sorted(p.glob("*.jsonl"))
        pick = [q for q in found if q.name == "test.jsonl"] or found
        if len(pick) != 1:
            raise UserFileNotFoundError(f"expected test.jsonl or exactly one *.jsonl in {p}, found "
                                        f"{[q.name for q in found] or 'none'}. Pass the file itself.")
        p = pick[0]
    records, skipped = read_jsonl(p, on_bad_record=on_bad_record)
    kept = records[:limit]
    return BenchmarkRecords(kept, published=len(kept) + len(skipped),
                            skipped=[{"id": None, "reason": m} for m in skipped])


BENCHMARK_LOADERS: dict[str, Callable[..., BenchmarkRecords]] = {
    "mathvista": load_mathvista,
    "mathvision": load_mathvision,
    "mmmu_pro_standard": partial(load_mmmu_pro, config="standard (10 options)"),
    "mmmu_pro_vision": partial(load_mmmu_pro, config="vision"),
    "logicvista": load_logicvista,
    "synthetic": load_synthetic,
}


def load_benchmark(name: str, path, limit: int | None = None, cache_dir=None, on_bad_record: str = "skip",
                   **kwargs) -> BenchmarkRecords:
    """Load benchmark ``name`` from ``path`` (a local folder/file, resolved against the working directory, or a
    hub id); ``kwargs`` go to the loader (e.g. ``split='test'`` for MathVision, ``split='testmini'`` for
    MathVista). ``on_bad_record``: ``skip`` (default: rows that cannot be used are listed in ``.skipped``) or
    ``error`` (the first such row raises)."""
    if name not in BENCHMARK_LOADERS:
        raise UserError(f"unknown benchmark {name!r}. Known benchmarks: {', '.join(sorted(BENCHMARK_LOADERS))}.")
    return BENCHMARK_LOADERS[name](path, limit=limit, cache_dir=cache_dir, on_bad_record=on_bad_record, **kwargs)
