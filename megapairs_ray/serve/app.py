"""The retriever as a Ray Serve application, in one of two layouts (``layout`` in the args).

colocated (a gallery that fits one replica):

    Colocated (FastAPI routes; ``api.create_api``)
      └─ answer   @serve.batch: the batch's queries encoded in one pass (composed, image-only
                  and text-only together), then one index search with the largest k

split (an index sharded across replicas):

    Ingress (FastAPI routes)
      ├─ QueryEncoder.encode   @serve.batch: one image-tower and one text-tower pass per batch
      └─ GallerySearch.search  @serve.batch: one index search per batch with the largest k,
                               sliced per request

The deployments are thin: the work is ``serve.engine``'s functions over ``RetrieverEncoder``
and ``GallerySearcher``, plain code that tests and benchmarks call without Serve. Each batched
method takes one request object positionally (Ray takes the keyword names of a whole batch from
its first request), and a failure that belongs to one request is returned to that request,
never raised for the batch.

``build_app(args)`` is the application builder named by the serve config file's
``import_path``; ``args`` are validated as ``ServeAppConfig``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from megapairs_ray.models.family import CLIP_PIXELS_FORM, family_of
from megapairs_ray.serve import engine
from megapairs_ray.serve.api import ApiError, Query, SearchCall, create_api
from megapairs_ray.serve.config import SearchSection, ServeAppConfig, app_config
from megapairs_ray.serve.gallery import footprint_bytes, read_gallery

log = logging.getLogger(__name__)


def _load_encoder(checkpoint: str, section: Any) -> Any:
    import torch

    from megapairs_ray.models.retriever import RetrieverEncoder

    if section.torch_threads:
        torch.set_num_threads(section.torch_threads)
    return RetrieverEncoder(checkpoint, device=section.device, precision=section.precision,
                            batch_size=section.max_batch_size, threads=4)


def _load_searcher(gallery_dir: str, cfg: SearchSection) -> Any:
    import faiss

    from megapairs_ray.serve.search import GallerySearcher

    faiss.omp_set_num_threads(cfg.faiss_threads)
    return GallerySearcher(gallery_dir, nprobe=cfg.nprobe, hnsw_ef_search=cfg.hnsw_ef_search,
                           mmap=cfg.mmap, local_cache_dir=cfg.local_cache_dir)


def _answered(out: Any) -> Any:
    if isinstance(out, ApiError):
        raise out
    return out


@serve.deployment
@serve.ingress()
class Colocated:
    """The routes, the query encoder and the whole index in one replica."""

    def __init__(self, checkpoint: str, args: dict[str, Any]) -> None:
        self.cfg: ServeAppConfig = app_config(args)
        section = self.cfg.colocated
        self.encoder = _load_encoder(checkpoint, section)
        self.searcher = _load_searcher(self.cfg.gallery_dir, self.cfg.search)
        self.dim = self.searcher.dim
        self.answer.set_max_batch_size(section.max_batch_size)
        self.answer.set_batch_wait_timeout_s(section.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.cfg, self)

    @serve.batch
    async def answer(self, calls: list[SearchCall]) -> list[list[dict[str, Any]] | ApiError]:
        return await asyncio.to_thread(engine.answer, self.encoder, self.searcher, calls)

    async def search(self, call: SearchCall) -> list[dict[str, Any]]:
        return _answered(await self.answer(call))

    async def embed(self, query: Query) -> np.ndarray:
        (out,) = await asyncio.to_thread(engine.encode_queries, self.encoder, [query])
        return _answered(out)

    async def thumbnail(self, image_id: int) -> bytes | None:
        return await asyncio.to_thread(self.searcher.thumbnail, image_id,
                                       self.cfg.limits.thumbnail_size)

    async def health(self) -> dict[str, Any]:
        hits = await self.search(SearchCall(Query(image=None, text="health check"), 1))
        return {"images": self.searcher.count, "dim": self.dim, "probe_hits": len(hits)}

    def check_health(self) -> None:
        self.searcher.probe()
        if not np.isfinite(self.encoder.queries([None], ["health check"])).all():
            raise RuntimeError("the query encoder returns non-finite embeddings")


@serve.deployment
class QueryEncoder:
    def __init__(self, checkpoint: str, section: dict[str, Any]) -> None:
        from megapairs_ray.serve.config import QueryEncoderSection

        cfg = QueryEncoderSection.model_validate(section)
        self.encoder = _load_encoder(checkpoint, cfg)
        self.encode.set_max_batch_size(cfg.max_batch_size)
        self.encode.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def encode(self, queries: list[Query]) -> list[np.ndarray | ApiError]:
        return await asyncio.to_thread(engine.encode_queries, self.encoder, queries)

    def check_health(self) -> None:
        vector = self.encoder.queries([None], ["health check"])
        if not np.isfinite(vector).all():
            raise RuntimeError("the query encoder returns non-finite embeddings")


@serve.deployment
class GallerySearch:
    def __init__(self, gallery_dir: str, section: dict[str, Any]) -> None:
        cfg = SearchSection.model_validate(section)
        self.searcher = _load_searcher(gallery_dir, cfg)
        self.search.set_max_batch_size(cfg.max_batch_size)
        self.search.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch
    async def search(self, calls: list[tuple[np.ndarray, int, bool]],
                     ) -> list[list[dict[str, Any]]]:
        return await asyncio.to_thread(engine.search_vectors, self.searcher, calls)

    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        return self.searcher.thumbnail(image_id, size)

    def info(self) -> dict[str, Any]:
        return {"images": self.searcher.count, "dim": self.searcher.dim}

    def check_health(self) -> None:
        self.searcher.probe()


@serve.deployment
@serve.ingress()
class Ingress:
    """The split layout's HTTP front: ``api.create_api`` over the two deployments' handles."""

    def __init__(self, encoder: DeploymentHandle, searcher: DeploymentHandle,
                 args: dict[str, Any], dim: int) -> None:
        self.cfg: ServeAppConfig = app_config(args)
        self.encoder, self.searcher, self.dim = encoder, searcher, dim

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.cfg, self)

    async def embed(self, query: Query) -> np.ndarray:
        return _answered(await self.encoder.encode.remote(query))

    async def search(self, call: SearchCall) -> list[dict[str, Any]]:
        vector = await self.embed(call.what) if isinstance(call.what, Query) else call.what
        return await self.searcher.search.remote((vector, call.k, call.deduplicate))

    async def thumbnail(self, image_id: int) -> bytes | None:
        return await self.searcher.thumbnail.remote(image_id, self.cfg.limits.thumbnail_size)

    async def health(self) -> dict[str, Any]:
        # A real round trip through both deployments, not just "the ingress is up".
        info = await self.searcher.info.remote()
        hits = await self.search(SearchCall(Query(image=None, text="health check"), 1))
        return {**info, "probe_hits": len(hits)}


def choose_layout(cfg: ServeAppConfig, checkpoint: str) -> str:
    """``cfg.layout``, with auto resolved: colocated when the model and the index take at most
    half of a colocated replica's memory (``colocated.memory_gib``)."""
    if cfg.layout != "auto":
        return cfg.layout
    need = footprint_bytes(cfg.gallery_dir, checkpoint)
    memory = cfg.colocated.memory_gib * 1024**3
    layout = "colocated" if need <= memory / 2 else "split"
    log.info("layout auto: %s (model + index %.2f GiB, replica memory %.1f GiB)", layout,
             need / 1024**3, memory / 1024**3)
    return layout


def build_app(args: dict[str, Any]) -> Any:
    """The application builder (``import_path: megapairs_ray.serve.app:build_app``)."""
    cfg = app_config(args)
    gallery = read_gallery(cfg.gallery_dir)
    checkpoint = cfg.checkpoint or gallery["checkpoint"]
    if (family_of(checkpoint) == "clip"
            and gallery.get("settings", {}).get("pixels.form") != CLIP_PIXELS_FORM):
        log.warning("gallery %s was embedded with CLIP pixels older than the released "
                    "processor's (docs/method.md §4): its vectors and this service's queries "
                    "differ slightly; rebuild it with `megapairs gallery -c CONFIG`",
                    cfg.gallery_dir)
    if choose_layout(cfg, checkpoint) == "colocated":
        return Colocated.options(**cfg.colocated.options()).bind(
            checkpoint, cfg.model_dump(mode="json"))
    encoder = QueryEncoder.options(**cfg.query_encoder.options()).bind(
        checkpoint, cfg.query_encoder.model_dump())
    searcher = GallerySearch.options(**cfg.search.options()).bind(
        cfg.gallery_dir, cfg.search.model_dump())
    return Ingress.options(**cfg.ingress.options()).bind(
        encoder, searcher, cfg.model_dump(mode="json"), int(gallery["dim"]))
