"""Boundaries a single-line change would cross unnoticed by the rest of the suite: a curriculum stage whose
validation metric equals its threshold ("at least"), a tokenizer pair whose probe encodes to as many tokens with
different ids, the last option letter of a choice question, and plain numbers that differ beyond float precision.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vold_pl.callbacks.curriculum import Curriculum
from vold_pl.data.curriculum import CurriculumStage
from vold_pl.rewards.extract import parse_choice_letters, parse_choice_letters_strict
from vold_pl.rewards.functions import math_equal, score_answer


# ----------------------------------------------------------------------------------- curriculum: "at least"
class _StageData:
    """The data module's side of the curriculum contract: stage pools and the stage filter."""

    train_epoch = 0

    def __init__(self):
        self.stages: list[int] = []

    def curriculum_pools(self, stage):
        return [[0]]

    def set_curriculum_stage(self, index, **record_filter):
        self.stages.append(index)


class _Policy:
    """The module's side: the epoch flag (no RL settings, as an SFT module)."""

    def __init__(self):
        self.ended: list[bool] = []

    def end_epoch_early(self, end: bool = True) -> None:
        self.ended.append(end)

    def curriculum_settings(self) -> dict:
        return {}

    def apply_curriculum_settings(self, **settings) -> None:
        assert not settings


def _curriculum_after_validation(value: float, threshold: float) -> int:
    stages = [CurriculumStage("easy", val_threshold=threshold, val_metric="val/acc"), CurriculumStage("hard")]
    cb, dm = Curriculum(stages), _StageData()
    trainer = SimpleNamespace(datamodule=dm, reload_dataloaders_every_n_epochs=0, max_epochs=-1, max_steps=-1,
                              sanity_checking=False, state=SimpleNamespace(fn="fit"), global_step=3,
                              callback_metrics={"val/acc": torch.tensor(value)}, is_global_zero=False)
    cb.setup(trainer, _Policy(), "fit")
    cb.on_validation_end(trainer, None)
    return cb.stage


def test_curriculum_stage_advances_when_the_metric_equals_its_threshold():
    assert _curriculum_after_validation(0.5, 0.5) == 1  # at least the threshold: equal ends the stage
    assert _curriculum_after_validation(0.75, 0.5) == 1
    assert _curriculum_after_validation(0.4375, 0.5) == 0  # below (exact in float32): the stage goes on


# ------------------------------------------------------------------------ tokenizer pair, same probe length
def _swapped_tokenizer(tok, a: int, b: int):
    """The same BPE and added tokens as ``tok``, with the ids of two ordinary tokens exchanged."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=tok.eos_token,
                                   pad_token=tok.pad_token)


def test_tokenizers_whose_probe_has_the_same_length_but_other_ids_are_refused():
    from vold_pl.data.synthetic import corpus_texts
    from vold_pl.models.factory import _PROBE_TEXT, TokenizerMismatchError, check_tokenizers_aligned
    from vold_pl.toy.tiny import train_tokenizer

    tok = train_tokenizer(corpus_texts(seed=0, n=300), vocab_size=512)
    ids = tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    added = set(tok.added_tokens_decoder)
    at = next(i for i, t in enumerate(ids) if t not in added)  # the probe's first ordinary token
    other_id = next(t for t in ids[at + 1:] if t not in added and t != ids[at])
    swapped = _swapped_tokenizer(tok, ids[at], other_id)
    theirs = swapped(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    assert len(theirs) == len(ids) and theirs != ids  # the boundary: as many tokens, other ids
    assert {k: v.content for k, v in swapped.added_tokens_decoder.items()} == \
        {k: v.content for k, v in tok.added_tokens_decoder.items()}  # added tokens agree: only the probe differs
    with pytest.raises(TokenizerMismatchError) as e:
        check_tokenizers_aligned(tok, swapped)
    assert str(e.value) == (
        "teacher and student tokenizers do not line up, so the teacher cannot score the student's tokens: "
        f"a probe rollout tokenises differently from token {at} on (student {ids[at:at + 6]}…, "
        f"teacher {theirs[at:at + 6]}…). Use a teacher from the same tokenizer family (e.g. Qwen3 for a "
        "Qwen2.5-VL student) or set opd.lam: 0.")
    check_tokenizers_aligned(tok, _swapped_tokenizer(tok, ids[at], ids[at]))  # the unchanged copy passes


# ------------------------------------------------------------------------------ the last option letter
def test_last_option_letter_is_parsed_and_scored():
    choices = ["red", "green", "blue", "black"]
    for answer in ("D", "(D)", "d", "D) black", "The answer is D", "black"):
        assert parse_choice_letters(answer, 4, choices) == frozenset({"D"}), answer
    assert parse_choice_letters("E", 4, choices) == frozenset()  # one past the last option
    assert parse_choice_letters_strict("D", 4) == frozenset({"D"})
    assert parse_choice_letters_strict("E", 4) == frozenset()
    record = SimpleNamespace(id="q", answer="D", answer_type="choice", choices=choices)
    assert score_answer("D", record) == 1.0 and score_answer("C", record) == 0.0
    assert score_answer("D", SimpleNamespace(id="q", answer="D", answer_type="choice", choices=choices[:3])) == 0.0


# ----------------------------------------------------------------------- numbers beyond float precision
@pytest.mark.parametrize("pred,gold", [
    ("12345678901234567891", "12345678901234567890"),  # equal as float64
    ("0.1000000000000000001", "0.1"),
    ("1e-400", "0"),  # a float64 underflow
    ("9007199254740993", "9007199254740992"),  # 2^53 + 1 vs 2^53
])
def test_plain_numbers_that_differ_beyond_float_precision_are_not_equal(pred, gold):
    assert float(pred) == float(gold)  # the case: float64 cannot tell them apart
    assert not math_equal(pred, gold)
    assert score_answer(pred, SimpleNamespace(id="q", answer=gold, answer_type="math")) == 0.0
    assert score_answer(pred, SimpleNamespace(id="q", answer=gold, answer_type="open")) == 0.0
    assert math_equal(pred, pred) and math_equal("1,000", "1000.0")
