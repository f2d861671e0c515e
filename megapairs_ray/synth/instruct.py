"""Instruct: descriptions -> open-ended retrieval instructions, through ``ray.data.llm`` + vLLM.

Each row (``pair_id``, ``description``) becomes the paper's LLM prompt with 5 demonstrations
drawn for that pair. The reply is constrained to a JSON list of strings (vLLM structured output),
which makes a list parseable even from a model that ignores the format; the parser still
tolerates prose and code fences for engines run without it. A row with fewer than 3 usable
instructions is tried again (the sampling is random); after the last try it is a reject with its
reason. Every row comes out: with instructions, or with a reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ray

from megapairs_ray.config import InstructConfig
from megapairs_ray.synth.prompts import MIN_INSTRUCTIONS, instruct_prompt, parse_instructions

OUTPUT_COLUMNS = ("pair_id", "description", "instructions", "dropped", "reject_reason",
                  "attempts", "generated_tokens")


def instructions_schema(cfg: InstructConfig) -> dict[str, Any]:
    return {"type": "array", "minItems": MIN_INSTRUCTIONS, "maxItems": cfg.max_instructions,
            "items": {"type": "string", "minLength": 8,
                      "maxLength": cfg.max_instruction_chars,
                      # No control characters (the parser would drop them as unprintable).
                      "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"}}


def model_path(cfg: InstructConfig) -> str:
    if cfg.model == "tiny-random-llama":
        from megapairs_ray.synth.tiny_models import build_tiny_llm

        return str(build_tiny_llm(cfg.tiny_model_dir))
    return cfg.model


def make_preprocess(cfg: InstructConfig, attempt: int) -> Callable[[dict[str, Any]], dict]:
    sampling: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                                "max_tokens": cfg.max_tokens}
    if cfg.structured_output:
        # No free whitespace between list items: a weak model otherwise spends its token
        # budget on it and the list never closes.
        sampling["structured_outputs"] = {"json": json.dumps(instructions_schema(cfg)),
                                          "disable_any_whitespace": True}
    if cfg.sampling_seed is not None:  # GPU engines only: vLLM's CPU sampler takes no seed
        sampling["seed"] = cfg.sampling_seed + attempt

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        prompt = instruct_prompt(str(row["pair_id"]), str(row["description"]), seed=cfg.seed)
        return {"pair_id": row["pair_id"], "description": row["description"],
                "messages": [{"role": "user", "content": prompt}],
                "sampling_params": sampling}

    return preprocess


def make_postprocess(cfg: InstructConfig, attempt: int) -> Callable[[dict[str, Any]], dict]:
    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        parsed = parse_instructions(str(row.get("generated_text") or ""),
                                    max_chars=cfg.max_instruction_chars)
        tokens = int(row.get("num_generated_tokens") or 0)
        reason = ""
        if not parsed.usable:
            # A reply cut off by max_tokens is told apart from one that never held a list.
            reason = ("truncated" if parsed.problem and tokens >= cfg.max_tokens
                      else parsed.problem or "too_few_instructions")
        return {"pair_id": row["pair_id"], "description": row["description"],
                "instructions": parsed.instructions,
                "dropped": json.dumps(dict(parsed.dropped), sort_keys=True),
                "reject_reason": reason, "attempts": attempt + 1,
                "generated_tokens": tokens}

    return postprocess


def build_instruct_processor(cfg: InstructConfig, attempt: int = 0) -> Any:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs = {"tensor_parallel_size": cfg.tensor_parallel_size,
                     "max_model_len": cfg.max_model_len, **cfg.engine_kwargs}
    bundle = {"CPU": cfg.engine_num_cpus}
    if cfg.engine_num_gpus:
        bundle["GPU"] = cfg.engine_num_gpus
    config = vLLMEngineProcessorConfig(
        model_source=model_path(cfg), engine_kwargs=engine_kwargs, batch_size=cfg.batch_size,
        concurrency=cfg.replicas,
        # The chat template is applied in a CPU stage; vLLM tokenises and detokenises itself.
        chat_template_stage={"enabled": True, "num_cpus": cfg.num_cpus, "concurrency": 1},
        tokenize_stage=False, detokenize_stage=False,
        placement_group_config={"bundle_per_worker": bundle})
    return build_processor(
        config, preprocess=make_preprocess(cfg, attempt),
        postprocess=make_postprocess(cfg, attempt),
        preprocess_map_kwargs={"num_cpus": cfg.num_cpus},
        postprocess_map_kwargs={"num_cpus": cfg.num_cpus})


def _is_reject(batch: Any) -> Any:
    return batch["reject_reason"] != ""


def run_instruct(descriptions: ray.data.Dataset, cfg: InstructConfig,
                 ) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(usable rows, rejected rows) after up to ``1 + cfg.retries`` tries; both materialised."""
    done: list[ray.data.Dataset] = []
    todo = descriptions
    out = None
    for attempt in range(cfg.retries + 1):
        out = build_instruct_processor(cfg, attempt)(todo).materialize()
        done.append(out.filter(lambda r: r["reject_reason"] == ""))
        todo = out.filter(lambda r: r["reject_reason"] != "").select_columns(
            ["pair_id", "description"]).materialize()
        if todo.count() == 0:
            break
    rejects = out.filter(lambda r: r["reject_reason"] != "")  # the last try's failures
    good = done[0].union(*done[1:]) if len(done) > 1 else done[0]
    return good.materialize(), rejects.materialize()
