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
from collections.abc import Callable, Sequence
from typing import Any

from megapairs_ray.config import InstructConfig
from megapairs_ray.reasons import Reason
from megapairs_ray.synth.llm import build_llm_processor, sampling_params
from megapairs_ray.synth.prompts import MIN_INSTRUCTIONS, instruct_prompt, parse_instructions


def instructions_schema(cfg: InstructConfig) -> dict[str, Any]:
    return {"type": "array", "minItems": MIN_INSTRUCTIONS, "maxItems": cfg.max_instructions,
            "items": {"type": "string", "minLength": 8,
                      "maxLength": cfg.max_instruction_chars,
                      # No control characters (escapes can still bring some in: the parser
                      # removes and counts them).
                      "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$"}}


def make_preprocess(cfg: InstructConfig, attempt: int) -> Callable[[dict[str, Any]], dict]:
    sampling = sampling_params(cfg, attempt)
    if cfg.structured_output:
        # No free whitespace between list items: a weak model otherwise spends its token
        # budget on it and the list never closes.
        sampling["structured_outputs"] = {"json": json.dumps(instructions_schema(cfg)),
                                          "disable_any_whitespace": True}

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        prompt = instruct_prompt(str(row["pair_id"]), str(row["description"]), seed=cfg.seed)
        return {**row, "messages": [{"role": "user", "content": prompt}],
                "sampling_params": sampling}

    return preprocess


def make_postprocess(cfg: InstructConfig, attempt: int,
                     carry: Sequence[str] = ("pair_id", "description"),
                     ) -> Callable[[dict[str, Any]], dict]:
    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        parsed = parse_instructions(str(row.get("generated_text") or ""),
                                    max_chars=cfg.max_instruction_chars)
        tokens = int(row.get("num_generated_tokens") or 0)
        reason = ""
        if not parsed.usable:
            # A reply cut off by max_tokens is told apart from one that never held a list.
            reason = (Reason.TRUNCATED if parsed.problem and tokens >= cfg.max_tokens
                      else parsed.problem or Reason.TOO_FEW_INSTRUCTIONS)
        return {**{k: row[k] for k in carry},
                "instructions": parsed.instructions,
                "dropped": json.dumps(dict(parsed.dropped), sort_keys=True),
                "reject_reason": reason, "attempts": attempt + 1,
                "generated_tokens": tokens}

    return postprocess


def build_instruct_processor(cfg: InstructConfig, attempt: int = 0,
                             carry: Sequence[str] = ("pair_id", "description")) -> Any:
    return build_llm_processor(cfg, make_preprocess(cfg, attempt),
                               make_postprocess(cfg, attempt, carry))
