"""What a retriever takes in, for training and serving alike: square pixels of one size, token ids
of a bounded length, and the preprocessing its image tower was trained with (pixel statistics,
how transparency is flattened, how the image is resized and cropped)."""

from __future__ import annotations

from dataclasses import dataclass

from megapairs_ray.imaging import TRANSPARENCY_MODES
from megapairs_ray.pixels import ImageSpec

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
    ``crop_offset`` (``pixels.CROP_OFFSETS``) "floor"; ``resize_8bit``, Pillow's 8-bit resize."""

    image_size: int
    max_text_len: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    transparency: str = "drop"
    crop_offset: str = "floor"
    resize_8bit: bool = True

    def __post_init__(self) -> None:
        if self.transparency not in TRANSPARENCY_MODES:
            raise ValueError(f"transparency must be one of {TRANSPARENCY_MODES}, "
                             f"not {self.transparency!r}")

    def image_spec(self, normalise: bool = True) -> ImageSpec:
        """The ``ImageSpec`` of these pixels: short side to the input size, centre crop,
        normalised with the model's statistics; or, ``normalise=False``, left in 0..255 (the
        training loaders ship whole levels as uint8 and normalise on the trainer)."""
        mean, std = (self.mean, self.std) if normalise else ((0.0, 0.0, 0.0), (1 / 255,) * 3)
        return ImageSpec(size=self.image_size, crop_fraction=1.0, mean=mean,
                         std=std,  # type: ignore[arg-type]
                         crop_offset=self.crop_offset, resize_8bit=self.resize_8bit)
