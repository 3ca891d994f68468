"""Bad input, second pass: files that are not UTF-8, decompression-bomb images, PNGs whose chunks are intact but
whose pixels do not decode, 20 MB prompts, crafted checkpoints, and how the CLI reports all of them (the message
alone, exit code 2; ``--debug`` adds the trace). Every input is written by the test.

Each bad record is named by file, line and field, and ``on_bad_record: skip`` skips exactly it; a training run
that meets a bad record mid-epoch counts it and trains every other record.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch

from vold_pl.cli import main
from vold_pl.data.datamodule import ReasoningDataModule
from vold_pl.data.schema import RecordError, read_jsonl
from vold_pl.data.sources import DataSource
from vold_pl.errors import UserError
from vold_pl.models.factory import ModelSpec
from vold_pl.modules.sft import SFTModule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _rec(rid: str, **kw) -> dict:
    rec = {"id": rid, "problem": f"Is there a red square in picture {rid}?", "answer": "yes", "answer_type": "yesno"}
    rec.update(kw)
    return rec


def _write_lines(path: Path, lines: list[bytes | dict]) -> Path:
    path.write_bytes(b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines))
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(path: Path, width: int, height: int, idat: bytes | None = None, seed: int = 0) -> Path:
    """An RGB PNG written chunk by chunk (every CRC valid). ``idat`` replaces the compressed pixel stream."""
    if idat is None:
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (height, width * 3), generator=g, dtype=torch.uint8)
        raw = b"".join(b"\x00" + bytes(row.tolist()) for row in pixels)
        idat = zlib.compress(raw)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _corrupt_pixels_png(path: Path, size: int = 56) -> Path:
    """Chunks and CRCs intact (``verify()`` passes), but the deflate stream breaks off into garbage."""
    good = _png(path, size, size).read_bytes()
    start = good.index(b"IDAT") + 4
    n = struct.unpack(">I", good[start - 8 : start - 4])[0]
    stream = good[start : start + n]
    broken = stream[:20] + bytes((b * 7 + 3) % 256 for b in stream[20:])
    return _png(path, size, size, idat=broken)


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit ``side`` x ``side`` PNG of zeros: ~50 KB on disk, 400 M pixels once decoded."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def _assert_named_and_skippable(path: Path, line: int, needles: list[str], good_ids: list[str], **kw) -> str:
    with pytest.raises(RecordError) as ei:
        read_jsonl(path, **kw)
    text = str(ei.value)
    assert f"{path}:{line}" in text, text
    for n in needles:
        assert n in text, text
    recs, skipped = read_jsonl(path, on_bad_record="skip", **kw)
    assert [r.id for r in recs] == good_ids and skipped == [text]
    return text


# ------------------------------------------------------------------------------------------------ data files

def test_non_utf8_line_is_named_and_only_it_is_skipped(tmp_path):
    path = _write_lines(tmp_path / "data.jsonl", [
        _rec("r1"), b'{"id": "r2", "problem": "Caf\xe9 au lait?", "answer": "yes", "answer_type": "yesno"}',
        _rec("r3", problem="Déjà vu — ünïcödé is fine?")])
    text = _assert_named_and_skippable(path, 2, ["not UTF-8 text", "byte 0xe9", "iconv"], ["r1", "r3"])
    assert "UnicodeDecodeError" not in text
    # a byte-order mark at the start of a UTF-8 file is not an error
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(_rec("b1")).encode() + b"\n")
    assert [r.id for r in read_jsonl(bom)[0]] == ["b1"]


def test_decompression_bomb_is_named_unread_and_skippable(tmp_path):
    (tmp_path / "img").mkdir()
    bomb = _bomb_png(tmp_path / "img" / "bomb.png")
    assert bomb.stat().st_size < 200_000  # tiny on disk
    _png(tmp_path / "img" / "ok.png", 28, 28)
    path = _write_lines(tmp_path / "data.jsonl", [
        _rec("r1", images=["img/ok.png"]), _rec("r2", images=["img/bomb.png"]), _rec("r3")])
    t0 = time.perf_counter()
    _assert_named_and_skippable(path, 2, ["field 'images'", "bomb.png", "decompression bomb", "400000000 pixels"], ["r1", "r3"])
    assert time.perf_counter() - t0 < 5.0  # refused from the header, never inflated


def test_png_with_valid_crcs_but_corrupt_pixels(tmp_path):
    (tmp_path / "img").mkdir()
    _corrupt_pixels_png(tmp_path / "img" / "broken.png")
    _png(tmp_path / "img" / "ok.png", 28, 28)
    from PIL import Image

    with Image.open(tmp_path / "img" / "broken.png") as im:
        im.verify()  # the chunk-level check alone passes: the pixels are what is broken
    path = _write_lines(tmp_path / "data.jsonl", [
        _rec("r1", images=["img/ok.png"]), _rec("r2", images=["img/broken.png"]), _rec("r3", images=["img/ok.png"])])
    _assert_named_and_skippable(path, 2, ["field 'images'", "unreadable image", "broken.png"], ["r1", "r3"])
    # check_images='header' lets it through setup; drawing it is then a named error, not a crash
    assert [r.id for r in read_jsonl(path, check_images="header")[0]] == ["r1", "r2", "r3"]
    dm = ReasoningDataModule(train=[DataSource(str(path))], image_check="header")
    dm.setup("fit")
    assert dm.datasets["train"][0]["id"] == "r1"
    with pytest.raises(RecordError) as ei:
        dm.datasets["train"][1]
    text = str(ei.value)
    assert f"{path}:2 (id='r2'): field 'images'" in text and "broken.png" in text and "when the batch" in text, text


def test_20mb_prompt_fails_fast_by_characters_with_its_line(tmp_path, tiny_models, monkeypatch):
    path = _write_lines(tmp_path / "data.jsonl", [_rec("r1"), _rec("huge", problem="Count the squares. " * 1_100_000),
                                                 _rec("r3")])
    assert path.stat().st_size > 20_000_000
    student = str(tiny_models["student"])
    t0 = time.perf_counter()
    dm = ReasoningDataModule(train=[DataSource(str(path))], processor=student, max_length=128)
    with pytest.raises(RecordError) as ei:
        dm.setup("fit")
    text = str(ei.value)
    assert f"{path}:2 (id='huge'): field 'problem': 20900000 characters" in text, text
    assert "data.max_length=128" in text and "on_bad_record: skip" in text
    monkeypatch.chdir(tmp_path)
    dm = ReasoningDataModule(train=[DataSource(str(path))], processor=student, max_length=128, on_bad_record="skip")
    dm.setup("fit")
    assert [r["id"] for r in dm.datasets["train"].datasets[0]] == ["r1", "r3"] and len(dm.skipped) == 1
    assert time.perf_counter() - t0 < 20.0  # tokenising 20 MB alone takes longer than this on these machines


# ------------------------------------------------------------------------------------------------ mid-run skip

class _SeenIds(L.Callback):
    def __init__(self):
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert "skipped_records" not in batch  # the data module takes the list out before the model sees it
        self.ids += [r["id"] for r in batch["records"]]


def test_training_meets_a_bad_record_mid_epoch_skips_it_and_trains_the_rest(tmp_path, tiny_models):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(8):
        name = f"img/{i}.png"
        if i == 5:
            _corrupt_pixels_png(tmp_path / name)  # found only when drawn: image_check is 'header'
        else:
            _png(tmp_path / name, 56, 56, seed=i)
        rows.append(_rec(f"r{i}", images=[name], trace=f"Picture {i} has a red square."))
    path = _write_lines(tmp_path / "train.jsonl", rows)
    L.seed_everything(0)
    module = SFTModule(ModelSpec(str(tiny_models["student"])), export=False)
    dm = ReasoningDataModule(train=[DataSource(str(path))], batch_size=2, epoch_size=8, image_check="header",
                             on_bad_record="skip", max_length=256)
    seen = _SeenIds()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[seen], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4  # the run finished: one epoch of 4 batches
    assert len(seen.ids) == 8  # batches kept their size: the next readable record took the bad one's place
    assert "r5" not in seen.ids and set(seen.ids) == {f"r{i}" for i in range(8) if i != 5}
    assert len(dm.skipped) == 1 and dm.state_dict()["skipped"] == 1
    msg = dm.skipped[0]
    assert f"{path}:6 (id='r5'): field 'images'" in msg and "5.png" in msg, msg
    assert (tmp_path / "skipped_records.txt").read_text().strip() == msg


# ------------------------------------------------------------------------------------------------ the CLI

def _sft_args(tiny_models, data: Path, root: Path, steps: int = 1) -> list[str]:
    return ["--model", "vold_pl.modules.sft.SFTModule", "--model.model.name_or_path", str(tiny_models["student"]),
            "--model.export", "false", "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
            "--data.train", json.dumps([{"path": str(data), "limit": 4}]), "--data.batch_size", "2"]


def _run(args: list[str], capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as ei:
        main(args)
    assert ei.value.code == code
    return capsys.readouterr().err


def test_cli_prints_a_user_error_alone_with_exit_2_and_the_trace_with_debug(tmp_path, tiny_models, capsys,
                                                                             monkeypatch):
    data = _write_lines(tmp_path / "data.jsonl", [_rec("r1"), b'{"id": "r2", "problem": "x?", "answer": "maybe", '
                                                              b'"answer_type": "yesno"}'])
    args = ["fit", *_sft_args(tiny_models, data, tmp_path)]
    monkeypatch.setenv("VOLD_PL_DEBUG", "")  # (--debug sets it for launched ranks; undone after the test)
    err = _run(args, capsys)
    assert f"error: {data}:2 (id='r2'): field 'answer': 'maybe' is not yes/no" in err, err
    assert "Traceback" not in err
    err = _run([*args, "--debug"], capsys)
    assert "Traceback (most recent call last)" in err and "RecordError" in err and f"{data}:2" in err
    monkeypatch.setenv("VOLD_PL_DEBUG", "0")
    assert "Traceback" not in _run(args, capsys)


def test_checkpoint_hparams_never_change_the_config_nor_run_code(tmp_path, tiny_models, synth_data, capsys):
    # a folder with code: loading it with trust_remote_code=True would run evil.py
    evil, marker = tmp_path / "evil", tmp_path / "pwned"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import PretrainedConfig\n"
                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    root = tmp_path / "run"
    base = _sft_args(tiny_models, synth_data["train_text"], root)
    main(["fit", *base])  # one step: a real checkpoint
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"].update(name_or_path=str(evil), trust_remote_code=True)  # plain data
    ckpt["hyper_parameters"]["export"] = True
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)
    capsys.readouterr()

    err = _run(["fit", *base, "--ckpt_path", str(crafted), "--ckpt_hparams", "error"], capsys)
    assert f"error: checkpoint {crafted} was saved with hyper-parameters that differ" in err, err
    assert f"model.init_args.model.name_or_path: config '{tiny_models['student']}', checkpoint '{evil}'" in err
    assert "model.init_args.model.trust_remote_code: config False, checkpoint True" in err
    assert "model.init_args.export: config False, checkpoint True" in err
    assert not marker.exists()

    # default: a warning, and the run resumes with the user's model and settings (one more step)
    main(["fit", *base, "--trainer.max_steps", "2", "--ckpt_path", str(crafted)])
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "trust_remote_code: config False, checkpoint True" in err, err
    assert not marker.exists()
    resumed = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 2
    assert resumed["hyper_parameters"]["model"]["name_or_path"] == str(tiny_models["student"])
    assert resumed["hyper_parameters"]["model"]["trust_remote_code"] is False
    assert not (root / "export").exists()  # export stayed off as the config says

    # hyper-parameters that would not parse as options (a type changed, an unknown key): plain data, compared
    ckpt["hyper_parameters"]["max_consecutive_skips"] = "many"
    ckpt["hyper_parameters"]["gone_option"] = {"depth": [1, 2]}
    torch.save(ckpt, crafted)
    main(["fit", *base, "--trainer.max_steps", "2", "--ckpt_path", str(crafted)])
    err = capsys.readouterr().err
    assert "model.init_args.max_consecutive_skips: config 10, checkpoint 'many'" in err, err
    assert "model.init_args.gone_option.depth: config (not set), checkpoint [1, 2]" in err, err
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


MARKER_MODULE = """
import os, pathlib
pathlib.Path(os.environ["VOLD_PL_TEST_MARKER"], __name__).write_text("imported")
class Evil:
    def __init__(self, *a, **k):
        pathlib.Path(os.environ["VOLD_PL_TEST_MARKER"], __name__ + ".called").write_text("called")
"""


def test_checkpoint_never_imports_what_it_names(tmp_path, tiny_models, synth_data, capsys):
    """``_class_path`` / ``class_path`` / any string in a checkpoint's hyper-parameters names nothing that gets
    imported or called: modules that leave a marker file when imported sit in the working directory and on
    PYTHONPATH of a real ``python -m vold_pl.cli`` run, and a standard-library module (``this`` prints the Zen of
    Python when imported)."""
    import os
    import subprocess
    import sys

    repo, markers, cwd = Path(__file__).resolve().parents[1], tmp_path / "markers", tmp_path / "cwd"
    markers.mkdir()
    cwd.mkdir()
    for name in ("vpl_marker", "vpl_marker_nested", "vpl_marker_value"):
        (cwd / f"{name}.py").write_text(MARKER_MODULE)
    root = tmp_path / "run"
    base = _sft_args(tiny_models, synth_data["train_text"], root)
    main(["fit", *base])  # one step: a real checkpoint
    capsys.readouterr()
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["_class_path"] == "vold_pl.modules.sft.SFTModule"  # what LightningCLI would hand to jsonargparse
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{cwd}", VOLD_PL_TEST_MARKER=str(markers),
               OMP_NUM_THREADS="1", VOLD_PL_DEBUG="")

    def run(class_path: str, *extra: str) -> subprocess.CompletedProcess:
        crafted = tmp_path / f"{class_path}.ckpt"
        torch.save({**ckpt, "hyper_parameters": {
            **hp, "_class_path": class_path,
            "optim": {"class_path": "vpl_marker_nested.Evil", "init_args": {"lr": 1.0}},
            "export": "vpl_marker_value.Evil"}}, crafted)
        return subprocess.run([sys.executable, "-m", "vold_pl.cli", "fit", *base, "--trainer.max_steps", "2",
                               "--ckpt_path", str(crafted), *extra], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)

    proc = run("vpl_marker.Evil")  # warn: the run resumes with the config's module
    assert sorted(p.name for p in markers.iterdir()) == []
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("model.class_path: config 'vold_pl.modules.sft.SFTModule', checkpoint 'vpl_marker.Evil'"
            in proc.stderr), proc.stderr[-3000:]
    assert "model.init_args.optim.class_path: config (not set), checkpoint 'vpl_marker_nested.Evil'" in proc.stderr
    assert sorted(p.name for p in markers.iterdir()) == []
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2

    proc = run("this.Zen", "--ckpt_hparams", "error")  # a standard-library module
    assert "Beautiful is better than ugly" not in proc.stdout + proc.stderr
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "checkpoint 'this.Zen'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Beautiful is better than ugly" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in markers.iterdir()) == []


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_pickled_checkpoint_gets_the_project_message(subcommand, tmp_path, tiny_models, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, evil)
    data = _write_lines(tmp_path / "data.jsonl", [_rec("r1")])
    err = _run([subcommand, *_sft_args(tiny_models, data, tmp_path), "--ckpt_path", str(evil)], capsys)
    assert f"error: checkpoint {evil} cannot be read safely" in err and "never runs code" in err, err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not marker.exists()


def test_user_error_classes_share_the_base():
    from vold_pl.checkpointing import CheckpointMismatchError, UnreadableCheckpointError
    from vold_pl.data.curriculum import EmptyStageError
    from vold_pl.rewards.functions import UnknownRewardError

    for cls in (RecordError, CheckpointMismatchError, UnreadableCheckpointError, EmptyStageError, UnknownRewardError):
        assert issubclass(cls, UserError), cls
