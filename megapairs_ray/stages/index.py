"""FAISS indexes per embedding space, sharded by image-id range, and exact top-k merging.

Vectors are L2-normalised, so inner product is cosine similarity. Every shard of a space shares
one trained index (the IVF coarse quantizer and PQ codebooks are trained once on a sample, then
each shard adds its own vectors), so shards answer on the same scale and their top-k lists merge
exactly as one index over all vectors would: for exact (flat) search, identically.

Ties. One total order is used everywhere: score descending, then id ascending. FAISS breaks equal
scores by insertion order and a GPU top-k arbitrarily, and real data ties exactly (identical
images, identical captions: the bundled corpus has 74 images sharing one caption), so a shard
fetches more than k candidates and grows the fetch until the last one scores strictly below the
k-th — the whole tie group at the k-th score is then in hand — and returns its first k in that
order. Any member of the global top-k is within the top-k of its own shard in the same order, so
``merge_topk`` over the shards equals one index, whatever the sharding and insertion order. This
holds when a score is a function of the (query, vector) pair alone: measured so for FAISS 1.15's
CPU flat / HNSW / IVF-Flat kernels (OpenBLAS), whatever the shard size, position in the shard,
query batch size or thread count (tests/test_index.py checks it on the machine it runs on). The
torch GPU path re-scores its fp16 candidates with elementwise float64 products and a fixed
summation tree, so its scores are by construction independent of shapes and positions, and it
fetches with a slack that absorbs fp16 rounding differences (``FP16_SLACK``; not yet measured on
a GPU). HNSW is searched with efSearch raised to the fetch size.

Ids are 64-bit hashes, uniform over the int64 range, so equal id ranges give balanced shards and
a shard is known from an id alone.

``device: cuda`` with ``kind: flat`` searches with a torch fp16 GEMM + top-k on the GPU for
candidates, re-scored exactly (no faiss-gpu needed); with faiss-gpu present, the FAISS index
itself is moved to the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from megapairs_ray.config import IndexConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Candidates fetched beyond k at first: a row whose last candidate scores strictly below its k-th
# is complete; a row still tied there is fetched again with twice as many.
TIE_MARGIN = 16
# Candidate rows x columns held at once while tie groups are grown.
GROW_BUDGET = 1 << 22
# The GPU path's fp16 candidate scores may round differently by a few fp16 steps (2^-11 near 1)
# for one pair wherever its vector sits: its fetch is complete only when the last candidate is
# this far (x |q| x the largest |v|) below every kept one.
FP16_SLACK = 2.0**-9
# Vectors copied to the GPU at a time when a shard loads there.
LOAD_CHUNK = 1 << 18


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
    # ``np``: no polysemous training. FAISS otherwise reorders each sub-quantizer's codes by
    # simulated annealing so that Hamming distances between codes approximate real ones, which
    # only a polysemous search (``polysemous_ht``) reads, and ours never sets it. Training
    # with it took 13 s against 0.5 s for 4,000 vectors of 32 dims (IVF32,PQ8x8), with the
    # same neighbours. The refine index holds every vector as fp16 (FAISS's ``SQfp16``):
    # lossless for the embed stage's fp16 vectors, so refined scores are exact inner products
    # of the stored vectors, at half ``RFlat``'s bytes.
    return f"IVF{nlist},PQ{cfg.pq_m}x{cfg.pq_nbits}np" + (",Refine(SQfp16)" if cfg.pq_refine
                                                           else "")


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


def mmap_flags(faiss: Any, cfg: IndexConfig) -> int:
    """What a memory-mapped shard leaves on disk: its largest part. IVF lists map with
    IO_FLAG_MMAP, flat codes (flat, HNSW storage, IVF-PQ's fp16 refine vectors) with
    IO_FLAG_MMAP_IFC; FAISS 1.15 refuses an IVF index asked for both, so a refined IVF-PQ maps its
    refine vectors (2·d bytes a vector) and holds its PQ lists (pq_m bytes) in memory."""
    if cfg.kind == "ivf_pq" and cfg.pq_refine:
        return faiss.IO_FLAG_MMAP_IFC
    if cfg.kind.startswith("ivf"):
        return faiss.IO_FLAG_MMAP
    return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC


class IndexShard:
    """One shard, loaded once, searched many times (a Ray actor holds one of these)."""

    def __init__(self, index_dir: str, shard: int, cfg: IndexConfig, mmap: bool = False,
                 local_cache_dir: str | None = None) -> None:
        """``mmap``: map a local shard file instead of reading it into memory: the bulk of the
        shard (IVF lists, flat codes, IVF-PQ's fp16 refine vectors) stays on disk, paged in by
        the OS, so a service's replicas on one node share it through the page cache and a
        mining actor's own memory is the small part alone. A shard on s3 is first copied to
        ``local_cache_dir`` (without one, it cannot be mapped)."""
        import faiss

        uri = shard_uri(index_dir, shard)
        if not storage.exists(uri):
            raise IndexStageError(f"index shard missing: {uri}")
        if mmap and storage.is_remote(uri):
            if local_cache_dir is None:
                raise IndexStageError(f"cannot memory-map {uri}: copy the index to local disk")
            uri = storage.local_copy(uri, local_cache_dir, storage.folder_version(uri),
                                     file=True)
        try:
            if mmap:
                flags = mmap_flags(faiss, cfg) | faiss.IO_FLAG_READ_ONLY
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
        if hasattr(faiss, "StandardGpuResources"):
            self.index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
            return
        if self.cfg.kind != "flat":
            raise IndexStageError("index.device=cuda without faiss-gpu supports only kind=flat")
        self._load_torch("cuda")

    def _load_torch(self, device: str) -> None:
        """Hold the shard's vectors (fp16) and ids as torch tensors on ``device`` and search
        there (``cuda`` in production; tests run the same code on ``cpu``)."""
        import faiss
        import torch

        # In chunks: host memory holds one chunk's fp32 copy, never the shard's (a memory-mapped
        # flat shard is read from the page cache).
        vecs = torch.empty((self.count, self.dim), dtype=torch.float16, device=device)
        norm = 0.0
        for lo in range(0, self.count, LOAD_CHUNK):
            part = self.index.index.reconstruct_n(lo, min(LOAD_CHUNK, self.count - lo))
            vecs[lo : lo + len(part)] = torch.from_numpy(part).to(device, torch.float16)
            norm = max(norm, float(np.linalg.norm(part, axis=1).max()))
        ids = faiss.vector_to_array(self.index.id_map)
        self._gpu = (vecs, torch.from_numpy(ids).to(device))
        self._gpu_norm = norm

    def reconstruct(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The stored vectors of those of ``ids`` this shard holds (a refined IVF-PQ shard's are
        its exact fp16 refine vectors; an unrefined one's, its decoded codes). The IVF direct
        map is built on first use."""
        import faiss

        out: dict[int, np.ndarray] = {}
        for i in map(int, ids):
            try:
                out[i] = self.index.reconstruct(i)
            except RuntimeError as e:
                if "not found" in str(e):  # IndexIDMap2: the id lives in another shard
                    continue
                if "direct map not initialized" not in str(e):
                    raise
                faiss.extract_index_ivf(faiss.downcast_index(self.index.index)).make_direct_map()
                out[i] = self.index.reconstruct(i)
        return out

    def shape(self) -> tuple[int, int]:
        """(dimension, vectors): checked against the index metadata when the actor starts."""
        return self.dim, self.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each [nq, min(k, shard size)]: the shard's first k by score descending,
        then id ascending (``merge_topk``'s order, so merged shards equal one index). A row an
        approximate kind fills short ends with id -1, score -inf."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexStageError(f"queries have shape {queries.shape}, the index dimension is "
                              f"{self.dim}")
        k = min(k, self.count)
        if k == 0:
            return (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
        fetch = self._fetch_torch if self._gpu is not None else self._fetch_faiss
        return topk_whole_ties(fetch, queries, k, self.count)

    def _fetch_faiss(self, queries: np.ndarray, m: int, k: int,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        params = None
        if self.cfg.kind == "hnsw" and m > self.cfg.hnsw_ef_search:
            import faiss  # HNSW returns at most efSearch hits: FAISS does not raise it to k

            params = faiss.SearchParametersHNSW(efSearch=m)
        scores, ids = self.index.search(queries, m, params=params)
        return order_and_check(scores, scores, ids, k, exhausted=m >= self.count)

    def _fetch_torch(self, queries: np.ndarray, m: int, k: int,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fp16 GEMM + top-m for candidates, re-scored exactly (``exact_scores_torch``), ordered
        and checked on the device (complete when the last candidate's fp16 score is
        ``FP16_SLACK`` below every kept one's); query chunks bound the score matrix to ~2 GB and
        the re-scoring's float64 products to ~1 GB."""
        import torch

        vecs, ids = self._gpu
        chunk = max(1, min(len(queries), (1 << 30) // max(1, self.count),
                           (1 << 27) // (m * self.dim)))
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for i in range(0, len(queries), chunk):
            q = torch.from_numpy(queries[i : i + chunk]).to(vecs.device)
            approx, cand = torch.topk(q.half() @ vecs.T, m, dim=1)  # sorted, best first
            exact = exact_scores_torch(q, vecs[cand])
            cid = ids[cand]
            by_id = torch.argsort(cid, dim=1, stable=True)
            order = by_id.gather(1, torch.argsort(exact.gather(1, by_id), dim=1,
                                                  descending=True, stable=True))
            s, a = exact.gather(1, order), approx.float().gather(1, order)
            kept = torch.where(s >= s[:, k - 1 : k], a, torch.inf).amin(dim=1)
            slack = FP16_SLACK * self._gpu_norm * torch.linalg.vector_norm(q, dim=1)
            done = ~(approx[:, -1].float() + slack >= kept) | (m >= self.count)
            out.append((s[:, :k].cpu().numpy(), cid.gather(1, order)[:, :k].cpu().numpy(),
                        done.cpu().numpy()))
        return (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]),
                np.concatenate([o[2] for o in out]))


# (queries [n, d], m candidates, k) -> (scores [n, k], ids [n, k], done [n])
Fetch = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def topk_whole_ties(fetch: Fetch, queries: np.ndarray, k: int, count: int,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k by (score desc, id asc), fetching m = k + ``TIE_MARGIN`` candidates,
    then twice as many for the rows ``fetch`` reports incomplete (a tie, or an approximate
    score, reaching the last candidate), up to all ``count`` vectors."""
    nq = len(queries)
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    todo = np.arange(nq)
    m = min(count, k + TIE_MARGIN)
    while len(todo):
        chunk = max(1, GROW_BUDGET // m)
        again = []
        for lo in range(0, len(todo), chunk):
            rows = todo[lo : lo + chunk]
            s, i, done = fetch(queries[rows], m, k)
            out_s[rows[done]], out_i[rows[done]] = s[done], i[done]
            again.append(rows[~done])
        todo = np.concatenate(again)
        m = min(count, 2 * m)
    return out_s, out_i


def order_and_check(approx: np.ndarray, exact: np.ndarray, ids: np.ndarray, k: int,
                    exhausted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates [n, m] (``approx``: the scores they were fetched by, best first; ``exact``: the
    scores they rank by) -> the first k by (exact desc, id asc), and whether each row is
    complete: every candidate kept there was fetched with a score strictly above the last
    fetched one, so nothing left unfetched can tie with or beat them. A row the index filled
    short (id -1) has nothing left to fetch."""
    exact = np.where(ids == -1, -np.inf, exact).astype(np.float32)
    order = np.broadcast_to(np.arange(exact.shape[1]), exact.shape).copy()
    unsorted = ~(exact[:, 1:] < exact[:, :-1]).all(axis=1)  # a tie, a pad, or not best first
    if unsorted.any():
        order[unsorted] = np.lexsort((ids[unsorted], -exact[unsorted]), axis=1)
    s = np.take_along_axis(exact, order, 1)
    a = np.take_along_axis(approx, order, 1)
    kept = np.where(s >= s[:, k - 1 : k], a, np.inf).min(axis=1)
    done = ~(approx[:, -1] >= kept) | (ids[:, -1] == -1) | exhausted
    return s[:, :k], np.take_along_axis(ids, order, 1)[:, :k], done


def exact_scores_torch(q: Any, x: Any) -> Any:
    """[n, d] float32 queries . [n, m, d] candidates -> [n, m] float32: float64 products (exact
    for fp16/fp32 inputs) summed by a fixed pairwise tree of elementwise adds, so a score
    depends on the two vectors alone — never on the tensor's shape or the candidate's position
    (a GEMM kernel's reduction order may)."""
    import torch

    p = q.double()[:, None, :] * x.double()
    width = 1 << max(0, p.shape[-1] - 1).bit_length()
    if width != p.shape[-1]:
        p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        p = p[..., :half] + p[..., half:]
    return p[..., 0].float()


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k: by score, ties by id. Exact when each
    shard's list is its own first k in that order (``IndexShard.search``), whatever the ties.

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
