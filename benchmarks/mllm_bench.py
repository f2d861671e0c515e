"""The mllm family against its bare model: the training step, and gallery embedding through Ray.

**train** (one process, no Ray; CPU or GPU): the same LoRA-wrapped LLaVA-NeXT, the same batch of
B queries with 1 positive and H hard negatives, the same GradCache chunk:
- ``bare_fwd_bwd``: GradCache written out plainly on pre-normalised tiles and pre-tokenised
  prompts: the chunks' embeddings without a graph, InfoNCE over them, each chunk again with its
  graph and the loss's gradient. No optimiser.
- ``bare_fwd_bwd_adamw``: the same plus an AdamW step, the least a training step costs.
- ``train_step``: ``TrainStep`` as Ray Train runs it: uint8 squares tiled on the device, the
  gathered loss, GradCache with replayed random state, clipping, AdamW, the schedule.

**vllm** (CPU): vLLM's pooling runner on the twin against this family's transformers path, the
same squares: embeddings must agree (cosine), and the faster one is what the gallery should run.

**layout**: DDP with LoRA against FSDP for configs/train-paper-mllm.yaml, from the parameters
counted on a LLaVA-NeXT of the 7B shape (meta device) under the recipe's LoRA.

**gallery** (CPU, Ray): ``run_gallery`` on folders of N/2 and N photos, against
``RetrieverEncoder`` on the same files in this process (read, decode, embed; one thread). Rates
are marginal, (N - N/2) / (t_N - t_N/2), so start-up costs (Ray, actors, the model load) cancel:
what is left is what Ray adds per image.

    python benchmarks/mllm_bench.py --part train --out benchmarks/results/cpu-2core/mllm_train.json
    python benchmarks/mllm_bench.py --part gallery --images 1200 \
        --out benchmarks/results/cpu-2core/mllm_gallery.json
    VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/mllm_bench.py --part vllm --images 1024 \
        --out benchmarks/results/cpu-2core/mllm_vllm.json
    # a GPU: a LLaVA-NeXT of Mistral-7B's shape, random weights, bf16 (benchmarks/run_gpu_mllm.sh)
    python benchmarks/mllm_bench.py --part train --device cuda --shape 7b --batch 8 --chunk 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megapairs_ray.models.mllm import MMRetMLLM, anyres
from megapairs_ray.models.mllm_settings import MLLMSettings

TWIN_SIDE = 56
# LLaVA-1.6-Mistral-7B's shape: Mistral-7B language model, CLIP ViT-L/14-336 vision tower.
SHAPE_7B = {"text": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064},
            "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}


def machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def build_model(shape: str, folder: Path, dtype: torch.dtype, device: str) -> MMRetMLLM:
    """The twin (built offline), or a random LLaVA-NeXT of 7B shape with the twin's tokenizer
    (the same prompts; only the vocabulary differs)."""
    from megapairs_ray.models.mllm_twin import build_tiny_llava_next
    from megapairs_ray.models.tokenizer import load_tokenizer

    twin = build_tiny_llava_next(folder / "twin")
    settings = (MLLMSettings(image_size=TWIN_SIDE, max_text_len=96) if shape == "twin"
                else MLLMSettings(image_size=512, max_text_len=3072))
    if shape == "twin":
        model = MMRetMLLM.from_pretrained(twin, trainable=True, settings=settings)
    else:
        from transformers import AutoConfig, LlavaNextForConditionalGeneration

        config = AutoConfig.from_pretrained(twin)
        for k, v in SHAPE_7B["text"].items():
            setattr(config.text_config, k, v)
        config.text_config.head_dim = 128
        for k, v in SHAPE_7B["vision"].items():
            setattr(config.vision_config, k, v)
        config.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336],
                                       [336, 1008]]
        with torch.device(device):
            llava = LlavaNextForConditionalGeneration(config).to(dtype)
        model = MMRetMLLM(llava, load_tokenizer(str(twin)), settings)
    model.add_lora(r=32, alpha=64, dropout=0.0,
                   target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj"
                                  r"|up_proj|down_proj)")
    return model.to(device)


def train_batch(model: MMRetMLLM, b: int, h: int, device: str) -> dict[str, torch.Tensor]:
    from megapairs_ray.models.inputs import tokenize_queries

    g = torch.Generator().manual_seed(0)
    side = model.settings.image_size

    def px(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)

    texts = [f"make it {c} and show it at night" for c in ("red", "blue", "green", "big") * b][:b]
    ids, mask = tokenize_queries(model.tokenizer, model.model_input, texts, [True] * b)
    return {"query_pixels": px(b, 3, side, side), "target_pixels": px(b, 3, side, side),
            "negative_pixels": px(b, h, 3, side, side),
            "input_ids": torch.from_numpy(ids).to(device),
            "attention_mask": torch.from_numpy(mask).to(device)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def bench_train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from megapairs_ray.train.config import OptimConfig
    from megapairs_ray.train.step import TrainStep

    dev, bf16 = args.device, args.device == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    model = build_model(args.shape, work, dtype, dev).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    b, h, chunk = args.batch, args.negatives, args.chunk
    data = train_batch(model, b, h, dev)
    # The bare path's inputs, prepared once: tiles and the candidates' prompt.
    q_tiles = anyres(data["query_pixels"].float(), model.grid, model.tile, model.mean, model.std)
    c_px = torch.cat([data["target_pixels"], data["negative_pixels"].flatten(0, 1)]).float()
    c_tiles = anyres(c_px, model.grid, model.tile, model.mean, model.std)
    side = model.settings.image_size
    inner = model.base_llava().model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16
                else torch.autocast("cpu", enabled=False))

    def embed(tiles: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with autocast:
            hidden = inner(input_ids=ids, attention_mask=mask, pixel_values=tiles.to(dtype),
                           image_sizes=torch.tensor([[side, side]] * len(ids), device=dev),
                           use_cache=False).last_hidden_state
        last = (mask * torch.arange(ids.shape[1], device=dev)).argmax(1)
        return F.normalize(hidden[torch.arange(len(ids), device=dev), last].float(), dim=-1)

    cand_ids = model.candidate_ids.expand(len(c_tiles), -1)
    cand_mask = torch.ones_like(cand_ids)
    q_parts = [(q_tiles[i : i + chunk], data["input_ids"][i : i + chunk],
                data["attention_mask"][i : i + chunk]) for i in range(0, b, chunk)]
    c_parts = [(c_tiles[i : i + chunk], cand_ids[i : i + chunk], cand_mask[i : i + chunk])
               for i in range(0, len(c_tiles), chunk)]
    params = [p for p in model.parameters() if p.requires_grad]
    bare_opt = torch.optim.AdamW(params, lr=1e-6, fused=bf16)
    labels = torch.arange(b, device=dev)

    def bare(step_optimizer: bool) -> None:
        with torch.no_grad():
            reps = [embed(*p) for p in q_parts + c_parts]
        q = torch.cat(reps[: len(q_parts)]).requires_grad_()
        c = torch.cat(reps[len(q_parts) :]).requires_grad_()
        F.cross_entropy(q @ c.T / 0.02, labels).backward()
        grads = list(q.grad.split(chunk)) + list(c.grad.split(chunk))  # type: ignore[union-attr]
        for p, g in zip(q_parts + c_parts, grads):
            embed(*p).backward(g)
        if step_optimizer:
            bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    optim = OptimConfig(lr=1e-6, max_steps=10_000, batch_size=b, grad_cache_chunk=chunk,
                        precision="bf16" if bf16 else "fp32")
    step = TrainStep(model, model, optim, h, model.model_input, torch.device(dev))
    runs: dict[str, list[float]] = {"bare_fwd_bwd": [], "bare_fwd_bwd_adamw": [],
                                    "train_step": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
        runs["bare_fwd_bwd"].append(timed(lambda: bare(False), args.steps, 1, dev))
        runs["bare_fwd_bwd_adamw"].append(timed(lambda: bare(True), args.steps, 1, dev))
        runs["train_step"].append(timed(lambda: step(data), args.steps, 1, dev))
    best = {k: min(v) for k, v in runs.items()}
    per_s = {k: b / v for k, v in best.items()}
    out = {"machine": machine(dev), "shape": args.shape, "batch_queries": b,
           "hard_negatives": h, "grad_cache_chunk": chunk, "lora_r": 32,
           "gradient_checkpointing": args.checkpointing,
           "precision": "bf16" if bf16 else "fp32", "image_tokens": model.image_tokens,
           "seconds_per_step": runs, "best_seconds_per_step": best, "triplets_per_s": per_s,
           "ratio_vs_bare_fwd_bwd": per_s["train_step"] / per_s["bare_fwd_bwd"],
           "ratio_vs_bare_fwd_bwd_adamw": per_s["train_step"] / per_s["bare_fwd_bwd_adamw"]}
    if dev == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def photos(folder: Path, n: int) -> list[Path]:
    """``n`` JPEGs of several sizes from the bundled corpus (``make demo``), else generated, each
    with a caption file beside it (the folder layout ingest reads)."""
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    datas: list[bytes] = []
    for tar in sorted(Path("data/corpus").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".jpg") and len(datas) < n:
                    datas.append(t.extractfile(m).read())  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    while len(datas) < n:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize(
            (320, 240), Image.Resampling.BICUBIC).save(buf, "JPEG")
        datas.append(buf.getvalue())
    paths = []
    for i, data in enumerate(datas):
        p = folder / f"{i:06d}.jpg"
        p.write_bytes(data)
        p.with_suffix(".txt").write_text(f"photo {i}")  # ingest requires a caption
        paths.append(p)
    return paths


def bench_gallery(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    from megapairs_ray.config import config_from_dict
    from megapairs_ray.models.mllm_twin import build_tiny_llava_next
    from megapairs_ray.models.retriever import RetrieverEncoder
    from megapairs_ray.pipeline.gallery import run_gallery
    from megapairs_ray.serve.config import GalleryConfig

    twin = build_tiny_llava_next(work / "twin")
    (twin / "mmret_mllm.json").write_text(json.dumps(
        MLLMSettings(image_size=args.side, max_text_len=96).to_dict()))
    n = args.images
    sets = {"half": photos(work / "half", n // 2), "full": photos(work / "full", n)}
    torch.set_num_threads(1)
    encoder = RetrieverEncoder(str(twin), batch_size=args.batch_size, threads=1)

    def bare(paths: list[Path]) -> None:
        for i in range(0, len(paths), args.batch_size):
            chunk = [p.read_bytes() for p in paths[i : i + args.batch_size]]
            encoder.candidates(encoder.pixels_of(chunk))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    seconds: dict[str, list[float]] = {f"{k}_{w}": [] for k in ("bare", "ray")
                                       for w in ("half", "full")}
    for r in range(args.repeats):
        for which, paths in sets.items():
            t0 = time.perf_counter()
            bare(paths)
            seconds[f"bare_{which}"].append(time.perf_counter() - t0)
            run_dir = work / f"gallery-{which}-{r}"
            cfg = config_from_dict({
                "profile": "bench", "run_dir": str(run_dir), "checkpoint": str(twin),
                "input": {"uris": [str(work / which)], "format": "folder"},
                "ingest": {"min_side": 16, "num_cpus": 0.25},
                "encoder": {"num_cpus": 1, "batch_size": args.batch_size, "decode_threads": 1},
                "index": {"kind": "flat", "shards": 1, "shard_num_cpus": 0.1}},
                schema=GalleryConfig)
            t0 = time.perf_counter()
            run_gallery(cfg)
            seconds[f"ray_{which}"].append(time.perf_counter() - t0)
            shutil.rmtree(run_dir, ignore_errors=True)
    ray.shutdown()
    extra = n - n // 2
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    bare_rate = extra / (med["bare_full"] - med["bare_half"])
    ray_rate = extra / (med["ray_full"] - med["ray_half"])
    return {"machine": machine("cpu"), "model": "mllm twin (random LLaVA-NeXT, 28-px tiles)",
            "square": args.side, "images": {"half": n // 2, "full": n},
            "batch_size": args.batch_size, "seconds": seconds,
            "marginal_bare_img_per_s": bare_rate, "marginal_ray_img_per_s": ray_rate,
            "ray_vs_bare": ray_rate / bare_rate,
            "end_to_end_bare_img_per_s": n / med["bare_full"],
            "end_to_end_ray_img_per_s": n / med["ray_full"],
            "note": "ray: the whole gallery job (ingest, one embedding actor of 1 CPU, index), "
                    "bare: read + decode + embed in this process on one thread; marginal "
                    "rates cancel start-up costs"}


def bench_vllm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """vLLM's pooling runner (LLaVA-NeXT converted to an embedding model: last token,
    normalised) against this family's transformers path, on the twin, the same squares."""
    from PIL import Image
    from vllm import LLM

    from megapairs_ray.models.mllm_settings import RELEASED_CANDIDATE
    from megapairs_ray.models.mllm_twin import build_tiny_llava_next

    twin = build_tiny_llava_next(work / "twin")
    (twin / "mmret_mllm.json").write_text(json.dumps(
        MLLMSettings(image_size=TWIN_SIDE, max_text_len=96).to_dict()))
    rng = np.random.default_rng(0)
    squares = [Image.fromarray((rng.random((TWIN_SIDE, TWIN_SIDE, 3)) * 255).astype("uint8"))
               for _ in range(args.images)]
    requests = [{"prompt": RELEASED_CANDIDATE, "multi_modal_data": {"image": im}}
                for im in squares]
    llm = LLM(model=str(twin), runner="pooling", convert="embed", max_model_len=256,
              dtype="float32", limit_mm_per_prompt={"image": 1}, enforce_eager=True)
    model = MMRetMLLM.from_pretrained(twin).eval()
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float()
                          for im in squares])
    torch.set_num_threads(os.cpu_count() or 1)

    def ours() -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([model.embed_candidates(pixels[i : i + args.batch_size]).numpy()
                                   for i in range(0, len(pixels), args.batch_size)])

    def theirs() -> np.ndarray:
        return np.array([o.outputs.embedding for o in llm.embed(requests, use_tqdm=False)])

    cosine = (ours() * theirs()).sum(1)
    seconds: dict[str, list[float]] = {"vllm": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("vllm", theirs), ("transformers", ours)):
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    rate = {k: args.images / min(v) for k, v in seconds.items()}
    return {"machine": machine("cpu"), "model": "mllm twin (random LLaVA-NeXT, 28-px tiles)",
            "images": args.images, "seconds": seconds, "img_per_s": rate,
            "vllm_vs_transformers": rate["vllm"] / rate["transformers"],
            "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "note": "the candidates' embedding on the same squares: vLLM's pooling runner "
                    "(its own processor on the PIL squares) against the family's transformers "
                    "path (tiles made on the tensors), all cores each"}


def bench_layout(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """DDP with LoRA or FSDP for the 7B recipe: the parameters counted on a LLaVA-NeXT of
    LLaVA-1.6-Mistral-7B's shape (meta device: no memory, no weights) under the recipe's LoRA,
    and what each layout sends between GPUs in one step of configs/train-paper-mllm.yaml."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    from megapairs_ray.models.mllm_twin import build_tiny_llava_next
    from megapairs_ray.train.config import TrainConfig

    cfg = TrainConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    config = AutoConfig.from_pretrained(build_tiny_llava_next(work / "twin"))
    for k, v in SHAPE_7B["text"].items():
        setattr(config.text_config, k, v)
    config.text_config.head_dim = 128
    for k, v in SHAPE_7B["vision"].items():
        setattr(config.vision_config, k, v)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    lora = cfg.model.mllm.lora
    peft_model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                  target_modules=lora.target_modules))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    o, h = cfg.optim, cfg.data.num_hard_negatives
    chunk = o.grad_cache_chunk or o.batch_size * (2 + h)
    chunks = -(-o.batch_size // chunk) + -(-o.batch_size * (1 + h) // chunk)
    gathers = 3  # each chunk's weights: GradCache's pass without a graph, with one, backward
    ddp_bytes = trainable * 4  # the adapter's fp32 gradients, all-reduced once a step
    fsdp_bytes = chunks * gathers * total * 2 * (cfg.scaling.num_workers - 1) / (
        cfg.scaling.num_workers)  # bf16 weights all-gathered per chunk and pass
    return {"machine": machine("cpu"), "config": args.config, "parameters": total,
            "lora_trainable": trainable, "bf16_weights_gib": total * 2 / 2**30,
            "lora_states_gib": trainable * 16 / 2**30, "chunks_per_gpu_step": chunks,
            "ddp_bytes_per_gpu_step": ddp_bytes, "fsdp_bytes_per_gpu_step": fsdp_bytes,
            "fsdp_vs_ddp_traffic": fsdp_bytes / ddp_bytes,
            "note": "counted on the real shape (meta device); FSDP's traffic is each chunk's "
                    "weights gathered for three passes, DDP's the adapter's gradients once"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("train", "gallery", "vllm", "layout"), required=True)
    ap.add_argument("--config", default="configs/train-paper-mllm.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=("twin", "7b"), default="twin")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        bench = {"train": bench_train, "gallery": bench_gallery, "vllm": bench_vllm,
                 "layout": bench_layout}[args.part]
        result = bench(args, Path(d))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
