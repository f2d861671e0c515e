"""The retriever as a Ray Serve application: ingress → query encoder → gallery search.

    Ingress (FastAPI: routes, limits, auth; ``api.create_api``)
      ├─ QueryEncoder.encode   @serve.batch: composed, image-only and text-only queries share a
      │                        batch; one image-tower and one text-tower pass per batch
      └─ GallerySearch.search  @serve.batch: one index search per batch with the largest k,
                               sliced per request

The deployments are thin: the work is ``RetrieverEncoder`` and ``GallerySearcher``, plain
classes that tests and benchmarks call without Serve. Each batched method takes one request
object positionally (Ray takes the keyword names of a whole batch from its first request), and
a failure that belongs to one request is returned to that request, never raised for the batch.

``build_app(args)`` is the application builder named by the serve config file's
``import_path``; ``args`` are validated as ``ServeAppConfig``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from megapairs_ray.serve.api import ApiError, Query, create_api
from megapairs_ray.serve.config import ServeAppConfig, app_config
from megapairs_ray.serve.gallery import read_gallery


@serve.deployment
class QueryEncoder:
    def __init__(self, checkpoint: str, section: dict[str, Any]) -> None:
        import torch

        from megapairs_ray.models.retriever import RetrieverEncoder
        from megapairs_ray.serve.config import QueryEncoderSection

        cfg = QueryEncoderSection.model_validate(section)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.encoder = RetrieverEncoder(checkpoint, device=cfg.device, precision=cfg.precision,
                                        batch_size=cfg.max_batch_size, threads=4)
        self.encode.set_max_batch_size(cfg.max_batch_size)
        self.encode.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def encode(self, queries: list[Query]) -> list[np.ndarray | ApiError]:
        return await asyncio.to_thread(self._encode, queries)

    def _encode(self, queries: list[Query]) -> list[np.ndarray | ApiError]:
        from megapairs_ray.models.retriever import UndecodableImage

        try:
            return list(self.encoder.queries([q.image for q in queries],
                                             [q.text for q in queries]))
        except UndecodableImage:
            # An image that passed the ingress's header checks but not a full decode: answer
            # each query on its own, so only that request fails.
            out: list[np.ndarray | ApiError] = []
            for q in queries:
                try:
                    out.append(self.encoder.queries([q.image], [q.text])[0])
                except UndecodableImage as e:
                    out.append(ApiError(422, "image_corrupt_image", f"the image is refused: {e}"))
            return out

    def check_health(self) -> None:
        vector = self.encoder.queries([None], ["health check"])
        if not np.isfinite(vector).all():
            raise RuntimeError("the query encoder returns non-finite embeddings")


@serve.deployment
class GallerySearch:
    def __init__(self, gallery_dir: str, section: dict[str, Any]) -> None:
        from megapairs_ray.serve.config import SearchSection
        from megapairs_ray.serve.search import GallerySearcher

        cfg = SearchSection.model_validate(section)
        import faiss

        faiss.omp_set_num_threads(cfg.faiss_threads)
        self.searcher = GallerySearcher(gallery_dir, nprobe=cfg.nprobe,
                                        hnsw_ef_search=cfg.hnsw_ef_search, mmap=cfg.mmap,
                                        local_cache_dir=cfg.local_cache_dir)
        self.search.set_max_batch_size(cfg.max_batch_size)
        self.search.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def search(self, requests: list[tuple[np.ndarray, int]],
                     ) -> list[list[dict[str, Any]]]:
        # One search with the largest k of the batch, each request sliced to its own k.
        k = max(k for _, k in requests)
        vectors = np.stack([v for v, _ in requests])
        hits = await asyncio.to_thread(self.searcher.search, vectors, k)
        return [row[:k_] for row, (_, k_) in zip(hits, requests)]

    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        return self.searcher.thumbnail(image_id, size)

    def info(self) -> dict[str, Any]:
        return {"images": self.searcher.count, "dim": self.searcher.dim}

    def check_health(self) -> None:
        self.searcher.probe()


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP front: ``api.create_api`` over the two deployments' handles."""

    def __init__(self, encoder: DeploymentHandle, searcher: DeploymentHandle,
                 args: dict[str, Any], dim: int) -> None:
        self.cfg: ServeAppConfig = app_config(args)
        self.encoder, self.searcher, self.dim = encoder, searcher, dim

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.cfg, self)

    async def embed(self, query: Query) -> np.ndarray:
        out = await self.encoder.encode.remote(query)
        if isinstance(out, ApiError):
            raise out
        return out

    async def search(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        return await self.searcher.search.remote((vector, k))

    async def thumbnail(self, image_id: int) -> bytes | None:
        return await self.searcher.thumbnail.remote(image_id, self.cfg.limits.thumbnail_size)

    async def health(self) -> dict[str, Any]:
        # A real round trip through both deployments, not just "the ingress is up".
        info = await self.searcher.info.remote()
        vector = await self.embed(Query(image=None, text="health check"))
        hits = await self.search(vector, 1)
        return {**info, "probe_hits": len(hits)}


def build_app(args: dict[str, Any]) -> Any:
    """The application builder (``import_path: megapairs_ray.serve.app:build_app``)."""
    cfg = app_config(args)
    gallery = read_gallery(cfg.gallery_dir)
    checkpoint = cfg.checkpoint or gallery["checkpoint"]
    encoder = QueryEncoder.options(**cfg.query_encoder.options()).bind(
        checkpoint, cfg.query_encoder.model_dump())
    searcher = GallerySearch.options(**cfg.search.options()).bind(
        cfg.gallery_dir, cfg.search.model_dump())
    return Ingress.options(**cfg.ingress.options()).bind(
        encoder, searcher, cfg.model_dump(mode="json"), int(gallery["dim"]))
