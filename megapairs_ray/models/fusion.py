"""MMRet-CLIP's score fusion, the one way every retriever family composes a query
(docs/method.md §4): ``normalize(proj_image(I) + proj_text(T))``, the sum of the two projected,
*unnormalised* features, normalised once; candidates are normalised projected image features.

A model here is anything with ``image_pooled(pixels)`` (the image tower's output),
``project_image(pooled)``, ``text_features(ids, mask)``, ``image_frozen`` and
``feature_cache``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class FeatureCache:
    """A frozen image tower's outputs by image key, least recently used out first.

    A frozen tower in eval mode gives an image the same features every pass, so training with it
    (alignment, LiT-style) runs the tower once per image and worker instead of once per pass and
    role: on 2 CPU cores that is most of a step's time. Bounded by ``max_items``."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def features(self, tower: Any, pixels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        keys_list = keys.tolist()
        missing = [i for i, k in enumerate(keys_list) if k not in self.items]
        self.hits += len(keys_list) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                fresh = tower(pixels[missing])
            for i, f in zip(missing, fresh):
                self.items[keys_list[i]] = f
        out = torch.stack([self.items[k] for k in keys_list])
        for k in keys_list:
            self.items.move_to_end(k)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return out


def image_features(model: Any, pixels: torch.Tensor, keys: torch.Tensor | None = None,
                   ) -> torch.Tensor:
    """Projected image features; a frozen tower's outputs come from the model's cache when the
    images have keys."""
    cache = getattr(model, "feature_cache", None)
    if keys is not None and cache is not None and model.image_frozen:
        return model.project_image(cache.features(model.image_pooled, pixels, keys))
    return model.project_image(model.image_pooled(pixels))


def compose(model: Any, query_pixels: torch.Tensor | None, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None, candidate_pixels: torch.Tensor,
            image_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's embeddings: composed queries [B, D] and candidates [N, D].

    Query and candidate images share one pass through the image tower (one large batch instead
    of two). Alignment steps have no query images: their queries are the texts alone.
    ``image_keys`` name the images (queries first, then candidates) for a frozen tower's
    cache."""
    text = model.text_features(input_ids, attention_mask)
    if query_pixels is None:
        feats = image_features(model, candidate_pixels, image_keys)
        return F.normalize(text, dim=-1), F.normalize(feats, dim=-1)
    b = query_pixels.shape[0]
    feats = image_features(model, torch.cat([query_pixels, candidate_pixels]), image_keys)
    return F.normalize(feats[:b] + text, dim=-1), F.normalize(feats[b:], dim=-1)


def fuse_queries(model: Any, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Composed (both), image-only or text-only queries."""
    if pixel_values is None and input_ids is None:
        raise ValueError("a query needs an image, a text, or both")
    total: torch.Tensor | int = 0
    if pixel_values is not None:
        total = total + model.image_features(pixel_values)
    if input_ids is not None:
        total = total + model.text_features(input_ids, attention_mask)
    return F.normalize(total, dim=-1)  # type: ignore[arg-type]


class Retriever(nn.Module):
    """What every retriever family shares: a family supplies ``image_pooled``,
    ``project_image``, ``text_features``, ``image_frozen``, ``freeze``, ``dim`` and
    ``model_input``; the embeddings and the training forward are these, the same for all."""

    feature_cache: FeatureCache | None = None

    def prepare_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the image tower takes, from normalised squares: the squares themselves."""
        return pixels

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.image_pooled(pixel_values))  # type: ignore[attr-defined]

    def embed_candidates(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(pixel_values), dim=-1)

    def forward(self, query_pixels: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, candidate_pixels: torch.Tensor,
                image_keys: torch.Tensor | None = None, part: str = "both") -> Any:
        """One training step's embeddings (``compose``); going through ``forward`` is what
        lets DDP synchronise gradients. ``part``: only the queries, or only the candidates
        (GradCache embeds them in chunks of their own, without the feature cache)."""
        if part == "queries":
            return fuse_queries(self, query_pixels, input_ids, attention_mask)
        if part == "candidates":
            return self.embed_candidates(candidate_pixels)
        return compose(self, query_pixels, input_ids, attention_mask, candidate_pixels,
                       image_keys)

    def embed_queries(self, pixel_values: torch.Tensor | None = None,
                      input_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Composed (both), image-only or text-only queries."""
        return fuse_queries(self, pixel_values, input_ids, attention_mask)
