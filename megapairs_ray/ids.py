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
