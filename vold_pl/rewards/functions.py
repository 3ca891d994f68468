"""Reward functions and their registry (EasyR1 / TRL style).

A reward is a plain function ``(completion: str, record) -> float`` registered under a name with
:func:`register_reward` and found with :func:`get_reward`. ``record`` is a :class:`vold_pl.data.schema.Record`
or anything with ``answer``, ``answer_type`` and ``choices`` attributes. The GRPO reward of a completion is
``r_i = Σ_k w_k · R_k(o_i, q)`` (METHODS.md §2), computed by :func:`compute_rewards`.

Accuracy rules per answer type follow Curr-ReFT (arXiv 2503.07065, METHODS.md §4); :func:`score_answer` is
the single source of truth, reused by the benchmark evaluator on already-extracted answers.

Besides registered names, a reward may be a user's function named ``module.path:function`` or
``path/to/file.py:function`` (see :mod:`vold_pl.rewards.plugins`; loaded only when enabled, once per process).
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import numbers
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Mapping, Sequence

import torch

from vold_pl.errors import UserError
from vold_pl.rewards.extract import (
    NUMBER_RE,
    THOUSANDS_RE,
    after_answer_phrase,
    clean_answer,
    extract_answer,
    is_well_formatted,
    normalize_text,
    parse_bbox,
    parse_choice_letters,
    parse_choice_letters_strict,
    parse_labels,
    parse_yesno,
)

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, Any], float]
_REGISTRY: dict[str, RewardFn] = {}

# math-verify's time limit (seconds, an int: it uses signal.alarm). Signals only work in the main thread,
# so elsewhere the limit is off and only the input guards below (length cap, "explosive" check) protect us.
MATH_TIMEOUT_S = 3
# A math answer longer than this is not sent to sympy (it would be slow and is never a sane final answer).
MAX_MATH_CHARS = 1000


class UnknownRewardError(KeyError, UserError):
    """An unknown reward name; the message lists the known names (and a close match, if any)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(completion, record) -> float`` under ``name``. A taken name raises unless
    ``overwrite=True``: a silent replacement would change training rewards without a trace."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"a reward name must be a non-empty string, got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn and not overwrite:
            raise UserError(f"reward {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                             "pass overwrite=True to replace it")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_rewards() -> list[str]:
    """Names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``, or the plugin function ``name`` points to (``module:function``,
    ``file.py:function``; :class:`~vold_pl.rewards.plugins.RewardPluginError` if it cannot be loaded);
    :class:`UnknownRewardError` listing known names otherwise."""
    fn = _REGISTRY.get(name) if isinstance(name, str) else None
    if fn is None:
        from vold_pl.rewards.plugins import get_plugin, is_plugin_name

        if is_plugin_name(name):
            return get_plugin(name)
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownRewardError(f"unknown reward {name!r}.{hint} Known rewards: {', '.join(list_rewards())}; "
                                 "or name your own function as module.path:function or path/to/file.py:function.")
    return fn


def validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Check reward weights (call at setup); return ``{name: float}``. ValueError for an empty mapping, an
    unknown name (listing the known ones) or a weight that is not a finite number."""
    if not isinstance(weights, Mapping) or not weights:
        raise UserError(f"reward weights must be a non-empty mapping name -> weight, got {weights!r}. "
                         f"Known rewards: {', '.join(list_rewards())}.")
    out: dict[str, float] = {}
    for name, w in weights.items():
        get_reward(name)  # UnknownRewardError is a ValueError
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise UserError(f"weight of reward {name!r} must be a finite number, got {w!r}")
        out[name] = float(w)
    return out


_LATEX_NOISE_RE = re.compile(r"\\left|\\right|\\[!,;: ]|\s+")
_POWER_RE = re.compile(r"\^|\*\*")
_BAD_EXPONENT_RE = re.compile(r"\^|\*\*|!|\d{5,}")
_BIG_FACTORIAL_RE = re.compile(r"(?:\d{4,}|[)}\]])\s*!")
_EXP_TOKEN_RE = re.compile(r"[-+]?[\w.\\]*")
_UNBOUNDED_OPS_RE = re.compile(r"\\(?:sum|prod|int|lim|iint|oint)")


def _canon(s: str) -> str:
    """Cheap canonical form for the exact-match fast path."""
    t = _LATEX_NOISE_RE.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return t[:-1] if t.endswith(".") else t


def _plain_number(s: str) -> Decimal | None:
    """``s`` as an exact Decimal when it is a plain decimal literal (``1,000`` and ``1e3`` allowed).

    Decimal, not float or Fraction: ``"1" + "0"*5000`` stays exact, and ``1e999999999`` costs nothing.
    """
    t = THOUSANDS_RE.sub("", s)
    if not NUMBER_RE.fullmatch(t):
        return None
    try:
        return Decimal(t)
    except (InvalidOperation, ValueError):
        return None


def _exponent_span(s: str, i: int) -> tuple[str, int]:
    """The exponent starting at ``s[i]`` (a brace/paren group or a token) and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] in "{(":
        close = "}" if s[i] == "{" else ")"
        depth = 0
        for j in range(i, len(s)):
            depth += s[j] == s[i]
            depth -= s[j] == close
            if depth == 0:
                return s[i + 1:j], j + 1
        return s[i + 1:], len(s)
    m = _EXP_TOKEN_RE.match(s, i)
    return m.group(), m.end()  # type: ignore[union-attr]


def _is_explosive(s: str) -> bool:
    """True for inputs sympy may evaluate for ever: power towers (``9^{9^9}``, ``2^3^4``), exponents of 5+
    digits (``10^{999999999}``), factorials of big or compound arguments, and, off the main thread where no
    time limit exists, sums/products/integrals/limits. Such answers score 0 instead of stalling training.
    """
    for m in _POWER_RE.finditer(s):
        exp, end = _exponent_span(s, m.end())
        if _BAD_EXPONENT_RE.search(exp) or _POWER_RE.match(s[end:].lstrip()):
            return True
    return bool(_BIG_FACTORIAL_RE.search(s)) or (_math_timeout() is None and bool(_UNBOUNDED_OPS_RE.search(s)))


def _math_timeout() -> int | None:
    """math-verify's signal-based limit works only in the main thread; elsewhere disable it."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _mv_parse(s: str, timeout: int | None) -> tuple:
    """math-verify ``parse`` of ``\\boxed{s}`` (so bare LaTeX like ``\\sqrt{8}`` parses). Cached: a gold
    answer is parsed once per group, not once per completion."""
    from math_verify import parse

    return tuple(parse("\\boxed{" + s + "}", parsing_timeout=timeout))


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Symbolic equivalence of two math answers; never raises.

    Order: empty → False; canonical string equality → True; both plain decimal literals → exact
    Decimal equality (sympy not needed); over ``MAX_MATH_CHARS`` or :func:`_is_explosive` → False; else
    math-verify ``verify(parse(gold), parse(pred))`` with ``MATH_TIMEOUT_S`` in the main thread.
    """
    p, g = clean_answer(pred), clean_answer(gold)
    if not p or not g:
        return False
    if _canon(p) == _canon(g):
        return True
    pn, gn = _plain_number(_canon(p)), _plain_number(_canon(g))
    if pn is not None and gn is not None:
        return pn == gn
    if len(p) > MAX_MATH_CHARS or len(g) > MAX_MATH_CHARS or _is_explosive(p) or _is_explosive(g):
        return False
    try:
        from math_verify import verify

        timeout = _math_timeout()
        gp, pp = _mv_parse(g, timeout), _mv_parse(p, timeout)
        if not gp or not pp:
            return False
        return bool(verify(list(gp), list(pp), timeout_seconds=timeout))
    except Exception:  # math-verify / sympy failures on odd input mean "not shown equal"
        logger.debug("math_verify failed on %r vs %r", p[:80], g[:80], exc_info=True)
        return False


_NUMERIC_LIKE_RE = re.compile(r"(?:[\d\s.,+\-*/^()%{}]|\\(?:d?t?frac|sqrt|pi|cdot|times|div|left|right|circ|%|,|!))+")


def _numeric_like(s: str | None) -> bool:
    """True when ``s`` is a numeric expression (``0.5``, ``\\frac{1}{2}``, ``2\\sqrt{2}``, ``50\\%``)."""
    t = clean_answer(s)
    return bool(t) and _NUMERIC_LIKE_RE.fullmatch(t) is not None and re.search(r"\d|\\pi", t) is not None


def bbox_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes (corners in any order); 0.0 for None or degenerate boxes."""
    if a is None or b is None or len(a) != 4 or len(b) != 4:
        return 0.0
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    iou = inter / union if union > 0 else 0.0
    return iou if math.isfinite(iou) else 0.0  # 1e300-sized boxes overflow to inf/inf


def label_jaccard(pred: str | None, gold: str | None) -> float:
    """Jaccard |pred ∩ gold| / |pred ∪ gold| of comma-separated, normalised labels; 0.0 if either is empty."""
    p, g = parse_labels(pred), parse_labels(gold)
    return len(p & g) / len(p | g) if p and g else 0.0


def score_answer(pred: str | None, record: Any) -> float:
    """Accuracy of an already-extracted answer against ``record`` (1.0 / 0.0, or a fraction for multilabel).

    - ``yesno``: lenient :func:`parse_yesno` of both sides equal.
    - ``choice``: option-letter *sets* equal (:func:`parse_choice_letters`, choice text accepted).
    - ``math``: :func:`math_equal` (cheap exact / numeric path, then math-verify with a time limit).
    - ``open``: :func:`normalize_text` equality, or :func:`math_equal` when both sides are numeric.
    - ``bbox``: 1.0 if IoU > 0.5 (Curr-ReFT), else 0.0.
    - ``multilabel``: :func:`label_jaccard`.
    An empty or missing answer (or gold) always scores 0.0. An unknown answer type raises ValueError (a
    data bug to surface, which :func:`compute_rewards` counts as an error).
    """
    if not isinstance(pred, str) or not pred.strip():
        return 0.0
    gold = getattr(record, "answer", None)
    if not isinstance(gold, str) or not gold.strip():
        return 0.0
    atype = getattr(record, "answer_type", None)
    if atype == "yesno":
        p = parse_yesno(pred)
        return float(p is not None and p == parse_yesno(gold))
    if atype == "choice":
        choices = getattr(record, "choices", None) or None
        n = len(choices) if choices else 0
        p = parse_choice_letters(pred, n, choices)
        return float(bool(p) and p == parse_choice_letters(gold, n))
    if atype == "math":
        # a sentence answer ("The answer is 1.45", no final period) is read after its answer phrase
        tail = after_answer_phrase(pred) if not math_equal(pred, gold) else pred
        return float(tail is not None and math_equal(tail, gold))
    if atype == "open":
        np_, ng = normalize_text(pred), normalize_text(gold)
        if np_ and np_ == ng:
            return 1.0
        return float(_numeric_like(pred) and _numeric_like(gold) and math_equal(pred, gold))
    if atype == "bbox":
        return float(bbox_iou(parse_bbox(pred), parse_bbox(gold)) > 0.5)
    if atype == "multilabel":
        return label_jaccard(pred, gold)
    raise ValueError(f"unknown answer_type {atype!r} for record {getattr(record, 'id', '?')!r}")


@register_reward("accuracy")
def accuracy_reward(completion: str, record: Any) -> float:
    """:func:`score_answer` of the extracted answer (METHODS.md §4, §6)."""
    return score_answer(extract_answer(completion), record)


@register_reward("format")
def format_reward(completion: str, record: Any) -> float:
    """1.0 when the output is ``<think>…</think> <answer>…</answer>`` (Curr-ReFT format reward)."""
    return 1.0 if is_well_formatted(completion) else 0.0


@register_reward("iou")
def iou_reward(completion: str, record: Any) -> float:
    """Continuous IoU of the answered box with the gold box (0.0 when either isn't a box)."""
    return bbox_iou(parse_bbox(extract_answer(completion)), parse_bbox(getattr(record, "answer", None)))


@register_reward("jaccard")
def jaccard_reward(completion: str, record: Any) -> float:
    """Jaccard similarity of the answered label set with the gold labels."""
    return label_jaccard(extract_answer(completion), getattr(record, "answer", None))


@register_reward("currreft_yesno")
def currreft_yesno_reward(completion: str, record: Any) -> float:
    """Curr-ReFT stage 1: the answer, stripped and lowercased, must be exactly ``yes``/``no`` and match
    (``"Yes, it is"`` scores 0 even when the gold is yes: the stage teaches the format)."""
    p = parse_yesno(extract_answer(completion), strict=True)
    return float(p is not None and p == parse_yesno(getattr(record, "answer", None), strict=True))


@register_reward("currreft_choice")
def currreft_choice_reward(completion: str, record: Any) -> float:
    """Curr-ReFT stage 2: nothing but option letters (``"B"``, ``"A, C"``), letter set equal to the gold's."""
    choices = getattr(record, "choices", None) or []
    n = len(choices) if choices else 26
    p = parse_choice_letters_strict(extract_answer(completion), n)
    return float(bool(p) and p == parse_choice_letters_strict(getattr(record, "answer", None), n))


@register_reward("currreft_open")
def currreft_open_reward(completion: str, record: Any) -> float:
    """Curr-ReFT stage 3 (open-ended): math by symbolic equivalence, boxes by IoU > 0.5, multi-label by
    Jaccard: exactly :func:`score_answer`'s rules, i.e. ``accuracy`` under the stage's name."""
    return score_answer(extract_answer(completion), record)


@dataclass
class RewardOutput:
    """Result of :func:`compute_rewards`.

    ``total``: float32 [N], ``Σ_k w_k R_k``; ``named``: each reward's unweighted float32 [N] scores;
    ``errors``: per reward, how many completions raised (or returned a non-finite value) and were scored 0.
    """

    total: torch.Tensor
    named: dict[str, torch.Tensor]
    errors: dict[str, int]

    @property
    def n_errors(self) -> int:
        """Failures over all rewards (log it; a rising count means a reward bug)."""
        return sum(self.errors.values())


REWARD_DTYPE = torch.float32  # the dtype of the rewards, advantages and loss terms they enter


def compute_rewards(completions: Sequence[str], records: Sequence[Any], weights: Mapping[str, float]) -> RewardOutput:
    """Score every completion with every weighted reward (weight 0 still computes it, e.g. for logging).

    A reward that raises, or returns something that isn't a finite number, must not kill a training run:
    that completion scores 0.0 for that reward, ``errors[name]`` counts it and one warning per reward and
    call names the first failure. Unknown names / bad weights / length mismatch → ValueError.
    """
    w = validate_weights(weights)
    if len(completions) != len(records):
        raise ValueError(f"{len(completions)} completions but {len(records)} records; they must pair up 1:1")
    named: dict[str, torch.Tensor] = {}
    errors: dict[str, int] = {}
    total = torch.zeros(len(completions), dtype=REWARD_DTYPE)
    for name, weight in w.items():
        fn = get_reward(name)
        scores: list[float] = []
        n_err = 0
        first = ""
        for i, (c, r) in enumerate(zip(completions, records)):
            try:
                v = fn(c, r)
                if not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise TypeError(f"returned {v!r}, not a finite number")
                # checked as it will be used: a finite float64 can overflow the rewards' dtype (or its weighted
                # term can), which would make the step's loss non-finite instead of counting one reward error
                cast = torch.tensor([float(v), weight * float(v)], dtype=REWARD_DTYPE)  # [2]
                if not bool(torch.isfinite(cast).all()):
                    raise TypeError(f"returned {v!r}, which (times its weight {weight}) is not finite in "
                                    f"{str(REWARD_DTYPE).removeprefix('torch.')}")
                scores.append(float(v))
            except Exception as e:  # noqa: BLE001 - a reward bug must not crash training; it is counted
                scores.append(0.0)
                n_err += 1
                first = first or f"sample {i} (id={getattr(r, 'id', '?')!r}): {type(e).__name__}: {e}"[:300]
        if n_err:
            logger.warning("reward %r failed on %d of %d completions (scored 0.0); first: %s",
                           name, n_err, len(scores), first)
        errors[name] = n_err
        named[name] = torch.tensor(scores, dtype=REWARD_DTYPE)
        total += weight * named[name]
    return RewardOutput(total=total, named=named, errors=errors)
