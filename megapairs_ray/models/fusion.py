"""MMRet-CLIP's score fusion, the one way every retriever family composes a query
(docs/method.md §4): ``normalize(proj_image(I) + proj_text(T))``, the sum of the two projected,
*unnormalised* features, normalised once; candidates are normalised projected image features.

A model here is anything with ``image_features(pixels)`` and ``text_features(ids, mask)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def compose(model: Any, query_pixels: torch.Tensor | None, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None, candidate_pixels: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's embeddings: composed queries [B, D] and candidates [N, D].

    Query and candidate images share one pass through the image tower (one large batch instead
    of two). Alignment steps have no query images: their queries are the texts alone."""
    text = model.text_features(input_ids, attention_mask)
    if query_pixels is None:
        return F.normalize(text, dim=-1), F.normalize(model.image_features(candidate_pixels),
                                                      dim=-1)
    b = query_pixels.shape[0]
    feats = model.image_features(torch.cat([query_pixels, candidate_pixels]))
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
