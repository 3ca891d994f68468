"""Images as the model sees them: every PIL mode a data set may carry, converted to 8-bit RGB in one place.

Image processors convert with ``image.convert("RGB")``, which clips high-bit-depth pixels: a 16-bit greyscale
PNG (PIL mode ``I;16``, values 0..65535) becomes a nearly white square. :func:`to_rgb` scales such pixels to
0..255 first; transparency (``RGBA``, ``LA``, ``PA``, a palette with a transparent index) is composited onto
white, as the processors do; every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) is converted by PIL.
The collators call it on every image before the processor sees it.
"""

from __future__ import annotations

from typing import Any

# Modes whose pixels are wider than 8 bits, with the value that maps to white (None: the image's own maximum).
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None, "F": None}


def _wide_to_l(im: Any) -> Any:
    """A high-bit-depth single-channel image as 8-bit ``L``, scaled (not clipped) to 0..255.

    16-bit modes scale by their full range (65535 -> 255). ``I`` (32-bit int) and ``F`` (float) say nothing of
    their range: values that fit 0..255 are kept, 0..65535 scale as 16-bit (how PIL loads 16-bit files into
    ``I``), anything else (negative, larger) is stretched from its minimum to its maximum.
    """
    import numpy as np
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)  # [H, W]
    white = _WIDE_MODES[im.mode]
    if white is None:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255:
            lo, white = 0.0, 255
        elif lo >= 0 and hi <= 65535:
            lo, white = 0.0, 65535
        else:
            white = hi
        a = np.nan_to_num(a - lo, nan=0.0, posinf=white - lo, neginf=0.0)
        white = max(white - lo, 1e-12)
    out = np.clip(np.rint(a * (255.0 / white)), 0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(out, mode="L")


def to_rgb(im: Any) -> Any:
    """``im`` (any PIL mode) as an 8-bit ``RGB`` PIL image; an ``RGB`` image is returned as it is."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _WIDE_MODES:
        im = _wide_to_l(im)
    elif im.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        im = im.convert("LA")
    elif im.mode == "LAB":  # CIE L*a*b* (TIFF): PIL's convert has no path to RGB, a colour transform does
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(im, lab_to_srgb)
    if "A" in im.getbands() or "a" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")  # [H, W, 4]
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
