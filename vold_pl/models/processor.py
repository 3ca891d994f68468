"""The processor of vision-language students: Qwen2.5-VL's, without the video processor.

``Qwen2_5_VLProcessor`` insists on a video processor, whose default needs torchvision. vold-pl trains on
images only, so :class:`Qwen2_5_VLImageTextProcessor` declares just an image processor and a tokenizer; the
prompt expansion of ``<|image_pad|>`` (one token per merged 28-px patch) is the parent's, unchanged.

Qwen2.5-VL is the one VLM family vold-pl serves: besides this processor, the prompt collation
(``image_grid_thw``, ``mm_token_type_ids``), the multimodal rope positions of the rollouts (``get_rope_index``)
and the dummy vision forward under sharding follow its layout. A VLM of another family is refused when it is
loaded (:func:`check_vision_family`), with a message naming the model, its ``model_type`` and what is supported.

``min_pixels`` / ``max_pixels`` bound the area each image is resized to (in multiples of 28 px), and so the
number of image tokens: a 1920x1080 photo is ~2.1 M pixels = ~2640 tokens under Qwen2.5-VL's defaults, 1280 with
``max_pixels=1003520``.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from vold_pl.errors import UserError

__all__ = ["SUPPORTED_VISION_MODEL_TYPES", "Qwen2_5_VLImageTextProcessor", "UnsupportedVisionModelError",
           "check_vision_family"]

# ``model_type`` in config.json -> the family's name, for the VLMs whose whole image pipeline vold-pl serves.
SUPPORTED_VISION_MODEL_TYPES = {"qwen2_5_vl": "Qwen2.5-VL"}


class UnsupportedVisionModelError(UserError):
    """A vision-language model of a family vold-pl's image pipeline does not serve."""


def check_vision_family(config, name_or_path: str, key: str) -> None:
    """Refuse a VLM (``config`` has a ``vision_config``) whose ``model_type`` is not in
    :data:`SUPPORTED_VISION_MODEL_TYPES`: its processor, image tokens and rope positions are not Qwen2.5-VL's,
    so collation and rollouts would be wrong rather than fail. ``key``: the config key that named the model."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_VISION_MODEL_TYPES:
        return
    supported = ", ".join(f"{name} (model_type {t!r})" for t, name in SUPPORTED_VISION_MODEL_TYPES.items())
    raise UnsupportedVisionModelError(
        f"{key}: {name_or_path!r} is a vision-language model of model_type {model_type!r} (config.json), which "
        f"vold-pl does not support: its image processing, prompt collation and rollout positions are built for "
        f"{supported} only. Use a Qwen2.5-VL checkpoint (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a text-only "
        "causal LM.")


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):  # noqa: N801 - the transformers class name, plus what it keeps
    """``Qwen2_5_VLProcessor`` minus video: ``processor(text=..., images=...)`` works without torchvision.
    Qwen2.5-VL only (:func:`check_vision_family`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, path, trust_remote_code: bool = False, min_pixels: int = 0, max_pixels: int = 0,
                        **kwargs):
        """Rebuild from a folder or hub id: the tokenizer through ``AutoTokenizer`` and a PIL image processor.

        Args:
            min_pixels: resize each image to at least this many pixels; ``0``: the folder's setting.
            max_pixels: resize each image to at most this many pixels; ``0``: the folder's setting.
        """
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        if min_pixels < 0 or max_pixels < 0 or (min_pixels and max_pixels and min_pixels > max_pixels):
            raise UserError(f"model.min_pixels={min_pixels} / model.max_pixels={max_pixels}: both must be >= 0 "
                            "(0 keeps the model folder's value) and min_pixels <= max_pixels, e.g. 3136 and 1003520.")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        sizes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs, **sizes)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   chat_template=getattr(tokenizer, "chat_template", None))
