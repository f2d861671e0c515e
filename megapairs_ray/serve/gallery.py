"""The gallery: images embedded with the retriever checkpoint, indexed, and described.

A gallery folder (local or s3://) holds, beside what ingest writes for its own input:

- ``embeddings/retriever/<shard>/part-*.parquet``: ``image_id`` + fp16 unit vector, written by
  the same writer as the embed stage's, with ``embeddings/_done/<shard>.json`` per finished
  images table and ``embeddings/_settings.json`` (the checkpoint and what else decides a vector);
- ``index/retriever/``: the index stage's sharded FAISS index (flat, IVF or HNSW; id ranges);
- ``rejects/gallery/``: images that could not be read back or decoded, with the reason;
- ``gallery.json``, written last: the contract the service reads — the checkpoint, the images
  tables that are its metadata (id, caption, where the bytes live), the index, the counts.

The images tables are the metadata table: a gallery built from a finished run points at that
run's tables instead of copying them.

This module imports no Ray: ``GalleryEncoder`` is a callable stage (the constructor loads the
model once per actor, ``__call__`` maps a batch) that a test or a GPU benchmark calls directly.
Nor does it import torch: the service's replicas that only search or route, and Serve's
controller building the application, read galleries through it; the model code loads in
``GalleryEncoder``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from megapairs_ray.config import InputConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import fetch_bytes_tolerant
from megapairs_ray.reasons import Reason
from megapairs_ray.serve.config import SPACE

# What the service needs of each image: its id, its caption and where its bytes live.
META_COLUMNS = ["image_id", "key", "caption", "format_kind", "file_uri", "offset", "length",
                "row"]


class GalleryError(MegapairsError, RuntimeError):
    """A gallery that cannot be built or served as asked; the message says why."""


def gallery_json(gallery_dir: str) -> str:
    return storage.join(gallery_dir, "gallery.json")


def index_dir(gallery_dir: str) -> str:
    return layout.index_dir(gallery_dir, SPACE)


def read_gallery(gallery_dir: str) -> dict[str, Any]:
    uri = gallery_json(gallery_dir)
    if not storage.exists(uri):
        raise GalleryError(f"no finished gallery at {gallery_dir} ({uri} missing): build it "
                           "with `megapairs gallery -c CONFIG`")
    return storage.read_json(uri)


def read_gallery_images(batch: dict[str, np.ndarray], input_cfg: InputConfig,
                        rows_per_batch: int = 256) -> Iterator[dict[str, Any]]:
    """For each ``{"images_file", "shard"}`` row: the table's images with their bytes, fetched
    grouped by the file that holds them. An image whose bytes cannot be read comes out with a
    status (a reject downstream), never as an exception that would stop the whole shard."""
    for uri, slug in zip(batch["images_file"], batch["shard"]):
        table = storage.read_parquet(str(uri), columns=META_COLUMNS)
        for start in range(0, table.num_rows, rows_per_batch):
            rows = table.slice(start, rows_per_batch).to_pylist()
            raw = fetch_bytes_tolerant(rows, input_cfg)
            yield {
                "image_id": np.array([r["image_id"] for r in rows], dtype=np.int64),
                "shard": np.array([slug] * len(rows), dtype=object),
                "image": np.array(raw, dtype=object),
                "status": np.array(["" if b else Reason.UNREADABLE_IMAGE for b in raw],
                                   dtype=object),
                "detail": np.array(["" if b else f"no bytes at {r['file_uri']}"
                                    for r, b in zip(rows, raw)], dtype=object),
            }


class GalleryEncoder:
    """Callable stage: image bytes in, unit-norm retriever embeddings (``SPACE``) out.

    An image that does not decode is a ``decode_failed`` row, not an exception."""

    def __init__(self, checkpoint: str, device: str = "cpu", precision: str = "fp32",
                 batch_size: int = 64, threads: int = 4,
                 decode_budget_bytes: int | None = None) -> None:
        from megapairs_ray.models.retriever import RetrieverEncoder
        from megapairs_ray.pixels import set_decode_budget

        if decode_budget_bytes is not None:
            set_decode_budget(decode_budget_bytes)
        self.encoder = RetrieverEncoder(checkpoint, device=device, batch_size=batch_size,
                                        threads=threads, precision=precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        status = np.array(batch["status"], dtype=object)
        detail = np.array(batch["detail"], dtype=object)
        todo = [i for i in range(n) if status[i] == ""]
        decoded = self.encoder.decode([batch["image"][i] for i in todo])
        good: list[int] = []
        for i, d in zip(todo, decoded):
            if isinstance(d, Exception):
                status[i], detail[i] = Reason.DECODE_FAILED, f"{type(d).__name__}: {d}"[:500]
            else:
                good.append(i)
        vectors = np.zeros((n, self.encoder.dim), dtype=np.float32)
        if good:
            at = {i: j for j, i in enumerate(todo)}
            pixels = self.encoder.pixels([decoded[at[i]] for i in good])  # type: ignore[misc]
            vectors[good] = self.encoder.candidates(pixels)
        return {"image_id": batch["image_id"], "shard": batch["shard"], SPACE: vectors,
                "status": status, "detail": detail}


def footprint_bytes(gallery_dir: str, checkpoint: str) -> int:
    """What one replica holding the whole gallery loads: its index shards and the model's
    weights (the files' sizes; the metadata table is small beside them)."""
    from megapairs_ray.stages.index import read_meta, shard_uri

    idx = index_dir(gallery_dir)
    total = 0
    for shard in range(int(read_meta(idx)["shards"])):
        fs, path = storage.filesystem(shard_uri(idx, shard))
        total += int(fs.size(path) or 0)
    for uri in storage.list_files(checkpoint, suffix=".safetensors"):
        fs, path = storage.filesystem(uri)
        total += int(fs.size(path) or 0)
    return total
