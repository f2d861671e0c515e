"""Where each stage's output lives inside a run directory (local or s3://)."""

from __future__ import annotations

from megapairs_ray.config import SPACE_NAMES
from megapairs_ray.io import storage

SPACES = SPACE_NAMES


def images_file(run_dir: str, slug: str) -> str:
    return storage.join(run_dir, "images", f"{slug}.parquet")


def ingest_marker(run_dir: str, slug: str) -> str:
    return storage.join(run_dir, "images", "_done", f"{slug}.json")


def rejects_dir(run_dir: str, stage: str) -> str:
    return storage.join(run_dir, "rejects", stage)


def rejects_file(run_dir: str, stage: str, name: str) -> str:
    return storage.join(rejects_dir(run_dir, stage), f"{name}.parquet")


def embeddings_dir(run_dir: str, space: str) -> str:
    return storage.join(run_dir, "embeddings", space)


def embeddings_shard_dir(run_dir: str, space: str, slug: str) -> str:
    return storage.join(embeddings_dir(run_dir, space), slug)


def embed_marker(run_dir: str, slug: str) -> str:
    return storage.join(run_dir, "embeddings", "_done", f"{slug}.json")
