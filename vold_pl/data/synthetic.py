"""Procedural, deterministic visual-reasoning data: the embedded default data set of vold-pl.

Each item is a 112x112 image of a 4x4 grid of 28-px cells (28 px is one merged Qwen2.5-VL patch, so one
object per cell keeps perception learnable for a tiny student) holding 1..6 filled squares/circles in four
clearly distinct colours, a question, a gold answer and reasoning trace, and an EXACT text view (caption +
question) from which a text-only teacher can answer perfectly: the premise of VOLD's on-policy
distillation from a text-only teacher. Every image record has a text-only twin (source ``synthetic-text``,
id suffix ``-text``) for teacher SFT and for mixing text-only examples.

The caption states the scene's facts (how many of each colour and shape, :func:`scene_facts`); every trace
starts by stating them ("I see ...") and then reasons over them, so a student that reads the image well is left
with the reasoning, where the teacher's help lies. Perception files (``n_perception``) train and measure that
reading on its own, as a real VLM's pretraining does.

CLI: ``python -m vold_pl.data.synthetic --out data/synthetic --seed 0 --n-train 2000 --n-val 200 --n-test 400
--n-perception 20000 --n-rl 4000``
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from PIL import Image, ImageDraw

from .schema import Record, write_jsonl

GRID, CELL = 4, 28
IMAGE_SIZE = GRID * CELL
MAX_OBJECTS = 6
# Saturated, far-apart colours: the student has to learn them from scratch in minutes.
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 0)}
SHAPES = ("square", "circle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (20, 20, 20)}
GRID_LINES = {"white": (210, 210, 210), "black": (70, 70, 70)}
KINDS = [(c, s) for c in COLORS for s in SHAPES]  # canonical order of the caption's totals
ANSWER_TYPES = ("yesno", "choice", "math", "open")
DIFFICULTIES = (1, 2, 3)
SPLITS = ("train", "val", "test")
LETTERS = "ABCD"


class Obj(NamedTuple):
    row: int  # 1-based, as the caption says it
    col: int
    color: str
    shape: str


class Scene(NamedTuple):
    background: str
    objects: tuple[Obj, ...]  # sorted by (row, col): canonical, so equal scenes compare and hash equal


def make_scene(rng: random.Random) -> Scene:
    """A random scene: 1..MAX_OBJECTS objects in distinct cells."""
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(1, MAX_OBJECTS)))
    objs = tuple(Obj(c // GRID + 1, c % GRID + 1, rng.choice(list(COLORS)), rng.choice(SHAPES)) for c in cells)
    return Scene(rng.choice(list(BACKGROUNDS)), objs)


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene; no anti-aliasing, so every pixel is exactly the background, a grid line or a COLORS value."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for k in range(1, GRID):  # faint cell borders make "row" and "column" visible
        draw.line([(k * CELL, 0), (k * CELL, IMAGE_SIZE - 1)], fill=GRID_LINES[scene.background])
        draw.line([(0, k * CELL), (IMAGE_SIZE - 1, k * CELL)], fill=GRID_LINES[scene.background])
    for o in scene.objects:
        x, y = (o.col - 1) * CELL, (o.row - 1) * CELL
        if o.shape == "square":  # 18 px square vs 22 px circle: similar area, so size is no shape cue
            draw.rectangle([x + 5, y + 5, x + CELL - 6, y + CELL - 6], fill=COLORS[o.color])
        else:
            draw.ellipse([x + 3, y + 3, x + CELL - 4, y + CELL - 4], fill=COLORS[o.color])
    return img


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _entry(n: int, color: str, shape: str) -> str:
    """One fact: the kind, then its count ("red squares 1"). Kind first, so that a reader who has just written
    the kind finds the count right after the same words in the list and copies it; with the count first ("1 red
    square") it must pick the number before it has written the kind, and the 1500-step toy teacher put a
    neighbouring entry's count there in most of its errors."""
    return f"{color} {shape}s {n}"


def scene_facts(scene: Scene) -> str:
    """The scene's facts: how many of each kind, in the canonical order of KINDS ("red squares 1, red circles 2").

    This list is what perception has to deliver. The text view states it, every trace starts by writing it
    ("I see ..."), and the perception stage trains the student to read it off the image. Everything a question
    asks is computed from it, so what comes after it in a trace is reasoning over facts, not perception.
    """
    kinds = Counter((o.color, o.shape) for o in scene.objects)
    return ", ".join(_entry(kinds[k], *k) for k in KINDS if kinds[k])


def describe_scene(scene: Scene) -> str:
    """The exact caption a text-only teacher reads: the background and the facts, so the text determines every
    answer."""
    return (f"The image shows {_plural(len(scene.objects), 'shape')} on a {scene.background} background: "
            f"{scene_facts(scene)}.")


# ---- questions: each builder returns {stem, value, trace, category} or None when it does not fit the scene ----

def _phrase(color: str | None = None, shape: str | None = None) -> str:
    """Plural noun phrase of a count spec: 'red squares', 'circles', 'blue shapes'."""
    return " ".join(w for w in (color, (shape or "shape") + "s") if w)


def _count(scene: Scene, color: str | None = None, shape: str | None = None) -> tuple[int, str]:
    """Count matching objects, with a trace sentence that reads the count off the facts list.

    The sentence names every matching kind exactly as the facts list does ("red circles 2"),
    in the same order, and ends with the count: "Red shapes: red squares 1, red circles 2. 1 + 2 = 3.",
    "Red shapes: red circles 2. That makes 2.", "Red shapes: none. That makes 0.". Short and copyable, so a
    small text-only reader can produce it nearly without error, while a student that sees only the image has
    to perceive the same per-kind counts; every count sentence ends with its number, which later steps reuse.
    """
    kinds = Counter((o.color, o.shape) for o in scene.objects)
    parts = [(kinds[k], _entry(kinds[k], *k)) for k in KINDS
             if kinds[k] and color in (None, k[0]) and shape in (None, k[1])]
    n, name = sum(m for m, _ in parts), _phrase(color, shape).capitalize()
    if len(parts) < 2:
        return n, f"{name}: {parts[0][1] if parts else 'none'}. That makes {n}."
    return n, f"{name}: {', '.join(e for _, e in parts)}. {' + '.join(str(m) for m, _ in parts)} = {n}."


def _total(scene: Scene) -> tuple[int, str]:
    """All shapes, summed over the facts list: "Shapes in total: 1 + 2 + 1 = 4." (or "That makes 1.")."""
    kinds = Counter((o.color, o.shape) for o in scene.objects)
    counts = [kinds[k] for k in KINDS if kinds[k]]  # in the order the facts list states them
    n = sum(counts)
    if len(counts) < 2:
        return n, f"Shapes in total: that makes {n}."
    return n, f"Shapes in total: {' + '.join(str(m) for m in counts)} = {n}."


def _pair(rng: random.Random) -> list[tuple[str | None, str | None]]:
    """Two count specs to compare or combine: squares vs circles, or two distinct colours (random order)."""
    if rng.random() < 0.5:
        return rng.sample([(None, "square"), (None, "circle")], 2)
    return [(c, None) for c in rng.sample(list(COLORS), 2)]


def _balanced(rng: random.Random, candidates: list, is_yes) -> tuple:
    """A candidate whose yes/no answer matches a fair coin when one exists, so neither answer is a free win."""
    want = rng.random() < 0.5
    return rng.choice([c for c in candidates if is_yes(c) == want] or candidates)


def _q_count1(scene, rng):
    spec = (rng.choice(list(COLORS)), None) if rng.random() < 0.5 else (None, rng.choice(SHAPES))
    n, t = _count(scene, *spec)
    return dict(stem=f"How many {_phrase(*spec)} are there?", value=n, trace=t, category="count")


def _q_count2(scene, rng):
    variant = rng.randrange(3)
    if variant == 0:
        c1, c2 = rng.sample(list(COLORS), 2)
        (a, ta), (b, tb) = _count(scene, c1), _count(scene, c2)
        return dict(stem=f"How many shapes are {c1} or {c2}?", value=a + b,
                    trace=f"{ta} {tb} {a} + {b} = {a + b}.", category="count")
    if variant == 1:
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        n, t = _count(scene, c, s)
        return dict(stem=f"How many {c} {s}s are there?", value=n, trace=t, category="count")
    n, t = _total(scene)
    return dict(stem="How many shapes are there in total?", value=n, trace=t, category="count")


def _q_arith3(scene, rng):
    if rng.random() < 0.5:
        (sa, sb), k = _pair(rng), rng.randint(1, 3)
        (a, ta), (b, tb) = _count(scene, *sa), _count(scene, *sb)
        return dict(stem=f"What is the number of {_phrase(*sa)} times the number of {_phrase(*sb)} plus {k}?",
                    value=a * b + k, trace=f"{ta} {tb} {a} * {b} + {k} = {a * b + k}.", category="arith")
    c, (total, tt) = rng.choice(list(COLORS)), _total(scene)  # total minus a part: never negative
    a, ta = _count(scene, c)
    return dict(stem=f"What is the total number of shapes minus the number of {c} shapes?", value=total - a,
                trace=f"{tt} {ta} {total} - {a} = {total - a}.",
                category="arith")


def _q_exists(scene, rng):
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [k for k in KINDS if k not in present]  # never empty: at most 6 of the 8 kinds are present
    c, s = rng.choice(present if rng.random() < 0.5 else absent)  # balanced yes/no
    n, t = _count(scene, c, s)
    return dict(stem=f"Is there a {c} {s}?", value="yes" if n else "no", trace=t, category="exist")


def _q_compare(scene, rng):
    family = [(None, "square"), (None, "circle")] if rng.random() < 0.5 else [(c, None) for c in COLORS]
    n = {spec: _count(scene, *spec)[0] for spec in family}
    sa, sb = _balanced(rng, list(itertools.permutations(family, 2)), lambda p: n[p[0]] > n[p[1]])
    (a, ta), (b, tb) = _count(scene, *sa), _count(scene, *sb)
    verdict = f"{a} > {b}." if a > b else f"{a} is not more than {b}."
    return dict(stem=f"Are there more {_phrase(*sa)} than {_phrase(*sb)}?", value="yes" if a > b else "no",
                trace=f"{ta} {tb} {verdict}", category="compare")


def _q_sum_gt(scene, rng):
    n = {spec: _count(scene, *spec)[0] for spec in [(c, None) for c in COLORS] + [(None, s) for s in SHAPES]}
    cands = [(c1, c2, s) for c1, c2 in itertools.combinations(COLORS, 2) for s in SHAPES]
    c1, c2, s = _balanced(rng, cands, lambda k: n[k[0], None] + n[k[1], None] > n[None, k[2]])
    if rng.random() < 0.5:  # either colour may come first in the question
        c1, c2 = c2, c1
    (a, ta), (b, tb), (m, tm) = _count(scene, c1), _count(scene, c2), _count(scene, None, s)
    gt = a + b > m
    return dict(stem=f"Is the number of {c1} shapes plus the number of {c2} shapes greater than the number of {s}s?",
                value="yes" if gt else "no", category="arith",
                trace=f"{ta} {tb} {tm} {a} + {b} = {a + b}, which is {'' if gt else 'not '}greater than {m}.")


def _q_parity(scene, rng):
    spec = (rng.choice(list(COLORS)), None) if rng.random() < 0.5 else (None, rng.choice(SHAPES))
    n, t = _count(scene, *spec)
    word = "even" if n % 2 == 0 else "odd"
    return dict(stem=f"Is the number of {_phrase(*spec)} even or odd?", value=word, trace=f"{t} {n} is {word}.",
                category="parity")


def _q_more_shape(scene, rng):
    (a, ta), (b, tb) = _count(scene, None, "square"), _count(scene, None, "circle")
    if a == b:
        return None  # a tie has no answer: resample the scene
    return dict(stem="Which are there more of, squares or circles?", value="squares" if a > b else "circles",
                trace=f"{ta} {tb} {a} {'>' if a > b else '<'} {b}.", category="compare")  # squares first, always


def _q_most_color(scene, rng):
    counts = [(_count(scene, c), c) for c in COLORS]
    best = max(n for (n, _), _ in counts)
    winners = [c for (n, _), c in counts if n == best]
    if len(winners) != 1:
        return None
    return dict(stem="Which colour has the most shapes?", value=winners[0], category="compare",
                trace=" ".join(t for (_, t), _ in counts) + f" {winners[0].capitalize()} has the most.")


def _as_choice(q: dict | None, rng: random.Random) -> dict | None:
    """Turn a numeric question into 4 shuffled numeric options near the answer. Shuffled, not sorted: small
    counts would otherwise put the answer at A most of the time, a shortcut a policy would learn."""
    if q is not None:
        v = q["value"]
        options = rng.sample([x for x in range(max(0, v - 3), v + 5) if x != v], 3) + [v]  # never negative
        rng.shuffle(options)
        q["choices"] = [str(x) for x in options]
    return q


BUILDERS = {
    ("math", 1): _q_count1, ("math", 2): _q_count2, ("math", 3): _q_arith3,
    ("choice", 1): lambda s, r: _as_choice(_q_count1(s, r), r),
    ("choice", 2): lambda s, r: _as_choice(_q_count2(s, r), r),
    ("choice", 3): lambda s, r: _as_choice(_q_arith3(s, r), r),
    ("yesno", 1): _q_exists, ("yesno", 2): _q_compare, ("yesno", 3): _q_sum_gt,
    ("open", 1): _q_parity, ("open", 2): _q_more_shape, ("open", 3): _q_most_color,
}


def make_question(scene: Scene, answer_type: str, difficulty: int, rng: random.Random) -> dict | None:
    """A question of the given type/difficulty with problem text, answer, choices and trace; None if it does not fit."""
    q = BUILDERS[answer_type, difficulty](scene, rng)
    if q is None:
        return None
    problem, answer, choices = q["stem"], str(q["value"]), None
    if answer_type == "choice":
        choices = q["choices"]
        k = choices.index(str(q["value"]))
        answer = LETTERS[k]
        problem += " Options: " + " ".join(f"{L}. {c}" for L, c in zip(LETTERS, choices))
        # Check the options in order and stop at the match. A bare "1 is option B." asks a small reader to
        # find "1" among the options and copy the letter before it in one step (the 3000-step toy teacher got
        # 47% of those right); copying "B. 1" in order is local. Each check then restates the value looked for
        # ("B. 1 vs 1 yes."): yes/no compares two adjacent numbers, where a bare "B. 1 yes." had the 2000-step
        # toy teacher compare with a number several tokens back, and most of its remaining errors were there.
        q["trace"] += f" Looking for {q['value']}:" + "".join(
            f" {L}. {c} vs {q['value']} {'yes' if i == k else 'no'}."
            for i, (L, c) in enumerate(zip(LETTERS, choices[:k + 1])))
    # Every trace first states what the image shows (the perception step; the teacher copies it from its text
    # view), then reasons over those facts.
    return dict(stem=q["stem"], problem=problem, answer=answer, answer_type=answer_type, choices=choices,
                trace=f"I see {scene_facts(scene)}. " + q["trace"] + f" The answer is {answer}.", difficulty=difficulty,
                category=q["category"])


def _generate_split(seed: int, split: str, n: int, combos: list, seen: set) -> list[tuple[Scene, dict]]:
    """n (scene, question) items of one split; each split has its own RNG stream, and ``seen`` (shared across
    splits) rejects any (caption, question stem) pair already used, so splits never share a problem. The caption
    states the facts, not where the shapes are, so two scenes that differ only in positions pose the same problem
    with the same answer: keyed by scene, a test problem could be a training problem in another layout."""
    rng = random.Random(f"vold-synthetic/{seed}/{split}")  # str seeds hash deterministically (sha512)
    out: list[tuple[Scene, dict]] = []
    for _ in range(200 * n + 1000):
        if len(out) >= n:
            break
        atype, diff = combos[len(out) % len(combos)]  # round-robin: every type x difficulty even for small n
        scene = make_scene(rng)
        q = make_question(scene, atype, diff, rng)
        if q is None or (describe_scene(scene), q["stem"]) in seen:
            continue
        seen.add((describe_scene(scene), q["stem"]))
        out.append((scene, q))
    if len(out) < n:
        raise RuntimeError(f"could not draw {n} distinct {split} items for {combos}; ask for fewer")
    return out


def _combos(answer_types: Sequence[str] | None, difficulties: Sequence[int] | None) -> list[tuple[str, int]]:
    types, diffs = list(answer_types or ANSWER_TYPES), list(difficulties or DIFFICULTIES)
    bad = [t for t in types if t not in ANSWER_TYPES] + [d for d in diffs if d not in DIFFICULTIES]
    if bad or not types or not diffs:
        raise ValueError(f"unsupported answer types/difficulties {bad}; use {ANSWER_TYPES} and {DIFFICULTIES}")
    return list(itertools.product(types, diffs))


def generate_items(seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 200,
                   answer_types: Sequence[str] | None = None, difficulties: Sequence[int] | None = None,
                   n_rl: int = 0) -> dict[str, list[tuple[Scene, dict]]]:
    """All splits' (scene, question) items, without rendering. Test is drawn first, then val, then train, then
    (``n_rl`` > 0) ``rl``, so the evaluation splits stay the same when only n_train or n_rl changes."""
    combos, seen = _combos(answer_types, difficulties), set()
    counts = {"train": n_train, "val": n_val, "test": n_test, "rl": n_rl}
    order = ("test", "val", "train", "rl") if n_rl > 0 else ("test", "val", "train")
    items = {s: _generate_split(seed, s, counts[s], combos, seen) for s in order}
    return {s: items[s] for s in (*SPLITS, "rl") if s in items}


def _answer_fields(scene: Scene, q: dict) -> dict:
    """The fields an image record and its text twin share: gold answer, trace and the text view (what the
    text-only teacher reads: the exact caption, then the problem with its options)."""
    return dict(answer=q["answer"], answer_type=q["answer_type"], choices=q["choices"], trace=q["trace"],
                text_view=f"{describe_scene(scene)}\n{q['problem']}", difficulty=q["difficulty"],
                category=q["category"])


PERCEPTION_QUESTION = "How many shapes of each kind are in the image? List each colour and shape with its count."


def perception_scenes(seed: int, split: str, n: int, exclude: set) -> list[Scene]:
    """``n`` distinct scenes of the perception split ``split`` (own RNG stream), none of them in ``exclude``."""
    rng, out, seen = random.Random(f"vold-synthetic/{seed}/perception-{split}"), [], set(exclude)
    for _ in range(50 * n + 1000):
        if len(out) >= n:
            return out
        scene = make_scene(rng)
        if scene not in seen:
            seen.add(scene)
            out.append(scene)
    raise RuntimeError(f"could not draw {n} distinct perception scenes for {split}; ask for fewer")


def perception_record(scene: Scene, rid: str, img_path: Path) -> Record:
    """A perception example: the image, :data:`PERCEPTION_QUESTION`, and the facts list as the answer (open)."""
    facts = scene_facts(scene)
    return Record(id=rid, problem=PERCEPTION_QUESTION, images=[str(Path(img_path).resolve())], answer=facts,
                  answer_type="open", trace=f"I see {facts}.", text_view=f"{describe_scene(scene)}\n"
                  f"{PERCEPTION_QUESTION}", difficulty=None, source="synthetic-perception", category="perception")


def generate_dataset(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 200,
                     answer_types: Sequence[str] | None = None, difficulties: Sequence[int] | None = None,
                     n_teacher_text: int = 0, n_perception: int = 0, n_perception_test: int = 200,
                     n_rl: int = 0) -> dict[str, Path]:
    """Write {split}.jsonl, {split}_text.jsonl, images/ and manifest.json; same args give byte-identical files.

    ``n_teacher_text`` > 0 also writes ``teacher_text.jsonl``: that many extra text-only problems (own RNG stream,
    disjoint from every split) for the text-only teacher's SFT. Text costs no rendering, and a reader that has
    seen many captions learns to look facts up in the caption instead of memorising the 2000 training scenes.

    ``n_rl`` > 0 also writes ``rl.jsonl`` (+ ``rl_text.jsonl``): that many image problems for the RL stages,
    none of them a problem of the other splits, so RL trains on problems the cold start has not memorised.

    ``n_perception`` > 0 also writes ``perception_train.jsonl`` (that many scenes) and ``perception_test.jsonl``
    (``n_perception_test`` other scenes, none of them a scene of any other file): the question
    :data:`PERCEPTION_QUESTION` with the scene's facts (:func:`scene_facts`) as the answer. It stands in for what a
    real VLM brings from pretraining: reading what is in an image (``perception_*`` images under ``images/``).

    Returns the paths keyed by ``train``, ``val``, ``test``, ``train_text``, ..., ``images``, ``manifest``.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for p in img_dir.glob("*.png"):  # drop our stale images from a larger earlier run (idempotence)
        if p.name.split("-")[0] in (*SPLITS, "rl", *(f"perception_{s}" for s in SPLITS)):
            p.unlink()
    items = generate_items(seed, n_train, n_val, n_test, answer_types, difficulties, n_rl)
    paths: dict[str, Path] = {"images": img_dir}
    manifest = {"generator": "vold_pl.data.synthetic", "version": 1, "seed": seed, "image_size": IMAGE_SIZE,
                "splits": {}}
    for split, split_items in items.items():
        recs, twins = [], []
        for i, (scene, q) in enumerate(split_items):
            rid, img_path = f"synthetic-{split}-{i:05d}", img_dir / f"{split}-{i:05d}.png"
            render_scene(scene).save(img_path, format="PNG")  # PIL writes no timestamp: bytes are reproducible
            common = _answer_fields(scene, q)
            recs.append(Record(id=rid, problem=q["problem"], images=[str(img_path.resolve())], source="synthetic",
                               **common))
            twins.append(Record(id=f"{rid}-text", problem=common["text_view"], images=[], source="synthetic-text",
                                **common))
        paths[split] = write_jsonl(recs, out_dir / f"{split}.jsonl")
        paths[f"{split}_text"] = write_jsonl(twins, out_dir / f"{split}_text.jsonl")
        manifest["splits"][split] = {
            "n": len(recs),
            **{k: dict(sorted(Counter(str(getattr(r, k)) for r in recs).items()))
               for k in ("answer_type", "difficulty", "category")}}
    if n_teacher_text > 0:
        seen = {(describe_scene(scene), q["stem"]) for split_items in items.values() for scene, q in split_items}
        extra = _generate_split(seed, "teacher", n_teacher_text, _combos(answer_types, difficulties), seen)
        fields = [_answer_fields(scene, q) for scene, q in extra]
        paths["teacher_text"] = write_jsonl(
            [Record(id=f"synthetic-teacher-{i:06d}-text", problem=f["text_view"], images=[], source="synthetic-text",
                    **f) for i, f in enumerate(fields)], out_dir / "teacher_text.jsonl")
        manifest["splits"]["teacher_text"] = {"n": n_teacher_text}
    if n_perception > 0:
        scenes = {scene for split_items in items.values() for scene, _ in split_items}
        for split, n in (("test", n_perception_test), ("train", n_perception)):  # test first: fixed by its count
            drawn = perception_scenes(seed, split, n, scenes)
            scenes.update(drawn)
            recs = []
            for i, scene in enumerate(drawn):
                img_path = img_dir / f"perception_{split}-{i:05d}.png"
                render_scene(scene).save(img_path, format="PNG")
                recs.append(perception_record(scene, f"synthetic-perception-{split}-{i:05d}", img_path))
            paths[f"perception_{split}"] = write_jsonl(recs, out_dir / f"perception_{split}.jsonl")
            manifest["splits"][f"perception_{split}"] = {"n": n}
    paths["manifest"] = out_dir / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def corpus_texts(seed: int = 0, n: int = 2000, answer_types: Sequence[str] | None = None,
                 difficulties: Sequence[int] | None = None) -> Iterator[str]:
    """Captions, problems, traces and answers of n train-like items (no images rendered), for tokenizer training."""
    yield PERCEPTION_QUESTION
    for scene, q in _generate_split(seed, "corpus", n, _combos(answer_types, difficulties), set()):
        yield describe_scene(scene)
        yield q["problem"]
        yield q["trace"]
        yield q["answer"]


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(prog="python -m vold_pl.data.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/synthetic", help="output folder (JSONL files, images/, manifest.json)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed; same seed and counts give identical files")
    ap.add_argument("--n-train", type=int, default=2000, help="number of training image records")
    ap.add_argument("--n-val", type=int, default=200, help="number of validation image records")
    ap.add_argument("--n-test", type=int, default=200, help="number of test image records")
    ap.add_argument("--n-teacher-text", type=int, default=0,
                    help="extra text-only problems for the teacher's SFT (teacher_text.jsonl); 0 writes none")
    ap.add_argument("--n-rl", type=int, default=0, help="image problems for the RL stages (rl.jsonl); 0 writes none")
    ap.add_argument("--n-perception", type=int, default=0,
                    help="scenes of the perception stage (perception_train.jsonl); 0 writes no perception files")
    ap.add_argument("--n-perception-test", type=int, default=200, help="held-out scenes of perception_test.jsonl")
    ap.add_argument("--answer-types", default=None, help=f"comma-separated subset of {','.join(ANSWER_TYPES)}")
    ap.add_argument("--difficulties", default=None, help="comma-separated subset of 1,2,3")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = generate_dataset(a.out, a.seed, a.n_train, a.n_val, a.n_test,
                             a.answer_types.split(",") if a.answer_types else None,
                             [int(d) for d in a.difficulties.split(",")] if a.difficulties else None,
                             a.n_teacher_text, a.n_perception, a.n_perception_test, a.n_rl)
    print(f"wrote {a.n_train}/{a.n_val}/{a.n_test} train/val/test image records (+ text twins) to {a.out} "
          f"(seed {a.seed}) in {time.perf_counter() - t0:.1f}s")
    return paths


if __name__ == "__main__":
    main()
