"""The ``official`` scorers against response/gold tables whose verdicts follow each benchmark's published rules
(docs/benchmarks.md names the source files). Each table mixes tagged and untagged answers."""

from __future__ import annotations

import pytest

from vold_pl.data.schema import Record
from vold_pl.rewards.official import official_score


def rec(source, answer, answer_type, choices=None):
    return Record(id="x", problem="q", answer=answer, answer_type=answer_type, choices=choices, source=source)


def tag(s):
    return f"<think> working </think><answer> {s} </answer>"


# ------------------------------------------------------------------------------------------------ MathVista
MV_CHOICES = ["3", "4", "5", "6"]
MV_TEXT_CHOICES = ["larger than", "equal to", "smaller than"]
MV_CHOICE = rec("mathvista", "B", "choice", MV_CHOICES)  # gold option text "4"
MV_TEXTC = rec("mathvista", "C", "choice", MV_TEXT_CHOICES)
MV_INT = rec("mathvista", "7", "math")
MV_FLOAT2 = rec("mathvista", "1.45", "math")  # precision 2 (the loader writes the gold with 2 decimals)
MV_FLOAT1 = rec("mathvista", "0.50", "math")
MV_FLOAT1b = rec("mathvista", "2.0", "math")
MV_LIST = rec("mathvista", "[1, 2, 3]", "open")
MV_TEXT = rec("mathvista", "Tom", "open")

MATHVISTA = [
    # letter forms, tagged and untagged
    (MV_CHOICE, tag("B"), 1), (MV_CHOICE, "B", 1), (MV_CHOICE, "(B)", 1), (MV_CHOICE, "B.", 1),
    (MV_CHOICE, "b", 1), (MV_CHOICE, tag("\\boxed{B}"), 1), (MV_CHOICE, "\\boxed{B}", 1), (MV_CHOICE, "B)", 1),
    (MV_CHOICE, tag("(B) 4"), 1), (MV_CHOICE, "The answer is (B).", 1), (MV_CHOICE, "Answer: B", 1),
    (MV_CHOICE, "4", 1), (MV_CHOICE, tag("4"), 1),  # option text
    (MV_CHOICE, "A", 0), (MV_CHOICE, tag("C"), 0), (MV_CHOICE, "(A)", 0), (MV_CHOICE, "5", 0),
    (MV_CHOICE, "", 0), (MV_CHOICE, tag(""), 0), (MV_CHOICE, "The answer is 6", 0),
    # two letters: the first bracketed one is read
    (MV_CHOICE, "(B) or (C)", 1), (MV_CHOICE, "(C) or (B)", 0),
    # free text goes to the most similar option (Levenshtein), as the official normalisation does
    (MV_TEXTC, "smaller", 1), (MV_TEXTC, "smaller than", 1), (MV_TEXTC, tag("C"), 1), (MV_TEXTC, "equal", 0),
    (MV_TEXTC, tag("larger than"), 0),
    # integers: int(float(x)) (truncation), sentences, units
    (MV_INT, "7", 1), (MV_INT, tag("7"), 1), (MV_INT, "7.0", 1), (MV_INT, "7.9", 1), (MV_INT, "The answer is 7", 1),
    (MV_INT, "The answer is 7.", 1), (MV_INT, tag("7 cm"), 1), (MV_INT, "\\boxed{7}", 1), (MV_INT, "8", 0),
    (MV_INT, tag("6.99"), 0), (MV_INT, "seven", 0), (MV_INT, "", 0), (MV_INT, "1,007", 0),
    # floats: rounded to the gold's precision
    (MV_FLOAT2, "1.45", 1), (MV_FLOAT2, "1.449", 1), (MV_FLOAT2, tag("1.4512"), 1),
    (MV_FLOAT2, "The answer is 1.45", 1),
    (MV_FLOAT2, "1.4", 0), (MV_FLOAT2, "1.46", 0), (MV_FLOAT2, tag("\\frac{29}{20}"), 0),
    (MV_FLOAT1, "0.5", 1), (MV_FLOAT1, tag("0.500"), 1), (MV_FLOAT1, "1/2", 0), (MV_FLOAT1b, "2", 1),
    (MV_FLOAT1b, "1.96", 1), (MV_FLOAT1b, "2.1", 0),
    # lists and text: string comparison (list spacing ignored)
    (MV_LIST, "[1, 2, 3]", 1), (MV_LIST, tag("[1,2,3]"), 1), (MV_LIST, "[1, 3, 2]", 0), (MV_LIST, "1, 2, 3", 0),
    (MV_TEXT, "Tom", 1), (MV_TEXT, tag("Tom"), 1), (MV_TEXT, "tom", 0), (MV_TEXT, "Jerry", 0),
]


# ----------------------------------------------------------------------------------------------- MATH-V
MATHV_CHOICE = rec("mathvision", "B", "choice", ["2", "4", "6", "8", "10"])
MATHV_NUM = rec("mathvision", "12", "math")
MATHV_DEC = rec("mathvision", "1.5", "math")
MATHV_FRAC = rec("mathvision", "\\frac{1}{3}", "math")
MATHV_SQRT = rec("mathvision", "2\\sqrt{2}", "math")
MATHV_TUPLE = rec("mathvision", "(1,2)", "math")

MATHVISION = [
    (MATHV_CHOICE, "B", 1), (MATHV_CHOICE, tag("B"), 1), (MATHV_CHOICE, "(B)", 1), (MATHV_CHOICE, "b", 1),
    (MATHV_CHOICE, "\\boxed{B}", 1), (MATHV_CHOICE, tag("\\boxed{B}"), 1), (MATHV_CHOICE, "So the answer is B.", 1),
    (MATHV_CHOICE, "Therefore it is (B).", 1), (MATHV_CHOICE, "B\nbecause 4 sides", 1),
    (MATHV_CHOICE, "The answer is 4", 1), (MATHV_CHOICE, tag("4"), 1),  # the option's value
    (MATHV_CHOICE, "\\boxed{4}", 1), (MATHV_CHOICE, "A", 0), (MATHV_CHOICE, tag("C"), 0), (MATHV_CHOICE, "6", 0),
    (MATHV_CHOICE, "", 0), (MATHV_CHOICE, "\\boxed{A} then \\boxed{B}", 1),
    (MATHV_CHOICE, "\\boxed{B} then \\boxed{A}", 0),
    (MATHV_CHOICE, "B.", 1), (MATHV_CHOICE, "B and C", 0),
    (MATHV_NUM, "12", 1), (MATHV_NUM, tag("12"), 1), (MATHV_NUM, "\\boxed{12}", 1), (MATHV_NUM, "The answer is 12.", 1),
    (MATHV_NUM, "x = 12", 1), (MATHV_NUM, "12.0", 1), (MATHV_NUM, "12.004", 1), (MATHV_NUM, "12.01", 0),
    (MATHV_NUM, "\\boxed{12 \\text{ cm}}", 0)  # spaces go before "\\text{ " is cut: "12{cm}"
    , (MATHV_NUM, "13", 0), (MATHV_NUM, tag("11"), 0), (MATHV_NUM, "", 0),
    (MATHV_NUM, "$12$", 1), (MATHV_NUM, "12^{\\circ}", 1), (MATHV_NUM, "twelve", 0),
    (MATHV_DEC, "1.5", 1), (MATHV_DEC, "\\frac{3}{2}", 1), (MATHV_DEC, "3/2", 1), (MATHV_DEC, tag("1.50"), 1),
    (MATHV_DEC, "1.499", 1), (MATHV_DEC, "1.49", 0), (MATHV_DEC, "1.6", 0),
    (MATHV_FRAC, "\\frac{1}{3}", 1), (MATHV_FRAC, "1/3", 1), (MATHV_FRAC, "0.33", 1), (MATHV_FRAC, "0.333", 1),
    (MATHV_FRAC, tag("\\dfrac{1}{3}"), 1), (MATHV_FRAC, "0.3", 0), (MATHV_FRAC, "\\frac{2}{3}", 0),
    (MATHV_SQRT, "2\\sqrt{2}", 1), (MATHV_SQRT, "2.83", 1), (MATHV_SQRT, "\\sqrt{8}", 1), (MATHV_SQRT, "2.8", 0),
    (MATHV_TUPLE, "(1,2)", 1), (MATHV_TUPLE, "(1, 2)", 1), (MATHV_TUPLE, "(2,1)", 0),
]


# --------------------------------------------------------------------------------------------- MMMU-Pro
OPTS = ["$1", "$2", "apple pie", "$4", "$5", "$6", "$7", "$8", "$9", "$10"]
MP = rec("mmmu_pro_standard", "C", "choice", OPTS)
MPV = rec("mmmu_pro_vision", "C", "choice", list("ABCDEFGHIJ"))
MPJ = rec("mmmu_pro_standard", "J", "choice", OPTS)

MMMU_PRO = [
    (MP, "C", 1), (MP, tag("C"), 1), (MP, "(C)", 1), (MP, "C.", 1), (MP, tag("\\boxed{C}"), 1),
    (MP, "Answer: C", 1), (MP, "Some reasoning here.\nAnswer: C", 1), (MP, "The answer is (C).", 1),
    (MP, "I think (A) is tempting but (C) is right", 1), (MP, "I think (C) is tempting but (A) is right", 0),
    (MP, "Answer: A", 0), (MP, tag("A"), 0), (MP, "(B)", 0), (MP, "", 0),
    (MP, "c", 0),  # lower-case letters are not option letters in the official parser
    (MP, "I am not sure at all about this", 0),  # no candidate: the official random choice is scored wrong
    (MP, "After careful thought the best one is the apple pie option here", 1),  # option text in a long response
    (MP, "After careful thought the best one is the $2 option here", 0),
    (MP, "apple pie", 0),  # short response: option texts are not compared
    (MP, "Answer: C or D", 0),  # two letters after Answer: -> fall through to candidates; the last wins
    (MP, "Answer: D or C", 1),
    (MP, "\\boxed{C}", 0),  # "{C}" is none of (C), "C ", "C."
    (MP, "C D", 0),  # both "C " and "D " are candidates; the last " X " position wins: D
    (MP, tag("(C) apple pie"), 1),
    (MP, "Answer:C", 1), (MP, "Answer: (C)", 1), (MP, "Answer: C.", 1),
    (MP, "Option C.", 1), (MP, "The correct option is C, apple pie.", 1),
    (MPJ, "J", 1), (MPJ, "Answer: J", 1), (MPJ, "(J)", 1), (MPJ, tag("J"), 1), (MPJ, "I", 0), (MPJ, "(I)", 0),
    (MPV, "C", 1), (MPV, "Answer: C", 1), (MPV, tag("C"), 1), (MPV, "(C)", 1), (MPV, "C.", 1),
    (MPV, "(B)", 0), (MPV, "Answer: B", 0), (MPV, "no idea", 0), (MPV, "", 0),
    (MPV, "The question asks which is cheapest. Answer: C", 1),
    (MPV, "The question asks which is cheapest. Answer: B", 0),
    (MPV, "Looking at the figure, (A) and (C) differ; I pick (C)", 1),
    (MPV, "Looking at the figure, (C) and (A) differ; I pick (A)", 0),
    (MPV, tag("B"), 0), (MPV, tag("(C)"), 1), (MPV, "Answer: \\boxed{C}", 1),
    (MPV, "C\n", 0)  # a newline is not stripped: neither "C " nor "C." appears
    , (MPV, "\nC", 1),
]


# ------------------------------------------------------------------------------------------- LogicVista
LV = rec("logicvista", "B", "choice", list("ABCD"))
LV2 = rec("logicvista", "A, C", "choice", list("ABCD"))
LVN = rec("logicvista", "3", "multilabel")

LOGICVISTA = [
    (LV, "B", 1), (LV, tag("B"), 1), (LV, "(B)", 1), (LV, "B.", 1), (LV, "b", 1), (LV, tag("\\boxed{B}"), 1),
    (LV, "\\boxed{B}", 1), (LV, "The answer is B.", 1), (LV, "The answer is B", 1), (LV, "Answer: B", 1),
    (LV, "Option B", 1), (LV, "Option 2", 1), (LV, "2", 1), (LV, tag("Option 2"), 1), (LV, "Final answer: (B)", 1),
    (LV, "A", 0), (LV, tag("C"), 0), (LV, "BC", 0), (LV, "B, C", 0), (LV, "", 0), (LV, "Option 3", 0),
    (LV, "I cannot tell", 0), (LV, tag("B because it rotates"), 0), (LV, "The answer is the second one", 0),
    (LV, tag("b"), 1), (LV, "Answer: (B).", 1), (LV, "answer: B", 1),
    (LV2, "A, C", 1), (LV2, "AC", 1), (LV2, "CA", 1), (LV2, "C, A", 1), (LV2, tag("A and C"), 1), (LV2, "A C", 1),
    (LV2, "(A), (C)", 1), (LV2, "a, c", 1), (LV2, "1, 3", 1), (LV2, "The answer is A, C.", 1),
    (LV2, "A", 0), (LV2, "C", 0), (LV2, "A, B, C", 0), (LV2, "ABC", 0), (LV2, tag("A; C"), 1), (LV2, "A & C", 1),
    (LVN, "3", 1), (LVN, tag("3"), 1), (LVN, "Option 3", 1), (LVN, "C", 1), (LVN, "The answer is 3.", 1),
    (LVN, "4", 0), (LVN, "B", 0), (LVN, "", 0), (LVN, "three", 0),
]

TABLES = {"mathvista": MATHVISTA, "mathvision": MATHVISION, "mmmu_pro": MMMU_PRO, "logicvista": LOGICVISTA}


@pytest.mark.parametrize("name", list(TABLES))
def test_tables_have_enough_cases(name):
    assert len(TABLES[name]) >= 50


@pytest.mark.parametrize("record, response, expected",
                         [pytest.param(r, s, e, id=f"{n}-{i}")
                          for n, t in TABLES.items() for i, (r, s, e) in enumerate(t)])
def test_official_verdicts(record, response, expected):
    score, _ = official_score(response, record)
    assert score == expected, (response, record.answer, official_score(response, record))


def test_official_is_total():
    for r in (MV_CHOICE, MV_INT, MATHV_NUM, MP, LV):
        for junk in (None, 3, "\\boxed{" * 5000, "<answer>" * 1000, "x" * 200_000):
            score, _ = official_score(junk, r)
            assert score == 0.0


@pytest.mark.parametrize("pred, expected", [
    ("The answer is 1.45", 1.0), ("The answer is 1.45.", 1.0), ("Final answer: 1.45", 1.0), ("1.45", 1.0),
    ("The answer is 1.46", 0.0), ("The answer is", 0.0), ("The answer is 1.45\nor maybe 2", 1.0),
])
def test_strict_reads_a_sentence_answer_with_or_without_final_period(pred, expected):
    from vold_pl.rewards.functions import score_answer

    assert score_answer(pred, rec("mathvista", "1.45", "math")) == expected
