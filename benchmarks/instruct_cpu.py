"""The instruct step through ray.data.llm vs vLLM's bare offline ``LLM.chat``, same prompts, on CPU.

Both paths send the same chat prompts (the paper's instruct prompt, 5 demonstrations drawn per
pair) with the same sampling parameters (JSON-list structured output) to the same tiny random
Llama on vLLM's CPU backend. Each runs on N and on 2N rows; the extra rows over the extra time is
its steady throughput, with fixed costs (engine start-up for Ray's stage; none for the warm bare
engine) cancelled. Generated tokens per second are reported beside rows per second, because
replies differ in length from run to run.

    python benchmarks/instruct_cpu.py --rows 64 --out benchmarks/results/cpu-2core/instruct.json
"""

from __future__ import annotations

import json
import time

from llm_bench import compare, marginal, ray_data_marginal

DESCRIPTION = ("Both images show a wooden boat on a lake. However, the Source Image is empty "
               "near the shore, whereas the Target Image has two people rowing in fog.")


def config(model_dir: str, batch: int):
    from megapairs_ray.config import InstructConfig

    return InstructConfig(
        model="tiny-random-llama", tiny_model_dir=model_dir, batch_size=batch,
        max_model_len=2048, max_tokens=256, retries=0, engine_num_gpus=0, engine_num_cpus=1,
        engine_kwargs={"enforce_eager": True, "dtype": "float32"})


def bare(cfg, n_small: int, n_large: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from megapairs_ray.synth.instruct import instructions_schema
    from megapairs_ray.synth.llm import model_path
    from megapairs_ray.synth.prompts import instruct_prompt

    llm = LLM(model=model_path(cfg), enforce_eager=True, dtype="float32",
              max_model_len=cfg.max_model_len)
    sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                        structured_outputs=StructuredOutputsParams(
                            json=json.dumps(instructions_schema(cfg)),
                            disable_any_whitespace=True))

    def run(n: int) -> tuple[float, int]:
        msgs = [[{"role": "user", "content": instruct_prompt(f"pair-{i}", DESCRIPTION)}]
                for i in range(n)]
        t0 = time.perf_counter()
        outs = llm.chat(msgs, sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    run(8)  # warm-up
    return marginal(run, n_small, n_large)


def through_ray(cfg, n_small: int, n_large: int) -> dict[str, float]:
    from megapairs_ray.synth.instruct import build_instruct_processor

    def rows(n: int) -> list[dict]:
        return [{"pair_id": f"pair-{i}", "description": DESCRIPTION} for i in range(n)]

    return ray_data_marginal(rows, lambda: build_instruct_processor(cfg), n_small, n_large)


def main() -> None:
    compare(__doc__, config, bare, through_ray, "bare_llm_chat", model_dir="llm")


if __name__ == "__main__":
    main()
