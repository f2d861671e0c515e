"""The retriever's encoders: one MMRet checkpoint of any family (``models/family.py``), as every
consumer uses it.

``megapairs eval`` (benchmark galleries and queries), the gallery job (candidate embeddings) and
the query-encoder deployment of the service all embed through this one class, so a served
ranking is the offline ranking: same decode, same preprocessing, same tokenisation, same
composition (``normalize(proj_image + proj_text)``, docs/method.md §4; the mllm family embeds
each query as one prompt instead).

Images arrive as encoded bytes. They are decoded whole (no reduced-scale JPEG decoding): the
protocol's pixels, not a faster approximation of them. A batch may mix composed, image-only and
text-only queries: the image tower runs once over every row that has an image, the text tower
once over every row that has a text, and each row sums what it has.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage
from megapairs_ray.models.family import load_retriever
from megapairs_ray.models.inputs import tokenize_queries
from megapairs_ray.pixels import decode_cpu, to_model_input

# Where an s3 checkpoint is copied to be loaded, once per node.
CHECKPOINT_CACHE = os.path.join(tempfile.gettempdir(), "megapairs", "checkpoints")


class CheckpointNotFound(MegapairsError, FileNotFoundError):
    """A checkpoint asked for that is not there; the message says which."""


def resolve_checkpoint(path: str) -> str:
    """An HF-form checkpoint folder (or hub id) as given, or, for a `megapairs train` run
    folder (``storage_path/name``), the checkpoint that run reported last (its
    ``summary.json``); ``tiny-random-llava-next``, the mllm family's twin (built on first
    use)."""
    from megapairs_ray.models.mllm_twin import TWIN_NAME, twin_path

    if path == TWIN_NAME:
        return twin_path()
    if storage.exists(posixpath.join(path, "config.json")):
        return path
    summary = posixpath.join(path, "summary.json")
    if storage.exists(summary):
        checkpoint = storage.read_json(summary).get("checkpoint")
        if checkpoint:
            return str(checkpoint)
        raise CheckpointNotFound(f"training run {path} has no checkpoint yet")
    return path  # a hub id, or a folder from_pretrained will name in its own error


def resolve_precision(precision: str, device: str, cpu_flags: set[str] | None = None) -> str:
    """``auto``: bf16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with
    AVX-512 BF16 or AMX: measured 1.5x faster per query than fp32 at batch 1, cosine >= 0.9999
    to it), fp32 elsewhere, where bf16 would be emulated and slower. Anything else as given."""
    if precision != "auto":
        return precision
    # Runs where the model is loaded (a replica), about that process's own device: the device
    # itself comes from the config.
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                line = next((ln for ln in f if ln.startswith("flags")), "")
            cpu_flags = set(line.split(":", 1)[-1].split())
        except OSError:
            cpu_flags = set()
    return "bf16" if cpu_flags & {"avx512_bf16", "amx_bf16"} else "fp32"


class UndecodableImage(ValueError):
    """An image the encoder cannot decode; the message says which and why."""


class RetrieverEncoder:
    """Batched embedding of gallery images and of composed, image-only or text-only queries."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 64,
                 threads: int = 8, precision: str = "fp32") -> None:
        from megapairs_ray.models.tokenizer import load_tokenizer

        self.checkpoint = checkpoint
        if storage.is_remote(checkpoint):  # from_pretrained reads local folders and hub ids
            checkpoint = storage.local_copy(checkpoint, CHECKPOINT_CACHE,
                                            version=storage.folder_version(checkpoint))
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.model = load_retriever(checkpoint).eval().to(self.device, self.dtype)
        self.tokenizer = load_tokenizer(checkpoint)
        model_input = self.model.model_input
        self.model_input = model_input
        self.dim = self.model.dim
        # The family's own preprocessing (models/inputs.py): for CLIP checkpoints, the released
        # processor's pixels, so released models rank here as they do in their authors' code.
        self.spec = model_input.image_spec()
        self.transparency = model_input.transparency
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(threads)

    # ------------------------------------------------------------------ pixels and tokens

    def decode(self, images: Sequence[bytes]) -> list[torch.Tensor | Exception]:
        """HWC uint8 tensors, or the exception that stopped each image."""
        return decode_cpu(images, 0, self.pool, self.transparency)

    def pixels(self, decoded: Sequence[torch.Tensor]) -> torch.Tensor:
        return to_model_input([d.to(self.device) for d in decoded], self.spec, self.dtype)

    def pixels_of(self, images: Sequence[bytes], names: Sequence[str] | None = None,
                  ) -> torch.Tensor:
        """Model input of encoded images; any undecodable one raises, naming it."""
        decoded = self.decode(images)
        for i, d in enumerate(decoded):
            if isinstance(d, Exception):
                name = names[i] if names is not None else f"image {i}"
                raise UndecodableImage(f"{name} cannot be decoded: {d}")
        return self.pixels(decoded)  # type: ignore[arg-type]

    def tokens(self, texts: Sequence[str | None], has_image: Sequence[bool] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and masks of queries' texts, on the device, as the training loaders make
        them (``inputs.tokenize_queries``); ``has_image`` matters to prompt families only."""
        flags = [False] * len(texts) if has_image is None else list(has_image)
        ids, mask = tokenize_queries(self.tokenizer, self.model_input, texts, flags)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    # ------------------------------------------------------------------ embeddings

    @torch.no_grad()
    def candidates(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit-norm gallery embeddings [N, D] (float32) of preprocessed pixels, in batches."""
        out = [self.model.embed_candidates(pixels[i : i + self.batch_size]).float().cpu().numpy()
               for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def queries(self, images: Sequence[bytes | None], texts: Sequence[str | None],
                ) -> np.ndarray:
        """Unit-norm query embeddings [N, D]: row i is composed when it has both an image and a
        text, image-only or text-only when it has one. Every image must decode (callers check
        images before they batch them)."""
        if len(images) != len(texts):
            raise ValueError("images and texts must pair up")
        out = []
        for i in range(0, len(images), self.batch_size):
            out.append(self._query_batch(images[i : i + self.batch_size],
                                         texts[i : i + self.batch_size]))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _query_batch(self, images: Sequence[bytes | None], texts: Sequence[str | None],
                     ) -> np.ndarray:
        with_image = [i for i in range(len(images)) if images[i] is not None]
        px = self.pixels_of([images[i] for i in with_image]) if with_image else None  # type: ignore[misc]
        return self._compose(with_image, px, texts)

    @torch.no_grad()
    def queries_of_decoded(self, decoded: Sequence[torch.Tensor | None],
                           texts: Sequence[str | None]) -> np.ndarray:
        """``queries`` for images already decoded (HWC uint8 tensors, or None: no image), so a
        caller that had to decode them to find the bad ones does not decode them again."""
        out = []
        for s in range(0, len(decoded), self.batch_size):
            chunk = decoded[s : s + self.batch_size]
            with_image = [i for i, d in enumerate(chunk) if d is not None]
            px = self.pixels([chunk[i] for i in with_image]) if with_image else None  # type: ignore[misc]
            out.append(self._compose(with_image, px, texts[s : s + self.batch_size]))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _compose(self, with_image: list[int], px: torch.Tensor | None,
                 texts: Sequence[str | None]) -> np.ndarray:
        """Score fusion of one batch: row i sums its image's features (``px`` holds the pixels
        of the rows ``with_image``, in order) and its text's, then is normalised."""
        n = len(texts)
        with_text = [i for i in range(n) if texts[i] is not None]
        missing = sorted(set(range(n)) - set(with_image) - set(with_text))
        if missing:
            raise ValueError(f"query {missing[0]} has neither an image nor a text")
        if self.model_input.query_formats is not None:  # one prompt per query (mllm)
            has_image = set(with_image)
            ids, mask = self.tokens(texts, [i in has_image for i in range(n)])
            return self.model.embed_queries(px, ids, mask).float().cpu().numpy()
        total = torch.zeros((n, self.dim), dtype=torch.float32, device=self.device)
        if px is not None:
            total[with_image] += self.model.image_features(px).float()
        if with_text:
            ids, mask = self.tokens([texts[i] for i in with_text])
            total[with_text] += self.model.text_features(ids, mask).float()
        return F.normalize(total, dim=-1).cpu().numpy()
