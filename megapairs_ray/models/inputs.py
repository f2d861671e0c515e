"""What a retriever takes in, for training and serving alike: square pixels of one size, token ids
of a bounded length, and the preprocessing its image tower was trained with (pixel statistics,
how transparency is flattened, how the image is resized and cropped)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megapairs_ray.imaging import TRANSPARENCY_MODES, ImageSpec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelInput:
    """What the loaders must produce for one model: square pixels and token ids.

    The preprocessing fields belong to the family: a model sees the pixels its weights were
    trained on only if every consumer (training loaders, eval, gallery, service) prepares them
    the same way, so they travel with the model input rather than being chosen per caller. The
    defaults are CLIP's released processor, as the statistics are OpenAI CLIP's:
    ``transparency`` (``imaging.TRANSPARENCY_MODES``) "drop", Pillow's plain RGB conversion;
    ``crop_offset`` (``imaging.CROP_OFFSETS``) "floor"; ``resize_8bit``, Pillow's 8-bit resize."""

    image_size: int
    max_text_len: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    transparency: str = "drop"
    crop_offset: str = "floor"
    resize_8bit: bool = True
    resize_mode: str = "shortest"  # or "squash" (``imaging.ImageSpec``)
    # Families that embed a query as one prompt (``mllm``): the prompt of a composed, a
    # text-only and an image-only query, ``{text}`` to fill, the image's tokens already in.
    # None: the query's text is tokenized as it is.
    query_formats: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        if self.transparency not in TRANSPARENCY_MODES:
            raise ValueError(f"transparency must be one of {TRANSPARENCY_MODES}, "
                             f"not {self.transparency!r}")

    def query_text(self, text: str | None, has_image: bool) -> str:
        """What the tokenizer gets for a query: its text as it is, or the family's prompt."""
        if self.query_formats is None:
            if text is None:
                raise ValueError("a query without a text has no tokens in this family")
            return text
        composed, text_only, image_only = self.query_formats
        if text is None:
            if not has_image:
                raise ValueError("a query needs an image, a text, or both")
            return image_only
        return (composed if has_image else text_only).replace("{text}", text)

    def image_spec(self, normalise: bool = True) -> ImageSpec:
        """The ``ImageSpec`` of these pixels: short side to the input size, centre crop,
        normalised with the model's statistics; or, ``normalise=False``, left in 0..255 (the
        training loaders ship whole levels as uint8 and normalise on the trainer)."""
        mean, std = (self.mean, self.std) if normalise else ((0.0, 0.0, 0.0), (1 / 255,) * 3)
        return ImageSpec(size=self.image_size, crop_fraction=1.0, mean=mean,
                         resize_mode=self.resize_mode,
                         std=std,  # type: ignore[arg-type]
                         crop_offset=self.crop_offset, resize_8bit=self.resize_8bit)


class PromptTooLong(ValueError):
    """A family's prompt that leaves no room for any text in ``max_text_len`` tokens."""


def tokenize_queries(tokenizer: Any, model_input: ModelInput, texts: Sequence[str | None],
                     has_image: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention masks [N, max_text_len] (int64, padded on the right) of queries,
    as every consumer (training loaders, eval, gallery, service) tokenizes them.

    A plain text is cut at ``max_text_len``. A family's prompt (``query_formats``) is never cut:
    its end (the image's tokens, the closing of the turn, the token that embeds) matters most,
    so a text too long for it is shortened, by whole tokens, until the prompt fits."""
    n = model_input.max_text_len
    if model_input.query_formats is None:
        tok = tokenizer([model_input.query_text(t, h) for t, h in zip(texts, has_image)],
                        padding="max_length", truncation=True, max_length=n, return_tensors="np")
        return tok["input_ids"].astype(np.int64), tok["attention_mask"].astype(np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), n), pad, np.int64)
    mask = np.zeros((len(texts), n), np.int64)
    encoded = tokenizer([model_input.query_text(t, h) for t, h in zip(texts, has_image)],
                        add_special_tokens=True)["input_ids"]
    for i, row in enumerate(encoded):
        if len(row) > n:
            row = _shortened(tokenizer, model_input, texts[i], has_image[i], len(row) - n)
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _shortened(tokenizer: Any, model_input: ModelInput, text: str | None, has_image: bool,
               overflow: int) -> list[int]:
    words = tokenizer(text or "", add_special_tokens=False)["input_ids"]
    keep = len(words) - overflow
    while True:
        short = tokenizer.decode(words[: max(0, keep)]) if text is not None else None
        row = tokenizer(model_input.query_text(short, has_image))["input_ids"]
        if len(row) <= model_input.max_text_len:
            return row
        if keep <= 0:
            raise PromptTooLong(f"max_text_len {model_input.max_text_len} is shorter than the "
                                f"prompt alone ({len(row)} tokens with no text)")
        keep -= len(row) - model_input.max_text_len
