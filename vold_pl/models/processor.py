"""A Qwen2.5-VL processor without the video processor.

``Qwen2_5_VLProcessor`` insists on a video processor, whose default needs torchvision. vold-pl trains on
images only, so this subclass declares just an image processor and a tokenizer; the prompt expansion of
``<|image_pad|>`` (one token per merged 28-px patch) is the parent's, unchanged.

``min_pixels`` / ``max_pixels`` bound the area each image is resized to (in multiples of 28 px), and so the
number of image tokens: a 1920x1080 photo is ~2.1 M pixels = ~2640 tokens under Qwen2.5-VL's defaults, 1280 with
``max_pixels=1003520``.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` minus video: ``processor(text=..., images=...)`` works without torchvision."""

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

        from vold_pl.errors import UserError

        if min_pixels < 0 or max_pixels < 0 or (min_pixels and max_pixels and min_pixels > max_pixels):
            raise UserError(f"model.min_pixels={min_pixels} / model.max_pixels={max_pixels}: both must be >= 0 "
                            "(0 keeps the model folder's value) and min_pixels <= max_pixels, e.g. 3136 and 1003520.")
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        sizes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs, **sizes)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   chat_template=getattr(tokenizer, "chat_template", None))
