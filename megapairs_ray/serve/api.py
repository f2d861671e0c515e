"""The service's HTTP surface: a FastAPI app over a ``Backend`` (no Ray here).

Every request is checked before it reaches a batch: body size, image bytes and pixels (ingest's
header checks: a decompression bomb is refused from its header), text length, ``top_k``, field
names and types. A breach is a 4xx whose JSON body names the problem; no error body carries a
stack trace, and one bad request never reaches, let alone fails, another's batch.

Routes: ``POST /search``, ``POST /embed`` (an image as a multipart upload or base64 in JSON,
and/or a text), ``GET /images/{id}``, ``GET /healthz``, ``GET /`` (the search page), the OpenAPI
schema, and ``POST /knn-service`` + ``GET /indices-list``, a clip-retrieval-compatible facade.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megapairs_ray.imaging import inspect_image
from megapairs_ray.io import storage
from megapairs_ray.reasons import Reason
from megapairs_ray.serve.config import ServeAppConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """One query as the encoder takes it: an image (encoded bytes), a text, or both. It travels
    as one positional object, so ``@serve.batch`` never sees per-request keyword arguments."""

    image: bytes | None
    text: str | None

    @property
    def kind(self) -> str:
        if self.image is not None and self.text is not None:
            return "composed"
        return "image" if self.image is not None else "text"


@dataclass(frozen=True)
class SearchCall:
    """One search as the backend takes it: a query to encode, or a unit vector already in the
    gallery's space (``embedding_input``); its ``k``; whether to collapse near-duplicate hits.
    One positional object, for the same reason as ``Query``."""

    what: Query | np.ndarray
    k: int
    deduplicate: bool = False


class Backend(Protocol):
    """What the routes need: the colocated deployment implements it in process, the split
    layout's ingress with deployment handles (``serve/app.py``)."""

    dim: int  # the gallery's embedding dimension

    async def embed(self, query: Query) -> np.ndarray: ...

    async def search(self, call: SearchCall) -> list[dict[str, Any]]: ...

    async def thumbnail(self, image_id: int) -> bytes | None: ...

    async def health(self) -> dict[str, Any]: ...


class ApiError(Exception):
    """A request the service refuses; ``status`` and a message that names the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def __reduce__(self) -> Any:  # travels between replicas as a per-request answer
        return (ApiError, (self.status, self.code, self.message))


# --------------------------------------------------------------------------- schemas


class _Body(BaseModel):
    # Strict: "5" or true is not a top_k, 1 is not a flag.
    model_config = ConfigDict(extra="forbid", strict=True)


class SearchRequest(_Body):
    image_base64: str | None = Field(default=None, description="The query image, base64 (a "
                                     "data: URL prefix is allowed).")
    image_uri: str | None = Field(default=None, description="A storage URI of the query image; "
                                  "only when url_fetch is enabled and the URI is allowed.")
    text: str | None = Field(default=None, description="The instruction (composed query with "
                             "an image) or a text-only query.")
    top_k: int | None = Field(default=None, ge=1, description="Hits to return.")


class EmbedRequest(_Body):
    image_base64: str | None = None
    image_uri: str | None = None
    text: str | None = None


class Hit(BaseModel):
    id: str = Field(description="The gallery image id (signed 64-bit, as a decimal string).")
    score: float
    caption: str | None
    image_url: str = Field(description="Its thumbnail on this service.")


class SearchResponse(BaseModel):
    kind: Literal["composed", "image", "text"]
    top_k: int
    hits: list[Hit]
    took_ms: float


class EmbedResponse(BaseModel):
    kind: Literal["composed", "image", "text"]
    dim: int
    embedding: list[float]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class KnnRequest(_Body):
    """clip-retrieval's ``/knn-service`` request; ``text`` + ``image`` together is a composed
    query. ``deduplicate`` collapses near-duplicate hits as clip back does. The filters this
    service has no model for (safety, violence, aesthetics) are accepted and reported as not
    applied (``X-Megapairs-Not-Applied``); multilingual CLIP must be off."""

    text: str | None = None
    image: str | None = Field(default=None, description="base64")
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = Field(
        default="image", description="What to search: image, the gallery's images. text (clip "
        "back's caption index) is refused: a gallery embeds its images only.")
    num_images: int = Field(default=40, ge=1)
    num_result_ids: int | None = Field(default=None, ge=1)
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: str | int | None = None
    aesthetic_weight: str | float | None = None


# The knn-service options this service accepts but has no model for; any that a request sets is
# named in the NOT_APPLIED_HEADER of its answer.
NOT_APPLIED_HEADER = "X-Megapairs-Not-Applied"
_KNN_FILTERS_NOT_APPLIED = ("use_safety_model", "use_violence_detector", "aesthetic_score")


class KnnHit(BaseModel):
    id: str
    caption: str | None
    url: str
    similarity: float


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503)}

_MULTIPART_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {"image": {"type": "string", "format": "binary"},
                   "text": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1}},
}


def _body_doc(model: type[BaseModel], multipart: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema()}}
    if multipart:
        schema = dict(_MULTIPART_SCHEMA)
        if "top_k" not in model.model_fields:
            schema["properties"] = {k: v for k, v in schema["properties"].items()
                                    if k != "top_k"}
        content["multipart/form-data"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


# --------------------------------------------------------------------------- request parsing


class RequestReader:
    """Turns a request into a checked ``Query`` (+ ``top_k``), or raises ``ApiError``."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        self.cfg = cfg
        self.limits = cfg.limits

    async def read(self, request: Request, model: type[_Body]) -> tuple[Query, int | None]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            fields = await self._form(request, with_top_k="top_k" in model.model_fields)
        elif ctype in ("application/json", ""):
            fields = self.parse_json(await request.body(), model)
        else:
            raise ApiError(415, "unsupported_media_type",
                           f"content-type {ctype!r}: send application/json or "
                           "multipart/form-data")
        image = fields.get("image")
        if fields.get("image_base64") is not None and fields.get("image_uri") is not None:
            raise ApiError(422, "invalid_request", "give image_base64 or image_uri, not both")
        if fields.get("image_base64") is not None:
            image = _b64(fields["image_base64"], "image_base64")
        if fields.get("image_uri") is not None:
            image = self._fetch(fields["image_uri"])
        text = fields.get("text")
        return self.query(image, text), fields.get("top_k")

    def parse_json(self, body: bytes, model: type[_Body]) -> dict[str, Any]:
        if not body.strip():
            raise ApiError(422, "empty_body", "the request body is empty: send a JSON object "
                           "with an image, a text, or both")
        # pydantic's own JSON parser: invalid UTF-8, lone surrogates and nesting past its
        # recursion limit are JSON errors here, not crashes further on.
        try:
            return model.model_validate_json(body).model_dump()
        except ValidationError as e:
            errors = e.errors()
            bad = [x for x in errors if x["type"] == "json_invalid"]
            if bad:
                raise ApiError(400, "bad_json", "the body is not valid JSON: "
                               f"{bad[0]['msg'].removeprefix('Invalid JSON: ')}") from None
            raise ApiError(422, "invalid_request", _validation_message(errors)) from None

    async def _form(self, request: Request, with_top_k: bool) -> dict[str, Any]:
        allowed = {"image", "text", "top_k"} if with_top_k else {"image", "text"}
        try:
            form = await request.form(max_files=1, max_fields=len(allowed),
                                      max_part_size=self.limits.max_request_bytes)
        except Exception as e:  # Starlette raises on malformed multipart (400 in its text)
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {e}") from None
        unknown = sorted(set(form.keys()) - allowed)
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown form field(s) {unknown}; allowed: "
                           f"{sorted(allowed)}")
        out: dict[str, Any] = {}
        image = form.get("image")
        if image is not None:
            out["image"] = await image.read() if hasattr(image, "read") else \
                str(image).encode()
        text = form.get("text")
        if text is not None:
            if not isinstance(text, str):
                raise ApiError(422, "invalid_request", "text must be a form field, not a file")
            out["text"] = text
        top_k = form.get("top_k")
        if top_k is not None:
            if not isinstance(top_k, str) or not top_k.strip().isdigit():
                raise ApiError(422, "invalid_request", "top_k must be a positive integer")
            out["top_k"] = int(top_k)
        return out

    def _fetch(self, uri: str) -> bytes:
        """Read a query image named by URI: only when enabled and under an allowed prefix."""
        uf = self.cfg.url_fetch
        if not uf.enabled:
            raise ApiError(422, "url_fetch_disabled",
                           "image_uri is not accepted: this service does not fetch images")
        scheme, sep, rest = uri.partition("://")
        norm = f"{scheme}://{posixpath.normpath(rest)}" if sep else posixpath.normpath(uri)
        if ".." in uri.split("/") or not any(
                norm.startswith(p.rstrip("/") + "/") for p in uf.allowed_prefixes):
            raise ApiError(422, "uri_not_allowed", "image_uri is not under an allowed prefix")
        try:
            fs, path = storage.filesystem(norm)
            size = fs.size(path)
            if size is not None and size > self.limits.max_request_bytes:
                raise ApiError(413, "image_too_large", f"the image at image_uri is over "
                               f"{self.limits.max_request_bytes} bytes")
            return fs.cat_file(path)
        except ApiError:
            raise
        except Exception as e:  # any storage failure: the client hears "not found", the log why
            log.info("image_uri %s not readable: %s: %s", norm, type(e).__name__, e)
            raise ApiError(404, "image_not_found", "no readable image at image_uri") from None

    def query(self, image: bytes | None, text: str | None) -> Query:
        """Check an image and a text against the limits; the ``Query`` to encode."""
        if text is not None:
            text = text.strip() or None
        if text is not None and not _encodes(text):
            raise ApiError(422, "bad_text", "text is not valid Unicode (a lone surrogate)")
        if text is not None and len(text) > self.limits.max_text_chars:
            raise ApiError(422, "text_too_long",
                           f"text is {len(text)} characters; at most "
                           f"{self.limits.max_text_chars}")
        if image is not None:
            verdict = inspect_image(
                image, max_bytes=self.limits.max_request_bytes,
                max_pixels=self.limits.max_image_pixels, min_side=1,
                max_aspect_ratio=self.limits.max_image_aspect_ratio)
            if not verdict.ok:
                status = 413 if verdict.reason in (Reason.TOO_MANY_PIXELS,
                                                   Reason.TOO_MANY_BYTES) else 422
                raise ApiError(status, f"image_{verdict.reason}",
                               f"the image is refused: {verdict.reason} ({verdict.detail})")
        if image is None and text is None:
            raise ApiError(422, "empty_query", "a query needs an image, a text, or both")
        return Query(image=image, text=text)

    def top_k(self, requested: int | None) -> int:
        k = self.limits.default_top_k if requested is None else requested
        if not 1 <= k <= self.limits.max_top_k:
            raise ApiError(422, "top_k_out_of_range",
                           f"top_k is {k}; it must be between 1 and {self.limits.max_top_k}")
        return k


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _similarity(score: float) -> float:
    """An inner product of unit vectors, clamped to [-1, 1] (float rounding reaches 1.00003)."""
    return min(1.0, max(-1.0, score))


def _b64(value: str, field: str) -> bytes:
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "bad_base64", f"{field} is not valid base64") from None
    if not data:
        raise ApiError(422, "empty_image", f"{field} decodes to no bytes")
    return data


def _validation_message(errors: Any) -> str:
    parts = []
    for e in list(errors)[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is refused with 413, whether it declares
    its length or streams in chunks (Ray Serve's proxy sets no limit of its own)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = _error(413, "request_too_large",
                               f"request body is over {self.limit} bytes")
            return await response(scope, receive, send)
        received = 0

        async def limited() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise ApiError(413, "request_too_large",
                               f"request body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
           ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


# --------------------------------------------------------------------------- the app


def _page(title: str) -> str:
    html = resources.files("megapairs_ray.serve").joinpath("page.html").read_text()
    return html.replace("{{TITLE}}", title.replace("<", "&lt;").replace(">", "&gt;"))


def create_api(cfg: ServeAppConfig, backend: Backend) -> FastAPI:
    """The FastAPI app of the service over ``backend``."""
    reader = RequestReader(cfg)
    token = _auth_token(cfg)
    app = FastAPI(title=cfg.title, version="1", description="Composed image retrieval over a "
                  "gallery with an MMRet retriever: query by image, by text, or both.")
    page = _page(cfg.title)
    app.add_middleware(BodyLimit, limit=cfg.limits.max_request_bytes)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if token is not None and request.url.path.removeprefix(
                request.scope.get("root_path", "")) != "/healthz":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "unauthorized", "a valid bearer token is required",
                              {"WWW-Authenticate": "Bearer"})
        try:
            return await call_next(request)
        except ApiError as e:  # raised while Starlette reads a body outside the route
            return _error(e.status, e.code, e.message)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", _validation_message(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(e.status_code, codes.get(e.status_code, "http_error"), str(e.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")  # the trace stays in the replica's log
        return _error(500, "internal", "internal error")

    def image_url(request: Request, image_id: int) -> str:
        return f"{request.scope.get('root_path', '')}/images/{image_id}"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page(request: Request) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        return HTMLResponse(page.replace("{{BASE}}", base))

    @app.post("/search", response_model=SearchResponse, responses=ERRORS,
              openapi_extra=_body_doc(SearchRequest, multipart=True))
    async def search(request: Request) -> SearchResponse:
        """Top-k gallery images for a composed (image + text), image-only or text-only query."""
        t0 = time.perf_counter()
        query, requested = await reader.read(request, SearchRequest)
        k = reader.top_k(requested)
        hits = await backend.search(SearchCall(query, k))
        return SearchResponse(kind=query.kind, top_k=k, took_ms=(time.perf_counter() - t0) * 1e3,
                              hits=[Hit(id=str(h["id"]), score=_similarity(h["score"]),
                                        caption=h["caption"],
                                        image_url=image_url(request, h["id"])) for h in hits])

    @app.post("/embed", response_model=EmbedResponse, responses=ERRORS,
              openapi_extra=_body_doc(EmbedRequest, multipart=True))
    async def embed(request: Request) -> EmbedResponse:
        """The query's unit-norm embedding in the gallery's space."""
        query, _ = await reader.read(request, EmbedRequest)
        vector = await backend.embed(query)
        return EmbedResponse(kind=query.kind, dim=len(vector),
                             embedding=[float(x) for x in vector])

    @app.get("/images/{image_id}", responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}},
             response_class=Response)
    async def image(image_id: int) -> Response:
        """A gallery image, resized, read from where its bytes live."""
        if not -(2**63) <= image_id < 2**63:
            raise ApiError(404, "not_found", f"no gallery image {image_id}")
        data = await backend.thumbnail(image_id)
        if data is None:
            raise ApiError(404, "not_found", f"no gallery image {image_id}")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz", responses=ERRORS)
    async def healthz() -> dict[str, Any]:
        """Liveness and readiness: the encoder and the index both answer."""
        try:
            return {"status": "ok", **(await backend.health())}
        except Exception as e:
            raise ApiError(503, "unhealthy", f"{type(e).__name__}: {e}"[:300]) from None

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        """clip-retrieval's index list: this service has one."""
        return ["megapairs"]

    @app.post("/knn-service", response_model=list[KnnHit], responses=ERRORS,
              openapi_extra=_body_doc(KnnRequest, multipart=False))
    async def knn_service(request: Request, response: Response) -> list[KnnHit]:
        """clip-retrieval's knn-service: text, image (base64), image_url or embedding_input;
        text + image is a composed query. ``deduplicate`` collapses near-duplicate hits; the
        safety, violence and aesthetic options are accepted and named in the
        ``X-Megapairs-Not-Applied`` response header (no model for them here)."""
        req = KnnRequest.model_validate(reader.parse_json(await request.body(), KnnRequest))
        if req.use_mclip:
            raise ApiError(422, "unsupported_option", "use_mclip: this service has no "
                           "multilingual CLIP; leave it off")
        if req.modality == "text":
            raise ApiError(422, "no_caption_index", "modality text searches caption "
                           "embeddings, and this gallery has none (a gallery embeds its "
                           "images only): search with modality image; a text query then "
                           "finds images")
        not_applied = [f for f in _KNN_FILTERS_NOT_APPLIED
                       if getattr(req, f) not in (None, False)]
        if not_applied:
            response.headers[NOT_APPLIED_HEADER] = ", ".join(not_applied)
        # clip-retrieval's clients ask for 40 by default: clamped to this service's limit
        # rather than refused, so they work unchanged.
        k = reader.top_k(min(req.num_result_ids or req.num_images, cfg.limits.max_top_k))
        if req.embedding_input is not None:
            vector = np.asarray(req.embedding_input, dtype=np.float32)
            if vector.shape != (backend.dim,) or not np.isfinite(vector).all() or \
                    not np.linalg.norm(vector):
                raise ApiError(422, "bad_embedding", f"embedding_input must be {backend.dim} "
                               "finite numbers, not all 0")
            what: Query | np.ndarray = vector / np.linalg.norm(vector)
        else:
            image = _b64(req.image, "image") if req.image is not None else None
            if req.image_url is not None:
                image = reader._fetch(req.image_url)
            what = reader.query(image, req.text)
        hits = await backend.search(SearchCall(what, k, deduplicate=req.deduplicate))
        return [KnnHit(id=str(h["id"]), caption=h["caption"], similarity=_similarity(h["score"]),
                       url=image_url(request, h["id"])) for h in hits]

    return app


def _auth_token(cfg: ServeAppConfig) -> str | None:
    name = cfg.auth.token_env
    if name is None:
        return None
    token = os.environ.get(name, "")
    if not token.strip():
        # Refuse to start rather than serve openly when auth was asked for.
        raise RuntimeError(f"auth.token_env names {name}, which is unset or empty on this "
                           "replica")
    return token.strip()
