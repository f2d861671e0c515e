"""What the describe and the instruct steps share: the model, the sampling parameters, and one
``ray.data.llm`` processor per try (``pipeline/synth.py`` runs the tries).

Both steps follow one contract: every row comes out exactly once, either usable (an empty
``reject_reason``) or with the reason of its last try. Columns other than the step's own are
carried through the engine untouched, so a pair's ids, spaces and negatives travel with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megapairs_ray.config import LLMStageConfig

Row = dict[str, Any]
RowFn = Callable[[Row], Row]

# Built offline by ``tiny_models``: the name is the builder's.
TINY_MODELS = ("tiny-random-llama", "tiny-random-llava")


def model_path(cfg: LLMStageConfig) -> str:
    """The engine's model: an HF id or folder as given, or a tiny model built on first use."""
    from megapairs_ray.synth import tiny_models

    if cfg.model == "tiny-random-llama":
        return str(tiny_models.build_tiny_llm(cfg.tiny_model_dir))
    if cfg.model == "tiny-random-llava":
        return str(tiny_models.build_tiny_vlm(cfg.tiny_model_dir))
    return cfg.model


def sampling_params(cfg: LLMStageConfig, attempt: int) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                              "max_tokens": cfg.max_tokens}
    if cfg.sampling_seed is not None:  # GPU engines only: vLLM's CPU sampler takes no seed
        params["seed"] = cfg.sampling_seed + attempt
    return params


def build_llm_processor(cfg: LLMStageConfig, preprocess: RowFn, postprocess: RowFn,
                        engine_kwargs: dict[str, Any] | None = None) -> Any:
    """A ``ray.data.llm`` processor: preprocess → chat template → vLLM → postprocess.

    vLLM tokenises and detokenises itself; Ray's separate tokenise/detokenise stages would
    each hold a CPU for work the engine does anyway."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = {"tensor_parallel_size": cfg.tensor_parallel_size,
              "max_model_len": cfg.max_model_len, **(engine_kwargs or {}), **cfg.engine_kwargs}
    bundle = {"CPU": cfg.engine_num_cpus}
    if cfg.engine_num_gpus:
        bundle["GPU"] = cfg.engine_num_gpus
    cpu_stage = {"enabled": True, "num_cpus": cfg.num_cpus, "concurrency": 1}
    config = vLLMEngineProcessorConfig(
        model_source=model_path(cfg), engine_kwargs=kwargs, batch_size=cfg.batch_size,
        concurrency=cfg.replicas,
        prepare_multimodal_stage={"enabled": False},
        chat_template_stage=cpu_stage,
        tokenize_stage=False, detokenize_stage=False,
        placement_group_config={"bundle_per_worker": bundle},
        runtime_env={"env_vars": dict(cfg.env_vars)} if cfg.env_vars else None)
    return build_processor(
        config, preprocess=preprocess, postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": cfg.num_cpus},
        postprocess_map_kwargs={"num_cpus": cfg.num_cpus})
