"""The describe step through ray.data.llm vs vLLM's bare offline ``LLM.generate``, same prompts.

Both paths send the same pairs — two images each (source, then target), the paper's prompt with
WORD_NUM drawn per pair, the chat template applied, the same sampling parameters (the template
regex as structured output) — to the same tiny random LLaVA on vLLM's CPU backend. The images
are already fetched and shrunk: what is timed is the model step and Ray's machinery around it.
Throughput is marginal (``llm_bench.marginal``): fixed costs cancel.

    python benchmarks/describe_cpu.py --rows 64 --out benchmarks/results/cpu-2core/describe.json
"""

from __future__ import annotations

import io
import time

from llm_bench import compare, marginal, ray_data_marginal


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
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from megapairs_ray.synth.describe import make_preprocess, template_regex
    from megapairs_ray.synth.llm import model_path, render_row

    path = model_path(cfg)
    llm = LLM(model=path, enforce_eager=True, dtype="float32", max_model_len=cfg.max_model_len,
              limit_mm_per_prompt={"image": 2})
    sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                        structured_outputs=StructuredOutputsParams(
                            regex=template_regex(cfg.template_slot_chars)))
    pre = make_preprocess(cfg, attempt=0)

    def run(n: int, time_prompts: bool = False) -> tuple[float, int]:
        t0 = time.perf_counter()
        # Decoding and the prompt, as our preprocessing step does: the same prompt text.
        rows = [render_row(pre(r), path, False) for r in pair_rows(n)]
        prompts = [{"prompt": r["prompt"], "multi_modal_data": r["multimodal_data"]}
                   for r in rows]
        if not time_prompts:
            t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    run(8)  # warm-up
    result = marginal(run, n_small, n_large)
    # The same with decoding the images and building the prompts timed too (Ray's path does
    # both in its pre-processing and chat-template stages).
    with_prompts = marginal(lambda n: run(n, time_prompts=True), n_small, n_large)
    result["rows_per_s_with_prompt_building"] = with_prompts["rows_per_s"]
    return result


def through_ray(cfg, n_small: int, n_large: int) -> dict[str, float]:
    from megapairs_ray.synth.describe import build_describe_processor

    return ray_data_marginal(pair_rows, lambda: build_describe_processor(cfg, 0, ["pair_id"]),
                             n_small, n_large)


def main() -> None:
    compare(__doc__, config, bare, through_ray, "bare_llm_generate", model_dir="vlm")


if __name__ == "__main__":
    main()
