"""``GallerySearcher``: a finished gallery, loaded once, searched many times.

It holds the gallery's index shards (memory-mapped from local disk where the index kind allows;
an s3 gallery's index is copied to a local cache first) and its metadata (id, caption, where the
bytes live: the images tables). A query batch goes to every shard and the per-shard top-k lists
are merged exactly as one index would rank them: each shard answers with its first k by score,
then id, its whole tie group at the k-th score considered (``IndexShard.search``), and
``merge_topk`` orders the union the same way, so a gallery with duplicate images or captions
serves the same hits however it is sharded or was built. Thumbnails are read from where the
image's bytes live and shrunk.

No Ray here: the search deployment is a thin wrapper, and tests and benchmarks call this class
directly.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from megapairs_ray.config import IndexConfig, InputConfig
from megapairs_ray.imaging import decode_rgb
from megapairs_ray.io import storage
from megapairs_ray.io.shards import fetch_bytes_tolerant
from megapairs_ray.serve.gallery import META_COLUMNS, GalleryError, index_dir, read_gallery
from megapairs_ray.stages.index import IndexShard, merge_topk, read_meta

log = logging.getLogger(__name__)

# clip-retrieval's clip back links two hits as duplicates above this inner product.
DEDUP_THRESHOLD = 0.94

class GallerySearcher:
    def __init__(self, gallery_dir: str, nprobe: int | None = None,
                 hnsw_ef_search: int | None = None, mmap: bool = True,
                 local_cache_dir: str = "/tmp/megapairs-gallery-cache") -> None:
        self.gallery = read_gallery(gallery_dir)
        self.dim = int(self.gallery["dim"])
        idx = index_dir(gallery_dir)  # not the recorded path: a gallery folder may move
        meta = read_meta(idx)
        search = {k: v for k, v in {"nprobe": nprobe, "hnsw_ef_search": hnsw_ef_search}.items()
                  if v is not None}
        cfg = IndexConfig(**meta["build"], **search)
        if mmap and storage.is_remote(idx):
            # Keyed by the index's metadata: a rebuilt index is never served from a stale copy.
            idx = storage.local_copy(idx, local_cache_dir, version=str(sorted(meta.items())))
        self.shards = [IndexShard(idx, s, cfg, mmap=mmap) for s in range(int(meta["shards"]))]
        if any(s.dim != self.dim for s in self.shards):
            raise GalleryError(f"{gallery_dir}: index dimension differs from gallery.json's "
                               f"{self.dim}")
        self.count = sum(s.count for s in self.shards)
        self.input_cfg = InputConfig.model_validate(self.gallery["input"])
        self._load_metadata()

    def _load_metadata(self) -> None:
        tables = [storage.read_parquet(u, META_COLUMNS) for u in self.gallery["images_tables"]]
        table = pa.concat_tables([t for t in tables if t.num_rows]) if tables else None
        if table is None or table.num_rows == 0:
            raise GalleryError("the gallery's images tables are empty")
        table = table.sort_by("image_id")
        self.meta = table
        self.ids = table.column("image_id").to_numpy()
        self.captions = table.column("caption").to_pylist()

    # ------------------------------------------------------------------ search

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Top-``k`` hits per query row: ``{"id", "score", "caption"}``, best first."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {vectors.shape}; the gallery's "
                             f"dimension is {self.dim}")
        scores, ids = merge_topk([s.search(vectors, k) for s in self.shards], k)
        out = []
        for row_s, row_i in zip(scores, ids):
            keep = row_i != -1
            out.append([{"id": int(i), "score": float(s), "caption": self.caption(int(i))}
                        for s, i in zip(row_s[keep], row_i[keep])])
        return out

    def deduplicate(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``hits`` without near-duplicates (``deduplicate``)."""
        return deduplicate(hits, self.shards)

    def _row(self, image_id: int) -> int | None:
        at = int(np.searchsorted(self.ids, image_id))
        return at if at < len(self.ids) and self.ids[at] == image_id else None

    def caption(self, image_id: int) -> str | None:
        at = self._row(image_id)
        return None if at is None else self.captions[at]

    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        """A JPEG at most ``size`` on its longer side; None for an id not in the gallery or an
        image that can no longer be read."""
        at = self._row(image_id)
        if at is None:
            return None
        row = self.meta.slice(at, 1).to_pylist()[0]
        (raw,) = fetch_bytes_tolerant([row], self.input_cfg)
        try:
            return thumbnail_jpeg(raw, size) if raw else None
        except Exception as e:  # the source changed under the gallery: answer "gone", not a crash
            log.warning("gallery image %s cannot be read back: %s: %s", image_id,
                        type(e).__name__, e)
            return None

    def probe(self) -> None:
        """Raise unless the index answers: one search for a fixed unit vector."""
        q = np.zeros((1, self.dim), np.float32)
        q[0, 0] = 1.0
        hits = self.search(q, 1)
        if not hits[0]:
            raise GalleryError("the gallery index returned no hit")


def deduplicate(hits: list[dict[str, Any]], shards: Sequence[IndexShard],
                threshold: float = DEDUP_THRESHOLD) -> list[dict[str, Any]]:
    """``hits`` (best first) without near-duplicates, as clip-retrieval's ``clip back`` does it:
    hits whose stored vectors have an inner product above ``threshold`` are linked, and of each
    connected group only the best-ranked hit stays."""
    if len(hits) < 2:
        return hits
    ids = [int(h["id"]) for h in hits]
    found: dict[int, np.ndarray] = {}
    for shard in shards:
        found.update(shard.reconstruct([i for i in ids if i not in found]))
    vecs = np.stack([found[i] for i in ids]).astype(np.float32)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    group = list(range(len(hits)))  # union-find; a group's root is its best-ranked hit

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(vecs @ vecs.T > threshold, 1))):
        ra, rb = root(int(a)), root(int(b))
        group[max(ra, rb)] = min(ra, rb)
    return [h for i, h in enumerate(hits) if root(i) == i]


def thumbnail_jpeg(data: bytes, size: int, quality: int = 85) -> bytes:
    """A JPEG at most ``size`` on its longer side. Decoded at no more resolution than that needs
    (JPEG DCT scaling, integer reduction otherwise): a 50-megapixel gallery image costs a
    thumbnail's worth of memory, not a full decode's."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    need_short = max(1, math.ceil(size * min(w, h) / max(w, h, 1)))
    im = Image.fromarray(decode_rgb(data, min_short_side=need_short))
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()
