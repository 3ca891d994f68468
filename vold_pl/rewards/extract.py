"""Answer parsing for rewards and evaluation: total functions over arbitrary model output.

Every function here accepts *any* input (including ``None``, non-strings and megabytes of garbage),
never raises and runs in time linear in a capped input size: no regex in this module can backtrack
catastrophically (each pattern is a literal, a character class, or a token scan), only the last
``MAX_SCAN_CHARS`` of an output are searched for the answer, and an answer longer than
``MAX_ANSWER_CHARS`` counts as no answer.

Output convention (METHODS.md §6, Curr-ReFT arXiv 2503.07065):
``<think> reasoning </think> <answer> final answer </answer>``, ``\\boxed{}`` accepted inside the answer.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata

# A rollout is at most a few thousand tokens; the final answer lives at its end. Scanning only the tail
# bounds the cost of a pathological 10 MB output while never changing the result for a sane one.
MAX_SCAN_CHARS = 65_536
# An extracted answer longer than this is not a final answer; per-type parsers look at this much only.
MAX_ANSWER_CHARS = 4_096

_OPEN_RE = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"</answer>", re.IGNORECASE)
# Tokens of a brace scan: a box opener, an escaped char (so ``\{`` is not a brace), or a brace.
_BOX_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|\{|\}", re.DOTALL)
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_THINK_ANSWER_RE = re.compile(r"</think>\s*<answer>")


def _text(s: object, cap: int) -> str | None:
    """``s`` as a string of at most ``cap`` trailing chars, or None for a non-string."""
    if not isinstance(s, str):
        return None
    return s[-cap:] if len(s) > cap else s


def _bounded(s: object) -> str | None:
    """``s`` stripped; "" when over ``MAX_ANSWER_CHARS`` (an over-long answer is no answer: truncating it
    would change its meaning); None for a non-string."""
    if not isinstance(s, str):
        return None
    t = s.strip()
    return "" if len(t) > MAX_ANSWER_CHARS else t


def _last_box_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the ``\\boxed{`` / ``\\fbox{`` whose ``}`` comes last, or None.

    One linear pass with a stack of open braces; escaped braces ``\\{ \\}`` do not count and
    unbalanced boxes are ignored, so 100 KB of ``\\boxed{`` fragments costs milliseconds.
    """
    stack: list[int | None] = []  # per open brace: content start if it opened a box, else None
    last: tuple[int, int] | None = None
    for m in _BOX_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                start = stack.pop()
                if start is not None:
                    last = (start, m.start())
        elif tok == "{":
            stack.append(None)
        elif len(tok) > 2:  # a box opener; 2-char tokens are escapes like \{
            stack.append(m.end())
    return last


def find_boxed(text: object) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, else None.

    "Last" is the box that closes last, so for ``\\boxed{\\boxed{5}}`` it is the outer one, whose nested
    boxes are then unwrapped (``"5"``).
    """
    if not isinstance(text, str):
        return None
    span = _last_box_span(text)
    return None if span is None else _unwrap_boxed(text[span[0]:span[1]].strip())


def _unwrap_boxed(s: str) -> str:
    """Strip ``\\boxed{...}`` wrappers that enclose the *whole* string (iterative, bounded depth).

    Strings over ``MAX_ANSWER_CHARS`` are left alone: they are no answer anyway, and unwrapping a
    7,000-deep box tower would cost a rescan per level.
    """
    if len(s) > MAX_ANSWER_CHARS:
        return s
    for _ in range(16):
        m = _BOX_OPEN_RE.match(s)
        # Only unwrap when the box spans everything: "\boxed{1} + \boxed{2}" stays as is.
        if not m or _balanced_end(s, m.end()) != len(s) - 1:
            break
        s = s[m.end():-1].strip()
    return s


def _balanced_end(s: str, start: int) -> int:
    """Index of the ``}`` closing the brace opened just before ``start``, or -1."""
    depth = 1
    for m in _BOX_TOKEN_RE.finditer(s, start):
        tok = m.group()
        if tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
        elif tok == "{" or len(tok) > 2:  # a brace or a box opener; 2-char tokens are escapes like \{
            depth += 1
    return -1


def extract_answer(text: object) -> str | None:
    """The model's final answer, or None. Never raises.

    Rule, in order:

    1. Tags are matched case-insensitively in the last ``MAX_SCAN_CHARS`` chars.
    2. The answer block is the *last complete* one: take the last ``</answer>``, the last ``<answer>``
       before it, and the first ``</answer>`` after that opener. So with several blocks the last wins,
       with nested tags the innermost wins (``<answer><answer>5</answer></answer>`` → ``"5"``), and a
       trailing unclosed ``<answer>`` (a truncated generation) is ignored in favour of an earlier
       complete block.
    3. If the block contains a balanced ``\\boxed{}``, the answer is the content of its last one.
    4. With no complete block, the answer is the content of the last ``\\boxed{}`` in the text.
    5. The result is stripped; empty, whitespace-only or longer than ``MAX_ANSWER_CHARS`` → None
       (an empty ``<answer></answer>`` must never earn reward: METHODS.md §6).
    """
    return _extract_answer(text) if isinstance(text, str) else None


@functools.lru_cache(maxsize=1024)
def _extract_answer(text: str) -> str | None:
    # Cached: compute_rewards runs several rewards over the same completion, each extracting the answer.
    t = _text(text, MAX_SCAN_CHARS) or ""
    answer: str | None = None
    closes = [m.start() for m in _CLOSE_RE.finditer(t)]
    if closes:
        opens = [m.end() for m in _OPEN_RE.finditer(t, 0, closes[-1])]
        if opens:
            start = opens[-1]
            end = next(c for c in closes if c >= start)  # exists: closes[-1] >= start
            block = t[start:end]
            boxed = find_boxed(block)
            answer = boxed if boxed is not None else block
    if answer is None:
        answer = find_boxed(t)
    if answer is None:
        return None
    return _bounded(answer) or None


_ANSWER_PHRASE_RE = re.compile(r"(?:final\s+|correct\s+)?(?:answer|option|choice)\s*(?:is|:)[ \t:]*", re.IGNORECASE)


def after_answer_phrase(s: object) -> str | None:
    """The text after the last "(final|correct) answer/option/choice is" or "...:" phrase, up to the end of its
    line, with one trailing period dropped; None when there is no such phrase or nothing follows it.

    ``"The answer is 1.45"`` -> ``"1.45"``; ``"Answer: B."`` -> ``"B"``. Only the last ``MAX_SCAN_CHARS`` are read.
    """
    t = _text(s, MAX_SCAN_CHARS)
    if not t:
        return None
    last = None
    for m in _ANSWER_PHRASE_RE.finditer(t):
        last = m
    if last is None:
        return None
    rest = t[last.end():].split("\n", 1)[0].strip()
    rest = rest[:-1].strip() if rest.endswith(".") else rest
    return _bounded(rest) or None


def is_well_formatted(text: object) -> bool:
    """True iff the output, stripped, fully matches ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL).

    This is Curr-ReFT's format reward pattern (arXiv 2503.07065). Because ``.*?`` matches anything, a full
    match exists iff the stripped text starts with ``<think>``, ends with ``</answer>``, and some
    ``</think>\\s*<answer>`` lies wholly between those two tags. We check exactly that in linear time
    instead of running the backtracking regex, which is quadratic or worse on repeated tag fragments.
    Tags are case-sensitive, as in the original pattern.
    """
    if not isinstance(text, str):
        return False
    s = text.strip()
    head, tail = "<think>", "</answer>"
    if not (s.startswith(head) and s.endswith(tail)):
        return False
    # The earliest </think>\s*<answer> at or after the head has the earliest end (occurrences can't overlap).
    m = _THINK_ANSWER_RE.search(s, len(head))
    return m is not None and m.end() <= len(s) - len(tail)


def clean_answer(s: object) -> str | None:
    """An extracted answer cleaned for type parsers ("" when empty, None for a non-string).

    Over ``MAX_ANSWER_CHARS`` → "". Unwraps a whole-string ``\\boxed{}``, ``\\text{}``-like wrappers and
    the math delimiters ``$ \\( \\) \\[ \\]``, and strips whitespace.
    """
    t = _bounded(s)
    if not t:
        return t
    t = _unwrap_boxed(t)
    t = _unwrap_text_cmds(t)
    t = t.replace("$", "").replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    return t.strip()


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")


def _unwrap_text_cmds(s: str) -> str:
    """``\\text{cat}`` → ``cat`` (inner-first, bounded passes; the class ``[^{}]*`` cannot backtrack)."""
    for _ in range(4):
        new = _TEXT_CMD_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    return s


_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")
THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,234" -> "1234", not "1,23"
# Punctuation that is dropped; "." and "-" are handled separately so that 3.5 and -2 survive.
_DROP = str.maketrans({c: " " for c in string.punctuation if c not in ".-"})


def normalize_text(s: object) -> str:
    """Normalise a free-form answer for string comparison ("" for non-strings).

    NFKC, unwrap ``\\boxed{}`` / ``\\text{}``-like wrappers and math delimiters, lowercase, drop thousands
    separators (``1,000`` → ``1000``), turn punctuation into spaces except a ``.`` between digits and a
    ``-`` before a digit, drop the articles a/an/the, collapse whitespace. SQuAD-style, plus LaTeX.
    """
    t = clean_answer(s)
    if not t:
        return ""
    t = unicodedata.normalize("NFKC", t)
    t = t.replace("\\%", "%").replace("\\ ", " ").replace("\\,", " ").replace("~", " ").lower()
    t = THOUSANDS_RE.sub("", t)
    t = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", t)
    t = re.sub(r"-(?!\d)", " ", t)
    t = t.translate(_DROP)
    t = "".join(" " if unicodedata.category(c).startswith("P") and c not in ".-" else c for c in t)
    t = _ARTICLES_RE.sub(" ", t)
    return " ".join(t.split())


def parse_yesno(s: object, strict: bool = False) -> str | None:
    """``"yes"`` / ``"no"`` / None.

    ``strict=True`` (Curr-ReFT stage 1): the answer, stripped and lowercased, must be exactly ``yes`` or
    ``no``. Lenient (default): after cleaning (box, ``\\text{}``, ``$``), the lowercased answer is ``yes``/``no``
    optionally followed by ``. , ; : !`` and anything (``"Yes, there are two."``). ``"yes or no"`` and
    ``"Yes/No"`` are None: a hedge is no answer.
    """
    if strict:
        t = _bounded(s)
        t = t.lower() if t else None
        return t if t in ("yes", "no") else None
    t = clean_answer(s)
    if not t:
        return None
    m = re.match(r"(yes|no)(?:$|\s*[.,;:!])", t.lower())
    return m.group(1) if m else None


_LETTER_TOKEN_RE = re.compile(r"\(?([A-Za-z])[).]?")
_CHOICE_PREFIX_RE = re.compile(
    r"(?:the\s+)?(?:correct\s+|final\s+|right\s+)?(?:answer|options?|choices?)\b\s*(?:(?:is|are)\b)?\s*:?\s*",
    re.IGNORECASE,
)
_LEADING_LETTER_RE = re.compile(r"\(?([A-Z])\s*[).:]\s*\S")


def parse_choice_letters(s: object, n_choices: int, choices: list[str] | None = None) -> frozenset[str]:
    """Option letters of a multiple-choice answer, or an empty set when it can't be read.

    Letters are A, B, … for options 0, 1, …; ``n_choices <= 0`` means ``len(choices)`` (or 26). Rule:

    1. Clean (box, ``\\text{}``, ``$``), drop one trailing ``.``, and drop a leading
       "(the) (correct|final) answer/option(s)/choice(s) (is|are):" phrase, twice at most
       ("Answer: Option B" → "B").
    2. Letter list: split on commas, ``;``, ``&``, the word "and", and whitespace; if every piece is one
       letter optionally as ``(B)``, ``B)`` or ``B.`` (either case), the answer is that set: ``"B"``,
       ``"(B)"``, ``"A, C"``, ``"a and c"``. "or" is not a separator: ``"A or B"`` is a hedge → empty.
    3. Leading letter: an *uppercase* letter followed by ``)``, ``.`` or ``:`` and then more text is
       that single option: ``"B) 42"``, ``"(B) 42"``, ``"B. The cat"``.
    4. Choice text: when ``choices`` is given and the normalised answer equals the normalised text of
       exactly one option, that option's letter.
    A letter outside the first ``n_choices`` makes the whole answer invalid (empty set).
    """
    t = clean_answer(s)
    if not t:
        return frozenset()
    n = n_choices if n_choices and n_choices > 0 else (len(choices) if choices else 26)
    valid = {chr(ord("A") + i) for i in range(min(n, 26))}
    t = t[:-1].strip() if t.endswith(".") else t
    for _ in range(2):
        m = _CHOICE_PREFIX_RE.match(t)
        if m and m.end() < len(t):
            t = t[m.end():].strip()

    pieces = re.sub(r"\band\b|[,;&]", " ", t, flags=re.IGNORECASE).split()
    tokens = [_LETTER_TOKEN_RE.fullmatch(p) for p in pieces]
    if pieces and all(tokens):
        letters = frozenset(m.group(1).upper() for m in tokens)  # type: ignore[union-attr]
        return letters if letters <= valid else frozenset()

    m = _LEADING_LETTER_RE.match(t)
    if m:
        return frozenset({m.group(1)}) if m.group(1) in valid else frozenset()

    if choices:
        target = normalize_text(t)
        hits = [i for i, c in enumerate(choices[:26]) if target and normalize_text(c) == target]
        if len(hits) == 1 and chr(ord("A") + hits[0]) in valid:
            return frozenset({chr(ord("A") + hits[0])})
    return frozenset()


def parse_choice_letters_strict(s: object, n_choices: int) -> frozenset[str]:
    """Curr-ReFT stage 2: nothing but uppercase option letters separated by commas/whitespace, else empty."""
    t = _bounded(s)
    if not t or not re.fullmatch(r"[A-Z,\s]+", t):
        return frozenset()
    letters = [p for p in re.split(r"[,\s]+", t) if p]
    valid = {chr(ord("A") + i) for i in range(min(n_choices if n_choices > 0 else 26, 26))}
    if not letters or any(len(p) != 1 or p not in valid for p in letters):
        return frozenset()
    return frozenset(letters)


NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_bbox(s: object) -> list[float] | None:
    """A box ``[x1, y1, x2, y2]`` as 4 finite floats, or None.

    Accepts any layout holding exactly four numbers: ``"[10, 20, 30, 40]"``, ``"(10,20),(30,40)"``,
    ``"10 20 30 40"``, ``"dog: [10, 20, 30, 40]"``. More or fewer numbers (e.g. two boxes) → None: we
    don't guess which box was meant. Coordinates are returned as written (not reordered).
    """
    t = clean_answer(s)
    if not t:
        return None
    nums = NUMBER_RE.findall(t)
    if len(nums) != 4:
        return None
    try:
        box = [float(x) for x in nums]
    except (ValueError, OverflowError):
        return None
    return box if all(math.isfinite(v) for v in box) else None


def parse_labels(s: object) -> frozenset[str]:
    """Labels of a multi-label answer: split on commas / semicolons, each normalised, empties dropped."""
    t = clean_answer(s)
    if not t:
        return frozenset()
    labels = (normalize_text(p) for p in re.split(r"[,;]", t))
    return frozenset(x for x in labels if x)
