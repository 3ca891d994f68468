"""Images a real data set carries: every PIL mode reaches the model as the right 8-bit RGB (16-bit greyscale
scaled, not clipped; palette and alpha composited on white), the image processor's own limit (aspect ratio
above 200:1) is a named, skippable record error, and a path the file system refuses (a name too long, no
permission, a folder, a NUL byte) is a reason for that record, never a crash. Every image is written here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vold_pl.data.images import to_rgb
from vold_pl.data.schema import RecordError, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _rec(rid: str, **kw) -> dict:
    return {"id": rid, "problem": f"Is there a red square in picture {rid}?", "answer": "yes",
            "answer_type": "yesno", **kw}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _grey16(h: int = 16, w: int = 24) -> np.ndarray:
    """A 16-bit ramp over the whole range, [H, W] uint16."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def _assert_named_and_skippable(path: Path, line: int, needles: list[str], good: list[str]) -> str:
    with pytest.raises(RecordError) as ei:
        read_jsonl(path)
    text = str(ei.value)
    assert f"{path}:{line}" in text and "field 'images'" in text, text
    for n in needles:
        assert n in text, text
    recs, skipped = read_jsonl(path, on_bad_record="skip")
    assert [r.id for r in recs] == good and skipped == [text]
    return text


# ------------------------------------------------------------------------------------------------ modes

def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    v = _grey16()
    Image.fromarray(v).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # PIL keeps the 16 bits (I;16 or I)
        rgb = np.asarray(to_rgb(im))  # [H, W, 3]
    expected = np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8)  # [H, W]
    assert rgb.shape == (*v.shape, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135  # a ramp, not a white square
    with Image.open(tmp_path / "g16.png") as im:  # what the processors' own im.convert("RGB") makes of it
        assert np.asarray(im.convert("RGB")).mean() > 250


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_int_and_float_greyscale(mode):
    v = _grey16().astype(np.int32 if mode == "I" else np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(v, mode=mode)))
    assert np.array_equal(rgb[..., 0], np.rint(v.astype(np.float64) * 255 / 65535).astype(np.uint8))
    small = Image.fromarray(np.arange(256, dtype=np.int32).reshape(16, 16), mode="I")  # 8-bit values kept
    assert np.array_equal(np.asarray(to_rgb(small))[..., 1], np.arange(256, dtype=np.uint8).reshape(16, 16))
    signed = Image.fromarray(np.array([[-10, 0], [10, 30]], dtype=np.int32), mode="I")  # stretched min..max
    assert np.asarray(to_rgb(signed))[..., 2].tolist() == [[0, 64], [128, 255]]


def test_palette_alpha_and_other_modes():
    # palette with a transparent index: transparent pixels on white, the others their palette colour
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1])
    p.info["transparency"] = 1
    assert np.asarray(to_rgb(p)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    # alpha composited on white: out = a*c + (1-a)*255
    rgba = Image.fromarray(np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], np.uint8), "RGBA")
    a = 128 / 255
    assert np.asarray(to_rgb(rgba)).tolist() == [[[200, 100, 0], [255, 255, 255],
                                                  [round(a * 200 + (1 - a) * 255), round(a * 100 + (1 - a) * 255),
                                                   round((1 - a) * 255)]]]
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], np.uint8), "LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[40, 40, 40], [255, 255, 255]]]
    for mode in ("1", "L", "P", "PA", "CMYK", "YCbCr", "RGBX", "La", "RGBa", "I;16B", "I;16L", "HSV", "LAB"):
        out = to_rgb(Image.new(mode, (5, 3)))
        assert out.mode == "RGB" and out.size == (5, 3), mode


def test_the_collator_feeds_the_model_the_scaled_image(tmp_path, tiny_models):
    """The real prompt encoding (tiny Qwen2.5-VL processor): a 16-bit PNG gives the pixel values of the 8-bit
    image with the same (scaled) values, not those of a white square."""
    import torch

    from vold_pl.data.collate import encode_prompts
    from vold_pl.models.factory import ModelSpec, load_processor

    v = _grey16(56, 56)
    Image.fromarray(v).save(tmp_path / "g16.png")
    Image.fromarray(np.rint(v * (255 / 65535)).astype(np.uint8), mode="L").save(tmp_path / "g8.png")
    Image.new("L", (56, 56), 255).save(tmp_path / "white.png")
    proc = load_processor(ModelSpec(str(tiny_models["student"])))

    def pixels(name):
        with Image.open(tmp_path / name) as im:
            return encode_prompts(proc, [{"problem": "What is shown?", "images": [im]}])["pixel_values"]

    p16, p8, white = pixels("g16.png"), pixels("g8.png"), pixels("white.png")
    assert torch.equal(p16, p8) and not torch.allclose(p16, white, atol=0.5)


# ------------------------------------------------------------------------------------------------ limits, paths

def test_aspect_ratio_the_processor_refuses_is_named_and_skippable(tmp_path, tiny_models, monkeypatch):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (2010, 10), (0, 128, 0)).save(tmp_path / "img" / "strip.png")  # 201:1
    Image.new("RGB", (2000, 10), (0, 128, 0)).save(tmp_path / "img" / "limit.png")  # 200:1, accepted
    Image.new("RGB", (28, 28)).save(tmp_path / "img" / "ok.png")
    path = _write(tmp_path / "data.jsonl", [_rec("r1", images=["img/ok.png"]), _rec("r2", images=["img/strip.png"]),
                                            _rec("r3", images=["img/limit.png"])])
    _assert_named_and_skippable(path, 2, ["strip.png", "2010x10", "aspect ratio above 200:1", "at most 200:1"],
                                ["r1", "r3"])

    # a whole skip-mode setup with the real tiny processor (the prompt-length check counts image patches): the
    # record is skipped, the others are kept and collate
    from vold_pl.data.datamodule import ReasoningDataModule
    from vold_pl.data.sources import DataSource

    monkeypatch.chdir(tmp_path)
    dm = ReasoningDataModule(train=[DataSource(str(path))], processor=str(tiny_models["student"]),
                             on_bad_record="skip", batch_size=2, max_length=4096)
    dm.setup("fit")
    assert len(dm.skipped) == 1 and "strip.png" in dm.skipped[0]
    batch = next(iter(dm.train_dataloader()))
    assert sorted(r["id"] for r in batch["records"]) == ["r1", "r3"]


def _unreadable_paths(tmp_path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (image path as written in the record, what the error must say)."""
    (tmp_path / "folder.png").mkdir()
    out = {
        "too_long": ("x" * 300 + ".png", ["cannot be used", "File name too long", "characters)"]),
        "nested_too_long": ("/".join(["d" * 250] * 20) + "/a.png", ["cannot be used"]),
        "folder": ("folder.png", ["is a folder, not an image file"]),
        "nul_byte": ("a\u0000b.png", ["cannot be used", "null byte"]),
    }
    if os.geteuid() != 0:  # root reads any file: a permission error needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir()
        Image.new("RGB", (8, 8)).save(locked / "x.png")
        locked.chmod(0)
        out["no_permission"] = ("locked/x.png", ["Permission denied"])
    return out


def test_os_errors_from_an_image_path_are_reasons_for_that_record(tmp_path):
    Image.new("RGB", (28, 28)).save(tmp_path / "ok.png")
    for name, (image, needles) in _unreadable_paths(tmp_path).items():
        path = _write(tmp_path / f"{name}.jsonl", [_rec("r1", images=["ok.png"]), _rec("r2", images=[image]),
                                                   _rec("r3")])
        _assert_named_and_skippable(path, 2, needles, ["r1", "r3"])
