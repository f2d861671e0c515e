"""Embed: one batch of encoded images and captions -> three L2-normalised fp16 embeddings.

The constructor builds the CLIP model (image + text towers) and the DINO model once; each call
decodes the batch (nvJPEG on a GPU, Pillow otherwise), preprocesses it as tensor ops on the
device, and runs the three encoders. An image that cannot be decoded comes back with a reject
reason instead of an embedding; it never fails the batch.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from megapairs_ray.config import EmbedConfig
from megapairs_ray.imaging import Reason
from megapairs_ray.models.encoders import DTYPES, build_clip, build_dino
from megapairs_ray.stages import pixels

OUTPUT_COLUMNS = ("image_id", "shard", "status", "detail", "has_text",
                  "clip_image", "dino_image", "clip_text")


class EmbedStage:
    """Callable stage. Input columns: ``image_id``, ``shard``, ``image`` (bytes), ``caption``,
    ``format``, ``mode``. Output: ``OUTPUT_COLUMNS``; ``status`` is "" or a reject reason."""

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.precision]
        if self.device.type == "cpu":
            # Ray gives an actor `num_cpus` cores; torch would otherwise spawn one thread per
            # core of the node. Rounded down: OpenMP threads spin-wait for each other, and one
            # descheduled by a neighbouring task stalls them all (measured: 1.3x slower on 2
            # cores with 2 threads for 1.5 CPUs).
            torch.set_num_threads(max(1, math.floor(cfg.num_cpus)))
        # Seeded: random-initialised models (the tiny profile, benchmarks) must be the same in
        # every actor, or embeddings from two actors would live in different spaces.
        torch.manual_seed(cfg.seed)
        self.clip = build_clip(cfg.clip, self.device, self.dtype)
        torch.manual_seed(cfg.seed + 1)
        self.dino = build_dino(cfg.dino, self.device, self.dtype)
        self.min_side = max(self.clip.spec.min_source_side, self.dino.spec.min_source_side)
        self.pool = ThreadPoolExecutor(cfg.decode_threads) if cfg.decode_threads > 1 else None
        pixels.set_decode_budget(cfg.decode_budget_bytes)
        self._local = threading.local()
        self._tokenizer_lock = threading.Lock()
        self.dims = {"clip_image": self.clip.dim, "dino_image": self.dino.dim,
                     "clip_text": self.clip.dim}

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
        if good:
            tensors = [decoded[i] for i in good]
            clip_px = pixels.to_model_input(tensors, self.clip.spec, self.dtype)  # type: ignore[arg-type]
            dino_px = pixels.to_model_input(tensors, self.dino.spec, self.dtype)  # type: ignore[arg-type]
            results["clip_image"] = (good, self.clip.encode_image(clip_px))
            results["dino_image"] = (good, self.dino.encode_image(dino_px))
        if len(text_idx):
            with self._tokenizer_lock:  # HF fast tokenizers refuse concurrent calls
                tokens = self.clip.tokenize([str(captions[i]) for i in text_idx])
            results["clip_text"] = (text_idx, self.clip.encode_tokens(tokens))
        out = {space: np.zeros((n, dim), dtype=np.float16) for space, dim in self.dims.items()}
        for space, (rows, emb) in results.items():
            out[space][rows] = _fp16(emb)
        return {"image_id": np.asarray(batch["image_id"], dtype=np.int64),
                "shard": np.asarray(batch["shard"], dtype=object),
                "status": status, "detail": detail, "has_text": has_text, **out}

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
