"""MMRet-MLLM: the ``mllm`` retriever family, a LLaVA-NeXT whose last hidden state embeds
(docs/method.md §4, "MMRet-MLLM").

One model embeds both sides. A query is a prompt holding the instruction and the query image; a
candidate is a prompt holding its image; the embedding is the final hidden state of the prompt's
last token, L2-normalised. There is no score fusion: the image and the text meet inside the
language model. The released BGE-VL-MLLM-S1/S2 are merged LLaVA-1.6-Mistral-7B weights with
remote code around ``LlavaNextForConditionalGeneration``; this family loads their weights with
the class itself and reproduces their prompts and pixels, so no remote code runs.

**Pixels.** The released code squashes every image to 512 x 512 (Pillow) before LLaVA-NeXT's
processor, whose anyres step then picks the 2 x 2 grid of tiles for a square: four tiles of the
image enlarged to twice the tile size, plus the whole image at the tile size. This family's
``ModelInput`` is that square (8-bit Pillow-style squash, levels 0..255 left unnormalised), and
``anyres`` makes the tiles from it on the device, as the processor's tensor backend does.

**Training** is LoRA (``peft``) on the language model; the vision tower and projector stay as
loaded. A checkpoint written here is a ``peft`` adapter folder (``adapter_config.json`` naming
the base, ``adapter_model.safetensors``) plus ``mmret_mllm.json`` (this family's prompts and
image size) and the processor's files: ``PeftModel.from_pretrained(base, folder)`` reads it, and
so does ``load_retriever``. A merged LLaVA-NeXT folder (a released checkpoint, or a twin) loads
too, with the released prompts unless it carries its own ``mmret_mllm.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megapairs_ray.errors import MegapairsError
from megapairs_ray.models.inputs import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ModelInput
from megapairs_ray.models.mllm_settings import (
    ADAPTER_CONFIG,
    IMAGE_PLACEHOLDER,
    SETTINGS_FILE,
    MLLMConfigError,
    MLLMSettings,
    read_settings,
)


class NotLlavaNext(MegapairsError, ValueError):
    """A checkpoint given to the ``mllm`` family that is not a LLaVA-NeXT."""



# --------------------------------------------------------------------------- anyres tiling


def best_grid(image_size: int, pinpoints: list[list[int]], tile: int) -> int:
    """Tiles a side for a square image of ``image_size``: LLaVA-NeXT's choice of resolution
    (the most of the image's pixels kept, then the least padding), which for a square is a
    square grid."""
    best, best_kept, best_waste = None, -1, math.inf
    for h, w in pinpoints:
        scale = min(w / image_size, h / image_size)
        kept = min(int(image_size * scale) ** 2, image_size * image_size)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (h, w), kept, waste
    if best is None or best[0] != best[1] or best[0] % tile:
        raise MLLMConfigError(f"image_grid_pinpoints {pinpoints} give a {image_size}-pixel "
                              f"square no square grid of {tile}-pixel tiles")
    return best[0] // tile


def image_token_count(image_size: int, pinpoints: list[list[int]], tile: int, patch: int
                      ) -> int:
    """The tokens a square image becomes: the whole image's patches, the grid's patches, and
    one newline per row of the grid (LLaVA-NeXT's ``spatial_unpad``; a square needs none
    removed)."""
    side = tile // patch
    grid_side = best_grid(image_size, pinpoints, tile) * side
    return side * side + grid_side * grid_side + grid_side


def anyres(pixels: torch.Tensor, grid: int, tile: int, mean: torch.Tensor, std: torch.Tensor
           ) -> torch.Tensor:
    """[B, 3, S, S] levels (0..255) -> [B, 1 + grid², 3, tile, tile] normalised: the whole
    image at the tile size, then the tiles of the image resized to ``grid * tile``, row by row,
    each resize rounded to whole levels as the processor's uint8 tensors are."""

    def resize(x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)
        return y.clamp(0, 255).round()

    b = pixels.shape[0]
    whole = resize(pixels, tile)[:, None]
    big = resize(pixels, grid * tile)
    tiles = big.view(b, 3, grid, tile, grid, tile).permute(0, 2, 4, 1, 3, 5)
    out = torch.cat([whole, tiles.reshape(b, grid * grid, 3, tile, tile)], dim=1)
    return (out / 255.0 - mean) / std


def settings_model_input(settings: MLLMSettings, image_tokens: int) -> ModelInput:
    """Squares of ``image_size`` in whole levels (normalised after tiling, in ``anyres``),
    squashed with Pillow's 8-bit resize as the released code's ``Image.resize`` does; the
    prompts with the image placeholder expanded to the image's tokens."""
    p = settings.prompts
    expand = IMAGE_PLACEHOLDER * image_tokens
    formats = tuple(f.replace("{instruction}", p.instruction).replace(IMAGE_PLACEHOLDER, expand)
                    for f in (p.query, p.text_query, p.image_query))
    return ModelInput(image_size=settings.image_size, max_text_len=settings.max_text_len,
                      mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, transparency="drop",
                      crop_offset="floor", resize_8bit=True, resize_mode="squash",
                      query_formats=formats)  # type: ignore[arg-type]


def checkpoint_model_input(path: str | Path, settings: MLLMSettings | None = None
                           ) -> ModelInput:
    """The model input of a checkpoint, read from configs without loading weights (the
    training driver feeds loaders only). ``settings``: used where the folder has none."""
    path = Path(path)
    if (path / SETTINGS_FILE).is_file() or settings is None:
        settings = read_settings(path)
    config = _llava_config(base_of(path))
    v = config.vision_config
    tokens = image_token_count(settings.image_size, [list(p) for p in config.image_grid_pinpoints],
                               int(v.image_size), int(v.patch_size))
    return settings_model_input(settings, tokens)


def base_of(path: str | Path) -> str:
    """The LLaVA-NeXT weights a folder stands on: an adapter's base, else the folder."""
    adapter = Path(path) / ADAPTER_CONFIG
    if adapter.is_file():
        return str(json.loads(adapter.read_text())["base_model_name_or_path"])
    return str(path)


# --------------------------------------------------------------------------- the family


class MMRetMLLM(nn.Module):
    """The ``mllm`` retriever: a LLaVA-NeXT (possibly under a ``peft`` LoRA) plus its prompts."""

    family = "mllm"
    feature_cache = None
    image_frozen = False

    def __init__(self, llava: nn.Module, tokenizer: Any, settings: MLLMSettings,
                 mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        super().__init__()
        settings.prompts.check()
        self.llava = llava
        self.settings = settings
        self.tokenizer = tokenizer
        config = self.llava_config()
        self.tile = int(config.vision_config.image_size)
        self.pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.grid = best_grid(settings.image_size, self.pinpoints, self.tile)
        self.image_tokens = image_token_count(settings.image_size, self.pinpoints, self.tile,
                                              int(config.vision_config.patch_size))
        self.image_token_id = int(config.image_token_id)
        mean, std = mean_std or (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        candidate = settings.prompts.candidate.replace(
            IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * self.image_tokens)
        ids = tokenizer(candidate, return_tensors="pt")["input_ids"]
        self.register_buffer("candidate_ids", ids, persistent=False)

    def llava_config(self) -> Any:
        return self.base_llava().config

    @property
    def is_lora(self) -> bool:
        return hasattr(self.llava, "get_base_model")

    def base_llava(self) -> nn.Module:
        """The ``LlavaNextForConditionalGeneration`` under any LoRA wrapper."""
        m = self.llava
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | Path, trainable: bool = False,
                        dtype: torch.dtype = torch.float32,
                        settings: MLLMSettings | None = None) -> MMRetMLLM:
        """A merged LLaVA-NeXT folder, or an adapter folder written here (its base loaded from
        ``base_model_name_or_path``). ``trainable``: an adapter stays trainable (resume);
        else it is merged into the weights, which embeds faster. ``settings``: for a folder
        without its own (a released checkpoint), instead of the released ones."""
        path = Path(path)
        if (path / SETTINGS_FILE).is_file() or settings is None:
            settings = read_settings(path)
        if (path / ADAPTER_CONFIG).is_file():
            from peft import PeftModel

            llava = PeftModel.from_pretrained(_load_llava(base_of(path), dtype), str(path),
                                              is_trainable=trainable)
            if not trainable:
                llava = llava.merge_and_unload()
        else:
            llava = _load_llava(str(path), dtype)
        return cls(llava, _load_tokenizer(path), settings, processor_mean_std(path))

    def add_lora(self, r: int, alpha: int, dropout: float, target_modules: str | list[str],
                 ) -> None:
        """Wrap the backbone in a fresh LoRA; everything else is frozen."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                            target_modules=target_modules, bias="none")
        try:
            self.llava = get_peft_model(self.llava, config)
        except ValueError as e:
            if "not found in the base model" in str(e) or "no modules" in str(e).lower():
                raise MLLMConfigError(f"model.mllm.lora.target_modules {target_modules!r} "
                                      f"matches no module of the backbone") from e
            raise

    def save_pretrained(self, path: str | Path) -> None:
        """An adapter folder when LoRA-wrapped (the base is named, not copied), else the whole
        LLaVA-NeXT; either way with ``mmret_mllm.json``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.llava.save_pretrained(path)
        doc = {**self.settings.to_dict(), "image_mean": self.mean.flatten().tolist(),
               "image_std": self.std.flatten().tolist()}
        (Path(path) / SETTINGS_FILE).write_text(json.dumps(doc, indent=2))

    def freeze(self, image_tower: bool, text_layers: int | None) -> None:
        """LoRA decides what trains in this family; the per-tower settings do not apply."""
        if text_layers is not None:
            raise MLLMConfigError("model.text_layers_trained does not apply to the mllm family: "
                                  "model.mllm.lora decides what trains")

    def gradient_checkpointing_enable(self) -> None:
        self.base_llava().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ inputs

    @property
    def dim(self) -> int:
        return int(self.llava_config().text_config.hidden_size)

    @property
    def model_input(self) -> ModelInput:
        return settings_model_input(self.settings, self.image_tokens)

    # ------------------------------------------------------------------ embeddings

    def _embed(self, pixels: torch.Tensor | None, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The final hidden state of each row's last real token, normalised. Rows whose ids hold
        image tokens take the images of ``pixels`` in order."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Any] = {}
        if pixels is not None and len(pixels):
            dtype = next(p for p in self.base_llava().parameters()).dtype
            kwargs["pixel_values"] = self.prepare_pixels(pixels).to(dtype)
            side = self.settings.image_size
            kwargs["image_sizes"] = torch.tensor([[side, side]] * len(pixels),
                                                 device=input_ids.device)
        inner = self.base_llava().model  # LlavaNextModel: hidden states without the LM head
        hidden = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **kwargs).last_hidden_state
        # The last real token, whichever side the padding is on.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.long() * positions).argmax(1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return F.normalize(hidden[rows, last].float(), dim=-1)

    def prepare_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Squares [B, 3, S, S] in levels -> LLaVA-NeXT's tiles [B, 1 + grid², 3, t, t]; tiles
        pass as they are. The training step tiles a micro-batch once, not once per GradCache
        pass."""
        if pixels.dim() == 5:
            return pixels
        return anyres(pixels.float(), self.grid, self.tile, self.mean, self.std)

    def embed_candidates(self, pixel_values: torch.Tensor) -> torch.Tensor:
        ids = self.candidate_ids.expand(len(pixel_values), -1)
        return self._embed(pixel_values, ids, None)

    def embed_queries(self, pixel_values: torch.Tensor | None = None,
                      input_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries whose ids were made by ``model_input.query_text`` (the prompt of each row's
        kind, its image's tokens included); ``pixel_values`` are the images of the rows that have
        one, in order."""
        if input_ids is None:
            raise ValueError("an mllm query is a prompt: input_ids are needed")
        return self._embed(pixel_values, input_ids, attention_mask)

    def forward(self, query_pixels: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, candidate_pixels: torch.Tensor,
                image_keys: torch.Tensor | None = None, part: str = "both",
                ) -> Any:
        """A training step's embeddings, as every family gives them (``fusion.compose``);
        ``part`` asks for only the queries or only the candidates (GradCache)."""
        if part == "queries":
            return self.embed_queries(query_pixels, input_ids, attention_mask)
        if part == "candidates":
            return self.embed_candidates(candidate_pixels)
        return (self.embed_queries(query_pixels, input_ids, attention_mask),
                self.embed_candidates(candidate_pixels))


def _llava_config(path: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise NotLlavaNext(f"{path}: no LLaVA-NeXT config to read ({e})") from e
    if config.model_type != "llava_next":
        raise NotLlavaNext(f"{path}: model_type {config.model_type!r} is not llava_next; the "
                           f"mllm family loads LLaVA-NeXT checkpoints")
    return config


def _load_llava(path: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlavaNextForConditionalGeneration

    _llava_config(path)
    # The released checkpoints name their own embedding class (remote code); the weights are
    # LlavaNextForConditionalGeneration's, which loads them without running that code.
    return LlavaNextForConditionalGeneration.from_pretrained(path, dtype=dtype)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    has_own = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(str(path) if has_own else base_of(path))


def processor_mean_std(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image processor's statistics (``preprocessor_config.json`` or the processor config
    transformers 5 writes), OpenAI CLIP's where the folder has none."""
    for name in (SETTINGS_FILE, "preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if f.is_file():
            doc = json.loads(f.read_text())
            doc = doc.get("image_processor", doc)
            if "image_mean" in doc and "image_std" in doc:
                return tuple(doc["image_mean"]), tuple(doc["image_std"])
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
