"""OPD's teacher reads the output-format instruction the student's prompt ends with (the data module's
``instruction``), not the default one: the student and the teacher are asked for the same format."""

from __future__ import annotations

import pytest

from tests.prompt_checks import teacher_decoded_prompts
from tests.scripted_engine import ScriptedEngine
from tests.test_microbatch import SCRIPT_IMAGE, SCRIPT_TEXT, _records
from vold_pl.data.collate import PromptCollator
from vold_pl.data.sources import to_dataset
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.base import OptimConfig
from vold_pl.modules.opd_grpo import GRPOConfig, OPDConfig, OPDGRPOModule
from vold_pl.prompts import DEFAULT_INSTRUCTION
from vold_pl.rl import teacher as teacher_mod
from vold_pl.rl.rollout_types import SamplingConfig

CUSTOM = "Reason briefly, then write only the final answer between <answer> and </answer>."


@pytest.mark.parametrize("instruction", [CUSTOM, DEFAULT_INSTRUCTION])
def test_teacher_prompt_ends_with_the_students_instruction(tiny_models, synth_data, monkeypatch, instruction):
    records = _records(synth_data)
    module = OPDGRPOModule(
        ModelSpec(str(tiny_models["student"])), teacher=ModelSpec(str(tiny_models["teacher"])),
        optim=OptimConfig(lr=1e-3), grpo=GRPOConfig(num_generations=2),
        opd=OPDConfig(lam=0.5, gate="all", estimator="k1", mode="loss"),
        sampling=SamplingConfig(max_new_tokens=16), export=False, log_completions_every_n_steps=0)
    module.configure_model()
    module.rollout_engine = ScriptedEngine(module.tokenizer, {records[0].id: SCRIPT_TEXT, records[1].id: SCRIPT_IMAGE})
    seen: list[str] = []
    build = teacher_mod.build_teacher_inputs

    def build_and_read(tokenizer, recs, ids, mask, group_size, instr=DEFAULT_INSTRUCTION):
        out = build(tokenizer, recs, ids, mask, group_size, instr)
        seen.extend(t for t, ok in zip(teacher_decoded_prompts(tokenizer, out), out.available.tolist()) if ok)
        return out

    from vold_pl.modules import opd_grpo

    monkeypatch.setattr(opd_grpo, "build_teacher_inputs", build_and_read)
    batch = PromptCollator(module.processor, instruction=instruction)([to_dataset(records)[i] for i in range(2)])
    module.build_experience(batch)
    assert seen, "the teacher scored no row"
    other = DEFAULT_INSTRUCTION if instruction == CUSTOM else CUSTOM
    for text in seen:
        assert text.count(instruction) == 1 and other not in text, text
