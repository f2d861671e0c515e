"""Embed stage vs the bare models, on one GPU, in one run.

Bare: the three encoders' forward passes (CLIP image tower, DINOv2, CLIP text tower: the paper's
spaces) on pre-made bf16 tensors already on the device — the ceiling. Stage: ``EmbedStage`` called
directly (no Ray) on real-sized JPEG bytes and captions — nvJPEG decode, preprocessing as
tensor ops, the same three forwards, fp16 results back on the host. The ratio stage/bare is the
share of the ceiling the stage keeps. Random weights: throughput does not depend on them.

    python benchmarks/embed_gpu.py --arch vit-l --batch 512 --out results.json
    python benchmarks/embed_gpu.py --tiny          # CPU smoke run of the same script
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time

import numpy as np
import torch
from PIL import Image

from megapairs_ray import pixels
from megapairs_ray.config import EmbedConfig
from megapairs_ray.models.encoders import ImageEncoder
from megapairs_ray.stages.embed import EmbedStage

DINO_ARCH = {
    "vit-l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "patch_size": 14, "image_size": 518},
    "vit-b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "intermediate_size": 3072, "patch_size": 14, "image_size": 518},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128, "patch_size": 14, "image_size": 56},
}
CLIP_ARCH = {"vit-l": "ViT-L-14", "vit-b": "ViT-B-16", "eva02-l": "EVA02-L-14",
             "tiny": "mp-tiny-clip"}


def photo_jpegs(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    """JPEGs (q90) cut from real photos when scikit-image is there, else smooth noise."""
    rng = np.random.default_rng(seed)
    try:
        from skimage import data as skdata

        sources = [np.asarray(getattr(skdata, name)()) for name in
                   ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
        sources = [s if s.ndim == 3 else np.stack([s] * 3, -1) for s in sources]
    except Exception:
        base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        sources = [np.asarray(Image.fromarray(base).resize((1024, 768), Image.BICUBIC))]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        src = Image.fromarray(sources[i % len(sources)][..., :3])
        scale = max(w / src.width, h / src.height) * (1 + rng.random() * 0.3)
        im = src.resize((int(src.width * scale) + 1, int(src.height * scale) + 1), Image.BILINEAR)
        x = int(rng.integers(0, im.width - w + 1))
        y = int(rng.integers(0, im.height - h + 1))
        buf = io.BytesIO()
        im.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def timed(fn, iters: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit-l", choices=sorted(CLIP_ARCH))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny models")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--decode-threads", type=int, default=8)
    ap.add_argument("--sizes", default="512x384,384x512,512x512",
                    help="JPEG sizes, cycled; one size = an upstream-resized corpus")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    arch = "tiny" if args.tiny else args.arch
    cuda = not args.tiny
    dino_arch = DINO_ARCH["vit-l" if arch == "eva02-l" else arch]
    clip = {"model": CLIP_ARCH[arch], "pretrained": None}
    cfg = EmbedConfig(
        spaces=[
            {"name": "clip_image", "encoder": {"kind": "open_clip_image", **clip}},
            {"name": "dino_image", "encoder": {
                "kind": "transformers_image", "model": "random", "pretrained": False,
                "config_overrides": dino_arch, "image_size": 56 if arch == "tiny" else 224}},
            {"name": "clip_text", "encoder": {"kind": "open_clip_text", **clip}},
        ],
        device="cuda" if cuda else "cpu", precision="bf16" if cuda else "fp32",
        decode="gpu" if cuda else "cpu", batch_size=args.batch,
        num_gpus=1 if cuda else 0, decode_threads=args.decode_threads,
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    stage = EmbedStage(cfg)
    build_s = time.perf_counter() - t0
    dev, dt = stage.device, stage.dtype
    B = args.batch
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    jpegs = photo_jpegs(B, sizes)  # type: ignore[arg-type]
    captions = [f"a photo of object number {i} on a table next to a window" for i in range(B)]
    batch = {"image_id": np.arange(B, dtype=np.int64),
             "shard": np.array(["bench"] * B, dtype=object),
             "image": np.array(jpegs, dtype=object),
             "caption": np.array(captions, dtype=object),
             "format": np.array(["JPEG"] * B, dtype=object),
             "mode": np.array(["RGB"] * B, dtype=object)}

    # Bare: forwards only, on tensors made once, already on the device.
    inputs = {}
    for name, enc in stage.encoders.items():
        if isinstance(enc, ImageEncoder):
            inputs[name] = torch.randn(B, 3, enc.spec.size, enc.spec.size, device=dev, dtype=dt)
        else:
            tokens = enc.tokenize(captions)
            inputs[name] = (tokens.to(dev) if isinstance(tokens, torch.Tensor)
                            else {k: v.to(dev) for k, v in tokens.items()})

    def forward(name: str) -> None:
        enc = stage.encoders[name]
        if isinstance(enc, ImageEncoder):
            enc.encode_image(inputs[name])
        else:
            enc.encode_tokens(inputs[name])

    def bare_all() -> None:
        for name in stage.encoders:
            forward(name)
    per = {name: timed(lambda name=name: forward(name), args.iters, sync)
           for name in stage.encoders}
    bare = timed(bare_all, args.iters, sync)
    stage_t = timed(lambda: stage(batch), args.iters, sync)
    # Two calls at once, as Ray runs them with embed.concurrent_calls_per_actor=2.
    from concurrent.futures import ThreadPoolExecutor

    callers = ThreadPoolExecutor(2)

    def two_calls() -> None:
        list(callers.map(lambda _: stage(batch), range(2)))

    stage2_t = timed(two_calls, args.iters, sync) / 2
    jpeg_mask = [True] * B
    if cuda:
        decode_t = timed(lambda: pixels.decode_gpu(jpegs, jpeg_mask, stage.min_side, dev,
                                                   stage.pool), args.iters, sync)
    else:
        decode_t = timed(lambda: pixels.decode_cpu(jpegs, stage.min_side, stage.pool),
                         args.iters, sync)
    cpu_decode_t = timed(lambda: pixels.decode_cpu(jpegs, stage.min_side, stage.pool), 2,
                         lambda: None)

    result = {
        "machine": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "arch": arch, "clip_model": CLIP_ARCH[arch], "dino": dino_arch,
        "batch": B, "jpeg_sizes": args.sizes, "precision": cfg.precision,
        "build_seconds": round(build_s, 1),
        "bare_img_per_s": {k: round(B / v, 1) for k, v in per.items()},
        "bare_three_encoders_img_per_s": round(B / bare, 1),
        "stage_img_per_s": round(B / stage_t, 1),
        "stage_over_bare": round(bare / stage_t, 3),
        "stage_2_concurrent_calls_img_per_s": round(B / stage2_t, 1),
        "stage_2_concurrent_calls_over_bare": round(bare / stage2_t, 3),
        "decode_img_per_s": round(B / decode_t, 1),
        "cpu_decode_img_per_s": round(B / cpu_decode_t, 1),
        "cpu_decode_threads": args.decode_threads,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
