"""The MMRet training step vs the bare model's forward + backward, on one GPU (no Ray).

Same random-initialised CLIP (ViT-B/16 as MMRet-base, or ViT-L/14), same batch of B queries with
1 positive + H hard negatives each, bf16 autocast, in one process:

- ``bare_fwd_bwd``: pixels already normalised in bf16-ready fp32; one image-tower pass over
  queries + candidates, the text tower, an InfoNCE over the candidates, backward. No optimiser.
- ``bare_fwd_bwd_adamw``: the same plus a fused AdamW step — the least any training step costs.
- ``train_step``: ``TrainStep`` as Ray Train runs it — uint8 pixels normalised on the device,
  the gathered loss, grad clipping, fused AdamW, the lr schedule.

    python benchmarks/train_gpu.py --model b16 --batch 128 --out benchmarks/results/h100/train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megapairs_ray.models.inputs import ModelInput
from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.train.config import OptimConfig
from megapairs_ray.train.step import TrainStep

MODELS = {
    "b16": {"projection_dim": 512,
            "text_config": {"hidden_size": 512, "intermediate_size": 2048,
                            "num_hidden_layers": 12, "num_attention_heads": 8,
                            "max_position_embeddings": 77, "vocab_size": 49408},
            "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                              "num_hidden_layers": 12, "num_attention_heads": 12,
                              "image_size": 224, "patch_size": 16}},
    "l14": {"projection_dim": 768,
            "text_config": {"hidden_size": 768, "intermediate_size": 3072,
                            "num_hidden_layers": 12, "num_attention_heads": 12,
                            "max_position_embeddings": 77, "vocab_size": 49408},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                              "num_hidden_layers": 24, "num_attention_heads": 16,
                              "image_size": 224, "patch_size": 14}},
}


def batch(b: int, h: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)

    def px(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.uint8)

    ids = torch.randint(1, 49000, (b, 77), generator=g, device=device)
    ids[:, 0], ids[:, 40:] = 49406, 49407  # start, end-of-text (and its padding)
    mask = torch.zeros_like(ids)
    mask[:, :41] = 1
    return {"query_pixels": px(b, 3, 224, 224), "target_pixels": px(b, 3, 224, 224),
            "negative_pixels": px(b, h, 3, 224, 224), "input_ids": ids, "attention_mask": mask}


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="b16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--negatives", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    b, h = args.batch, args.negatives
    data = batch(b, h, dev)
    mi = ModelInput(image_size=224, max_text_len=77)
    mean = torch.tensor(mi.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(mi.std, device=dev).view(1, 3, 1, 1)
    q_norm = (data["query_pixels"].float() / 255 - mean) / std
    c_norm = (torch.cat([data["target_pixels"], data["negative_pixels"].flatten(0, 1)]).float()
              / 255 - mean) / std
    labels = torch.arange(b, device=dev)

    torch.manual_seed(0)
    model = MMRetCLIP.from_config(**MODELS[args.model]).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    bare_opt = torch.optim.AdamW(params, lr=1e-6, fused=True)

    def bare(step_optimizer: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, c = model(q_norm, data["input_ids"], data["attention_mask"], c_norm)
        loss = F.cross_entropy(q.float() @ c.float().T / 0.02, labels)
        loss.backward()
        if step_optimizer:
            bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)

    optim = OptimConfig(lr=1e-6, max_steps=10_000, batch_size=b, precision="bf16")
    step = TrainStep(model, model, optim, h, mi, dev)
    runs: dict[str, list[float]] = {"bare_fwd_bwd": [], "bare_fwd_bwd_adamw": [],
                                    "train_step": []}
    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
        runs["bare_fwd_bwd"].append(timed(lambda: bare(False), args.steps, args.warmup))
        runs["bare_fwd_bwd_adamw"].append(timed(lambda: bare(True), args.steps, args.warmup))
        runs["train_step"].append(timed(lambda: step(data), args.steps, args.warmup))
    best = {k: min(v) for k, v in runs.items()}
    per_s = {k: b / v for k, v in best.items()}
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "platform": platform.platform(), "model": args.model, "batch_queries": b,
        "hard_negatives": h, "images_per_step": b * (2 + h), "precision": "bf16",
        "seconds_per_step": best, "triplets_per_s": per_s,
        "ratio_vs_bare_fwd_bwd": per_s["train_step"] / per_s["bare_fwd_bwd"],
        "ratio_vs_bare_fwd_bwd_adamw": per_s["train_step"] / per_s["bare_fwd_bwd_adamw"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
