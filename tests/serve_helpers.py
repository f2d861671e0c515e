"""Builders for the gallery and service tests: a retriever checkpoint, a gallery folder, configs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch
import yaml

from megapairs_ray.config import config_from_dict
from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.models.tokenizer import load_tokenizer
from megapairs_ray.serve.config import GalleryConfig

from .helpers import jpeg
from .train_helpers import TINY_CLIP

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SERVE_TOKEN_ENV = "MEGAPAIRS_TEST_SERVE_TOKEN"
SERVE_TOKEN = "test-token-6c1f0e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(folder: Path, seed: int = 3) -> str:
    """A random-initialised MMRet-CLIP in HF form, with its tokenizer: what `megapairs train`
    writes, at test size."""
    torch.manual_seed(seed)
    MMRetCLIP.from_config(**TINY_CLIP).save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    return str(folder)


def make_towers_checkpoint(folder: Path, seed: int = 3) -> str:
    """A towers-family checkpoint (the packaged towers, fresh projections) with its tokenizer,
    at test size: what `megapairs train` writes for that family."""
    from transformers import AutoTokenizer

    from megapairs_ray.models.towers import MMRetTowers
    from megapairs_ray.train.config import TowersSpec

    spec = TowersSpec(image_size=64, projection_dim=32, max_text_len=16)
    model = MMRetTowers.from_towers(**spec.model_dump(), seed=seed)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model.tokenizer_source).save_pretrained(folder)
    return str(folder)


def make_mllm_checkpoint(folder: Path) -> str:
    """The mllm family's twin (a random LLaVA-NeXT) with its settings at test size: squares of
    two 28-pixel tiles a side, prompts of up to 96 tokens."""
    import json

    from megapairs_ray.models.mllm_settings import MLLMSettings
    from megapairs_ray.models.mllm_twin import build_tiny_llava_next

    build_tiny_llava_next(folder)
    (folder / "mmret_mllm.json").write_text(
        json.dumps(MLLMSettings(image_size=56, max_text_len=96).to_dict()))
    return str(folder)


def write_gallery_folder(root: Path, n: int = 36) -> list[Path]:
    """``n`` distinct photos of several sizes, each with a caption file beside it (the folder
    layout ingest reads)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = [(96, 72), (72, 96), (80, 80), (120, 64)][i % 4]
        p = root / f"img{i:03d}.jpg"
        p.write_bytes(jpeg(1000 + i, size))
        (root / f"img{i:03d}.txt").write_text(f"a {COLOURS[i % len(COLOURS)]} picture {i}")
        paths.append(p)
    return paths


def gallery_config(gallery_dir: Path | str, checkpoint: str, **sections: Any) -> GalleryConfig:
    doc: dict[str, Any] = {
        "profile": "test", "run_dir": str(gallery_dir), "checkpoint": checkpoint,
        "ingest": {"min_side": 16, "num_cpus": 0.25},
        "encoder": {"num_cpus": 0.5, "batch_size": 8, "decode_threads": 1,
                    "read_batch_rows": 16, "writer_batch_rows": 16},
        "index": {"kind": "flat", "shards": 2, "shard_num_cpus": 0.25},
    }
    for k, v in sections.items():
        doc[k] = {**doc[k], **v} if isinstance(doc.get(k), dict) and isinstance(v, dict) else v
    return config_from_dict(doc, schema=GalleryConfig)


def app_args(gallery_dir: str, **over: Any) -> dict[str, Any]:
    """Application args for tests: no CPU reservations (the session's 2-CPU Ray is shared with
    the other tests), batches that fill under concurrent load, fp32 queries (rankings are
    compared with the eval code's fp32 ones to 1e-4)."""
    encoder = {"num_cpus": 0, "torch_threads": 1, "max_batch_size": 8,
               "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 64, "precision": "fp32"}
    args: dict[str, Any] = {
        "gallery_dir": gallery_dir,
        "colocated": encoder,
        "ingress": {"num_cpus": 0, "max_ongoing_requests": 128},
        "query_encoder": encoder,
        "search": {"num_cpus": 0, "max_batch_size": 8, "batch_wait_timeout_s": 0.02,
                   "max_ongoing_requests": 64},
        "limits": {"max_request_bytes": 2_000_000, "max_image_pixels": 4_000_000,
                   "max_text_chars": 200, "max_top_k": 20, "default_top_k": 5,
                   "thumbnail_size": 64},
    }
    args.update(over)
    return args


def write_serve_file(path: Path, port: int, apps: list[tuple[str, str, dict[str, Any]]]) -> Path:
    """A Ray Serve config file with our applications: (name, route prefix, args)."""
    doc = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": name, "route_prefix": prefix,
                             "import_path": "megapairs_ray.serve.app:build_app", "args": args}
                            for name, prefix, args in apps]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
