"""A model path that is neither a local folder nor reachable offline is one line: the path, the config key
that holds it and what produces it (instead of a jsonargparse trace ending in "Repo id must be in the form")."""

from __future__ import annotations

from pathlib import Path

import pytest

from vold_pl.errors import UserError
from vold_pl.models.factory import ModelPathError, ModelSpec, load_processor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh checkout's state: the configs, no artifacts/ and no runs/."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def run_cli(args: list[str], capsys) -> str:
    from vold_pl.cli import main

    with pytest.raises(SystemExit) as ei:
        main(args)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    # (Lightning's logging handler may report a closed capture stream: not our concern here.)
    assert "ModelPathError" not in err and "Repo id must be in the form" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    return line


def test_missing_export_names_path_key_and_producing_stage(workdir, capsys):
    line = run_cli(["fit", "--config", "configs/quickstart/opd_grpo.yaml"], capsys)
    assert "model.init_args.model.name_or_path: model path 'runs/sft_student/export'" in line
    assert "`vold-pl fit --config configs/quickstart/sft_student.yaml`" in line and "make quickstart" in line


def test_missing_teacher_names_the_teacher_key(workdir, capsys, tiny_models):
    line = run_cli(["fit", "--config", "configs/quickstart/opd_grpo.yaml",
                    "--model.init_args.model.name_or_path", str(tiny_models["student"])], capsys)
    assert "model.init_args.teacher.name_or_path: model path 'runs/sft_teacher/export'" in line
    assert "configs/quickstart/sft_teacher.yaml" in line


def test_missing_artifacts_say_make_quickstart(workdir, capsys):
    line = run_cli(["fit", "--config", "configs/quickstart/sft_student.yaml"], capsys)
    assert "'artifacts/tiny/student'" in line and "run `make quickstart` first" in line


def test_unreachable_hub_id_and_bad_folder(workdir, tmp_path):
    with pytest.raises(ModelPathError) as ei:
        load_processor(ModelSpec("Qwen/No-Such-Model-0B"))
    msg = str(ei.value)
    assert isinstance(ei.value, UserError) and "\n" not in msg
    assert "'Qwen/No-Such-Model-0B' is neither a local folder nor cached for offline use" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match=r"'.*empty' is a folder but not a model saved with save_pretrained"):
        load_processor(ModelSpec(str(tmp_path / "empty")), key="model.init_args.teacher.name_or_path")
