"""Describe: both images of a pair -> how they relate, through ``ray.data.llm`` + a vision-language
model on vLLM (paper: InternVL2-26B).

Each row is a mined pair with the locations of its two images. ``FetchPairImages`` reads them
(grouped by the file that holds them, in each batch; never a shuffle of image bytes) and shrinks
them to the model's input size; the prompt is the paper's, WORD_NUM drawn per pair. A reply that
is empty, cut off by ``max_tokens`` or shorter than ``min_words`` is tried again, then rejected
with that reason. A pair whose image cannot be read is rejected before the model sees it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from PIL import Image

from megapairs_ray.config import DescribeConfig, InputConfig
from megapairs_ray.reasons import Reason
from megapairs_ray.synth.images import fetch_resized, shrink_jpeg
from megapairs_ray.synth.llm import build_llm_processor, sampling_params
from megapairs_ray.synth.prompts import describe_messages, word_num


def template_regex(max_chars: int) -> str:
    """The paper's template as a regular expression for vLLM's structured output: printable
    text in each slot, at most ``max_chars`` characters per slot, so a reply that follows it
    always ends."""
    slot = f"[^\\x00-\\x1f\\x7f-\\x9f]{{8,{max_chars}}}"
    return (f"Both images (are|have|exhibit|show) {slot}\\. However, the Source Image {slot}, "
            f"whereas the Target Image {slot}\\.")


def _as_list(v: Any) -> list[Any]:
    return v.tolist() if isinstance(v, np.ndarray) else list(v)


class FetchPairImages:
    """Callable stage: pairs with ``q_``/``t_`` image locations in, the same pairs with
    ``q_image``/``t_image`` (JPEG bytes, longest side ``image_size``) and ``fetch_error`` out."""

    def __init__(self, input_cfg: InputConfig, image_size: int) -> None:
        self.input_cfg = input_cfg
        self.convert = partial(shrink_jpeg, longest_side=image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values())))
        rows = [{k: (_as_list(v[i]) if isinstance(v[i], np.ndarray) else v[i])
                 for k, v in batch.items()} for i in range(n)]
        out = fetch_resized(rows, ("q_", "t_"), self.input_cfg, self.convert)
        return {k: [r[k] for r in out] for k in out[0]} if out else {}


def make_preprocess(cfg: DescribeConfig, attempt: int) -> Callable[[dict[str, Any]], dict]:
    sampling = sampling_params(cfg, attempt)
    if cfg.template_regex:
        sampling["structured_outputs"] = {"regex": template_regex(cfg.template_slot_chars)}

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        pid = str(row["pair_id"])
        rest = {k: v for k, v in row.items() if k not in ("q_image", "t_image")}
        if row.get("fetch_error"):
            # An unreadable image is this row's reject. The row still passes the engine (as a
            # one-token text prompt) so the stream needs neither a second read of the images
            # nor a copy of them held to split it; postprocess gives it its reason.
            return {**rest, "messages": [{"role": "user", "content": "-"}],
                    "sampling_params": {"max_tokens": 1, "temperature": 0.0}}
        # Each image part becomes the model's placeholder in the prompt (``llm.ChatFormat``:
        # the template's own rendering, or the family's placeholder text for templates that
        # take text only); the pixels go to the engine beside the prompt, in the same order
        # (source, then target).
        images = [Image.open(io.BytesIO(row["q_image"])), Image.open(io.BytesIO(row["t_image"]))]
        for im in images:
            im.load()
        messages = describe_messages(pid, None, None, seed=cfg.seed)
        for part in messages[0]["content"]:  # type: ignore[union-attr]
            part.pop("image", None)  # type: ignore[union-attr]
        return {**rest, "messages": messages, "multimodal_data": {"image": images},
                "sampling_params": sampling}

    return preprocess


def describe_problem(text: str, tokens: int, cfg: DescribeConfig) -> str:
    """"" for a usable description, else why not."""
    if not text.strip():
        return Reason.EMPTY_DESCRIPTION
    if tokens >= cfg.max_tokens:
        return Reason.TRUNCATED
    if len(text.split()) < cfg.min_words:
        return Reason.TOO_SHORT
    return ""


def make_postprocess(cfg: DescribeConfig, attempt: int, carry: Sequence[str],
                     ) -> Callable[[dict[str, Any]], dict]:
    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        text = " ".join(str(row.get("generated_text") or "").split())
        tokens = int(row.get("num_generated_tokens") or 0)
        fetch_error = str(row.get("fetch_error") or "")
        return {**{k: row[k] for k in carry},
                "description": "" if fetch_error else text,
                "word_num": word_num(str(row["pair_id"]), cfg.seed),
                "reject_reason": fetch_error or describe_problem(text, tokens, cfg),
                "attempts": attempt + 1, "generated_tokens": tokens}

    return postprocess


def build_describe_processor(cfg: DescribeConfig, attempt: int, carry: Sequence[str]) -> Any:
    """The vLLM engine takes two images per prompt, decoded in the preprocessing step.

    Ray's own multimodal stage is left off: in Ray 2.60 it imports a vLLM module (``vllm.
    entrypoints.chat_utils``) that vLLM 0.32 has moved, and it would only re-parse images we
    already hold decoded."""
    return build_llm_processor(
        cfg, make_preprocess(cfg, attempt), make_postprocess(cfg, attempt, carry),
        engine_kwargs={"limit_mm_per_prompt": {"image": 2}})
