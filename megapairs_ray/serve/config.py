"""Configuration of the gallery job and of the retriever service.

``GalleryConfig`` is one YAML document like a run config (``configs/gallery-*.yaml``).

The service is configured by one Ray Serve config file (``configs/serve-*.yaml``): the file
``serve deploy`` and KubeRay's ``serveConfigV2`` take, whose application ``args`` are a
``ServeAppConfig``. ``load_serve_file`` checks the file with Ray's own ``ServeDeploySchema``, then
fails on keys that schema would silently ignore, then validates every application's arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from megapairs_ray.config import (
    RESOURCE,
    ActorPoolSection,
    ConfigError,
    IndexConfig,
    IngestConfig,
    InputConfig,
    RayConfig,
    Strict,
    config_from_dict,
)

SPACE = "retriever"  # the gallery's one embedding space, beside the synthesis run's three


class GalleryEncoderConfig(ActorPoolSection):
    """The retriever's image tower on a Ray Data actor pool; readers fetch each images table's
    bytes grouped by file, ``read_batch_rows`` at a time."""

    section: ClassVar[str] = "encoder"

    precision: Literal["fp32", "bf16"] = "fp32"
    read_batch_rows: int = Field(default=256, gt=0, json_schema_extra=RESOURCE)
    reader_num_cpus: float = Field(default=0.25, gt=0, json_schema_extra=RESOURCE)
    writer_batch_rows: int = Field(default=1024, gt=0, json_schema_extra=RESOURCE)


class GalleryConfig(Strict):
    """A gallery to search: images embedded with one retriever checkpoint, indexed with FAISS."""

    profile: str
    run_dir: str = Field(description="The gallery's folder (local or s3://): images table, "
                                     "embeddings, index, gallery.json.")
    checkpoint: str = Field(description="HF-form CLIP folder: `megapairs train` output, or a "
                                        "released BGE-VL / MMRet model.")
    # The images: anything ingest reads, or the images table of a finished synthesis run.
    input: InputConfig | None = None
    images_from: str | None = Field(default=None, description="A run directory whose "
                                    "ingested images are the gallery.")
    ingest: IngestConfig = IngestConfig()
    encoder: GalleryEncoderConfig = GalleryEncoderConfig()
    index: IndexConfig = IndexConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _one_source(self) -> GalleryConfig:
        if (self.input is None) == (self.images_from is None):
            raise ValueError("give exactly one gallery source: input (shards ingest reads) or "
                             "images_from (a finished run's directory)")
        return self

    @field_validator("run_dir", "checkpoint", "images_from")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v.rstrip("/") if v is not None else v


# --------------------------------------------------------------------------- the service


class AutoscalingSection(Strict):
    """Ray Serve's ``autoscaling_config`` (the fields this service sets; Serve's defaults for
    the rest)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas "
                             f"({self.max_replicas})")
        return self


class DeploymentSection(Strict):
    """Replicas and resources of one deployment."""

    autoscaling: AutoscalingSection = AutoscalingSection()
    max_ongoing_requests: int = Field(default=16, ge=1)
    # Load shedding: requests a caller (the proxy; the replica itself under direct ingress)
    # holds beyond max_ongoing_requests. Past that a request is refused at once with 503 and
    # Retry-After instead of queueing without bound; -1 queues without bound (Ray's default).
    max_queued_requests: int = Field(default=-1, ge=-1)
    retry_after_s: float = Field(default=1.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    health_check_period_s: float = Field(default=10.0, gt=0)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        return {"autoscaling_config": self.autoscaling.model_dump(exclude_none=True),
                "max_ongoing_requests": self.max_ongoing_requests,
                "max_queued_requests": self.max_queued_requests,
                "backpressure_config": {"status_code": 503,
                                        "retry_after_s": self.retry_after_s},
                "health_check_period_s": self.health_check_period_s,
                "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}


class BatchedSection(DeploymentSection):
    """A deployment whose main method is ``@serve.batch``-ed."""

    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    max_ongoing_requests: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> BatchedSection:
        # A replica never holds more than max_ongoing_requests at once, so a smaller value
        # would cap every batch below max_batch_size.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"max_batch_size ({self.max_batch_size})")
        return self


class QueryEncoderSection(BatchedSection):
    device: Literal["cpu", "cuda"] = "cpu"
    # auto: bf16 where the replica's hardware computes it natively, else fp32
    # (models/retriever.py resolve_precision); the gallery's own vectors stay as built.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch intra-op threads (Ray sets OMP threads to the actor's num_cpus; this wins).
    torch_threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _gpu(self) -> QueryEncoderSection:
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("query_encoder.device=cuda needs query_encoder.num_gpus > 0")
        return self


class ColocatedSection(QueryEncoderSection):
    """The colocated layout's one deployment: the HTTP routes, the query encoder and the whole
    gallery index in each replica, one ``@serve.batch`` that encodes and searches. The index's
    search settings are ``search``'s (nprobe, hnsw_ef_search, faiss_threads, mmap)."""

    max_queued_requests: int = Field(default=64, ge=-1)
    # No wait for a batch to fill: one batch runs at a time, so requests that arrive meanwhile
    # form the next one; a wait would only add latency at low load (measured in
    # benchmarks/serve_layouts.py).
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    # The memory one replica may use: `layout: auto` colocates when the model and the index
    # take at most half of it. From the config, never from the machine that builds the app
    # (on a cluster that is the head, not where replicas run).
    memory_gib: float = Field(default=4.0, gt=0)
    # Reserve memory_gib as Ray's `memory` resource, so a replica is placed only where it fits.
    reserve_memory: bool = False

    def options(self) -> dict[str, Any]:
        out = super().options()
        if self.reserve_memory:
            out["ray_actor_options"]["memory"] = int(self.memory_gib * 1024**3)
        return out


class SearchSection(BatchedSection):
    # Search-time index settings (the build settings are the gallery's).
    nprobe: int | None = Field(default=None, gt=0)
    hnsw_ef_search: int | None = Field(default=None, gt=0)
    # FAISS's OpenMP threads per replica. A serving batch is small: one thread avoids OpenMP's
    # spin-waiting across threads that other replicas on the node need (a 1,000-vector search
    # measured 6 ms in a replica with the default, 0.4 ms in one thread).
    faiss_threads: int = Field(default=1, ge=1)
    # Map index files instead of reading them into memory, where the index kind allows
    # (IVF lists; flat codes with FAISS >= 1.10). s3 galleries are copied to local disk first.
    mmap: bool = True
    local_cache_dir: str = "/tmp/megapairs-gallery-cache"


class LimitsSection(Strict):
    """Every request is held to these; a breach is a 4xx naming the limit."""

    max_request_bytes: int = Field(default=8 * 1024**2, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_image_aspect_ratio: float = Field(default=20.0, ge=1)
    max_text_chars: int = Field(default=1000, gt=0)
    max_top_k: int = Field(default=100, ge=1)
    default_top_k: int = Field(default=10, ge=1)
    thumbnail_size: int = Field(default=256, ge=16, le=2048)

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsSection:
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"default_top_k ({self.default_top_k}) > max_top_k "
                             f"({self.max_top_k})")
        return self


class AuthSection(Strict):
    # Name of the environment variable holding the bearer token (from a Kubernetes secret, for
    # example); null serves without auth. /healthz is always open.
    token_env: str | None = None


class UrlFetchSection(Strict):
    """Queries naming an image by URI instead of sending it. Off by default: a service that
    fetches what a client names is a server-side request forgery waiting to happen."""

    enabled: bool = False
    # Storage prefixes the service may read (s3://bucket/prefix/, a local folder); nothing else.
    allowed_prefixes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _prefixes(self) -> UrlFetchSection:
        if self.enabled and not self.allowed_prefixes:
            raise ValueError("url_fetch.enabled needs url_fetch.allowed_prefixes")
        for p in self.allowed_prefixes:
            if p.startswith(("http://", "https://")):
                raise ValueError(f"url_fetch.allowed_prefixes: {p!r}: only storage prefixes "
                                 "(s3://, gs://, a local folder) are allowed")
        return self


class ServeAppConfig(Strict):
    """The arguments of the retriever application (``megapairs_ray.serve.app:build_app``)."""

    gallery_dir: str = Field(description="A gallery built by `megapairs gallery`.")
    # Default: the checkpoint the gallery was embedded with (gallery.json). Set it only when
    # that folder has moved: queries must be embedded by the gallery's own model.
    checkpoint: str | None = None
    title: str = "megapairs-ray retriever"
    # colocated: one deployment holds the routes, the encoder and the whole index (no hop
    # between replicas: the faster layout, measured in benchmarks/serve_load.py); split: an
    # ingress, a query-encoder and a search deployment, for an index too large for one
    # replica. auto: colocated when the model and the index fit (colocated.memory_gib).
    layout: Literal["auto", "colocated", "split"] = "auto"
    colocated: ColocatedSection = ColocatedSection()
    # The split layout's deployments.
    ingress: DeploymentSection = DeploymentSection(num_cpus=0.25, max_queued_requests=64)
    query_encoder: QueryEncoderSection = QueryEncoderSection()
    search: SearchSection = SearchSection(num_cpus=0.5)
    limits: LimitsSection = LimitsSection()
    auth: AuthSection = AuthSection()
    url_fetch: UrlFetchSection = UrlFetchSection()


IMPORT_PATH = "megapairs_ray.serve.app:build_app"


def app_config(args: dict[str, Any] | None, source: str = "application args") -> ServeAppConfig:
    return config_from_dict(args or {}, source=source, schema=ServeAppConfig)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Optional[X]``, ``List[X]``, ``X``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_keys(doc: Any, model: type[BaseModel], where: str) -> list[str]:
    """Keys of ``doc``, at any depth, that ``model`` and its nested models do not declare."""
    if not isinstance(doc, dict):
        return []
    prefix = f"{where}." if where else ""
    out = [f"{prefix}{k}" for k in doc if k not in model.model_fields]
    for name, field in model.model_fields.items():
        inner = _model_in(field.annotation)
        sub = doc.get(name)
        if inner is None or sub is None:
            continue
        items = enumerate(sub) if isinstance(sub, list) else [(None, sub)]
        for i, item in items:
            out += _unknown_keys(item, inner, f"{prefix}{name}" + ("" if i is None else f"[{i}]"))
    return out


def validate_serve_doc(doc: Any, source: str) -> tuple[Any, dict[str, ServeAppConfig]]:
    """(Ray's parsed ``ServeDeploySchema``, our config of each megapairs application)."""
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a Ray Serve config file holds a mapping at the top level")
    try:
        schema = ServeDeploySchema.model_validate(doc)
    except ValidationError as e:  # Ray's schema is pydantic: its own text names the field
        raise ConfigError(f"{source}: not a valid Ray Serve config: {e}") from None
    unknown = _unknown_keys(doc, ServeDeploySchema, "")
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} (Ray's schema ignores them, so "
                          "a misspelt field would silently do nothing)")
    apps: dict[str, ServeAppConfig] = {}
    for app in doc.get("applications", []):
        if app.get("import_path") == IMPORT_PATH:
            name = app.get("name", "default")
            apps[name] = app_config(app.get("args"), f"{source}: application {name} args")
    if not apps:
        raise ConfigError(f"{source}: no application with import_path {IMPORT_PATH}")
    return schema, apps


def load_serve_file(path: str | Path) -> tuple[dict[str, Any], Any, dict[str, ServeAppConfig]]:
    """(the raw document, Ray's schema of it, our config of each megapairs application)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"serve config not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"serve config {path} is not valid YAML: {e}") from None
    schema, apps = validate_serve_doc(doc, str(path))
    return doc, schema, apps
