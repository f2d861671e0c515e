"""What the describe and the instruct steps share: the model, its chat template, the sampling
parameters, and one ``ray.data.llm`` processor per try (``pipeline/synth.py`` runs the tries).

Both steps follow one contract: every row comes out exactly once, either usable (an empty
``reject_reason``) or with the reason of its last try. Columns other than the step's own are
carried through the engine untouched, so a pair's ids, spaces and negatives travel with it.

The prompt is rendered here with the model's own chat template (``ChatFormat``), the way vLLM's
chat API renders it, because model families differ in ways Ray's chat-template stage leaves to
the caller: a template may take each message's content as one string (InternVL2's, Llama 3's),
so image parts become the family's placeholder in the text; a tokenizer that puts its BOS before
every text it encodes (Llama 3's, InternLM2's) must not get a second one from the template; and
a template may end the model's turn with a token that is not the tokenizer's EOS (InternVL2's
``<|im_end|>``), where generation has to stop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

from megapairs_ray.config import LLMStageConfig
from megapairs_ray.errors import MegapairsError

Row = dict[str, Any]
RowFn = Callable[[Row], Row]

# Built offline by ``tiny_models``: the name is the builder's.
TINY_MODELS = ("tiny-random-llama", "tiny-random-llava", "tiny-random-internvl2",
               "tiny-random-llama3")

# What vLLM expects in the prompt text for each image, by the checkpoint's ``model_type``, when
# the chat template takes text only (vLLM's ``get_placeholder_str`` of the model class).
IMAGE_PLACEHOLDERS = {
    "internvl_chat": "<image>",
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


def model_path(cfg: LLMStageConfig) -> str:
    """The engine's model: an HF id or folder as given, or a tiny model built on first use.

    A built model's path is absolute: the engine actors and the preprocessing tasks run in
    other processes, which under ``ray job submit`` have working directories of their own (a
    relative ``.cache/...`` was found by none of them; the cluster soak found it). Their node
    must read that folder: on a cluster of several machines, a shared path."""
    from megapairs_ray.synth import tiny_models

    builders = {"tiny-random-llama": tiny_models.build_tiny_llm,
                "tiny-random-llava": tiny_models.build_tiny_vlm,
                "tiny-random-internvl2": tiny_models.build_tiny_internvl2,
                "tiny-random-llama3": tiny_models.build_tiny_llama3}
    if cfg.model in builders:
        return str(Path(builders[cfg.model](cfg.tiny_model_dir)).resolve())
    return cfg.model


_PROBE = "\u2063probe\u2063"


@dataclass(frozen=True)
class ChatFormat:
    """How one model's chat template renders a conversation into the prompt its engine takes."""

    # The processor or tokenizer whose ``apply_chat_template`` renders (as in Ray's stage).
    renderer: Any
    template: str
    # True: the template renders a list of typed parts itself (images included); False: each
    # message's content must be one string, images as ``image_placeholder`` in the text.
    takes_parts: bool
    image_placeholder: str | None
    # The template's BOS text, dropped from the prompt when the tokenizer adds a BOS itself.
    strip_prefix: str
    # Tokens that end the model's turn in the template besides the tokenizer's EOS.
    stop_token_ids: tuple[int, ...]
    model_type: str

    def render(self, messages: list[dict[str, Any]]) -> str:
        if not self.takes_parts:
            messages = [{**m, "content": self._flatten(m["content"])} for m in messages]
        prompt = _apply(self.renderer, messages, self.template)
        if self.strip_prefix and prompt.startswith(self.strip_prefix):
            prompt = prompt[len(self.strip_prefix):]
        return prompt

    def _flatten(self, content: Any) -> str:
        if isinstance(content, str):
            return content
        text = []
        for part in content:
            if part["type"] == "text":
                text.append(part["text"])
            elif part["type"] == "image":
                if self.image_placeholder is None:
                    raise ValueError(
                        f"the chat template of this {self.model_type!r} model takes text only, "
                        "and its image placeholder is unknown; known: "
                        f"{sorted(IMAGE_PLACEHOLDERS)}")
                text.append(self.image_placeholder)
            else:
                raise ValueError(f"unsupported message part {part['type']!r}")
        return "".join(text)


def _apply(renderer: Any, messages: list[dict[str, Any]], template: str) -> str:
    """The chat template applied as Ray's chat-template stage applies it: a generation prompt
    after a user turn, else the last message continued."""
    last_is_user = messages[-1]["role"] == "user"
    return str(renderer.apply_chat_template(
        messages, tokenize=False, chat_template=template, add_generation_prompt=last_is_user,
        continue_final_message=not last_is_user))


def _template_takes_parts(renderer: Any, template: str) -> bool:
    """Whether the template renders a list of typed parts (it is handed one and its text comes
    out, with no Python list in sight), or wants each content as one string."""
    parts = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
    try:
        rendered = _apply(renderer, parts, template)
    except Exception:  # a template that cannot take parts fails in any way
        return False
    return _PROBE in rendered and "'type'" not in rendered


def _turn_end_ids(renderer: Any, template: str, tokenizer: Any) -> list[int]:
    """The special token the template puts right after an assistant message (Llama 3's
    ``<|eot_id|>``, InternLM2's ``<|im_end|>``), if it is not the tokenizer's EOS already."""
    reply = "\u2063reply\u2063"
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": reply},
             {"role": "user", "content": "v"}]
    try:
        rendered = _apply(renderer, turns, template)
    except Exception:  # no turn end can be read from this template
        return []
    tail = rendered.split(reply, 1)[-1] if reply in rendered else ""
    ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if ids and ids[0] in special and ids[0] != tokenizer.eos_token_id:
        return [ids[0]]
    return []


@lru_cache(maxsize=4)
def chat_format(path: str, trust_remote_code: bool = False) -> ChatFormat:
    """The chat format of the model at ``path`` (a folder or an HF id), read from its processor
    or tokenizer as Ray's chat-template stage reads it; once per process."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if not template:
        raise ValueError(f"{path} has no chat template")
    if isinstance(template, dict):  # named templates: the default one
        template = template["default"]
    model_type = _model_type(path, trust_remote_code, AutoConfig)
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]
    return ChatFormat(renderer=processor, template=template,
                      takes_parts=_template_takes_parts(processor, template),
                      image_placeholder=IMAGE_PLACEHOLDERS.get(model_type),
                      strip_prefix=bos if adds_bos else "",
                      stop_token_ids=tuple(_turn_end_ids(processor, template, tokenizer)),
                      model_type=model_type)


def _model_type(path: str, trust_remote_code: bool, auto_config: Any) -> str:
    local = Path(path) / "config.json"
    if local.exists():
        return str(json.loads(local.read_text()).get("model_type", ""))
    return str(auto_config.from_pretrained(path, trust_remote_code=trust_remote_code).model_type)


def render_row(row: Row, path: str, trust_remote_code: bool) -> Row:
    """A preprocessed row (``messages``, ``sampling_params``) as the engine takes it: the prompt
    rendered with the model's chat template, the template's turn end added to the stops."""
    fmt = chat_format(path, trust_remote_code)
    out = dict(row)
    out["prompt"] = fmt.render(out.pop("messages"))
    if fmt.stop_token_ids:
        sampling = dict(out["sampling_params"])
        sampling["stop_token_ids"] = sorted({*sampling.get("stop_token_ids", ()),
                                             *fmt.stop_token_ids})
        out["sampling_params"] = sampling
    return out


def sampling_params(cfg: LLMStageConfig, attempt: int) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p,
                              "max_tokens": cfg.max_tokens}
    if cfg.sampling_seed is not None:  # GPU engines only: vLLM's CPU sampler takes no seed
        params["seed"] = cfg.sampling_seed + attempt
    return params


def _prepare(row: Row, preprocess: RowFn, path: str, trust_remote_code: bool) -> Row:
    return render_row(preprocess(row), path, trust_remote_code)


def offline_batch_defaults(cfg: LLMStageConfig) -> dict[str, int]:
    """The scheduler limits vLLM gives its offline ``LLM`` class, for an engine on CPUs.

    vLLM sizes ``max_num_seqs`` and ``max_num_batched_tokens`` by how it is used: its offline
    ``LLM`` class gets twice the limits of an engine built from ``AsyncEngineArgs`` (an online
    server's), which is what ``ray.data.llm`` builds. On CPUs that is 256 sequences and 4,096
    tokens a step against 128 and 2,048 (per tensor-parallel rank); with the smaller limits the
    describe step ran at 0.41 of the bare ``LLM.generate`` on the same rows, half its sequences
    waiting. Batch inference is the offline case, so its limits are restored here. A GPU engine's
    limits depend on the card it lands on, which the driver cannot see: a profile may set them
    in ``engine_kwargs`` (which wins over these)."""
    if cfg.engine_num_gpus:
        return {}
    return {"max_num_seqs": 256 * cfg.tensor_parallel_size,
            "max_num_batched_tokens": 4096 * cfg.tensor_parallel_size}


# Ray's core worker kills its direct children as it exits gracefully, before the interpreter's
# exit finalizers run. The engine actor's children are vLLM's engine process (already ended by
# then: Ray Data's ``__ray_shutdown__`` runs the stage's engine shutdown first) and Python's
# shared-memory resource tracker. Killed early, the tracker is relaunched by the finalizers that
# unregister the engine's shared memory and semaphores, and the new one prints a ``KeyError``
# traceback for each name it never saw: a successful step's log said otherwise. Left alive, the
# tracker sees its parent go and exits. Ray's setting never covered a crashed or SIGKILLed
# worker (its docs: the raylet's subreaper or process groups do); the engine actor's graceful
# exit ends its engine itself, which the synthesis test checks.
KEEP_CHILDREN = "RAY_kill_child_processes_on_worker_exit"

# vLLM's engine runs in a process of its own behind ``ray.data.llm``'s actor (its async client
# always starts one). On a GPU, a one-card engine's model runs in that process; vLLM's CPU
# backend instead turns the one-process executor into the multiprocessing one, a third process
# importing torch and vLLM again, unless V1 multiprocessing is off. Off, the CPU engine takes the
# GPU engine's shape (the actor, then the engine process with the model in it) and starts in
# 24.6 s instead of 37.5 s on a 2-core machine (the tiny Llama, side by side). The engine
# process stays, so its OpenMP threads are still its own.
CPU_ENGINE_IN_ONE_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


class RuntimeEnvConflict(MegapairsError, ValueError):
    """A step's ``env_vars`` and the job's runtime env set one variable to two values."""


def stage_runtime_env(cfg: LLMStageConfig, job_env_vars: dict[str, str],
                      ) -> dict[str, Any] | None:
    """The engine stage's runtime env: the section's ``env_vars`` less those the job's own
    runtime env already sets (``ray job submit --runtime-env-json``).

    ``ray.data.llm`` passes the stage's runtime env to ``ray.init`` in the driver, and Ray
    refuses to merge a job's runtime env with a driver's that names the same variable, even with
    the same value ("Failed to merge the Job's runtime env"): the step failed with a traceback
    naming neither. The job's value already reaches every actor of the job, so a variable both
    set alike is left to the job; set to different values, it is one line naming both. The
    engine's actors also keep their children at exit (``KEEP_CHILDREN``, above), and an engine
    on CPUs runs its model in its engine process (``CPU_ENGINE_IN_ONE_PROCESS``), unless the
    job or the section says otherwise."""
    section = type(cfg).__name__.removesuffix("Config").lower()
    clash = sorted(k for k, v in cfg.env_vars.items()
                   if k in job_env_vars and str(job_env_vars[k]) != str(v))
    if clash:
        k = clash[0]
        raise RuntimeEnvConflict(
            f"{section}.env_vars.{k} is {cfg.env_vars[k]!r} but the job's runtime env sets "
            f"{k}={job_env_vars[k]!r}: set it in one place")
    env = {k: v for k, v in cfg.env_vars.items() if k not in job_env_vars}
    if KEEP_CHILDREN not in job_env_vars:
        env.setdefault(KEEP_CHILDREN, "false")
    cpu_engine = not cfg.engine_num_gpus and cfg.tensor_parallel_size == 1
    if cpu_engine and CPU_ENGINE_IN_ONE_PROCESS not in job_env_vars:
        env.setdefault(CPU_ENGINE_IN_ONE_PROCESS, "0")
    return {"env_vars": env}


def _job_env_vars() -> dict[str, str]:
    import ray

    if not ray.is_initialized():
        return {}
    return dict(ray.get_runtime_context().runtime_env.get("env_vars") or {})


def build_llm_processor(cfg: LLMStageConfig, preprocess: RowFn, postprocess: RowFn,
                        engine_kwargs: dict[str, Any] | None = None) -> Any:
    """A ``ray.data.llm`` processor: preprocess and chat template (``render_row``) → vLLM →
    postprocess.

    Ray's chat-template stage is left off: the prompt is rendered in the preprocessing step
    (see the module's docstring), which also spares the actor that stage holds. vLLM tokenises
    and detokenises itself; Ray's separate tokenise/detokenise stages would each hold a CPU for
    work the engine does anyway."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kwargs = {"tensor_parallel_size": cfg.tensor_parallel_size,
              "max_model_len": cfg.max_model_len, **offline_batch_defaults(cfg),
              **(engine_kwargs or {}), **cfg.engine_kwargs}
    bundle = {"CPU": cfg.engine_num_cpus}
    if cfg.engine_num_gpus:
        bundle["GPU"] = cfg.engine_num_gpus
    path = model_path(cfg)
    config = vLLMEngineProcessorConfig(
        model_source=path, engine_kwargs=kwargs, batch_size=cfg.batch_size,
        concurrency=cfg.replicas,
        prepare_multimodal_stage={"enabled": False},
        chat_template_stage={"enabled": False},
        tokenize_stage=False, detokenize_stage=False,
        placement_group_config={"bundle_per_worker": bundle},
        runtime_env=stage_runtime_env(cfg, _job_env_vars()))
    return build_processor(
        config, preprocess=partial(_prepare, preprocess=preprocess, path=path,
                                   trust_remote_code=bool(kwargs.get("trust_remote_code"))),
        postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": cfg.num_cpus},
        postprocess_map_kwargs={"num_cpus": cfg.num_cpus})
