"""Tests of answer extraction and reward functions (vold_pl.rewards). Expected values are worked by hand."""

from __future__ import annotations

import os
import random
import re
import threading
import time

import pytest
import torch

from vold_pl.data.schema import Record
from vold_pl.rewards import functions as F
from vold_pl.rewards.extract import (
    extract_answer,
    find_boxed,
    is_well_formatted,
    normalize_text,
    parse_bbox,
    parse_choice_letters,
    parse_choice_letters_strict,
    parse_labels,
    parse_yesno,
)
from vold_pl.rewards.functions import (
    RewardOutput,
    UnknownRewardError,
    compute_rewards,
    get_reward,
    list_rewards,
    math_equal,
    register_reward,
    score_answer,
    validate_weights,
)


# Time limits of the "never stalls" checks. Mutation testing (`make mutate`) runs them in forked workers beside
# other work, where everything is several times slower; the limits stay below math-verify's time limit there.
SLOW = 5.0 if "MUTANT_UNDER_TEST" in os.environ else 1.0


def rec(answer, answer_type, choices=None, rid="r0"):
    return Record(id=rid, problem="q", answer=answer, answer_type=answer_type, choices=choices)


def wrap(ans: str) -> str:
    return f"<think>some reasoning</think> <answer>{ans}</answer>"


@pytest.fixture
def registry_snapshot():
    saved = dict(F._REGISTRY)
    yield
    F._REGISTRY.clear()
    F._REGISTRY.update(saved)


# ------------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("no tags at all, the answer is 42", None),
    ("no tags but \\boxed{42} and later \\boxed{43}.", "43"),
    ("<answer>1</answer> wait <answer>2</answer> no <answer>3</answer>", "3"),          # last wins
    ("<answer><answer>5</answer></answer>", "5"),                                    # nested: innermost
    ("<answer>7</answer> then <answer>8 and the output was cut", "7"),               # unclosed trailing
    ("<answer>8 and the output was cut", None),
    ("<answer>9", None),
    ("</answer> stray close only", None),
    ("<answer></answer>", None),                                                     # empty never scores
    ("<answer>   \n </answer>", None),
    ("<answer>\\boxed{}</answer>", None),
    ("<ANSWER>Yes</Answer>", "Yes"),                                                 # case-insensitive tags
    ("<answer>so \\boxed{\\boxed{\\frac{1}{2}}} done</answer>", "\\frac{1}{2}"),     # nested boxes
    ("<answer>\\boxed{\\{1,2\\}}</answer>", "\\{1,2\\}"),                            # escaped braces
    ("<answer>\\boxed{12</answer>", "\\boxed{12"),                                   # unbalanced box: raw block
    ("<answer>1</answer> \\boxed{2}", "1"),                                          # tags beat a later box
    ("<answer>" + "x" * 5000 + "</answer>", None),                                   # over-long is no answer
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("bad", [None, 42, b"<answer>1</answer>", ["<answer>1</answer>"], ""])
def test_non_strings_never_raise(bad):
    assert extract_answer(bad) is None
    assert is_well_formatted(bad) is False
    assert find_boxed(bad) is None
    assert normalize_text(bad) == ""
    assert parse_yesno(bad) is None and parse_bbox(bad) is None
    assert parse_choice_letters(bad, 4) == frozenset() and parse_labels(bad) == frozenset()


def test_is_well_formatted_cases():
    assert is_well_formatted("<think>a</think><answer>b</answer>")
    assert is_well_formatted("  \n<think>a\nb</think>\n\n<answer>\nc</answer>\n ")
    assert is_well_formatted("<think></think><answer></answer>")
    assert not is_well_formatted("<think>a</think> text <answer>b</answer>")
    assert not is_well_formatted("<answer>b</answer>")
    assert not is_well_formatted("<think>a</think><answer>b</answer> trailing")
    assert not is_well_formatted("<think>a</think><answer>b")
    assert not is_well_formatted("<think></answer>")


def test_is_well_formatted_equals_curr_reft_regex():
    """The linear check must agree with the original backtracking pattern on random tag soups."""
    pattern = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
    parts = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x", "<", ">"]
    rng = random.Random(0)
    for _ in range(3000):
        s = "".join(rng.choice(parts) for _ in range(rng.randint(0, 9)))
        assert is_well_formatted(s) == (pattern.fullmatch(s.strip()) is not None), repr(s)


# -------------------------------------------------------------------------------------------- parsers
@pytest.mark.parametrize("s, expected", [
    ("B", {"B"}), ("(B)", {"B"}), ("B.", {"B"}), ("B) 42", {"B"}), ("(B) 42", {"B"}), ("B. The cat", {"B"}),
    ("A, C", {"A", "C"}), ("a and c", {"A", "C"}), ("(C) (A)", {"A", "C"}), ("Option B", {"B"}),
    ("The answer is (B).", {"B"}), ("Answer: Option B", {"B"}), ("\\boxed{B}", {"B"}), ("$\\text{B}$", {"B"}),
    ("A or B", set()), ("E", set()), ("A, E", set()), ("I think B", set()), ("", set()),
])
def test_parse_choice_letters(s, expected):
    assert parse_choice_letters(s, 4) == frozenset(expected)


def test_parse_choice_letters_by_choice_text():
    choices = ["41", "42", "The red car", "42"]
    assert parse_choice_letters("the red car.", 4, choices) == {"C"}
    assert parse_choice_letters("41", 4, choices) == {"A"}
    assert parse_choice_letters("42", 4, choices) == frozenset()  # two options read "42": ambiguous
    assert parse_choice_letters("43", 4, choices) == frozenset()


def test_parse_choice_letters_strict():
    assert parse_choice_letters_strict("B", 4) == {"B"}
    assert parse_choice_letters_strict(" A, C ", 4) == {"A", "C"}
    for s in ["(B)", "B.", "Option B", "b", "B) 42", "E", "AB", ""]:
        assert parse_choice_letters_strict(s, 4) == frozenset(), s


def test_parse_yesno():
    assert parse_yesno("Yes") == "yes" and parse_yesno("no.") == "no"
    assert parse_yesno("Yes, there are two.") == "yes" and parse_yesno("\\text{No}") == "no"
    assert parse_yesno("yes or no") is None and parse_yesno("Yes/No") is None and parse_yesno("yesterday") is None
    assert parse_yesno("  YES ", strict=True) == "yes"
    assert parse_yesno("Yes.", strict=True) is None and parse_yesno("yes, it is", strict=True) is None


def test_parse_bbox():
    assert parse_bbox("[10, 20, 30.5, 40]") == [10.0, 20.0, 30.5, 40.0]
    assert parse_bbox("(10,20),(30,40)") == [10.0, 20.0, 30.0, 40.0]
    assert parse_bbox("dog: 1 2 3 4") == [1.0, 2.0, 3.0, 4.0]
    assert parse_bbox("[1, 2, 3]") is None and parse_bbox("[1,2,3,4] [5,6,7,8]") is None
    assert parse_bbox("[1e999, 0, 1, 1]") is None  # inf is not a coordinate


def test_normalize_text():
    assert normalize_text("The Red  Car!") == "red car"
    assert normalize_text("$\\text{an apple}$") == "apple"
    assert normalize_text("1,000 and 3.5.") == "1000 and 3.5"
    assert normalize_text("-2") == "-2" and normalize_text("t-shirt") == "t shirt"
    assert normalize_text("\\boxed{Paris}") == "paris"


# ------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("pred, gold, expected", [
    ("\\frac{1}{2}", "0.5", 1.0), ("0.5", "\\frac{1}{2}", 1.0), ("1/2", "0.5", 1.0), ("0.50", "0.5", 1.0),
    ("\\sqrt{8}", "2\\sqrt{2}", 1.0), ("x = 2", "2", 1.0), ("1,000", "1000", 1.0), ("\\dfrac{3}{4}", "0.75", 1.0),
    ("3", "4", 0.0), ("-2", "2", 0.0), ("12", "2", 0.0), ("1" + "0" * 1000, "1e1000", 1.0),
    ("9^{9^{9}}", "2", 0.0), ("10^{999999999}", "2", 0.0), ("(10^{10})!", "5", 0.0),
])
def test_math_scores(pred, gold, expected):
    t0 = time.perf_counter()
    assert score_answer(pred, rec(gold, "math")) == expected
    assert time.perf_counter() - t0 < 5.0 * SLOW


def test_scores_per_type():
    # yes/no and choice: exact answers
    assert score_answer("Yes.", rec("yes", "yesno")) == 1.0 and score_answer("no", rec("yes", "yesno")) == 0.0
    ch = ["3", "42", "7", "9"]
    for p in ["B", "(B)", "B) 42", "Option B", "42"]:
        assert score_answer(p, rec("B", "choice", ch)) == 1.0, p
    assert score_answer("A, B", rec("B", "choice", ch)) == 0.0
    assert score_answer("C, A", rec("A, C", "choice", ch)) == 1.0
    assert score_answer("A", rec("A, C", "choice", ch)) == 0.0
    # open: normalized equality, numeric fallback through math-verify
    assert score_answer("The Eiffel Tower.", rec("eiffel tower", "open")) == 1.0
    assert score_answer("\\frac{1}{2}", rec("0.5", "open")) == 1.0
    assert score_answer("Louvre", rec("eiffel tower", "open")) == 0.0
    # bbox: [0,0,10,10] vs [0,0,10,8]: inter 80 / union 100 = 0.8 > 0.5; vs [5,0,15,10]: 50 / 150 = 1/3
    assert score_answer("[0, 0, 10, 8]", rec("[0, 0, 10, 10]", "bbox")) == 1.0
    assert score_answer("[5, 0, 15, 10]", rec("[0, 0, 10, 10]", "bbox")) == 0.0
    assert F.iou_reward(wrap("[5, 0, 15, 10]"), rec("[0, 0, 10, 10]", "bbox")) == pytest.approx(1 / 3)
    assert F.iou_reward(wrap("[10, 10, 0, 0]"), rec("[0, 0, 10, 10]", "bbox")) == pytest.approx(1.0)  # corner order
    # multilabel: {cat, dog, bird} vs {dog, fish}: |∩| = 1, |∪| = 4
    assert score_answer("cat, Dog, bird", rec("dog, fish", "multilabel")) == pytest.approx(0.25)
    assert F.jaccard_reward(wrap("dog; fish"), rec("Fish, dog", "multilabel")) == 1.0


@pytest.mark.parametrize("pred, gold, expected", [
    ("1/2", "0.5", 1.0), ("0.50", "1/2", 1.0), ("\\frac{3}{4}", "0.75", 1.0),  # numeric on both sides: math_equal
    # math_equal calls each of these pairs equal (sympy reads them as algebra), but an open answer is text unless
    # both sides are numbers: only the normalised-text comparison applies, and it says no.
    ("x = 2", "2", 0.0), ("p+q", "q+p", 0.0), ("2x", "x*2", 0.0), ("x^2", "x\\cdot x", 0.0),
])
def test_open_answers_use_math_only_when_both_sides_are_numeric(pred, gold, expected):
    assert math_equal(pred, gold), "the pair must be math-equal for the numeric guard to matter"
    assert score_answer(pred, rec(gold, "open")) == expected


@pytest.mark.parametrize("answer_type, gold", [
    ("yesno", "yes"), ("choice", "A"), ("math", "0"), ("open", " "), ("open", ""), ("bbox", "[0,0,1,1]"),
    ("multilabel", "cat"),
])
def test_empty_answer_never_scores(answer_type, gold):
    r = rec(gold, answer_type, ["x", "y"] if answer_type == "choice" else None)
    for completion in ["<think>t</think><answer></answer>", "<answer> </answer>", "no answer here", ""]:
        assert F.accuracy_reward(completion, r) == 0.0
    assert score_answer(None, r) == 0.0 and score_answer("", r) == 0.0


def test_unknown_answer_type_raises():
    with pytest.raises(ValueError, match="unknown answer_type"):
        score_answer("1", rec("1", "essay"))


def test_currreft_rewards():
    yes = rec("yes", "yesno")
    assert F.currreft_yesno_reward(wrap("  YES "), yes) == 1.0
    assert F.currreft_yesno_reward(wrap("Yes, there is one"), yes) == 0.0  # gold is in it: still 0
    assert F.currreft_yesno_reward(wrap("yes."), yes) == 0.0
    ch = rec("A, C", "choice", ["1", "2", "3", "4"])
    assert F.currreft_choice_reward(wrap("C, A"), ch) == 1.0
    assert F.currreft_choice_reward(wrap("(A), (C)"), ch) == 0.0
    assert F.currreft_choice_reward(wrap("A"), ch) == 0.0
    assert F.currreft_open_reward(wrap("\\boxed{\\frac{1}{2}}"), rec("0.5", "math")) == 1.0
    assert F.currreft_open_reward(wrap("[0,0,10,8]"), rec("[0,0,10,10]", "bbox")) == 1.0
    assert F.currreft_open_reward(wrap("cat, dog, bird"), rec("dog, fish", "multilabel")) == pytest.approx(0.25)


def test_format_reward():
    r = rec("1", "math")
    assert F.format_reward(wrap("1"), r) == 1.0 and F.format_reward("<answer>1</answer>", r) == 0.0


def test_math_off_main_thread():
    out = {}

    def work():
        out["timeout"] = F._math_timeout()
        t0 = time.perf_counter()
        out["ok"] = math_equal("\\frac{1}{2}", "0.5")
        out["bomb"] = math_equal("9^{9^{9}}", "2") or math_equal("\\sum_{k=1}^{9999} k^k", "2")
        out["dt"] = time.perf_counter() - t0

    th = threading.Thread(target=work)
    th.start()
    th.join(30)
    assert not th.is_alive()
    assert out == {"timeout": None, "ok": True, "bomb": False, "dt": out["dt"]} and out["dt"] < 5.0 * SLOW
    assert F._math_timeout() == F.MATH_TIMEOUT_S


# --------------------------------------------------------------------------------------- adversarial
def _garbage(n: int, seed: int) -> str:
    rng = random.Random(seed)
    alphabet = "abc {}()[]\\^!$<>/,.0123456789\n"
    frags = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "}", "\\frac{", "^{", "yes", "(B)"]
    out, size = [], 0
    while size < n:
        piece = rng.choice(frags) if rng.random() < 0.3 else "".join(rng.choices(alphabet, k=rng.randint(1, 8)))
        out.append(piece)
        size += len(piece)
    return "".join(out)[:n]


ADVERSARIAL = [
    _garbage(100_000, 0), _garbage(100_000, 1),
    "<answer>" * 12_500, "</answer>" * 11_000, "<answer></answer>" * 6_000,
    "<think>" + "</think><answer>x" * 6_000, "<think>" + "</think>" * 6_000 + "<answer>" * 6_000,
    "\\boxed{" * 14_000, "\\boxed{" * 7_000 + "}" * 7_000, "{" * 100_000, "}" * 100_000,
    "<answer>" + "(" * 4000 + "</answer>", "<answer>" + "A, " * 1300 + "</answer>",
    "<answer>1" + "0" * 5000 + "</answer>", "<answer>" + "9" * 4000 + "</answer>",  # 10**5000 as text
    "<answer>" + "2^{" * 300 + "2" + "}" * 300 + "</answer>", "<answer>" + " " * 4000 + "!</answer>",
    "<answer>" + "\\text{" * 1000 + "a" + "}" * 1000 + "</answer>", "\x00\udcff" * 50_000,
]


@pytest.mark.parametrize("idx", range(len(ADVERSARIAL)))
def test_adversarial_outputs_are_fast_and_safe(idx):
    text = ADVERSARIAL[idx]
    records = [
        rec("yes", "yesno"), rec("A", "choice", ["1", "2", "3"]), rec("2", "math"), rec("0.5", "open"),
        rec("[0,0,1,1]", "bbox"), rec("a, b", "multilabel"),
    ]
    math_equal("1/2", "0.5")  # import math-verify / sympy outside the timed region
    t0 = time.perf_counter()
    ans = extract_answer(text)
    is_well_formatted(text)
    find_boxed(text)
    for f in (normalize_text, parse_yesno, parse_bbox, parse_labels):
        f(text)
        f(ans)
    parse_choice_letters(text, 4, ["x", "y"])
    parse_choice_letters(ans, 4)
    out = compute_rewards([text] * len(records), records, {n: 1.0 for n in list_rewards()})
    dt = time.perf_counter() - t0
    assert out.n_errors == 0
    assert torch.isfinite(out.total).all()
    assert dt < 2.0 * SLOW, f"took {dt:.2f}s"


# -------------------------------------------------------------------------------- registry & combining
def test_registry_lookup_and_typo_message():
    assert get_reward("accuracy") is F.accuracy_reward
    for name in ["accuracy", "format", "iou", "jaccard", "currreft_yesno", "currreft_choice", "currreft_open"]:
        assert name in list_rewards()
    with pytest.raises(UnknownRewardError) as ei:
        get_reward("acuracy")
    msg = str(ei.value)
    assert "unknown reward 'acuracy'" in msg and "Did you mean 'accuracy'?" in msg and "format" in msg
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, ValueError)


def test_register_duplicate(registry_snapshot):
    @register_reward("test_const")
    def const(c, r):
        return 1.0

    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_const")(lambda c, r: 0.0)
    register_reward("test_const", overwrite=True)(lambda c, r: 0.5)
    assert get_reward("test_const")("x", None) == 0.5


def test_weights_combination():
    records = [rec("4", "math", rid=f"r{i}") for i in range(4)]
    completions = [
        wrap("4"),                          # accuracy 1, format 1 -> 1.0 + 0.5 = 1.5
        "so the result is \\boxed{4}",      # accuracy 1, format 0 -> 1.0
        wrap("5"),                          # accuracy 0, format 1 -> 0.5
        "<answer></answer>",                # accuracy 0, format 0 -> 0.0
    ]
    out = compute_rewards(completions, records, {"accuracy": 1.0, "format": 0.5})
    assert isinstance(out, RewardOutput)
    assert out.total.dtype == torch.float32 and out.total.shape == (4,)
    assert out.total.tolist() == pytest.approx([1.5, 1.0, 0.5, 0.0])
    assert out.named["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.named["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out.errors == {"accuracy": 0, "format": 0} and out.n_errors == 0


def test_raising_reward_is_counted_not_fatal(registry_snapshot, caplog):
    @register_reward("test_boom")
    def boom(completion, record):
        if record.id == "bad":
            raise RuntimeError("kaboom")
        return float("nan") if record.id == "nan" else 2.0

    records = [rec("4", "math", rid="ok"), rec("4", "math", rid="bad"), rec("4", "math", rid="nan")]
    with caplog.at_level("WARNING"):
        out = compute_rewards([wrap("4")] * 3, records, {"test_boom": 0.25, "accuracy": 1.0})
    assert out.named["test_boom"].tolist() == [2.0, 0.0, 0.0]
    assert out.total.tolist() == pytest.approx([0.25 * 2.0 + 1.0, 1.0, 1.0])
    assert out.errors == {"test_boom": 2, "accuracy": 0} and out.n_errors == 2
    assert "kaboom" in caplog.text and "'test_boom' failed on 2 of 3" in caplog.text


def test_reward_overflowing_the_reward_dtype_is_counted_and_scored_0(registry_snapshot):
    @register_reward("test_huge")
    def huge(completion, record):
        return {"f64": 1e39, "weighted": 1e38, "ok": 3.0}[record.id]  # all finite in float64

    records = [rec("4", "math", rid="f64"), rec("4", "math", rid="weighted"), rec("4", "math", rid="ok")]
    out = compute_rewards([wrap("4")] * 3, records, {"test_huge": 10.0, "accuracy": 1.0})
    assert torch.isfinite(out.total).all()
    assert out.named["test_huge"].tolist() == [0.0, 0.0, 3.0]  # 1e38 alone fits float32, 10 x 1e38 does not
    assert out.total.tolist() == pytest.approx([1.0, 1.0, 31.0])
    assert out.errors == {"test_huge": 2, "accuracy": 0}


def test_bad_weights_and_inputs():
    with pytest.raises(ValueError, match="Known rewards"):
        compute_rewards(["x"], [rec("1", "math")], {"acuracy": 1.0})
    with pytest.raises(ValueError, match="finite"):
        validate_weights({"accuracy": float("nan")})
    with pytest.raises(ValueError, match="non-empty"):
        validate_weights({})
    with pytest.raises(ValueError, match="pair up"):
        compute_rewards(["x", "y"], [rec("1", "math")], {"accuracy": 1.0})
    assert validate_weights({"accuracy": 1, "format": 0.5}) == {"accuracy": 1.0, "format": 0.5}
