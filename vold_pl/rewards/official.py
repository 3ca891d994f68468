"""Each benchmark's own rule-based answer extraction and comparison: the ``official`` scoring of benchmark reports.

The ``strict`` scoring (:func:`vold_pl.rewards.functions.score_answer` of the tagged answer) is the training reward;
this module scores a completion the way the benchmark's published evaluation code does, so a model that never
writes ``<answer>`` tags (a base model) is scored as the papers score it. Written from the published rules, not
copied:

* MathVista (github.com/lupantech/MathVista ``evaluation/extract_answer.py`` + ``calculate_score.py``): the
  extraction tries the response as an option text, an integer or a float, else asks an LLM. Here the LLM step is
  replaced by rules (the answer block, ``\\boxed{}``, an "answer is ..." phrase, the last number). Then the
  official normalisation: ``(B)`` -> ``B``, a letter -> its option text, anything else -> the most similar option
  (Levenshtein); integers by ``int(float(x))``; floats rounded to the record's precision; lists and text compared
  as strings.
* MATH-V (github.com/mathllm/MATH-V ``evaluation/evaluate.py`` + ``utils.py``): letter endings (``... B.``),
  "the answer is" phrases, the last ``\\boxed{}``, ``find_math_answer``'s clean-up, then ``is_equal`` against the
  gold letter or the gold option's text: exact (lower-case) match, tuples, or numeric equality after rounding to
  two decimals.
* MMMU-Pro (github.com/MMMU-Benchmark/MMMU ``mmmu-pro/evaluate.py`` ``parse_multi_choice_response``): the last
  ``Answer:`` with exactly one option letter after it, else ``(B)``, ``B ``, ``B.`` candidates (the last one in the
  response wins), else option texts in a long response. Where the official code picks a *random* letter (no
  candidate), this scores the item wrong: a seeded guess would add noise, not signal.
* LogicVista (VLMEvalKit ``vlmeval/dataset/utils/logicvista.py``; the authors' repository ships no scorer): an LLM
  extracts the chosen option labels, which must equal the gold labels as a sorted set (``"A, C"`` == ``"CA"``); a
  digit answers its letter (``3`` -> ``C``) when the gold is letters. Here the LLM step is replaced by rules (the
  answer block, an "answer is ..." phrase, ``Option 3``, ``(B)``, ``B.``, letters run together ``BC``).

When a completion has a complete ``<answer>`` block, its content is what these rules read (it is the model's final
answer); otherwise the whole completion. Every function is total: any input, never raises. docs/benchmarks.md lists
every known difference from the official numbers.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vold_pl.rewards.extract import MAX_ANSWER_CHARS, MAX_SCAN_CHARS, after_answer_phrase, extract_answer, find_boxed

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _tail(text: object) -> str:
    return text[-MAX_SCAN_CHARS:] if isinstance(text, str) else ""


def _block(text: str) -> str | None:
    """The content of the last complete ``<answer>`` block (its ``\\boxed{}`` unwrapped), or None."""
    if "</answer>" not in text.lower():
        return None
    return extract_answer(text)


def final_span(text: object) -> str:
    """The model's final answer as the rule-based extractors read it: the answer block, else the last
    ``\\boxed{}``, else the text after the last "answer is" / "Answer:" phrase, else the whole (stripped) text."""
    t = _tail(text)
    got = extract_answer(t)
    if got is None:
        got = after_answer_phrase(t) or t
    got = got.strip()
    return "" if len(got) > MAX_ANSWER_CHARS and got is not t else got


def _float(s: str) -> float | None:
    try:
        v = float(s.replace(",", "").strip().rstrip("."))
    except (ValueError, AttributeError):
        return None
    return v if math.isfinite(v) else None


def _levenshtein(a: str, b: str) -> int:
    a, b = a[:300], b[:300]  # bounded: a 300 x 300 table at most
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ------------------------------------------------------------------------------------------------ MathVista
_LETTER_FORM_RE = re.compile(r"\(?([A-Za-z])\s*[).:]?")


def mathvista_extract(text: object, record: Any) -> str | None:
    """The prediction MathVista compares with the gold, normalised by its answer type (None: no answer)."""
    span = final_span(text)
    if not span:
        return None
    choices = list(getattr(record, "choices", None) or [])
    gold = str(getattr(record, "answer", "") or "")
    if getattr(record, "answer_type", None) == "choice" and choices:
        s = span.strip().rstrip(".").strip()
        if s in choices:
            return s
        m = re.findall(r"\(([a-zA-Z])\)", s)  # "(A) text" -> "A"
        letter = m[0].upper() if m else None
        if letter is None and _LETTER_FORM_RE.fullmatch(s):
            letter = s.strip("().: ").upper()
        if letter is not None and letter in LETTERS[: len(choices)]:
            return choices[LETTERS.index(letter)]
        return min(choices, key=lambda c: _levenshtein(s, c))  # the official "most similar option"
    if getattr(record, "answer_type", None) == "math":
        value = _float(span)
        if value is None:
            nums = _NUMBER_RE.findall(span.replace(",", ""))
            value = _float(nums[-1]) if nums else None
        if value is None:
            return None
        places = len(gold.split(".")[1]) if "." in gold else None
        if places is None:  # integer answer: int(float(x)), truncating as the official code does
            return str(int(value))
        return f"{round(value, places):.{places}f}"
    s = span.strip().rstrip(".").strip()
    return re.sub(r"\s+", "", s) if gold.startswith("[") else s


def mathvista_correct(text: object, record: Any) -> bool:
    pred = mathvista_extract(text, record)
    if pred is None:
        return False
    gold = str(record.answer).strip()
    choices = list(getattr(record, "choices", None) or [])
    if record.answer_type == "choice" and choices:
        return gold in LETTERS[: len(choices)] and pred == choices[LETTERS.index(gold)]
    if gold.startswith("["):
        return pred == re.sub(r"\s+", "", gold)
    return pred == gold


# ------------------------------------------------------------------------------------------------- MATH-V
def _mathv_strip(s: str) -> str:
    """MATH-V's ``_strip_string``: LaTeX noise, units after ``\\text{ ``, ``=``, spaces, ``a/b`` -> ``\\frac``."""
    for a, b in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                 ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", "")):
        s = s.replace(a, b)
    s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    s = s.replace(" ", "")
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


def _mathv_find_answer(s: str) -> str:
    """MATH-V's ``find_math_answer``: the last ``\\boxed{}`` (else the text), after ``=``/``\\approx``, cleaned."""
    s = s.lower().replace("{}", "")
    boxed = find_boxed(s)
    ans = boxed if boxed is not None else s
    if "}" in ans and ("{" not in ans or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for a, b in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\text", ""), ("\\mbox", ""),
                 ("^{\\circ}", ""), ("^\\circ", ""), ("{units}", ""), ("units", "")):
        ans = ans.replace(a, b)
    return _mathv_strip(ans)


def mathvision_extract(text: object, record: Any) -> str:
    """The model answer MATH-V's ``evaluate.py`` reads from a response (lower-case; "" when none)."""
    t = _tail(text)
    block = _block(t)
    ans = (block if block is not None else t).strip()
    for c in "ABCDE":
        if (ans.endswith(f" {c}.") or ans.endswith(f" ({c}).") or ans.startswith(f"{c}\n")
                or ans.startswith(f"({c})\n") or ans.startswith(f"({c}) {c}\n")):
            ans = c
    tail = ans.split("is ")[-1].rstrip(".")
    if _float(tail) is not None:
        ans = tail
    if "oxed{" not in ans:
        for flag in ("the final answer is", "the answer is", "the correct answer is", "the answer should be"):
            for f in (flag, flag.replace("the", "The")):
                if f in ans:
                    ans = ans.split(f)[-1].strip().split("\n")[0].split(". ")[0]
    ans = _mathv_find_answer(ans)
    for c in "abcde":
        ans = ans.replace(f"({c})", c).replace(f"{{{c}}}", c)
    return ans.rstrip(".").lstrip(":").strip()


def _mathv_number(s: str) -> float | None:
    """A numeric value of an answer (plain number, ``\\frac``, ``\\sqrt``, ``\\pi``...), or None."""
    v = _float(s)
    if v is not None:
        return v
    if len(s) > 200:
        return None
    try:
        from math_verify import parse

        for e in parse("\\boxed{" + s + "}", parsing_timeout=3):
            if hasattr(e, "evalf"):
                f = complex(e.evalf())
                if f.imag == 0 and math.isfinite(f.real):
                    return f.real
    except Exception:  # sympy / math-verify failures mean "not a number"
        return None
    return None


def _mathv_equal(pred: str, gold: str) -> bool:
    """MATH-V's ``is_equal``: exact (lower-case), element-wise tuples, or equal when rounded to two decimals."""
    pred, gold = pred.lower().strip(), gold.lower().strip()
    if not pred.replace(" ", "") or not gold.replace(" ", ""):
        return False
    if pred == gold:
        return True
    if pred[:1] in "([" and pred[-1:] in ")]" and gold[:1] == pred[:1] and gold[-1:] == pred[-1:]:
        ps, gs = pred[1:-1].split(","), gold[1:-1].split(",")
        if len(ps) == len(gs) > 1:
            return all(_mathv_equal(p, g) for p, g in zip(ps, gs))
    p, g = _mathv_number(pred), _mathv_number(gold)
    return p is not None and g is not None and round(p, 2) == round(g, 2)


def mathvision_correct(text: object, record: Any) -> bool:
    pred = mathvision_extract(text, record)
    gold = str(record.answer)
    choices = list(getattr(record, "choices", None) or [])
    value = choices[LETTERS.index(gold)] if choices and gold in LETTERS[: len(choices)] else ""
    return _mathv_equal(pred, gold) or bool(value) and _mathv_equal(pred, _mathv_strip(value.lower()))


# ----------------------------------------------------------------------------------------------- MMMU-Pro
def mmmu_pro_extract(text: object, record: Any) -> str | None:
    """MMMU-Pro's ``parse_multi_choice_response``; None where the official code would pick a random letter."""
    t = _tail(text)
    block = _block(t)
    response = block if block is not None else t
    choices = list(getattr(record, "choices", None) or [])
    letters = list(LETTERS[: len(choices)])
    # option texts are only compared when they are real texts (the vision config has bare letters)
    index2ans = {L: c for L, c in zip(letters, choices) if c != L}
    pos = response.rfind("Answer:")
    if pos != -1:
        after = response[pos + len("Answer:"):].strip()
        found = [L for L in letters if L in after]
        if len(found) == 1:
            return found[0]
    response = " " + response.strip(",.!?;:'") + " "
    cands = [L for L in letters if f"({L})" in response]
    brackets = bool(cands)
    if not cands:
        cands = [L for L in letters if f"{L} " in response]
    if not cands:
        cands = [L for L in letters if f"{L}." in response]
    by_text = False
    if not cands and len(response.split()) > 5:
        cands = [L for L, a in index2ans.items() if a.lower() in response.lower()]
        by_text = True
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if by_text:
        pos_of = {L: response.lower().rfind(index2ans[L].lower()) for L in cands}
    elif brackets:
        pos_of = {L: response.rfind(f"({L})") for L in cands}
    else:
        pos_of = {L: response.rfind(f" {L} ") for L in cands}
    return max(cands, key=lambda L: pos_of[L])  # first of equal positions, as numpy argmax


def mmmu_pro_correct(text: object, record: Any) -> bool:
    return mmmu_pro_extract(text, record) == str(record.answer).strip()


# --------------------------------------------------------------------------------------------- LogicVista
def logicvista_extract(text: object, record: Any) -> str | None:
    """The chosen option labels, sorted and lower-case (``"ac"``), or None when none can be read."""
    s = final_span(text)
    s = re.sub(r"\b(?:options?|choices?|answers?)\b", " ", s, flags=re.I)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"[A-Za-z0-9]+", s):
        labels = list(s) if not s.isdigit() else [s]
    else:
        parts = [p.strip("().") for p in re.split(r"[\s,;&]+|\band\b", s) if p and p.strip("().")]
        if not parts or any(not re.fullmatch(r"[A-Za-z]|\d+", p) for p in parts):
            return None
        labels = parts
    gold = str(getattr(record, "answer", ""))
    gold_letters = bool(re.search(r"[A-Za-z]", gold))
    out = []
    for lab in labels:
        if lab.isdigit() and gold_letters:
            k = int(lab)
            if not 1 <= k <= 26:
                return None
            lab = LETTERS[k - 1]
        elif lab.isalpha() and not gold_letters:
            if len(lab) != 1:
                return None
            lab = str(LETTERS.index(lab.upper()) + 1)
        out.append(lab.lower())
    return "".join(sorted(out))


def logicvista_correct(text: object, record: Any) -> bool:
    pred = logicvista_extract(text, record)
    gold = "".join(sorted(re.findall(r"[A-Za-z0-9]", str(record.answer).lower())))
    return pred is not None and bool(gold) and pred == gold


# ------------------------------------------------------------------------------------------------ dispatch
_SCORERS = {
    "mathvista": (mathvista_extract, mathvista_correct),
    "mathvision": (mathvision_extract, mathvision_correct),
    "mmmu_pro_standard": (mmmu_pro_extract, mmmu_pro_correct),
    "mmmu_pro_vision": (mmmu_pro_extract, mmmu_pro_correct),
    "logicvista": (logicvista_extract, logicvista_correct),
}


def official_score(text: object, record: Any) -> tuple[float, str | None]:
    """``(score, extracted)`` by the rules of ``record.source``'s benchmark; any other source falls back to the
    strict reward on :func:`final_span` (so untagged answers are still read). Never raises."""
    source = getattr(record, "source", None)
    try:
        if source in _SCORERS:
            extract, correct = _SCORERS[source]
            return float(correct(text, record)), extract(text, record)
        from vold_pl.rewards.functions import score_answer

        span = final_span(text)
        return float(score_answer(span, record)), span or None
    except Exception:  # a scorer bug on odd input must not stop an evaluation: count it wrong
        return 0.0, None
