"""A Qwen2.5-VL processor without the video processor.

``Qwen2_5_VLProcessor`` insists on a video processor, whose default needs torchvision. vold-pl trains on
images only, so this subclass declares just an image processor and a tokenizer; the prompt expansion of
``<|image_pad|>`` (one token per merged 28-px patch) is the parent's, unchanged.
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
    def from_pretrained(cls, path, trust_remote_code: bool = False, **kwargs):
        """Rebuild from a folder or hub id: the tokenizer through ``AutoTokenizer`` and a PIL image processor."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   chat_template=getattr(tokenizer, "chat_template", None))
