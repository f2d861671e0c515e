"""MMRet-CLIP on Hugging Face ``transformers`` CLIP (docs/method.md §4).

The released BGE-VL / MMRet checkpoints are HF ``CLIPModel`` folders, so they load with
``MMRetCLIP.from_pretrained`` and what is trained here saves in the same form.
A composed query (image + instruction) is ``normalize(proj_image(I) + proj_text(T))`` — the sum
of the two projected, *unnormalised* features, normalised once; candidates are normalised
projected image features. Image-only and text-only queries are the usual CLIP embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from megapairs_ray.models.fusion import Retriever
from megapairs_ray.models.inputs import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelInput


class MMRetCLIP(Retriever):
    """The ``clip`` retriever family."""

    family = "clip"

    def __init__(self, clip: nn.Module,
                 mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        self.clip = clip
        self.mean_std = mean_std or (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        # The loss has a fixed temperature, so CLIP's learned logit scale takes no part; DDP
        # must not wait for a gradient it will never get.
        self.clip.logit_scale.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MMRetCLIP:
        from transformers import CLIPModel

        return cls(CLIPModel.from_pretrained(path), clip_mean_std(path))

    @property
    def dim(self) -> int:
        return int(self.clip.config.projection_dim)

    @property
    def model_input(self) -> ModelInput:
        return clip_model_input(self.clip.config, self.mean_std)

    def freeze(self, image_tower: bool, text_layers: int | None) -> None:
        """Freeze the vision tower (``image_tower``) and all but the top ``text_layers`` layers
        of the text tower (None: train them all). The projections always train."""
        if image_tower:
            self.clip.vision_model.requires_grad_(False)
        if text_layers is not None:
            layers = list(self.clip.text_model.encoder.layers)
            self.clip.text_model.requires_grad_(False)
            for layer in layers[len(layers) - text_layers:] if text_layers else []:
                layer.requires_grad_(True)

    def gradient_checkpointing_enable(self) -> None:
        self.clip.gradient_checkpointing_enable()

    @classmethod
    def from_config(cls, **overrides: object) -> MMRetCLIP:
        """A random-initialised CLIP of any size (tests, benchmarks)."""
        from transformers import CLIPConfig

        return cls(_clip_model(CLIPConfig(**overrides)))

    def save_pretrained(self, path: str | Path) -> None:
        self.clip.save_pretrained(path)

    @property
    def image_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.clip.vision_model.parameters())

    def image_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's pooled output (before the projection)."""
        return self.clip.vision_model(pixel_values=pixel_values).pooler_output

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.clip.visual_projection(pooled)

    def text_features(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.pooler_output)


def clip_model_input(config: object,
                     mean_std: tuple[tuple[float, ...], tuple[float, ...]]) -> ModelInput:
    """The model input of a CLIP config: its image size and text length, with the pixels CLIP's
    released image processor makes (``CLIPImageProcessor`` as the BGE-VL / MMRet checkpoints
    ship it): Pillow's plain RGB conversion (alpha dropped, a palette's transparent entries
    shown as their colours), the short side resized to the input size with Pillow's 8-bit
    bicubic, the centre crop's offset floored. Released checkpoints are only ranked as their
    authors ranked them if their pixels are these."""
    return ModelInput(image_size=config.vision_config.image_size,  # type: ignore[attr-defined]
                      max_text_len=config.text_config.max_position_embeddings,  # type: ignore[attr-defined]
                      mean=mean_std[0], std=mean_std[1],  # type: ignore[arg-type]
                      transparency="drop", crop_offset="floor", resize_8bit=True)


def clip_mean_std(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A CLIP checkpoint's pixel statistics (``preprocessor_config.json``), OpenAI's where it
    has none."""
    pre = Path(path) / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        if "image_mean" in p and "image_std" in p:
            return tuple(p["image_mean"]), tuple(p["image_std"])
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def _clip_model(config: object) -> nn.Module:
    from transformers import CLIPModel

    return CLIPModel(config)
