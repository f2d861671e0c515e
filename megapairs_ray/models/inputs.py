"""What a retriever takes in, for training and serving alike: square pixels of one size, token ids
of a bounded length, and the normalisation its image tower was trained with."""

from __future__ import annotations

from dataclasses import dataclass

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelInput:
    """What the loaders must produce for one model: square pixels and token ids."""

    image_size: int
    max_text_len: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
