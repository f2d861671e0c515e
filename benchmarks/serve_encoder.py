"""The query-encoder deployment's batched work vs the bare model, in one process (no Ray).

What a replica of ``QueryEncoder`` does per ``@serve.batch`` call is ``RetrieverEncoder.queries``
on a mixed batch (composed, image-only, text-only): decode, preprocess, one image-tower pass,
one text-tower pass, sum and normalise. The bare floor is the two towers alone on tensors made
in advance. Both run side by side on the same batches; the ratio is what the deployment keeps
of the model's own throughput. Runs on a GPU (``--device cuda --precision bf16``) or the CPU.

    python benchmarks/serve_encoder.py --device cuda --precision bf16 --batch 64 \
        --out benchmarks/results/h200/serve_encoder.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.models.tokenizer import load_tokenizer

VIT_B16 = {"projection_dim": 512,
           "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                           "num_attention_heads": 8, "max_position_embeddings": 77,
                           "vocab_size": 49408},
           "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                             "num_hidden_layers": 12, "num_attention_heads": 12,
                             "image_size": 224, "patch_size": 16}}
TINY = {"projection_dim": 64,
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 32,
                        "vocab_size": 49408},
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 64, "patch_size": 16}}


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((512, 384))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["vit-b16", "tiny"], default="vit-b16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (named, never probed)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = VIT_B16 if args.model == "vit-b16" else TINY
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        MMRetCLIP.from_config(**cfg).save_pretrained(d)
        load_tokenizer(None).save_pretrained(d)
        enc = RetrieverEncoder(d, device=args.device, precision=args.precision,
                               batch_size=args.batch, threads=8)
    n = args.batch
    images = [_jpeg(i) for i in range(n)]
    texts = [f"the same thing, but number {i} and red" for i in range(n)]
    # A serving mix: a third composed, a third image-only, a third text-only.
    q_images = [images[i] if i % 3 != 2 else None for i in range(n)]
    q_texts = [texts[i] if i % 3 != 1 else None for i in range(n)]
    with_image = [i for i in range(n) if q_images[i] is not None]
    with_text = [i for i in range(n) if q_texts[i] is not None]
    pixels = enc.pixels_of([images[i] for i in with_image])
    ids, mask = enc.tokens([texts[i] for i in with_text])

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare() -> None:
        enc.model.image_features(pixels)
        enc.model.text_features(ids, mask)

    def deployment() -> None:
        enc.queries(q_images, q_texts)

    t_bare = _timed(bare, args.repeats, sync)
    t_dep = _timed(deployment, args.repeats, sync)
    result = {
        "what": "QueryEncoder batch (RetrieverEncoder.queries on a mixed batch: decode + "
                "preprocess + towers) vs the bare towers on ready tensors",
        "model": args.model, "device": args.device, "precision": args.precision, "batch": n,
        "bare_queries_per_s": n / t_bare, "deployment_queries_per_s": n / t_dep,
        "ratio": t_bare / t_dep,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
