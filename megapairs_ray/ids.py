"""Stable 64-bit image ids.

An id is a hash of the shard's path *relative to its corpus root* and the record's key inside the
shard, so the same corpus copied from a laptop folder to s3 keeps its ids, while two records never
share one unless they are the same record of the same shard. blake2b is stable across processes
and Python versions (``hash()`` is not).
"""

from __future__ import annotations

import hashlib

import numpy as np


def image_id(source: str, key: str) -> int:
    """Signed 64-bit id (parquet and Arrow have no unsigned default integer type)."""
    digest = hashlib.blake2b(f"{source}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def image_ids(source: str, keys: list[str]) -> np.ndarray:
    return np.fromiter((image_id(source, k) for k in keys), dtype=np.int64, count=len(keys))


def held_out(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which images a seeded split holds out: a hash of (seed, id) below ``fraction``. The same
    id is on the same side in every job and process, so a held-out image never reaches
    training by any route (captions, triplets, hard negatives)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty(len(ids), dtype=bool)
    for i, v in enumerate(ids.tolist()):
        digest = hashlib.blake2b(f"{seed}\x00{v}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64 < fraction
    return out


def id_of_path(path: str) -> int:
    """The image id of an annotated image path: the export names each image by its id
    (``images/00007/<16 hex digits>.jpg``); any other path is hashed like a key."""
    stem = path.rsplit("/", 1)[-1].split(".", 1)[0]
    if len(stem) == 16:
        try:
            return int.from_bytes(int(stem, 16).to_bytes(8, "big"), "big", signed=True)
        except ValueError:
            pass
    return image_id("", path)
