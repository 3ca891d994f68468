"""Loaders for published visual-reasoning benchmarks, read offline from a folder the user downloaded.

Every loader maps its benchmark's own answer conventions onto :class:`~vold_pl.data.schema.Record`
and runs each mapped row through :func:`~vold_pl.data.schema.validate_record`, so a malformed row
raises :class:`~vold_pl.data.schema.RecordError` naming ``<file>:<row> (id=...)`` and the field
(``row`` is the 0-based row index inside that parquet shard). A missing folder or file raises
:class:`~vold_pl.errors.UserFileNotFoundError` (a ``FileNotFoundError``) naming the expected path and how to
download it.

Expected layouts (``<dir>`` is what you pass as ``path``; the files are as published):

========================  ==================================================================
``mathvista``             ``huggingface-cli download AI4Math/MathVista --repo-type dataset
                          --local-dir <dir>`` -> ``<dir>/data/testmini-*.parquet``
``mathvision``            ``huggingface-cli download MathLLMs/MathVision --repo-type dataset
                          --local-dir <dir>`` -> ``<dir>/data/test-*.parquet`` (and testmini)
``mmmu_pro_standard``     ``huggingface-cli download MMMU/MMMU_Pro --repo-type dataset
``mmmu_pro_vision``       --local-dir <dir>`` -> ``<dir>/standard (10 options)/test-*.parquet``,
                          ``<dir>/vision/test-*.parquet``
``logicvista``            ``git clone https://github.com/Yijia-Xiao/LogicVista <dir>`` ->
                          ``<dir>/data/dataset.json`` and ``<dir>/data/images/*.png``
``synthetic``             a JSONL file in the project schema (or a folder holding one)
========================  ==================================================================

A parquet folder may also be given directly (``<dir>`` holding the ``*.parquet`` shards).
Records hold image *paths*, so embedded image bytes are written once to ``<cache_dir>/<benchmark>/
<split>/`` (default ``cache_dir``: ``<dir>/images_cache``); an existing file of the same size is
reused. Images above ``MAX_IMAGE_PIXELS`` are downscaled on the way out, because the schema refuses
them and the processor shrinks them to a few hundred pixels anyway.

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

from vold_pl.data.schema import MAX_IMAGE_PIXELS, Record, RecordError, _where, read_jsonl, validate_record
from vold_pl.errors import UserError, UserFileNotFoundError
from vold_pl.io import atomic_open, atomic_write_bytes

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_IMAGE_TAG = re.compile(r"\s*<image\s*(\d*)>\s*")
_EXTS = {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp", "bmp": "bmp"}


def _hf_hint(repo: str, root: Path) -> str:
    return f"Download it with: huggingface-cli download {repo} --repo-type dataset --local-dir {root}"


def _find_parquet(path: str | Path, subdir: str, split: str, repo: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise UserFileNotFoundError(f"benchmark folder not found: {root} (expected {root / subdir}/{split}-*.parquet). "
                                + _hf_hint(repo, root))
    for folder in (root / subdir, root):
        files = sorted(folder.glob(f"{split}-*.parquet"))
        if files:
            return files
    raise UserFileNotFoundError(f"no {root / subdir}/{split}-*.parquet in {root}. " + _hf_hint(repo, root))


def _rows(files: list[Path], required: tuple[str, ...], limit: int | None) -> Iterator[tuple[Path, int, dict]]:
    """Yield ``(file, row_index, row)``; batches keep memory flat on shards of hundreds of MB."""
    import pyarrow.parquet as pq

    _check_limit(limit)
    from vold_pl.progress import progress

    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # footers only: cheap
    bar = progress(total=total if limit is None else min(total, limit), desc="benchmark rows (images cached)",
                   unit="row", leave=False)
    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        missing = [c for c in required if c not in pf.schema_arrow.names]
        if missing:
            raise RecordError(f"{f}: missing column(s) {', '.join(missing)} (found "
                              f"{', '.join(pf.schema_arrow.names)}). Is this the right benchmark, config and split, "
                              "as published on the hub?")
        i = 0
        for batch in pf.iter_batches(batch_size=32):
            for row in batch.to_pylist():
                if limit is not None and n >= limit:
                    bar.close()
                    return
                yield f, i, row
                bar.update(1)
                i += 1
                n += 1
    bar.close()


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise UserError(f"limit must be a non-negative integer or None, got {limit!r}")


def _failer(file: Path, row: int | None, rid: Any) -> Callable[[str, str, str], RecordError]:
    def fail(fname: str, problem: str, fix: str) -> RecordError:
        return RecordError(f"{_where(file, row, rid)}: field '{fname}': {problem}. {fix}")
    return fail


def _text(row: dict, name: str, fail) -> str:
    v = row.get(name)
    if not isinstance(v, str) or not v.strip():
        raise fail(name, f"expected a non-empty string, got {v!r:.60}",
                   "The published file has text here; re-download it.")
    return v


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def _cache(path, cache_dir, bench: str, split: str) -> Path:
    return Path(cache_dir or Path(path) / "images_cache") / bench / _safe(split)


def _save_image(value: Any, dest_stem: Path, fail, field: str, fallback: Path | None = None) -> str:
    """Write an HF ``Image`` cell (``{'bytes', 'path'}``) to ``dest_stem.<ext>``; return its path.

    Without bytes, ``fallback`` (the published relative ``image`` path, e.g. from an unzipped
    ``images.zip``) is used if it exists.
    """
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    if not data:
        if fallback is not None and fallback.is_file():
            return str(fallback)
        raise fail(field, "no image bytes" + (f" and no file at {fallback}" if fallback else ""),
                   "The published parquet embeds the image; re-download the file.")
    from PIL import Image

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
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        with atomic_open(dest, "wb") as fh:
            im.resize((max(1, int(w * scale)), max(1, int(h * scale)))).save(fh, format="PNG")
    else:
        atomic_write_bytes(dest, data)
    return str(dest)


def _finish(obj: dict, file: Path, row: int | None, seen: set[str]) -> Record:
    rec = validate_record(obj, file, row, check_images=True)
    if rec.id in seen:
        raise RecordError(f"{_where(file, row, rec.id)}: field 'id': duplicate id. Ids must be unique within a "
                          "benchmark.")
    seen.add(rec.id)
    return rec


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


# ---------------------------------------------------------------------------------------- MathVista
MATHVISTA_COLUMNS = ("pid", "question", "decoded_image", "choices", "precision", "answer", "question_type",
                     "answer_type")


def load_mathvista(path, split: str = "testmini", limit: int | None = None, cache_dir=None) -> list[Record]:
    """MathVista (``AI4Math/MathVista``), split ``testmini`` (``test`` has no public answers).

    * ``multi_choice``: the gold option text becomes its letter -> ``choice``.
    * ``free_form`` ``integer`` -> ``math``; ``float`` -> ``math`` with the gold formatted to exactly
      ``precision`` decimals (``"1.2"`` at precision 2 -> ``"1.20"``) and the problem asking for that
      many decimals, as MathVista's own hint does. Scoring must respect it the way the official
      evaluation does: round the prediction to the number of decimals written in the gold, then
      compare. ``text``/``list`` -> ``open`` (exact match after normalisation).
    * ``unit`` goes into the problem as ``(Unit: cm)``; golds never carry the unit.
    * ``category`` is ``metadata['task']`` (figure QA, geometry problem solving, ...), the grouping
      MathVista reports by; ``difficulty`` is null (MathVista has none).
    """
    files = _find_parquet(path, "data", split, "AI4Math/MathVista")
    cache = _cache(path, cache_dir, "mathvista", split)
    out: list[Record] = []
    seen: set[str] = set()
    for f, i, row in _rows(files, MATHVISTA_COLUMNS, limit):
        pid = str(row["pid"])
        fail = _failer(f, i, pid)
        problem, hint = _text(row, "question", fail).strip(), ""
        ans = str(row["answer"] if row["answer"] is not None else "").strip()
        if not ans:
            raise fail("answer", "empty answer", "Only 'testmini' has public answers; load split='testmini'.")
        qtype, atype, choices = row["question_type"], row["answer_type"], None
        if qtype == "multi_choice":
            choices = [str(c) for c in (row["choices"] or [])]
            if len(choices) < 2:
                raise fail("choices", f"a multi_choice row needs >= 2 choices, got {choices!r}",
                           "Re-download the file.")
            ans, kind = _letter_of(ans, choices, fail, text_first=True), "choice"
        elif qtype != "free_form":
            raise fail("question_type", f"unknown question type {qtype!r}", "Expected 'multi_choice' or 'free_form'.")
        elif atype in ("integer", "float"):
            try:
                value = float(ans)
            except ValueError:
                raise fail("answer", f"{ans!r} is not a number but answer_type is {atype!r}", "Fix the row.") from None
            if atype == "integer":
                if not value.is_integer():
                    raise fail("answer", f"{ans!r} is not an integer", "Fix the row or its answer_type.")
                hint = "Answer with an integer."
            elif row["precision"] is not None and row["precision"] == row["precision"]:  # NaN means unset
                places = int(row["precision"])
                ans = f"{value:.{places}f}"
                hint = f"Answer with a number rounded to {places} decimal place{'s' if places != 1 else ''}."
            kind = "math"
        elif atype in ("text", "list"):
            kind, hint = "open", "Answer with a Python list, e.g. [1, 2, 3]." if atype == "list" else ""
        else:
            raise fail("answer_type", f"unknown answer type {atype!r}", "Expected integer, float, text or list.")
        if qtype == "free_form" and row.get("unit"):
            problem += f" (Unit: {row['unit']})"
        problem += f"\n{hint}" if hint else ""
        meta = row.get("metadata")
        if isinstance(meta, str):
            meta = json.loads(meta) if meta.strip().startswith("{") else None
        image = _save_image(row["decoded_image"], cache / _safe(pid), fail, "decoded_image",
                            Path(path) / row["image"] if isinstance(row.get("image"), str) else None)
        out.append(_finish({"id": pid, "problem": problem, "answer": ans, "answer_type": kind, "images": [image],
                            "choices": choices, "source": "mathvista",
                            "category": (meta or {}).get("task") if isinstance(meta, dict) else None}, f, i, seen))
    return out


# --------------------------------------------------------------------------------------- MathVision
MATHVISION_COLUMNS = ("id", "question", "options", "decoded_image", "answer", "level", "subject")
_LEVEL_TO_DIFFICULTY = {1: 1, 2: 1, 3: 2, 4: 3, 5: 3}


def load_mathvision(path, split: str = "test", limit: int | None = None, cache_dir=None) -> list[Record]:
    """MATH-Vision (``MathLLMs/MathVision``), split ``test`` (3040) or ``testmini`` (304).

    Non-empty ``options`` -> ``choice`` (letters A-E; a gold given as option text is mapped to its
    letter); empty -> ``math``. ``<image1>`` placeholders are removed (the image is passed
    separately). ``level`` 1-2/3/4-5 -> difficulty 1/2/3; ``subject`` -> category.
    """
    files = _find_parquet(path, "data", split, "MathLLMs/MathVision")
    cache = _cache(path, cache_dir, "mathvision", split)
    out: list[Record] = []
    seen: set[str] = set()
    for f, i, row in _rows(files, MATHVISION_COLUMNS, limit):
        rid = str(row["id"])
        fail = _failer(f, i, rid)
        problem = _IMAGE_TAG.sub(" ", _text(row, "question", fail)).strip()
        ans = str(row["answer"] if row["answer"] is not None else "").strip()
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
        image = _save_image(row["decoded_image"], cache / _safe(rid), fail, "decoded_image",
                            Path(path) / row["image"] if isinstance(row.get("image"), str) else None)
        out.append(_finish({"id": rid, "problem": problem, "answer": ans, "answer_type": kind, "images": [image],
                            "choices": options or None, "difficulty": _LEVEL_TO_DIFFICULTY[level],
                            "source": "mathvision", "category": row["subject"]}, f, i, seen))
    return out


# ----------------------------------------------------------------------------------------- MMMU-Pro
MMMU_PRO_VISION_PROMPT = ("The question and its options are shown in the image. "
                          "Answer with the letter of the correct option.")
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
                  cache_dir=None) -> list[Record]:
    """MMMU-Pro (``MMMU/MMMU_Pro``), config ``standard (10 options)``, ``standard (4 options)`` or ``vision``.

    Standard: ``<image k>`` references in question and options are rewritten to plain ``image k``
    (Record.images holds ``image_1..image_7`` in number order, so the reference stays meaningful
    without a template placeholder); ``topic_difficulty`` Easy/Medium/Hard -> 1/2/3.
    Vision: the whole question, options included, is the screenshot, so the problem is a fixed
    instruction and ``choices`` are the bare letters (printing the option texts would turn it back
    into the standard setting). Both: ``answer`` is the letter, ``subject`` -> category.
    """
    vision = config == "vision"
    files = _find_parquet(path, config, "test", "MMMU/MMMU_Pro")
    cache = _cache(path, cache_dir, "mmmu_pro", config)
    required = ("id", "image", "options", "answer") if vision else ("id", "question", "options", "answer", "image_1")
    out: list[Record] = []
    seen: set[str] = set()
    for f, i, row in _rows(files, required, limit):
        rid = str(row["id"])
        fail = _failer(f, i, rid)
        options = _parse_options(row["options"], fail)
        if vision:
            problem, choices = MMMU_PRO_VISION_PROMPT, list(LETTERS[: len(options)])
            images = [_save_image(row["image"], cache / _safe(rid), fail, "image")]
        else:
            problem, choices = _untag(_text(row, "question", fail)), [_untag(o) for o in options]
            images = [_save_image(row[f"image_{k}"], cache / f"{_safe(rid)}_{k}", fail, f"image_{k}")
                      for k in range(1, 8) if row.get(f"image_{k}") is not None]
        diff = _TOPIC_DIFFICULTY.get(str(row.get("topic_difficulty") or "").strip().lower())
        out.append(_finish({"id": rid, "problem": problem, "answer": str(row["answer"] or "").strip(),
                            "answer_type": "choice", "images": images, "choices": choices, "difficulty": diff,
                            "source": "mmmu_pro_vision" if vision else "mmmu_pro_standard",
                            "category": row.get("subject")}, f, i, seen))
    return out


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


def load_logicvista(path, limit: int | None = None, cache_dir=None) -> list[Record]:
    """LogicVista (github.com/Yijia-Xiao/LogicVista): ``data/dataset.json`` + ``data/images/``.

    ``dataset.json`` maps ids to ``{imagename, question, answer, reasoning, skill, capability, ...}``.
    The options are drawn in the image, and golds are letters, possibly several (``"A, C"``):
    -> ``choice`` with all gold letters. ``choices`` are the option texts when the question spells
    them out (``(A) 33% (B) 17%``; a gold beyond them is an error), else the bare letters up to the
    announced range ("A-D", "A, B, C, or D"; at least up to the highest gold letter, 4 when the
    question announces nothing). A few questions number their
    options ("Select from 1-5", gold ``"3"``): those keep the gold as written -> ``multilabel``.
    ``skill`` -> category (joined with ``+`` if several). ``cache_dir`` is unused (images are files).
    """
    _check_limit(limit)
    root = Path(path)
    file = next((p for p in (root / "data" / "dataset.json", root / "dataset.json") if p.is_file()), None)
    if file is None:
        raise UserFileNotFoundError(f"LogicVista file not found: {root / 'data' / 'dataset.json'}. Download it with: "
                                f"git clone https://github.com/Yijia-Xiao/LogicVista {root}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}). Re-download the file.") from None
    if not isinstance(data, dict):
        raise RecordError(f"{file}: expected a JSON object mapping ids to questions, got {type(data).__name__}.")
    out: list[Record] = []
    seen: set[str] = set()
    for key, row in list(data.items())[:limit]:
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
        out.append(_finish({"id": str(key), "problem": question, "answer": ans, "answer_type": kind,
                            "images": [str(file.parent / "images" / image)], "choices": choices,
                            "source": "logicvista", "category": category}, file, None, seen))
    return out


# ---------------------------------------------------------------------------------------- synthetic
def load_synthetic(path, limit: int | None = None, cache_dir=None) -> list[Record]:
    """The bundled synthetic benchmark's held-out split: a JSONL in the project schema.

    ``path`` is the file, or a folder holding ``test.jsonl`` or exactly one ``*.jsonl``.
    """
    _check_limit(limit)
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.jsonl"))
        pick = [q for q in found if q.name == "test.jsonl"] or found
        if len(pick) != 1:
            raise UserFileNotFoundError(f"expected test.jsonl or exactly one *.jsonl in {p}, found "
                                    f"{[q.name for q in found] or 'none'}. Pass the file itself.")
        p = pick[0]
    records, _ = read_jsonl(p)
    return records[:limit]


BENCHMARK_LOADERS: dict[str, Callable[..., list[Record]]] = {
    "mathvista": load_mathvista,
    "mathvision": load_mathvision,
    "mmmu_pro_standard": partial(load_mmmu_pro, config="standard (10 options)"),
    "mmmu_pro_vision": partial(load_mmmu_pro, config="vision"),
    "logicvista": load_logicvista,
    "synthetic": load_synthetic,
}


def load_benchmark(name: str, path, limit: int | None = None, cache_dir=None, **kwargs) -> list[Record]:
    """Load benchmark ``name`` from the local folder/file ``path``; ``kwargs`` go to the loader
    (e.g. ``split='test'`` for MathVision, ``split='testmini'`` for MathVista)."""
    if name not in BENCHMARK_LOADERS:
        raise UserError(f"unknown benchmark {name!r}. Known benchmarks: {', '.join(sorted(BENCHMARK_LOADERS))}.")
    return BENCHMARK_LOADERS[name](path, limit=limit, cache_dir=cache_dir, **kwargs)
