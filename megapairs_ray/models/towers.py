"""MMRet on two separate pretrained towers: the ``towers`` retriever family.

An image tower (a timm convnet; the demo's EfficientNet-Lite0 with ImageNet weights) and a text
tower (a transformers sentence encoder, mean-pooled; the demo's all-MiniLM-L6-v2), each followed
by a trainable linear projection into one shared space. The interface is MMRetCLIP's
(``image_features``, ``text_features``, ``forward``, ``embed_candidates``, ``embed_queries``),
so the trainer, eval, gallery and service treat both families alike, and a composed query is
MMRet-CLIP's score fusion: ``normalize(proj_image(I) + proj_text(T))`` (docs/method.md §4).

The two towers have never seen each other, so the projections start random: the untrained family
ranks image queries by the image tower's own similarities and nothing else. An alignment run
(LiT-style: image tower frozen, captions as text-only queries) gives them a shared space before
MMRet training on triplets (docs/method.md §4, "Towers").

A checkpoint is one self-contained folder, in the layout ``transformers`` users know:
``config.json`` (``model_type: megapairs_towers``, the towers' architectures, the text tower's
own config, the pixel statistics), ``model.safetensors`` (every weight), and the text tower's
tokenizer files. Loading it needs timm and transformers, not the packages the towers first came
from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megapairs_ray.errors import MegapairsError
from megapairs_ray.models.fusion import Retriever

MODEL_TYPE = "megapairs_towers"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class TowersUnavailable(MegapairsError, ImportError):
    """A tower the config names cannot be built here (a package or library missing)."""


class MMRetTowers(Retriever):
    """Image tower + text tower + one linear projection each into ``projection_dim``."""

    family = "towers"

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, config: dict[str, Any]
                 ) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.config = config
        dim = int(config["projection_dim"])
        self.image_projection = nn.Linear(int(config["image_features"]), dim, bias=False)
        self.text_projection = nn.Linear(int(config["text_features"]), dim, bias=False)
        self.frozen: set[str] = set()

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_towers(cls, image_model: str, image_checkpoint: str | None,
                    image_checkpoint_keys: str, image_size: int, text_model: str,
                    max_text_len: int, projection_dim: int, seed: int = 0) -> MMRetTowers:
        """Fresh projections on pretrained towers (``package:<module>/<path>`` allowed)."""
        from megapairs_ray.models.encoders import load_state_file, resolve_model_path

        timm, transformers = _libraries()
        if not timm.is_model(image_model):
            raise TowersUnavailable(f"model.towers.image_model: unknown timm model "
                                    f"{image_model!r}")
        image = timm.create_model(image_model, pretrained=False)
        if image_checkpoint is not None:  # a classifier's weights: loaded with its head
            field = "model.towers.image_checkpoint"
            load_state_file(image, resolve_model_path(image_checkpoint, field),
                            image_checkpoint_keys, field)
        image.reset_classifier(0)  # pooled features
        text_path = resolve_model_path(text_model, "model.towers.text_model")
        text = transformers.AutoModel.from_pretrained(text_path)
        mean, std = image_statistics(image_model, image)
        config = {
            "model_type": MODEL_TYPE, "architectures": ["MMRetTowers"],
            "projection_dim": projection_dim,
            "image_model": image_model, "image_size": image_size,
            "image_mean": list(mean), "image_std": list(std),
            "image_features": int(image.num_features),
            "text_config": text.config.to_dict(), "text_features": int(text.config.hidden_size),
            "max_text_len": max_text_len, "text_pooling": "mean",
        }
        torch.manual_seed(seed)
        model = cls(image, text, config)
        model.tokenizer_source = text_path
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MMRetTowers:
        from safetensors.torch import load_model

        timm, transformers = _libraries()
        config = json.loads((Path(path) / CONFIG_FILE).read_text())
        image = timm.create_model(config["image_model"], pretrained=False, num_classes=0)
        text_conf = transformers.AutoConfig.for_model(**config["text_config"])
        text = transformers.AutoModel.from_config(text_conf)
        model = cls(image, text, config)
        load_model(model, str(Path(path) / WEIGHTS_FILE))
        model.tokenizer_source = str(path)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_model

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        save_model(self, str(Path(path) / WEIGHTS_FILE))

    # ------------------------------------------------------------------ what trains

    def freeze(self, image_tower: bool, text_layers: int | None) -> None:
        """Freeze the image tower (``image_tower``) and all but the top ``text_layers`` layers
        of the text tower (None: train them all). Projections always train. A frozen tower
        stays in eval mode, so its batch-norm statistics never move."""
        if image_tower:
            self.image_tower.requires_grad_(False)
            self.frozen.add("image")
        if text_layers is not None:
            layers = list(self.text_tower.encoder.layer)
            self.text_tower.requires_grad_(False)
            for layer in layers[len(layers) - text_layers:] if text_layers else []:
                layer.requires_grad_(True)
            if text_layers == 0:
                self.frozen.add("text")
        self.train(self.training)

    def train(self, mode: bool = True) -> MMRetTowers:
        super().train(mode)
        if "image" in self.frozen:
            self.image_tower.eval()
        if "text" in self.frozen:
            self.text_tower.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        self.text_tower.gradient_checkpointing_enable()
        if hasattr(self.image_tower, "set_grad_checkpointing"):
            self.image_tower.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ embeddings

    @property
    def dim(self) -> int:
        return int(self.config["projection_dim"])

    @property
    def model_input(self) -> Any:
        return towers_model_input(self.config)

    @property
    def image_frozen(self) -> bool:
        return "image" in self.frozen

    def image_pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features (before the projection)."""
        pixels = pixel_values.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.image_frozen):
            return self.image_tower(pixels)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.image_projection(pooled)

    def text_features(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_tower(input_ids=input_ids,
                                 attention_mask=attention_mask).last_hidden_state
        # The sentence encoder's own pooling: the mean over real tokens.
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.text_projection(pooled)


def towers_model_input(config: dict[str, Any]) -> Any:
    """Square pixels at the image tower's size and statistics; the text tower's length. The
    family's own preprocessing, a timm-style eval transform on tensors: transparency composited
    on white, one float bicubic resize, torchvision's rounded centre-crop offset."""
    from megapairs_ray.models.inputs import ModelInput

    return ModelInput(image_size=int(config["image_size"]),
                      max_text_len=int(config["max_text_len"]),
                      mean=tuple(config["image_mean"]), std=tuple(config["image_std"]),
                      transparency="white", crop_offset="round", resize_8bit=False)


def image_statistics(image_model: str, model: nn.Module | None = None,
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The pixel mean and std a timm architecture was trained with (EfficientNet-Lite's TF
    port: [-1, 1] scaling)."""
    timm, _ = _libraries()
    if model is None:
        if not timm.is_model(image_model):
            raise TowersUnavailable(f"model.towers.image_model: unknown timm model "
                                    f"{image_model!r}")
        model = timm.create_model(image_model, pretrained=False)
    data = timm.data.resolve_data_config({}, model=model)
    return tuple(data["mean"]), tuple(data["std"])


def _libraries() -> tuple[Any, Any]:
    try:
        import timm
        import timm.data
        import transformers
    except ImportError as e:
        raise TowersUnavailable(f"the towers family needs timm and transformers: {e}") from e
    return timm, transformers
