"""Pixel and ranking parity of the CLIP family's preprocessing with the released CLIP processor.

The question: a user who evaluates a released CLIP checkpoint (BGE-VL-base/large) through this
project, which embeds with ``RetrieverEncoder`` (eval, the gallery, the service), gets the
rankings the authors' code gives. The authors' code is ``CLIPImageProcessor`` as the checkpoints
ship it; transformers 4.x ran it on Pillow (``CLIPImageProcessorPil`` in transformers 5), which
produced the published numbers, and transformers 5 runs it on torchvision by default
(``CLIPImageProcessor``). All three are compared here, with the previous preprocessing beside
them (transparency composited on white, torchvision's rounded crop offset, one float resize).

The gallery: the bundled corpus's JPEGs (``data/corpus/*.tar``, clip art at most 384 px) plus
generated PNGs of the awkward kinds (transparent RGBA with black or coloured hidden pixels,
palettes with and without a transparent entry, greyscale with and without alpha, odd sizes,
extreme aspect ratios, images small enough to be enlarged), at most ``--max-images`` in all.
The model: a random-initialised CLIP at 224 px (no weights can be downloaded here; a random
model's rankings are, if anything, more fragile than a trained one's). Every image is embedded
through each path with the same weights; each image is then an image-only query over the rest
of the gallery (itself excluded), and the mean share of its top 10 that two paths agree on is
reported. Pixel differences are per image kind, in normalised units and in 8-bit levels (one
level is 1 / (255 * std); 0.0150 at CLIP's smallest std).

Throughput is the preprocessing alone, from encoded bytes to the model's input tensor, per path
on this machine: ours decodes on the encoder's thread pool and resizes in batches of
``--batch``; the processors are called as users call them, on a batch of ``Image.open`` results
(they decode when they convert to RGB), in this one process. Everything runs on ``--threads``
threads (default 1, torch's and the decode pool's): the two cores are shared with another
tenant, and at two threads OpenMP's barriers on an oversubscribed core made a single resize
10x slower and the figures noise; one thread gives a per-core rate that survives the neighbour.

    .venv/bin/python benchmarks/preprocess_parity.py \\
        --out benchmarks/results/cpu-2core/preprocess_parity.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import transformers
from PIL import Image, ImageDraw

from megapairs_ray.imaging import ImageSpec
from megapairs_ray.models.inputs import ModelInput
from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.models.tokenizer import load_tokenizer
from megapairs_ray.pixels import decode_cpu, to_model_input

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 10
# A small random CLIP at the released models' input size: ViT patches of 16 (BGE-VL-base's),
# a narrow, shallow tower so a thousand images embed in seconds on two cores.
CLIP_224 = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 224, "patch_size": 16},
    "projection_dim": 64,
}
KINDS = ["rgba_black_hidden", "rgba_colour_hidden", "palette", "palette_transparent",
         "grey", "grey_alpha", "odd_size", "wide", "tall", "small"]


# ---------------------------------------------------------------------- the gallery


def corpus_jpegs(corpus: Path, limit: int) -> list[tuple[str, str, bytes]]:
    """(name, kind, bytes) of the bundled corpus's JPEGs, in tar order."""
    out: list[tuple[str, str, bytes]] = []
    for tar in sorted(corpus.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                if member.name.endswith(".jpg") and len(out) < limit:
                    out.append((member.name, "corpus_jpeg", tf.extractfile(member).read()))
    return out


def scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Clip art of a sort: a two-colour gradient and a few filled shapes and lines, hard edged
    (where bicubic overshoots, so rounding and clamping show)."""
    c0, c1 = rng.integers(0, 256, (2, 3))
    t = np.linspace(0, 1, w)[None, :, None]
    im = Image.fromarray(np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(xy, fill=colour)
        elif shape == 1:
            draw.rectangle(xy, fill=colour)
        else:
            draw.line(xy, fill=colour, width=int(rng.integers(1, 4)))
    return im


def mask(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """An alpha channel: opaque shapes on a transparent ground, soft-edged in places."""
    a = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(a)
    for _ in range(int(rng.integers(1, 5))):
        xs, ys = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
        draw.ellipse([xs[0], ys[0], xs[1], ys[1]], fill=int(rng.integers(128, 256)))
    ramp = np.linspace(0, 1, w)[None, :] ** 2 if rng.random() < 0.5 else 1.0
    return (np.asarray(a, np.float64) * ramp).round().astype(np.uint8)


def generated_image(kind: str, rng: np.random.Generator) -> bytes:
    """One PNG of ``kind``."""
    if kind == "wide":
        w, h = int(rng.integers(300, 900)), int(rng.integers(6, 24))
    elif kind == "tall":
        w, h = int(rng.integers(6, 24)), int(rng.integers(300, 900))
    elif kind == "small":
        w, h = (int(v) for v in rng.integers(12, 200, 2))
    elif kind == "odd_size":
        w, h = (int(v) | 1 for v in rng.integers(31, 601, 2))
    else:
        w, h = (int(v) for v in rng.integers(60, 500, 2))
    im = scene(rng, w, h)
    if kind.startswith("rgba"):
        rgb = np.asarray(im).copy()
        alpha = mask(rng, w, h)
        if kind == "rgba_black_hidden":  # the usual transparent logo: black where unseen
            rgb[alpha == 0] = 0
        im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif kind.startswith("palette"):
        im = im.quantize(colors=int(rng.integers(4, 64)))
        if kind == "palette_transparent":
            buf = io.BytesIO()
            im.save(buf, "PNG", transparency=int(np.asarray(im)[0, 0]))  # the ground colour
            return buf.getvalue()
    elif kind == "grey":
        im = im.convert("L")
    elif kind == "grey_alpha":
        im = Image.fromarray(np.dstack([np.asarray(im.convert("L")), mask(rng, w, h)]), "LA")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def gallery(corpus: Path, max_images: int, generated: int, seed: int,
            ) -> list[tuple[str, str, bytes]]:
    rng = np.random.default_rng(seed)
    made = [(f"gen{i:04d}.png", KINDS[i % len(KINDS)], generated_image(KINDS[i % len(KINDS)], rng))
            for i in range(min(generated, max_images))]
    return corpus_jpegs(corpus, max_images - len(made)) + made


# ---------------------------------------------------------------------- the paths


def clip_checkpoint(folder: Path) -> str:
    torch.manual_seed(0)
    MMRetCLIP.from_config(**CLIP_224).save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)
    return str(folder)


def processors(mi: ModelInput) -> dict[str, Any]:
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kw = {"size": {"shortest_edge": mi.image_size},
          "crop_size": {"height": mi.image_size, "width": mi.image_size},
          "image_mean": list(mi.mean), "image_std": list(mi.std)}
    return {"hf_pil": CLIPImageProcessorPil(**kw), "hf_torchvision": CLIPImageProcessor(**kw)}


def paths(enc: RetrieverEncoder) -> dict[str, Callable[[list[bytes]], torch.Tensor]]:
    """Encoded bytes -> model input, per path."""
    mi = enc.model.model_input
    old_spec = ImageSpec(size=mi.image_size, crop_fraction=1.0, mean=mi.mean, std=mi.std)

    def processor_path(proc: Any) -> Callable[[list[bytes]], torch.Tensor]:
        return lambda batch: proc([Image.open(io.BytesIO(b)) for b in batch],
                                  return_tensors="pt")["pixel_values"]

    return {
        "ours": enc.pixels_of,
        "previous": lambda batch: to_model_input(decode_cpu(batch, 0, enc.pool), old_spec,
                                                 torch.float32),
        **{name: processor_path(p) for name, p in processors(mi).items()},
    }


def top_k(emb: np.ndarray, k: int) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)  # an image is not its own neighbour
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / a.shape[1] for x, y in zip(a, b)]))


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--max-images", type=int, default=1000)
    ap.add_argument("--generated", type=int, default=300,
                    help="generated PNGs of the awkward kinds, within --max-images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads and decode threads (see the module docstring)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    images = gallery(Path(args.corpus), args.max_images, args.generated, args.seed)
    kinds = [k for _, k, _ in images]
    with tempfile.TemporaryDirectory() as tmp:
        enc = RetrieverEncoder(clip_checkpoint(Path(tmp) / "clip224"), batch_size=args.batch,
                               threads=args.threads)
    mi = enc.model.model_input
    level = 1 / (255 * min(mi.std))
    fns = paths(enc)
    for fn in fns.values():  # warm-up: first calls pay for imports and thread start
        fn([b for _, _, b in images[:4]])

    seconds: dict[str, float] = defaultdict(float)
    emb: dict[str, list[np.ndarray]] = defaultdict(list)
    diffs: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for s in range(0, len(images), args.batch):
        batch = [b for _, _, b in images[s : s + args.batch]]
        px = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            px[name] = fn(batch)
            seconds[name] += time.perf_counter() - t0
            emb[name].append(enc.candidates(px[name]))
        for name in ("ours", "previous", "hf_torchvision"):
            for ref in ("hf_pil", "hf_torchvision"):
                if name != ref:
                    d = (px[name] - px[ref]).abs().flatten(1).numpy()
                    diffs[f"{name}_vs_{ref}"]["all"].append(d)
                    for i, k in enumerate(kinds[s : s + args.batch]):
                        diffs[f"{name}_vs_{ref}"][k].append(d[i : i + 1])

    ranks = {name: top_k(np.concatenate(e), TOP_K) for name, e in emb.items()}
    pixel = {
        pair: {kind: {"max": round(float(np.concatenate(ds).max()), 4),
                      "max_levels": round(float(np.concatenate(ds).max() / level), 2),
                      "mean": round(float(np.concatenate(ds).mean()), 6),
                      "share_values_differing": round(
                          float((np.concatenate(ds) > level / 2).mean()), 5),
                      "images": int(sum(len(d) for d in ds))}
               for kind, ds in by_kind.items()}
        for pair, by_kind in diffs.items()}
    n = len(images)
    result = {
        "benchmark": "preprocess_parity",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores "
                   f"({platform.processor() or 'cpu'}), shared with another tenant",
        "threads": args.threads,
        "load_average_1min": {"before": round(load_before[0], 2),
                              "after": round(os.getloadavg()[0], 2)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "pillow": PIL.__version__},
        "setup": {"images": n, "corpus_jpegs": kinds.count("corpus_jpeg"),
                  "generated_pngs": n - kinds.count("corpus_jpeg"),
                  "kinds": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
                  "model": "random-initialised CLIP, 224 px, ViT patch 16, "
                           f"{CLIP_224['vision_config']['num_hidden_layers']} layers, "
                           f"width {CLIP_224['vision_config']['hidden_size']}",
                  "model_input": mi.__dict__, "batch": args.batch, "top_k": TOP_K,
                  "one_level": round(level, 5),
                  "paths": {"ours": "RetrieverEncoder.pixels_of (the CLIP family's spec)",
                            "previous": "before: white compositing, rounded crop offset, "
                                        "one float resize",
                            "hf_pil": "CLIPImageProcessorPil (transformers 4.x's path)",
                            "hf_torchvision": "CLIPImageProcessor (transformers 5 default)"}},
        f"top{TOP_K}_overlap": {
            f"{a}_vs_{b}": round(overlap(ranks[a], ranks[b]), 4)
            for a, b in [("ours", "hf_pil"), ("ours", "hf_torchvision"),
                         ("hf_torchvision", "hf_pil"), ("previous", "hf_pil"),
                         ("previous", "hf_torchvision")]},
        "pixel_difference": pixel,
        "preprocess_images_per_s": {name: round(n / s, 1) for name, s in seconds.items()},
    }
    print(json.dumps({k: result[k] for k in ("setup", f"top{TOP_K}_overlap",
                                             "preprocess_images_per_s")}, indent=2))
    print(json.dumps({p: v["all"] for p, v in pixel.items()}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
