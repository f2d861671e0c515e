"""Clustered synthetic embeddings: the shape real neighbour structure has, unlike uniform noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megapairs_ray.config import RunConfig
from megapairs_ray.io import layout, storage
from megapairs_ray.pipeline.embed import EMBED
from megapairs_ray.pipeline.ingest import INGEST
from megapairs_ray.stages.embed_io import embedding_table


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-(2**63), 2**63 - 1, n, dtype=np.int64)


def write_space(run_dir: Path | str, space: str, ids: np.ndarray, vectors: np.ndarray,
                slugs: list[str]) -> None:
    """Write vectors in the embed stage's layout, split evenly over ``slugs``."""
    for slug, part in zip(slugs, np.array_split(np.arange(len(ids)), len(slugs))):
        storage.write_parquet(
            storage.join(layout.embeddings_shard_dir(str(run_dir), space, slug),
                         "part-0.parquet"),
            embedding_table(ids[part], vectors[part].astype(np.float16)))


def mark_embedded(cfg: RunConfig, slugs: list[str]) -> None:
    """The books of finished ingest and embed stages, as they keep them (index and mine read
    them before trusting the embeddings)."""
    INGEST.state(cfg).reconcile([])
    state = EMBED.state(cfg)
    state.reconcile([])
    for slug in slugs:
        state.mark_done(slug, {})
