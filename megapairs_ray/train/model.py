"""MMRet-CLIP on Hugging Face ``transformers`` CLIP (docs/method.md §4).

The released BGE-VL / MMRet checkpoints are HF ``CLIPModel`` folders, so they load with
``MMRetCLIP.from_pretrained`` and what is trained here saves in the same form.
A composed query (image + instruction) is ``normalize(proj_image(I) + proj_text(T))`` — the sum
of the two projected, *unnormalised* features, normalised once; candidates are normalised
projected image features. Image-only and text-only queries are the usual CLIP embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class MMRetCLIP(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MMRetCLIP:
        from transformers import CLIPModel

        return cls(CLIPModel.from_pretrained(path))

    @classmethod
    def from_config(cls, **overrides: object) -> MMRetCLIP:
        """A random-initialised CLIP of any size (tests, benchmarks)."""
        from transformers import CLIPConfig

        return cls(_clip_model(CLIPConfig(**overrides)))

    def save_pretrained(self, path: str | Path) -> None:
        self.clip.save_pretrained(path)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.clip.vision_model(pixel_values=pixel_values)
        return self.clip.visual_projection(out.pooler_output)

    def text_features(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.clip.text_projection(out.pooler_output)

    def embed_candidates(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(pixel_values), dim=-1)

    def forward(self, query_pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, candidate_pixels: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step's embeddings: composed queries [B, D] and candidates [N, D].

        Query and candidate images share one pass through the image tower (one large batch
        instead of two), and going through ``forward`` is what lets DDP synchronise gradients.
        """
        b = query_pixels.shape[0]
        feats = self.image_features(torch.cat([query_pixels, candidate_pixels]))
        queries = F.normalize(feats[:b] + self.text_features(input_ids, attention_mask), dim=-1)
        return queries, F.normalize(feats[b:], dim=-1)

    def embed_queries(self, pixel_values: torch.Tensor | None = None,
                      input_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Composed (both), image-only or text-only queries."""
        if pixel_values is None and input_ids is None:
            raise ValueError("a query needs an image, a text, or both")
        total = 0
        if pixel_values is not None:
            total = total + self.image_features(pixel_values)
        if input_ids is not None:
            total = total + self.text_features(input_ids, attention_mask)
        return F.normalize(total, dim=-1)


def _clip_model(config: object) -> nn.Module:
    from transformers import CLIPModel

    return CLIPModel(config)
