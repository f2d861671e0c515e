"""One Ray cluster and one S3 server (moto, on 127.0.0.1) per test session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vLLM's CPU backend
# The service tests' bearer token: in the environment before Ray starts, so Serve replicas read
# it the way a pod reads a Kubernetes secret.
os.environ.setdefault("MEGAPAIRS_TEST_SERVE_TOKEN", "test-token-6c1f0e")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 protocol server. Its address goes into the environment *before* Ray starts,
    so Ray's worker processes reach it exactly as the driver does."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    })
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> Iterator[None]:
    import ray

    from megapairs_ray.runtime import job_runtime_env

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, runtime_env=job_runtime_env())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_synth_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny profile's synthesis models (``configs/tiny.yaml``: the LLaVA that describes, the
    Llama that writes instructions), built once per session from the current builders (a
    folder cached from an earlier checkout could be stale), for every test that runs or reads
    them."""
    from megapairs_ray.synth import tiny_models

    root = tmp_path_factory.mktemp("tiny-synth-models")
    return {"describe": tiny_models.build_tiny_vlm(root / "llava"),
            "instruct": tiny_models.build_tiny_llm(root / "llama")}


@pytest.fixture()
def bucket(s3_endpoint: str) -> str:
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


@pytest.fixture(scope="session")
def retriever_gallery(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory,
                      ) -> dict[str, object]:
    """A retriever checkpoint and a finished gallery of 36 photos (folder input, flat index in
    two id-range shards), built once for the gallery and service tests."""
    from megapairs_ray.pipeline.gallery import run_gallery

    from .serve_helpers import gallery_config, make_checkpoint, write_gallery_folder

    root = tmp_path_factory.mktemp("retriever")
    checkpoint = make_checkpoint(root / "checkpoint")
    images = write_gallery_folder(root / "images")
    cfg = gallery_config(root / "gallery", checkpoint,
                         input={"uris": [str(root / "images")], "format": "folder"})
    record = run_gallery(cfg)
    return {"checkpoint": checkpoint, "gallery_dir": cfg.run_dir, "images": images,
            "record": record, "config": cfg}


def _same_photos_gallery(retriever_gallery: dict[str, Any], root: Path, checkpoint: str,
                         ) -> dict[str, object]:
    """A gallery of ``retriever_gallery``'s photos (its ingested images) for ``checkpoint``."""
    from megapairs_ray.pipeline.gallery import run_gallery

    from .serve_helpers import gallery_config

    cfg = gallery_config(root / "gallery", checkpoint,
                         images_from=retriever_gallery["gallery_dir"])
    record = run_gallery(cfg)
    return {"checkpoint": checkpoint, "gallery_dir": cfg.run_dir,
            "images_from": retriever_gallery["gallery_dir"],
            "images": retriever_gallery["images"], "record": record, "config": cfg}


@pytest.fixture(scope="session")
def towers_gallery(retriever_gallery: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                   ) -> dict[str, object]:
    """The same photos as ``retriever_gallery``'s, embedded by a towers-family checkpoint."""
    from .serve_helpers import make_towers_checkpoint

    root = tmp_path_factory.mktemp("towers")
    return _same_photos_gallery(retriever_gallery, root,
                                make_towers_checkpoint(root / "checkpoint"))


@pytest.fixture(scope="session")
def mllm_gallery(retriever_gallery: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                 ) -> dict[str, object]:
    """The same photos as ``retriever_gallery``'s, embedded by the mllm family's twin."""
    from .serve_helpers import make_mllm_checkpoint

    root = tmp_path_factory.mktemp("mllm")
    return _same_photos_gallery(retriever_gallery, root,
                                make_mllm_checkpoint(root / "checkpoint"))
