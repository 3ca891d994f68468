"""Answer extraction at the edges the reward tests leave open: nested braces inside a box, the display-math
delimiters, the length cap, and the last answer phrase of a response (worked by hand)."""

from __future__ import annotations

from vold_pl.rewards.extract import MAX_ANSWER_CHARS, after_answer_phrase, clean_answer, find_boxed


def test_a_box_keeps_its_nested_braces():
    assert find_boxed(r"so \boxed{\frac{1}{2}} is it") == r"\frac{1}{2}"
    assert find_boxed(r"\boxed{a} then \boxed{\{1, 2\}}") == r"\{1, 2\}"  # the last box; escaped braces are text


def test_clean_answer_drops_every_math_delimiter_and_refuses_overlong_answers():
    assert clean_answer(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"  # a whole-string box, nested braces inside
    assert clean_answer(r"\boxed{1} + \boxed{2}") == r"\boxed{1} + \boxed{2}"  # not one box: kept
    assert clean_answer(r"\[ x^2 + 1 \]") == "x^2 + 1"
    assert clean_answer(r"\( 5 \)") == "5" and clean_answer("$7$") == "7"
    assert clean_answer("9" * MAX_ANSWER_CHARS) == "9" * MAX_ANSWER_CHARS
    assert clean_answer("9" * (MAX_ANSWER_CHARS + 1)) == ""  # over the cap: no answer, not a truncated one


def test_the_last_answer_phrase_wins_up_to_its_line_end():
    assert after_answer_phrase("Answer: A.\nOn reflection, the final answer is B.") == "B"
    assert after_answer_phrase("The answer is 1.45\nbecause 1 + 0.45") == "1.45"
    assert after_answer_phrase("no phrase here") is None
    assert after_answer_phrase("The answer is " + "9" * (MAX_ANSWER_CHARS + 1)) is None
