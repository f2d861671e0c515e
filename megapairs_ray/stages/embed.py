"""Embed: one batch of encoded images and captions -> an L2-normalised fp16 vector per space.

The constructor builds the encoder of every space it is given once (``embed.spaces``, or a
subset when only some spaces need computing); each call decodes the batch once (nvJPEG on a
GPU, Pillow otherwise), preprocesses it as tensor ops on the device for each distinct image
spec, and runs the encoders: image spaces on the pixels, caption spaces on the captions. An
image that cannot be decoded comes back with a reject reason instead of vectors; it never fails
the batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from megapairs_ray import pixels
from megapairs_ray.config import EmbedConfig
from megapairs_ray.imaging import ImageSpec
from megapairs_ray.models.encoders import (
    DTYPES,
    ImageEncoder,
    TextEncoder,
    build_encoders,
)
from megapairs_ray.reasons import Reason

BASE_COLUMNS = ("image_id", "shard", "status", "detail", "has_text")


class EmbedStage:
    """Callable stage. Input columns: ``image_id``, ``shard``, ``image`` (bytes), ``caption``,
    ``format``, ``mode``. Output: ``BASE_COLUMNS`` and one column per space; ``status`` is ""
    or a reject reason."""

    def __init__(self, cfg: EmbedConfig, spaces: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.precision]
        if self.device.type == "cpu":
            # Ray gives an actor `num_cpus` cores; torch would otherwise spawn one thread per
            # core of the node. Rounded down: OpenMP threads spin-wait for each other, and one
            # descheduled by a neighbouring task stalls them all (measured: 1.3x slower on 2
            # cores with 2 threads for 1.5 CPUs).
            torch.set_num_threads(max(1, math.floor(cfg.num_cpus)))
        self.spaces = [s for s in cfg.spaces if spaces is None or s.name in spaces]
        if spaces is not None and len(self.spaces) != len(set(spaces)):
            raise ValueError(f"unknown space(s) {sorted(set(spaces) - set(cfg.space_names))}")
        # Random-initialised models (tiny profiles, benchmarks) are seeded from embed.seed and
        # their spec, so every actor holds the same weights.
        self.encoders = build_encoders(self.spaces, self.device, self.dtype, cfg.seed)
        self.batch_rows = {s.name: s.batch_size for s in self.spaces}
        self.image_spaces = [n for n, e in self.encoders.items() if isinstance(e, ImageEncoder)]
        self.text_spaces = [n for n, e in self.encoders.items() if isinstance(e, TextEncoder)]
        # Caption spaces alone still decode each image (a row is embedded only if its image
        # decodes), at the smallest scale.
        self.min_side = max([e.spec.min_source_side for e in self.encoders.values()
                             if isinstance(e, ImageEncoder)], default=1)
        self.pool = ThreadPoolExecutor(cfg.decode_threads) if cfg.decode_threads > 1 else None
        pixels.set_decode_budget(cfg.decode_budget_bytes)
        self._local = threading.local()
        self._tokenizer_lock = threading.Lock()
        self.dims = {name: e.dim for name, e in self.encoders.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        # Ray may run calls concurrently in threads (embed.concurrent_calls_per_actor): each
        # thread gets its own CUDA stream, so one call's decode and host work overlap another
        # call's forward passes instead of queueing behind them on the default stream.
        with self._thread_stream():
            return self._embed(batch)

    def _thread_stream(self) -> AbstractContextManager[Any]:
        if self.device.type != "cuda":
            return nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(stream)

    def _embed(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["image_id"])
        # Rows the reader already rejected (source changed or unreadable) carry their reason.
        status = np.array(batch["status"] if "status" in batch else [""] * n, dtype=object)
        detail = np.array(batch["detail"] if "detail" in batch else [""] * n, dtype=object)
        todo = [i for i in range(n) if not status[i]]
        decoded: list[torch.Tensor | Exception | None] = [None] * n
        if todo:
            sub = {k: v[todo] for k, v in batch.items() if k in ("format", "mode")}
            for i, t in zip(todo, self._decode([bytes(batch["image"][i]) for i in todo], sub)):
                decoded[i] = t
        good = []
        for i in todo:
            t = decoded[i]
            if isinstance(t, torch.Tensor):
                good.append(i)
            else:
                status[i] = Reason.DECODE_FAILED
                detail[i] = f"{type(t).__name__}: {t}"[:500]
        captions = batch["caption"]
        has_text = np.array([isinstance(c, str) and bool(c) for c in captions], dtype=bool)
        has_text &= status == ""
        text_idx = np.flatnonzero(has_text)
        # Launch every GPU step before reading any result back: CUDA runs them asynchronously,
        # so the CPU tokenises the captions while the image towers are still computing.
        results: dict[str, tuple[Any, torch.Tensor]] = {}
        if good and self.image_spaces:
            tensors = [decoded[i] for i in good]
            inputs: dict[ImageSpec, torch.Tensor] = {}  # spaces with one spec share the pixels
            for name in self.image_spaces:
                enc = self.encoders[name]
                assert isinstance(enc, ImageEncoder)
                if enc.spec not in inputs:
                    inputs[enc.spec] = pixels.to_model_input(
                        tensors, enc.spec, self.dtype)  # type: ignore[arg-type]
                results[name] = (good, self._chunked(name, enc.encode_image, inputs[enc.spec]))
        if len(text_idx):
            texts = [str(captions[i]) for i in text_idx]
            for name in self.text_spaces:
                enc = self.encoders[name]
                assert isinstance(enc, TextEncoder)
                step = self.batch_rows[name] or len(texts)
                parts = []
                for lo in range(0, len(texts), step):
                    with self._tokenizer_lock:  # HF fast tokenizers refuse concurrent calls
                        tokens = enc.tokenize(texts[lo:lo + step])
                    parts.append(enc.encode_tokens(tokens))
                results[name] = (text_idx, torch.cat(parts))
        out = {space: np.zeros((n, dim), dtype=np.float16) for space, dim in self.dims.items()}
        for space, (rows, emb) in results.items():
            out[space][rows] = _fp16(emb)
        return {"image_id": np.asarray(batch["image_id"], dtype=np.int64),
                "shard": np.asarray(batch["shard"], dtype=object),
                "status": status, "detail": detail, "has_text": has_text, **out}

    def _chunked(self, name: str, fn: Any, x: torch.Tensor) -> torch.Tensor:
        """``fn`` over ``x`` in the space's forward batches."""
        step = self.batch_rows[name] or len(x)
        if step >= len(x):
            return fn(x)
        return torch.cat([fn(x[lo:lo + step]) for lo in range(0, len(x), step)])

    def _decode(self, images: list[bytes], batch: dict[str, np.ndarray],
                ) -> list[torch.Tensor | Exception]:
        if self.cfg.decode == "gpu":
            fmt = batch.get("format")
            mode = batch.get("mode")
            jpeg = [fmt is not None and fmt[i] == "JPEG" and mode is not None
                    and mode[i] in ("RGB", "L") for i in range(len(images))]
            return pixels.decode_gpu(images, jpeg, self.min_side, self.device, self.pool)
        decoded = pixels.decode_cpu(images, self.min_side, self.pool)
        if self.device.type != "cpu":
            decoded = [t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                       for t in decoded]
        return decoded


def _fp16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).cpu().numpy()
