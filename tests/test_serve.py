"""The retriever service, live: Ray Serve on the session's Ray, real HTTP on 127.0.0.1.

Four applications share one Serve instance: ``open`` at ``/`` (no auth; layout auto, which
colocates a gallery this small), ``split`` at ``/split`` (the same gallery in the split
layout), ``secured`` at ``/secured`` (a bearer token from the replicas' environment, URI
fetching allowed under one prefix, and a queue of 2 so that it sheds load) and ``towers`` at
``/towers`` (a towers-family gallery). Rankings are checked against the eval code's offline
ranking for the same checkpoint and gallery images.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image

from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.train.evaluate import Embedder, rank

from .helpers import encode, jpeg
from .serve_helpers import SERVE_TOKEN, SERVE_TOKEN_ENV, app_args, free_port, write_serve_file

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def service(retriever_gallery, towers_gallery, mllm_gallery, tmp_path_factory):
    from ray import serve

    from megapairs_ray.serve.deploy import deploy

    g = retriever_gallery
    images_dir = str(Path(g["images"][0]).parent)
    port = free_port()
    path = write_serve_file(tmp_path_factory.mktemp("serve") / "serve.yaml", port, [
        ("open", "/", app_args(g["gallery_dir"])),
        ("split", "/split", app_args(g["gallery_dir"], layout="split")),
        ("secured", "/secured", app_args(
            g["gallery_dir"], auth={"token_env": SERVE_TOKEN_ENV},
            url_fetch={"enabled": True, "allowed_prefixes": [images_dir]},
            colocated={"num_cpus": 0, "torch_threads": 1, "max_batch_size": 2,
                       "max_ongoing_requests": 2, "max_queued_requests": 2,
                       "retry_after_s": 3, "precision": "fp32"})),
        ("towers", "/towers", app_args(towers_gallery["gallery_dir"])),
        ("mllm", "/mllm", app_args(mllm_gallery["gallery_dir"])),
    ])
    urls = deploy(path)
    assert urls == [f"http://127.0.0.1:{port}{p}" for p in ("/", "/split/", "/secured/",
                                                            "/towers/", "/mllm/")]
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=120) as client:
        yield {"base": base, "client": client, **g}
    serve.shutdown()


@pytest.fixture(scope="module")
def offline(retriever_gallery):
    return _offline(retriever_gallery)


@pytest.fixture(scope="module")
def offline_towers(towers_gallery):
    return _offline(towers_gallery)


@pytest.fixture(scope="module")
def offline_mllm(mllm_gallery):
    return _offline(mllm_gallery)


def _offline(g: dict) -> dict:
    """The eval code's view of a gallery: ids, embeddings, the embedder."""
    import pyarrow.parquet as pq

    from megapairs_ray.io import storage

    tables = [pq.read_table(f) for f in storage.list_files(
        storage.join(g.get("images_from") or g["gallery_dir"], "images"), ".parquet")]
    by_path = {r["file_uri"]: r["image_id"] for t in tables for r in t.to_pylist()}
    paths = sorted(by_path)
    emb = Embedder(g["checkpoint"])
    # The gallery job stores its vectors as float16 (the embed stage's form), so the service
    # scores against those: up to ~1e-4 from float32 per value, as much as the tolerance the
    # scores are compared with. The eval side is rounded the same way.
    gallery = emb.images(paths).astype(np.float16).astype(np.float32)
    return {"embedder": emb, "paths": paths, "ids": [str(by_path[p]) for p in paths],
            "gallery": gallery, "id_of": {p: str(i) for p, i in by_path.items()}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hit_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [h["id"] for h in response.json()["hits"]]


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"] and "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code, body


def test_a_gallery_image_queried_by_itself_comes_back_first(service, offline):
    c = service["client"]
    for path in offline["paths"][:6]:
        data = Path(path).read_bytes()
        r = c.post("/search", files={"image": ("q.jpg", data, "image/jpeg")},
                   data={"top_k": "3"})
        body = r.json()
        assert body["kind"] == "image" and body["top_k"] == 3
        assert body["hits"][0]["id"] == offline["id_of"][path]
        assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert body["hits"][0]["caption"].startswith("a ")


def test_auto_layout_colocates_a_small_gallery():
    from ray import serve

    deployments = {name: sorted(app.deployments)
                   for name, app in serve.status().applications.items()}
    assert deployments["open"] == ["Colocated"]
    assert deployments["split"] == ["GallerySearch", "Ingress", "QueryEncoder"]


def test_auto_layout_follows_the_configured_replica_memory(retriever_gallery):
    """The decision reads colocated.memory_gib, never the memory of the machine building the
    app; the memory is reserved from Ray only when asked."""
    from megapairs_ray.serve.app import choose_layout
    from megapairs_ray.serve.config import app_config
    from megapairs_ray.serve.gallery import footprint_bytes

    g, ckpt = retriever_gallery["gallery_dir"], retriever_gallery["checkpoint"]
    need_gib = footprint_bytes(g, ckpt) / 1024**3
    fits = app_config({"gallery_dir": g, "colocated": {"memory_gib": 2.1 * need_gib}})
    too_small = app_config({"gallery_dir": g, "colocated": {"memory_gib": 1.9 * need_gib}})
    assert choose_layout(fits, ckpt) == "colocated"
    assert choose_layout(too_small, ckpt) == "split"
    assert "memory" not in fits.colocated.options()["ray_actor_options"]
    reserved = app_config({"gallery_dir": g, "colocated": {"memory_gib": 3,
                                                           "reserve_memory": True}})
    assert reserved.colocated.options()["ray_actor_options"]["memory"] == 3 * 1024**3


@pytest.mark.parametrize("app", ["colocated", "split", "towers", "mllm"])
@pytest.mark.parametrize("kind", ["composed", "image", "text"])
def test_served_ranking_equals_the_offline_eval_ranking(service, offline, offline_towers,
                                                        offline_mllm, kind, app):
    offline = {"towers": offline_towers, "mllm": offline_mllm}.get(app, offline)
    prefix = {"colocated": "", "split": "/split", "towers": "/towers", "mllm": "/mllm"}[app]
    c, emb = service["client"], offline["embedder"]
    ref = offline["paths"][7]
    text = "make it purple and brighter"
    body = {"top_k": 10}
    if kind in ("composed", "image"):
        body["image_base64"] = _b64(Path(ref).read_bytes())
    if kind in ("composed", "text"):
        body["text"] = text
    r = c.post(f"{prefix}/search", json=body)
    if kind == "composed":
        q = emb.queries([ref], [text])
    elif kind == "image" and app == "mllm":  # one prompt for an image-only query: not a candidate's
        q = RetrieverEncoder.queries(emb, [Path(ref).read_bytes()], [None])
    elif kind == "image":
        q = emb.images([ref])
    else:
        q = RetrieverEncoder.queries(emb, [None], [text])  # the base class's text-only path
    want = rank(q, offline["gallery"], offline["ids"], depth=9)[0][:10]
    assert r.json()["kind"] == kind
    scores = [h["score"] for h in r.json()["hits"]]
    expected = np.sort(q @ offline["gallery"].T)[0][::-1][:10]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    # The same ranking; two hits may trade places only where their offline scores are closer
    # than the scores' own tolerance (a batch of one and a batch of many round differently:
    # oneDNN picks other convolution kernels for the towers' convnet by batch size).
    offline_score = dict(zip(offline["ids"], (q @ offline["gallery"].T)[0]))
    served = _hit_ids(r)
    for i, (got, exp) in enumerate(zip(served, want)):
        assert got == exp or abs(offline_score[got] - offline_score[exp]) < 1e-4, (i, served, want)


@pytest.mark.parametrize("prefix", ["", "/split"])
def test_concurrent_mixed_queries_each_get_their_own_answer(service, offline, prefix):
    """Composed, image-only and text-only queries with different top_k, sent at once so they
    share batches: each answer equals the one the same query gets alone."""
    c = service["client"]
    texts = ["more red", "a bigger one", "same but green", "darker", None, None]
    queries = []
    for i in range(18):
        body: dict = {"top_k": 1 + i % 7}
        if i % 3 != 2:
            body["image_base64"] = _b64(Path(offline["paths"][i]).read_bytes())
        text = texts[i % len(texts)]
        if text is not None or "image_base64" not in body:
            body["text"] = text or f"query number {i}"
        queries.append(body)
    alone = [_hit_ids(c.post(f"{prefix}/search", json=q)) for q in queries]
    with ThreadPoolExecutor(18) as pool:
        together = list(pool.map(lambda q: c.post(f"{prefix}/search", json=q), queries))
    for q, a, t in zip(queries, alone, together):
        assert len(a) == q["top_k"]
        assert _hit_ids(t) == a


@pytest.mark.parametrize("prefix", ["", "/split"])
def test_a_malformed_image_in_a_batch_fails_only_its_own_request(service, offline, prefix):
    c = service["client"]
    good = [{"image_base64": _b64(Path(p).read_bytes()), "top_k": 2}
            for p in offline["paths"][:10]]
    truncated = Path(offline["paths"][3]).read_bytes()
    bad = [{"image_base64": _b64(truncated[: len(truncated) // 2]), "top_k": 2},
           {"image_base64": _b64(b"GIF89a but not really a gif" * 3)}]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda q: c.post(f"{prefix}/search", json=q), good + bad))
    for path, r in zip(offline["paths"][:10], answers[:10]):
        assert _hit_ids(r)[0] == offline["id_of"][path]
    _assert_error(answers[10], 422, "image_corrupt_image")
    _assert_error(answers[11], 422)
    assert c.get("/healthz").status_code == 200


def test_the_engine_answers_an_undecodable_image_on_its_own(retriever_gallery):
    """Past the ingress's header checks, an image that still fails to decode must not fail the
    batch it shares: that query is answered alone, in both layouts' batched calls."""
    from megapairs_ray.serve import engine
    from megapairs_ray.serve.api import ApiError, Query, SearchCall
    from megapairs_ray.serve.search import GallerySearcher

    encoder = RetrieverEncoder(retriever_gallery["checkpoint"])
    searcher = GallerySearcher(retriever_gallery["gallery_dir"])
    good = Path(retriever_gallery["images"][0]).read_bytes()
    queries = [Query(good, "x"), Query(b"\xff\xd8\xff garbage", None), Query(None, "text only")]
    out = engine.encode_queries(encoder, queries)
    assert isinstance(out[1], ApiError) and out[1].status == 422
    assert np.allclose(out[0], encoder.queries([good], ["x"])[0], atol=1e-5)
    assert np.allclose(out[2], encoder.queries([None], ["text only"])[0], atol=1e-5)
    vector = encoder.queries([None], ["a vector query"])[0]
    calls = [SearchCall(q, 3 + i) for i, q in enumerate(queries)] + [SearchCall(vector, 2)]
    answers = engine.answer(encoder, searcher, calls)
    assert isinstance(answers[1], ApiError)
    for call, got in zip(calls[::2] + calls[3:], answers[::2] + answers[3:]):
        want = call.what if isinstance(call.what, np.ndarray) else \
            encoder.queries([call.what.image], [call.what.text])[0]
        assert [h["id"] for h in got] == [h["id"] for h in searcher.search(want[None], call.k)[0]]


def test_limits_are_4xx_naming_the_problem(service, offline):
    c = service["client"]
    img = _b64(Path(offline["paths"][0]).read_bytes())
    bomb = encode(Image.new("1", (3000, 3000)), "PNG")  # 9 Mpx in a few kB
    sliver = encode(Image.new("RGB", (2000, 20)), "PNG")
    cases = [
        (c.post("/search", content=b"{" + b" " * 2_100_000 + b"}",
                headers={"content-type": "application/json"}), 413, "request_too_large"),
        (c.post("/search", content=iter([b"{", b" " * 1_500_000, b" " * 1_500_000, b"}"]),
                headers={"content-type": "application/json"}), 413, "request_too_large"),
        (c.post("/search", json={"image_base64": _b64(bomb)}), 413, "image_too_many_pixels"),
        (c.post("/search", json={"image_base64": _b64(sliver)}), 422,
         "image_extreme_aspect_ratio"),
        (c.post("/search", json={"text": "x" * 201}), 422, "text_too_long"),
        (c.post("/search", json={"text": "x", "top_k": 21}), 422, "top_k_out_of_range"),
        (c.post("/search", json={"text": "x", "top_k": 0}), 422, "invalid_request"),
        (c.post("/search", json={"text": "x", "top_k": "many"}), 422, "invalid_request"),
        (c.post("/search", json={"text": "x", "top_k": "5"}), 422, "invalid_request"),
        (c.post("/search", json={"text": "x", "top_k": True}), 422, "invalid_request"),
        (c.post("/search", json={"text": "x", "top_k": 5.0}), 422, "invalid_request"),
        (c.post("/search", content=b"[" * 100_000, headers={"content-type": "application/json"}),
         400, "bad_json"),
        (c.post("/search", content=b'{"text": "\\ud800"}',
                headers={"content-type": "application/json"}), 400, "bad_json"),
        (c.post("/search", content=b'{"text": "caf\xe9"}',
                headers={"content-type": "application/json"}), 400, "bad_json"),
        (c.post("/search", json={"text": 5}), 422, "invalid_request"),
        (c.post("/search", json={"image_base64": "not base64!"}), 422, "bad_base64"),
        (c.post("/search", json={"image_base64": _b64(b"plain text, no image")}), 422,
         "image_not_an_image"),
        (c.post("/search", json={"image_base64": img, "colour": "red"}), 422,
         "invalid_request"),
        (c.post("/search", json={}), 422, "empty_query"),
        (c.post("/search", json={"text": "   "}), 422, "empty_query"),
        (c.post("/search", content=b""), 422, "empty_body"),
        (c.post("/search", content=b"{not json", headers={"content-type": "application/json"}),
         400, "bad_json"),
        (c.post("/search", content=b"[1, 2]", headers={"content-type": "application/json"}),
         422, "invalid_request"),
        (c.post("/search", content=b"text=hi", headers={"content-type": "text/plain"}), 415,
         "unsupported_media_type"),
        (c.post("/search", data={"text": "hi", "extra": "1"}, files={"f": ("a", b"1")}), 422,
         "invalid_request"),
        (c.post("/search", data={"text": "hi", "top_k": "-3"},
                files={"image": ("a.jpg", b"", "image/jpeg")}), 422, None),
        (c.post("/search", json={"image_uri": "/etc/passwd"}), 422, "url_fetch_disabled"),
        (c.get("/images/99"), 404, "not_found"),
        (c.get("/images/not-a-number"), 422, "invalid_request"),
        (c.get("/images/99999999999999999999999"), 404, "not_found"),
        (c.get("/no-such-route"), 404, "not_found"),
        (c.post("/knn-service", json={"text": "x", "use_mclip": True}), 422,
         "unsupported_option"),
        (c.post("/knn-service", json={"text": "x", "modality": "text"}), 422,
         "no_caption_index"),
        (c.post("/knn-service", json={"text": "x", "num_images": "5"}), 422,
         "invalid_request"),
        (c.post("/knn-service", json={"embedding_input": [0.0] * 32}), 422, "bad_embedding"),
    ]
    for i, (r, status, code) in enumerate(cases):
        try:
            _assert_error(r, status, code)
        except AssertionError as e:
            raise AssertionError(f"case {i}: {e}") from None
    # A multipart text field that is not UTF-8 is read as Latin-1 (Starlette's form parser
    # falls back to it), not refused: answered, not a crash.
    form = c.post("/search", content=b'--b\r\nContent-Disposition: form-data; name="text"\r\n'
                  b'\r\n\xff\xfe\r\n--b--\r\n',
                  headers={"content-type": "multipart/form-data; boundary=b"})
    assert form.status_code == 200 and form.json()["kind"] == "text"
    # A surrogate pair is a character, not an error.
    emoji = c.post("/search", content=b'{"text": "a red \\ud83d\\ude00", "top_k": 2}',
                   headers={"content-type": "application/json"})
    assert len(_hit_ids(emoji)) == 2
    assert c.get("/healthz").json()["status"] == "ok"  # no replica died


def test_overload_is_refused_with_503_and_retry_after(service):
    """The secured app holds 2 requests and queues 2: a burst of 16 gets 200s and 503s with
    Retry-After, never a 500, and the app answers again afterwards."""
    c = service["client"]
    auth = {"Authorization": f"Bearer {SERVE_TOKEN}"}
    body = {"text": "a purple picture", "top_k": 3}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: c.post("/secured/search", json=body, headers=auth),
                                range(16)))
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) == {200, 503}, statuses
    refused = [r for r in answers if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "3" for r in refused)
    assert len(_hit_ids(c.post("/secured/search", json=body, headers=auth))) == 3


def test_auth_on_and_off(service, offline):
    c = service["client"]
    query = {"text": "a red picture", "top_k": 3}
    assert c.get("/secured/healthz").status_code == 200
    _assert_error(c.post("/secured/search", json=query), 401, "unauthorized")
    _assert_error(c.post("/secured/search", json=query,
                         headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    _assert_error(c.get("/secured/"), 401)
    auth = {"Authorization": f"Bearer {SERVE_TOKEN}"}
    secured = c.post("/secured/search", json=query, headers=auth)
    assert _hit_ids(secured) == _hit_ids(c.post("/search", json=query))
    hit = secured.json()["hits"][0]
    assert hit["image_url"].startswith("/secured/images/")
    _assert_error(c.get(hit["image_url"]), 401)
    assert c.get(hit["image_url"], headers=auth).headers["content-type"] == "image/jpeg"


def test_uri_fetching_only_under_an_allowed_prefix(service, offline, tmp_path):
    c = service["client"]
    auth = {"Authorization": f"Bearer {SERVE_TOKEN}"}
    inside = offline["paths"][5]
    r = c.post("/secured/search", json={"image_uri": inside, "top_k": 1}, headers=auth)
    assert _hit_ids(r) == [offline["id_of"][inside]]
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg(5))
    allowed = str(Path(inside).parent)
    for uri in [str(outside), f"{allowed}/../{outside.parent.name}/outside.jpg",
                "http://127.0.0.1:1/x.jpg", f"{allowed}-sibling/x.jpg"]:
        _assert_error(c.post("/secured/search", json={"image_uri": uri}, headers=auth), 422,
                      "uri_not_allowed")
    _assert_error(c.post("/secured/search", json={"image_uri": f"{allowed}/missing.jpg"},
                         headers=auth), 404, "image_not_found")


def test_thumbnails_embed_and_health(service, offline):
    c = service["client"]
    hits = c.post("/search", json={"text": "a green picture", "top_k": 4}).json()["hits"]
    for h in hits:
        r = c.get(h["image_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(r.content))
        im.load()
        assert max(im.size) <= 64
    ref = offline["paths"][2]
    r = c.post("/embed", data={"text": "brighter"},
               files={"image": ("q.jpg", Path(ref).read_bytes(), "image/jpeg")})
    body = r.json()
    assert body["kind"] == "composed" and body["dim"] == 32
    want = offline["embedder"].queries([ref], ["brighter"])[0]
    np.testing.assert_allclose(body["embedding"], want, atol=1e-5)
    health = c.get("/healthz").json()
    assert health == {"status": "ok", "images": 36, "dim": 32, "probe_hits": 1}


def _clip_client_module():
    """clip-retrieval's own client: the PyPI package, which scripts/setup.sh installs beside the
    venv's packages without its server's dependencies. Its ``__init__`` imports the Flask
    server, so the client module loads by path."""
    path = Path(sys.prefix) / "clip-retrieval" / "clip_retrieval" / "clip_client.py"
    assert path.is_file(), f"{path} missing: run scripts/setup.sh"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("prefix", ["", "/split"])
def test_clip_retrieval_client_works_with_its_defaults(service, offline, prefix):
    cc = _clip_client_module()
    client = cc.ClipClient(url=f"{service['base']}{prefix}/knn-service", indice_name="megapairs")
    assert client.deduplicate and client.use_safety_model and client.use_violence_detector
    ref = offline["paths"][4]
    by_image = client.query(image=ref)
    assert by_image[0]["id"] == offline["id_of"][ref]
    assert all(-1.0 <= h["similarity"] <= 1.0 for h in by_image)
    by_text = client.query(text="a yellow picture")
    assert by_text and {"id", "caption", "url", "similarity"} <= set(by_text[0])
    # Deduplicated as clip back does: of each group of hits linked (transitively) above its
    # threshold, the best-ranked stays. The oracle: components by breadth-first search over
    # the vectors the index stores for the undeduplicated answer.
    from megapairs_ray.serve.search import DEDUP_THRESHOLD, GallerySearcher

    full = [str(h["id"]) for h in service["client"].post(f"{prefix}/knn-service", json={
        "text": "a yellow picture", "num_images": 40}).json()]
    stored: dict[int, np.ndarray] = {}
    for shard in GallerySearcher(service["gallery_dir"]).shards:
        stored.update(shard.reconstruct([int(i) for i in full]))
    vec = np.stack([stored[int(i)] for i in full])
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    sims = vec @ vec.T
    seen: set[int] = set()
    want = []
    for start in range(len(full)):
        if start in seen:
            continue
        want.append(full[start])
        todo = [start]
        while todo:
            i = todo.pop()
            seen.add(i)
            todo += [j for j in np.nonzero(sims[i] > DEDUP_THRESHOLD)[0] if j not in seen]
    assert [str(h["id"]) for h in by_text] == want
    assert len(by_text) < len(full)  # a random tiny CLIP puts many images close together
    # The filters it has no model for are accepted and named as not applied.
    r = service["client"].post(f"{prefix}/knn-service", json={
        "text": "x", "use_safety_model": True, "use_violence_detector": True, "num_images": 2})
    assert r.status_code == 200
    assert r.headers["x-megapairs-not-applied"] == "use_safety_model, use_violence_detector"


def test_clip_retrieval_facade_takes_composed_queries(service, offline):
    c = service["client"]
    ref = offline["paths"][9]
    img = _b64(Path(ref).read_bytes())
    knn = c.post("/knn-service", json={"text": "in blue", "image": img, "modality": "image",
                                       "num_images": 6, "indice_name": "megapairs",
                                       "aesthetic_score": "", "aesthetic_weight": ""})
    assert knn.status_code == 200, knn.text
    ours = c.post("/search", json={"text": "in blue", "image_base64": img, "top_k": 6})
    assert [h["id"] for h in knn.json()] == _hit_ids(ours)
    assert {"id", "caption", "url", "similarity"} == set(knn.json()[0])
    vec = c.post("/embed", json={"image_base64": img}).json()["embedding"]
    by_vector = c.post("/knn-service", json={"embedding_input": vec, "num_images": 1}).json()
    assert by_vector[0]["id"] == offline["id_of"][ref]
    assert c.get("/indices-list").json() == ["megapairs"]


def test_openapi_fuzz_never_gets_a_server_error(service):
    """Property-based requests from the live OpenAPI schema (schemathesis + hypothesis): any
    body, any content type the schema names, any path id: 4xx at worst, never a 5xx.

    (schemathesis's lazy pytest fixture does not run under pytest 9, so each operation's
    strategy is driven by hypothesis here.)"""
    schema = schemathesis.openapi.from_url(f"{service['base']}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {o.label for o in operations} >= {"POST /search", "POST /embed",
                                             "GET /images/{image_id}", "POST /knn-service"}
    server_errors = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(base_url=service["base"], timeout=60)
            if response.status_code >= 500:
                server_errors.append((case.method, case.path, case.body, response.text[:300]))

        check()
    assert not server_errors, server_errors[:3]
    assert service["client"].get("/healthz").status_code == 200


def test_search_page_in_chromium(service, offline, tmp_path):
    """The page's own form, in Debian's Chromium: pick an image, type an instruction, search;
    every result image decodes, and clicking a result searches with it."""
    from playwright.sync_api import sync_playwright

    query = Path(offline["paths"][11])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{service['base']}/")
            assert page.title() == "megapairs-ray retriever"
            page.set_input_files("#image", str(query))
            page.select_option("#top_k", "8")
            page.click("#go")
            page.wait_for_function("document.body.dataset.searches === '1'", timeout=60_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every("
                "i => i.complete && i.naturalWidth > 0)", timeout=60_000)
            ids = page.eval_on_selector_all("#results figure", "fs => fs.map(f => f.dataset.id)")
            assert len(ids) == 8 and ids[0] == offline["id_of"][str(query)]
            assert "image query" in page.text_content("#status")
            page.fill("#text", "make it orange")
            page.click("#go")
            page.wait_for_function("document.body.dataset.searches === '2'", timeout=60_000)
            assert "composed query" in page.text_content("#status")
            composed = page.eval_on_selector_all("#results figure",
                                                 "fs => fs.map(f => f.dataset.id)")
            want = _hit_ids(service["client"].post("/search", json={
                "image_base64": _b64(query.read_bytes()), "text": "make it orange",
                "top_k": 8}))
            assert composed == want
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every("
                "i => i.complete && i.naturalWidth > 0)", timeout=60_000)
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            colours = Image.open(shot).convert("RGB").getcolors(1 << 20)
            assert colours is not None and len(colours) > 500
        finally:
            browser.close()
