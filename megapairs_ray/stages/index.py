"""FAISS indexes per embedding space, sharded by image-id range, and exact top-k merging.

Vectors are L2-normalised, so inner product is cosine similarity. Every shard of a space shares
one trained index (the IVF coarse quantizer and PQ codebooks are trained once on a sample, then
each shard adds its own vectors), so shards answer on the same scale and their top-k lists merge
exactly as one index over all vectors would: for exact (flat) search, identically.

Ids are 64-bit hashes, uniform over the int64 range, so equal id ranges give balanced shards and
a shard is known from an id alone.

``device: cuda`` with ``kind: flat`` searches with a torch GEMM + top-k on the GPU (no faiss-gpu
needed); with faiss-gpu present, the FAISS index itself is moved to the GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from megapairs_ray.config import IndexConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class IndexStageError(MegapairsError, RuntimeError):
    """An index that cannot be built, loaded or searched as asked; the message says why."""


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """Shard number of each id: equal ranges of the int64 space."""
    if shards == 1:
        return np.zeros(len(ids), dtype=np.int64)
    offset = ids.astype(np.int64).view(np.uint64) ^ np.uint64(1 << 63)  # order-preserving
    return (offset // np.uint64(-(-(2**64) // shards))).astype(np.int64)


def id_range(shard: int, shards: int) -> tuple[int, int]:
    width = -(-(2**64) // shards)
    lo = shard * width - 2**63
    return lo, min(lo + width - 1, INT64_MAX)


def factory_string(cfg: IndexConfig, dim: int, n: int) -> str:
    if cfg.kind == "flat":
        return "Flat"
    if cfg.kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    nlist = cfg.nlist or max(1, int(4 * math.sqrt(max(n, 1))))
    if cfg.kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if dim % cfg.pq_m:
        raise IndexStageError(f"index.pq_m={cfg.pq_m} must divide the dimension {dim}")
    return f"IVF{nlist},PQ{cfg.pq_m}x{cfg.pq_nbits}" + (",RFlat" if cfg.pq_refine else "")


def clean_vectors(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """(ids, float32 vectors) of the finite rows, and the ids of the rows dropped (NaN/inf)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    return ids[finite], np.ascontiguousarray(vectors[finite]), ids[~finite]


def train_index(cfg: IndexConfig, sample: np.ndarray, n_total: int) -> bytes:
    """An empty index of the configured kind, trained on ``sample``; serialized."""
    import faiss

    if sample.ndim != 2 or sample.shape[1] == 0:
        raise IndexStageError("cannot size an index from an empty sample")
    dim = sample.shape[1]
    spec = factory_string(cfg, dim, n_total)
    base = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained and len(sample) == 0:
        raise IndexStageError(f"no finite training vectors for a {spec} index")
    if cfg.kind == "hnsw":
        faiss.downcast_index(base).hnsw.efConstruction = cfg.hnsw_ef_construction
    if not base.is_trained:
        nlist = faiss.extract_index_ivf(base).nlist
        if len(sample) < nlist:
            raise IndexStageError(f"{len(sample)} training vectors for {nlist} IVF lists; lower "
                              "index.nlist or raise index.train_sample")
        base.train(np.ascontiguousarray(sample, dtype=np.float32))
    index = faiss.IndexIDMap2(base)
    return faiss.serialize_index(index).tobytes()


def build_shard(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> Any:
    """The trained empty index with this shard's vectors added."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if vectors.shape[1] != index.d:
        raise IndexStageError(f"vectors have dimension {vectors.shape[1]}, the index {index.d}")
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                           np.ascontiguousarray(ids, dtype=np.int64))
    return index


@dataclass
class ShardMeta:
    space: str
    shard: int
    shards: int
    kind: str
    factory: str
    dim: int
    count: int
    id_lo: int
    id_hi: int


def shard_uri(index_dir: str, shard: int) -> str:
    return storage.join(index_dir, f"shard-{shard:04d}.faiss")


def save_shard(index_dir: str, index: Any, meta: ShardMeta) -> None:
    import faiss

    with storage.open_atomic(shard_uri(index_dir, meta.shard)) as f:
        f.write(faiss.serialize_index(index).tobytes())
    storage.write_json(storage.join(index_dir, f"shard-{meta.shard:04d}.json"), asdict(meta))


def read_meta(index_dir: str) -> dict[str, Any]:
    uri = storage.join(index_dir, "index.json")
    if not storage.exists(uri):
        raise IndexStageError(f"no index at {index_dir} (index.json missing): run the index stage")
    return storage.read_json(uri)


class IndexShard:
    """One shard, loaded once, searched many times (a Ray actor holds one of these)."""

    def __init__(self, index_dir: str, shard: int, cfg: IndexConfig, mmap: bool = False,
                 ) -> None:
        """``mmap``: map a local shard file instead of reading it into memory (IVF lists and
        flat codes stay on disk, paged in by the OS: a service's replicas on one node share
        them through the page cache)."""
        import faiss

        uri = shard_uri(index_dir, shard)
        if not storage.exists(uri):
            raise IndexStageError(f"index shard missing: {uri}")
        if mmap and storage.is_remote(uri):
            raise IndexStageError(f"cannot memory-map {uri}: copy the index to local disk")
        try:
            if mmap:
                flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
                self.index = faiss.read_index(storage.filesystem(uri)[1], flags)
            else:
                fs, path = storage.filesystem(uri)
                with fs.open(path, "rb") as f:
                    data = f.read()
                self.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except Exception as e:  # FAISS raises RuntimeError with its own text
            raise IndexStageError(f"index shard {uri} is corrupt: {e}") from None
        self.dim = self.index.d
        self.count = self.index.ntotal
        self.cfg = cfg
        self._tune(faiss)
        self._gpu = None
        if cfg.device == "cuda":
            self._to_gpu(faiss)

    def _tune(self, faiss: Any) -> None:
        inner = faiss.downcast_index(self.index.index)
        if self.cfg.kind in ("ivf_flat", "ivf_pq"):
            faiss.extract_index_ivf(inner).nprobe = self.cfg.nprobe
        if self.cfg.kind == "ivf_pq" and self.cfg.pq_refine:
            inner.k_factor = self.cfg.pq_refine_k_factor  # re-rank k x factor PQ candidates
        if self.cfg.kind == "hnsw":
            inner.hnsw.efSearch = self.cfg.hnsw_ef_search

    def _to_gpu(self, faiss: Any) -> None:
        import torch

        if hasattr(faiss, "StandardGpuResources"):
            self.index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
            return
        if self.cfg.kind != "flat":
            raise IndexStageError("index.device=cuda without faiss-gpu supports only kind=flat")
        vectors = self.index.index.reconstruct_n(0, self.count)
        ids = faiss.vector_to_array(self.index.id_map)
        self._gpu = (torch.from_numpy(vectors).to("cuda", torch.float16),
                     torch.from_numpy(ids).to("cuda"))

    def shape(self) -> tuple[int, int]:
        """(dimension, vectors): checked against the index metadata when the actor starts."""
        return self.dim, self.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [nq, k'] with k' = min(k, shard size); -1 ids never returned."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexStageError(f"queries have shape {queries.shape}, the index dimension is "
                              f"{self.dim}")
        k = min(k, self.count)
        if k == 0:
            return (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
        if self._gpu is not None:
            return self._search_gpu(queries, k)
        return self.index.search(queries, k)

    def _search_gpu(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """fp16 GEMM + top-k for candidates, re-scored in fp32 so scores near a window edge are
        not rounded across it; query chunks bound the score matrix to ~2 GB."""
        import torch

        vecs, ids = self._gpu
        extra = min(self.count, k + 16)
        chunk = max(1, min(len(queries), (1 << 30) // max(1, self.count)))
        out_s, out_i = [], []
        for i in range(0, len(queries), chunk):
            q = torch.from_numpy(queries[i : i + chunk]).to("cuda")
            _, cand = torch.topk(q.half() @ vecs.T, extra, dim=1)
            exact = torch.einsum("qd,qcd->qc", q, vecs[cand].float())
            scores, order = torch.topk(exact, k, dim=1)
            out_s.append(scores.cpu().numpy())
            out_i.append(ids[torch.gather(cand, 1, order)].cpu().numpy())
        return np.concatenate(out_s), np.concatenate(out_i)


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k: by score, ties by id.

    Entries with id -1 (FAISS's "no result") are dropped; rows shorter than ``k`` are padded
    with score -inf and id -1, which callers skip.
    """
    scores = np.concatenate([r[0] for r in results], axis=1).astype(np.float32)
    ids = np.concatenate([r[1] for r in results], axis=1).astype(np.int64)
    scores = np.where(ids == -1, -np.inf, scores)  # ids are hashes: only -1 is "none"
    # lexsort: last key is primary. Highest score first, then smallest id.
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    top_s = np.take_along_axis(scores, order, axis=1)
    top_i = np.take_along_axis(ids, order, axis=1)
    top_i = np.where(np.isfinite(top_s), top_i, -1)
    if top_s.shape[1] < k:
        pad = k - top_s.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s, top_i
