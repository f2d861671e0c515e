"""The three encoders of the embed stage, built from config names.

- CLIP (open_clip): one model gives the image encoder and the caption (text) encoder. Any
  open_clip name works (``EVA02-L-14`` for the paper); ``pretrained`` is an open_clip tag, a local
  checkpoint file, or None for random weights. Bundled architectures (``mp-tiny-*``) are JSON
  configs in ``open_clip_configs/`` registered with open_clip, the way open_clip ships its own.
- DINOv2: transformers ``Dinov2Model`` (hub id or local folder) or a timm model name; random
  weights from a config when ``pretrained`` is false.

Heavy imports live inside the builders so that importing this module stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megapairs_ray.config import ClipEncoderConfig, DinoEncoderConfig
from megapairs_ray.errors import MegapairsError

OPEN_CLIP_CONFIGS = Path(__file__).parent / "open_clip_configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ImageSpec:
    """How one image model wants its pixels, as torchvision's eval transforms define it:
    ``shortest`` resizes the short side to ``size / crop_fraction`` and centre-crops
    ``size`` x ``size``; ``squash`` resizes straight to ``size`` x ``size``. Then normalised with
    ``mean``/``std`` (in [0, 1] units)."""

    size: int
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    @property
    def min_source_side(self) -> int:
        """The short side a decoded image needs so that resizing only ever shrinks."""
        return round(self.size / self.crop_fraction)


@dataclass
class ClipEncoder:
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[list[str]], torch.Tensor]
    encode_tokens: Callable[[torch.Tensor], torch.Tensor]
    spec: ImageSpec
    dim: int
    model: torch.nn.Module  # the open_clip model itself, for benchmarks and checks
    tokenize: Callable[[list[str]], torch.Tensor]


@dataclass
class ImageEncoder:
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    spec: ImageSpec
    dim: int


def register_bundled_open_clip_configs() -> None:
    import open_clip

    open_clip.add_model_config(OPEN_CLIP_CONFIGS)


class ModelNotFoundError(MegapairsError, ValueError):
    """A model name that cannot be built here: unknown, or on a hub this machine cannot reach."""


def check_models(clip: ClipEncoderConfig, dino: DinoEncoderConfig) -> None:
    """Refuse, before any work starts, model names that cannot load: an unknown open_clip
    architecture, or hub weights while the hub is off (``HF_HUB_OFFLINE``)."""
    import open_clip

    register_bundled_open_clip_configs()
    if clip.model not in open_clip.list_models():
        raise ModelNotFoundError(f"embed.clip.model: unknown open_clip model {clip.model!r}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    needs_hub = (dino.library == "transformers" and dino.pretrained
                 and not Path(dino.model).is_dir())
    if needs_hub and offline:
        raise ModelNotFoundError(f"embed.dino.model {dino.model!r} is not a local folder and "
                                 "HF_HUB_OFFLINE is set: give a folder with the weights, or "
                                 "pretrained: false for random weights")


def build_clip(cfg: ClipEncoderConfig, device: torch.device, dtype: torch.dtype) -> ClipEncoder:
    import open_clip

    register_bundled_open_clip_configs()
    if cfg.model not in open_clip.list_models():
        raise ModelNotFoundError(f"embed.clip.model: unknown open_clip model {cfg.model!r}")
    model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, device=device)
    model = model.to(dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    pcfg = model.visual.preprocess_cfg
    size = pcfg["size"]
    size = size if isinstance(size, int) else int(size[0])
    resize_mode = pcfg.get("resize_mode", "shortest")
    interpolation = pcfg.get("interpolation", "bicubic")
    if resize_mode not in ("shortest", "squash") or interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"embed.clip.model {cfg.model!r}: preprocessing {resize_mode}/"
                         f"{interpolation} is not supported (shortest|squash, bicubic|bilinear)")
    spec = ImageSpec(size, 1.0, tuple(pcfg["mean"]), tuple(pcfg["std"]),  # type: ignore[arg-type]
                     resize_mode, interpolation)

    @torch.inference_mode()
    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixels.to(dtype), normalize=True)

    @torch.inference_mode()
    def encode_tokens(tokens: torch.Tensor) -> torch.Tensor:
        return model.encode_text(tokens.to(device, non_blocking=True), normalize=True)

    def encode_text(captions: list[str]) -> torch.Tensor:
        return encode_tokens(tokenizer(captions))

    with torch.inference_mode():
        dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return ClipEncoder(encode_image, encode_text, encode_tokens, spec, dim, model, tokenizer)


def build_dino(cfg: DinoEncoderConfig, device: torch.device, dtype: torch.dtype) -> ImageEncoder:
    spec = ImageSpec(cfg.image_size, cfg.crop_fraction, IMAGENET_MEAN, IMAGENET_STD)
    if cfg.library == "transformers":
        model, dim = _dino_transformers(cfg)
    else:
        model, dim = _dino_timm(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    pooling = cfg.pooling
    library = cfg.library

    @torch.inference_mode()
    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(dtype)
        if library == "transformers":
            out = model(pixel_values=pixels)
            feats = (out.pooler_output if pooling == "cls"
                     else out.last_hidden_state[:, 1:].mean(dim=1))
        else:
            tokens = model.forward_features(pixels)
            prefix = model.num_prefix_tokens
            feats = tokens[:, 0] if pooling == "cls" else tokens[:, prefix:].mean(1)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    return ImageEncoder(encode_image, spec, dim)


def _dino_transformers(cfg: DinoEncoderConfig) -> tuple[torch.nn.Module, int]:
    from transformers import Dinov2Config, Dinov2Model

    if cfg.pretrained:
        model = Dinov2Model.from_pretrained(cfg.model, **cfg.config_overrides)
    else:
        base: dict[str, Any] = {}
        if Path(cfg.model).is_dir():  # a local config to take the architecture from
            base = Dinov2Config.from_pretrained(cfg.model).to_dict()
        config = Dinov2Config(**{**base, **cfg.config_overrides})
        model = Dinov2Model(config)
    return model, int(model.config.hidden_size)


def _dino_timm(cfg: DinoEncoderConfig) -> tuple[torch.nn.Module, int]:
    import timm

    model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=0,
                              img_size=cfg.image_size, **cfg.config_overrides)
    return model, int(model.num_features)
