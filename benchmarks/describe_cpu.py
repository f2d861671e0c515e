"""The describe step through ray.data.llm vs vLLM's bare offline ``LLM.generate``, same prompts.

Both paths send the same pairs — two images each (source, then target), the paper's prompt with
WORD_NUM drawn per pair, the chat template applied, the same sampling parameters (the template
regex as structured output) — to the same tiny random LLaVA on vLLM's CPU backend. The images
are already fetched and shrunk: what is timed is the model step and Ray's machinery around it.
Each path runs on N and on 2N rows; the extra rows over the extra time is its steady throughput,
with fixed costs (engine start-up for Ray's stage; none for the warm bare engine) cancelled.

    python benchmarks/describe_cpu.py --rows 64 --out benchmarks/results/cpu-2core/describe.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def config(model_dir: str, batch: int):
    from megapairs_ray.config import DescribeConfig

    return DescribeConfig(
        tiny_model_dir=model_dir, image_size=56, template_regex=True, template_slot_chars=40,
        batch_size=batch, max_model_len=1024, max_tokens=160, retries=0, engine_num_gpus=0,
        engine_num_cpus=1, engine_kwargs={"enforce_eager": True, "dtype": "float32"})


def pair_rows(n: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    return [{"pair_id": i, "q_image": jpeg(), "t_image": jpeg(), "fetch_error": ""}
            for i in range(n)]


def bare(cfg, n_small: int, n_large: int) -> dict[str, float]:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from megapairs_ray.synth.describe import make_preprocess, template_regex
    from megapairs_ray.synth.llm import model_path

    path = model_path(cfg)
    processor = AutoProcessor.from_pretrained(path)
    llm = LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=cfg.max_model_len,
              limit_mm_per_prompt={"image": 2})
    sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                        structured_outputs=StructuredOutputsParams(
                            regex=template_regex(cfg.template_slot_chars)))
    pre = make_preprocess(cfg, attempt=0)

    def run(n: int) -> tuple[float, int]:
        rows = [pre(r) for r in pair_rows(n)]  # decoding and the prompt, as Ray's stage does
        prompts = [{"prompt": processor.apply_chat_template(r["messages"], tokenize=False,
                                                            add_generation_prompt=True),
                    "multi_modal_data": r["multimodal_data"]} for r in rows]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    run(8)  # warm-up
    (t1, k1), (t2, k2) = run(n_small), run(n_large)
    return {"rows_per_s": (n_large - n_small) / (t2 - t1), "tokens_per_s": (k2 - k1) / (t2 - t1),
            "seconds_small": t1, "seconds_large": t2}


def through_ray(cfg, n_small: int, n_large: int) -> dict[str, float]:
    import ray

    from megapairs_ray.synth.describe import build_describe_processor

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def run(n: int) -> tuple[float, int]:
        ds = ray.data.from_items(pair_rows(n))
        t0 = time.perf_counter()
        out = build_describe_processor(cfg, 0, ["pair_id"])(ds).take_all()
        return time.perf_counter() - t0, sum(r["generated_tokens"] for r in out)

    (t1, k1), (t2, k2) = run(n_small), run(n_large)
    ray.shutdown()
    return {"rows_per_s": (n_large - n_small) / (t2 - t1), "tokens_per_s": (k2 - k1) / (t2 - t1),
            "seconds_small": t1, "seconds_large": t2,
            "end_to_end_rows_per_s": n_large / t2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="ray.data.llm batch size")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cfg = config(str(Path(d) / "vlm"), args.batch)
        b = bare(cfg, args.rows, 2 * args.rows)
        r = through_ray(cfg, args.rows, 2 * args.rows)
    import vllm

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "vllm": vllm.__version__},
              "rows": [args.rows, 2 * args.rows], "batch_size": args.batch,
              "bare_llm_generate": b, "ray_data_llm": r,
              "ratio_rows": r["rows_per_s"] / b["rows_per_s"],
              "ratio_tokens": r["tokens_per_s"] / b["tokens_per_s"]}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
