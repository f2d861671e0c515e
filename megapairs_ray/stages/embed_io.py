"""The embed stage's two ends: a shard reader that feeds it, a writer that stores its output.

The reader streams a shard once more (one sequential read beats thousands of ranged GETs) and
emits only the records ingest accepted, with their ids and captions. The writer stores each space
as ``embeddings/<space>/<shard>/part-<uuid>.parquet`` — ``image_id`` + a fixed-size fp16 list —
and decode failures as embed rejects, then reports how many rows of each shard it wrote, so the
driver can mark a shard finished once every one of its rows is accounted for.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from megapairs_ray.config import InputConfig
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.io.shards import Shard, ShardProblem, read_shard
from megapairs_ray.reasons import Reason

READ_BATCH_ROWS = 256


def read_accepted_images(batch: dict[str, np.ndarray], run_dir: str, input_cfg: InputConfig,
                         rows_per_batch: int = READ_BATCH_ROWS,
                         max_member_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """For each shard row in ``batch``: the ingest-accepted images, with their bytes.

    ``max_member_bytes`` (ingest's ``max_bytes``): members ingest refused for their size are
    skipped from their headers again, not read."""
    for i in range(len(batch["uri"])):
        shard = Shard.from_row({k: batch[k][i] for k in batch})
        accepted = storage.read_parquet(
            layout.images_file(run_dir, shard.slug),
            columns=["image_id", "key", "caption", "format", "mode", "length"]).to_pylist()
        by_key = {r["key"]: r for r in accepted}
        rows: list[dict[str, Any]] = []
        problem: ShardProblem | None = None
        for rec in read_shard(shard, input_cfg, max_member_bytes=max_member_bytes):
            if isinstance(rec, ShardProblem):
                problem = rec
                continue
            if rec.key not in by_key or rec.image is None:
                continue
            meta = by_key.pop(rec.key)
            status, detail = "", ""
            if meta["length"] is not None and len(rec.image) != meta["length"]:
                # Not the bytes ingest checked (the shard was rewritten since): never decoded.
                status, detail = Reason.SOURCE_CHANGED, (
                    f"{len(rec.image)} bytes now, {meta['length']} at ingest")
            rows.append(_row(meta, shard.slug, rec.image, status, detail))
            if len(rows) >= rows_per_batch:
                yield _columns(rows)
                rows = []
        for meta in by_key.values():
            # Accepted at ingest but not readable now: an embed reject with the reason, so the
            # shard's count still adds up and nothing vanishes.
            if problem is not None:
                status, detail = problem.reason, f"not reached: {problem.detail}"
            else:
                status, detail = Reason.SOURCE_CHANGED, "record no longer in the shard"
            rows.append(_row(meta, shard.slug, b"", status, detail))
        if rows:
            yield _columns(rows)


def _row(meta: dict[str, Any], slug: str, image: bytes, status: str, detail: str,
         ) -> dict[str, Any]:
    return {"image_id": meta["image_id"], "shard": slug, "image": image,
            "caption": meta["caption"], "format": meta["format"], "mode": meta["mode"],
            "status": status, "detail": detail}


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image_id": np.array([r["image_id"] for r in rows], dtype=np.int64),
        "shard": np.array([r["shard"] for r in rows], dtype=object),
        "image": np.array([r["image"] for r in rows], dtype=object),
        "caption": np.array([r["caption"] for r in rows], dtype=object),
        "format": np.array([r["format"] for r in rows], dtype=object),
        "mode": np.array([r["mode"] for r in rows], dtype=object),
        "status": np.array([r["status"] for r in rows], dtype=object),
        "detail": np.array([r["detail"] for r in rows], dtype=object),
    }


def embedding_table(ids: np.ndarray, vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1), type=pa.float16())
    return pa.table({"image_id": pa.array(ids, type=pa.int64()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})


def write_embeddings(batch: dict[str, np.ndarray], run_dir: str,
                     image_spaces: Sequence[str], text_spaces: Sequence[str] = (),
                     stage: str = "embed") -> dict[str, Any]:
    """Write one batch of embed output; return per-shard counts of the rows it accounted for.

    ``image_spaces`` are columns every accepted row has; ``text_spaces`` are columns only rows
    with ``has_text`` have (captions). The gallery job writes its one ``retriever`` space the
    same way, with no text space."""
    shards = batch["shard"]
    status = batch["status"]
    out: dict[str, list[Any]] = {"shard": [], "rows": [], "embedded": [], "texts": [],
                                 "rejected": [], "reasons": []}
    for slug in sorted(set(shards.tolist())):
        sel = shards == slug
        ok = sel & (status == "")
        bad = sel & (status != "")
        # Named by content: a retried writer task rewrites the same file instead of adding a
        # second copy of the same rows.
        ids_bytes = np.sort(batch["image_id"][sel]).tobytes()
        part = f"part-{hashlib.blake2b(ids_bytes, digest_size=12).hexdigest()}.parquet"
        if ok.any():
            ids = batch["image_id"][ok]
            for space in image_spaces:
                storage.write_parquet(
                    storage.join(layout.embeddings_shard_dir(run_dir, space, slug), part),
                    embedding_table(ids, batch[space][ok]))
        # Rows with a caption; an encoder with no text space (the gallery's) sends no column.
        text = ok & batch["has_text"].astype(bool) if "has_text" in batch else ok & False
        if text.any():
            for space in text_spaces:
                storage.write_parquet(
                    storage.join(layout.embeddings_shard_dir(run_dir, space, slug), part),
                    embedding_table(batch["image_id"][text], batch[space][text]))
        if bad.any():
            rejects = [reject_row(stage, slug, [int(i)], str(r), str(d))
                       for i, r, d in zip(batch["image_id"][bad], status[bad],
                                          batch["detail"][bad])]
            write_rejects(storage.join(layout.rejects_dir(run_dir, stage), f"{slug}-{part}"),
                          rejects)
        out["shard"].append(slug)
        out["rows"].append(int(sel.sum()))
        out["embedded"].append(int(ok.sum()))
        out["texts"].append(int(text.sum()))
        out["rejected"].append(int(bad.sum()))
        out["reasons"].append(json.dumps(Counter(str(r) for r in status[bad])))
    return {k: np.array(v) for k, v in out.items()}


def load_space(run_dir: str, space: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], vectors float16 [N, D]) of one space — for small runs and checks; at
    scale the index stage streams the parts instead."""
    return embedding_matrix(layout.embeddings_dir(run_dir, space))


def embedding_matrix(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, fp16 vectors) of every embeddings part under ``uri``."""
    table = storage.read_parquet_dir(uri)
    if table is None:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float16)
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table.column("image_id").to_numpy(), vectors
