"""The run configuration: one validated document per run, loaded from YAML.

Profiles live in ``configs/`` (``tiny.yaml`` for CPU tests and the demo, ``paper.yaml`` for the
paper's models on GPUs). Model choices are names, resources are numbers: nothing here is derived
from the machine the driver happens to run on, because the driver is often a CPU-only head node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megapairs_ray.errors import MegapairsError


class ConfigError(MegapairsError, ValueError):
    """A run configuration that cannot be used; the message names the offending field."""

    exit_code = 2


class Strict(BaseModel):
    # Unknown keys are errors: a misspelt field must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


# How a field enters the settings fingerprint of the stage that reads it (pipeline/stepstate.py).
# Every field changes the stage's output unless marked: a new field invalidates earlier output
# until someone decides it is only a resource.
RESOURCE: dict[str, Any] = {"books": "resource"}  # how the work runs, not what it makes
SEARCH_TIME: dict[str, Any] = {"books": "search"}  # read when searching, not when building
MINE_RULE: dict[str, Any] = {"books": "mine"}  # set beside an embed space, read by mine


def output_settings(model: BaseModel, exclude: tuple[str, ...] = ("resource",),
                    prefix: str = "") -> dict[str, Any]:
    """The fields of ``model`` that decide a stage's output, as ``{"dotted.name": value}``:
    every field but those whose ``books`` kind is in ``exclude``, nested sections flattened."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("books") in exclude:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(output_settings(value, exclude, f"{prefix}{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            # A list of sections (the embed spaces): each under its name, or its position.
            for i, item in enumerate(value):
                key = getattr(item, "name", None) or str(i)
                out.update(output_settings(item, exclude, f"{prefix}{name}.{key}."))
        else:  # JSON form: tuples become lists, so a stored fingerprint compares equal
            out[f"{prefix}{name}"] = json.loads(json.dumps(value, default=str))
    return out


class InputConfig(Strict):
    """Where the image shards are and how to read them."""

    uris: list[str] = Field(min_length=1, description="Shard files, folders or globs; local or s3://.")
    format: Literal["auto", "webdataset", "parquet", "folder"] = "auto"
    # Parquet shards (img2dataset's parquet output and most HF image datasets).
    image_column: str = "jpg"
    caption_column: str = "caption"
    key_column: str | None = "key"
    # Webdataset / folder: which member extensions hold the image and the caption.
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
    caption_extensions: list[str] = ["txt", "json"]
    json_caption_field: str = "caption"


class IngestConfig(Strict):
    """Checks every record passes before an image may enter the pipeline."""

    max_pixels: int = Field(default=89_478_485, gt=0, description="Decompression-bomb guard.")
    min_side: int = Field(default=32, gt=0)
    max_aspect_ratio: float = Field(default=8.0, ge=1.0)
    max_bytes: int = Field(default=50 * 1024**2, gt=0)
    # CMYK, 16-bit, alpha and palette images: convert to RGB (recorded) or reject with the reason.
    unusual_modes: Literal["convert", "reject"] = "convert"
    require_caption: bool = True
    max_caption_chars: int = Field(default=2000, gt=0)
    # A full decode at reduced scale (JPEG DCT scaling) catches truncated or corrupt data cheaply.
    verify_decode: bool = True
    num_cpus: float = Field(default=1.0, gt=0, json_schema_extra=RESOURCE)


class OpenClipEncoder(Strict):
    """One tower of an open_clip model: the image tower (``open_clip_image``) or the text tower
    over captions (``open_clip_text``). Two spaces naming the same model and weights share one
    loaded model."""

    kind: Literal["open_clip_image", "open_clip_text"]
    # An open_clip model name (EVA02-L-14 for the paper) or a bundled config (mp-tiny-clip).
    model: str
    # An open_clip pretrained tag, a local checkpoint file, or None for random weights.
    pretrained: str | None = None

    def label(self) -> str:
        return f"open_clip {self.model}, " + (self.pretrained or "random weights")


class ImagePreprocess(Strict):
    """How an image model wants its pixels (torchvision's eval transform): resize the short side
    to ``image_size / crop_fraction``, centre-crop ``image_size``, normalise with ``mean``/``std``.
    None takes the model's own value (timm's pretrained config; ImageNet's for transformers)."""

    image_size: int | None = Field(default=None, gt=0)
    crop_fraction: float | None = Field(default=None, gt=0, le=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bicubic", "bilinear"] | None = None


class TimmImageEncoder(ImagePreprocess):
    """A timm image model. Weights: timm's hub (``pretrained``), a state-dict file
    (``checkpoint``: a path or ``package:<module>/<path>`` inside an installed package), or
    random."""

    kind: Literal["timm_image"]
    model: str = Field(description="A timm architecture name (timm.list_models()).")
    pretrained: bool = False
    checkpoint: str | None = None
    # by_name: the file's keys are timm's; in_order: the file's tensors map in order onto the
    # model's (a port with other key names, e.g. EfficientNet-Lite0's ``_conv_stem`` naming).
    checkpoint_keys: Literal["by_name", "in_order"] = "by_name"
    config_overrides: dict[str, Any] = {}
    # head: timm's own global pooling (convnets); cls / mean: a ViT's tokens.
    pooling: Literal["head", "cls", "mean"] = "head"

    def label(self) -> str:
        weights = (self.checkpoint or ("timm's pretrained weights" if self.pretrained
                                       else "random weights"))
        return f"timm {self.model}, {weights}"


class TransformersImageEncoder(ImagePreprocess):
    """A transformers vision model (DINOv2 in the paper): a hub id, a local folder or
    ``package:<module>/<path>``; with ``pretrained: false``, random weights of that folder's
    architecture or of ``model_type`` with ``config_overrides``."""

    kind: Literal["transformers_image"]
    model: str
    pretrained: bool = True
    model_type: str = Field(default="dinov2", description="Architecture for random weights "
                            "when ``model`` is not a folder.")
    config_overrides: dict[str, Any] = {}
    pooling: Literal["cls", "mean"] = "cls"

    def label(self) -> str:
        return f"transformers {self.model}" + ("" if self.pretrained else ", random weights")


class TransformersTextEncoder(Strict):
    """A transformers sentence encoder over the captions (all-MiniLM-L6-v2 in the demo): the
    last hidden state pooled over the attention mask, L2-normalised."""

    kind: Literal["transformers_text"]
    model: str = Field(description="A hub id, a local folder or package:<module>/<path>.")
    pretrained: bool = Field(default=True, description="False: random weights of the folder's "
                             "architecture, with its tokenizer.")
    config_overrides: dict[str, Any] = {}
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(default=256, gt=0, description="Caption tokens kept.")

    def label(self) -> str:
        return (f"transformers {self.model}, {self.pooling} pooling"
                + ("" if self.pretrained else ", random weights"))


EncoderSpec = Annotated[
    OpenClipEncoder | TimmImageEncoder | TransformersImageEncoder | TransformersTextEncoder,
    Field(discriminator="kind")]
TEXT_KINDS = ("open_clip_text", "transformers_text")


class SpaceConfig(Strict):
    """One embedding space: what encodes it, its mining window, its resources."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64,
                      description="The space's folder under embeddings/ and index/.")
    encoder: EncoderSpec
    # A neighbour is a target candidate when lo < similarity < hi: below is a weak link, above
    # a near-duplicate. Per space, since models differ in their similarity scales. Read by mine
    # (``mine.windows`` can override it), not by embed.
    window: tuple[float, float] = Field(default=(0.8, 0.96), json_schema_extra=MINE_RULE)
    # Rows per forward pass of this encoder (None: the whole batch), for a large model beside
    # small ones in one actor.
    batch_size: int | None = Field(default=None, gt=0, json_schema_extra=RESOURCE)

    @property
    def is_text(self) -> bool:
        """Encodes captions (rows without one get no vector) rather than images."""
        return self.encoder.kind in TEXT_KINDS

    @field_validator("window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not -1.0 <= v[0] < v[1] <= 1.0:
            raise ValueError("window must satisfy -1 <= lo < hi <= 1")
        return v


class ActorPoolSection(Strict):
    """A model stage on a Ray Data actor pool: shard readers → an autoscaling pool of model
    actors (between min and max, resources per actor) → writers."""

    section: ClassVar[str] = "embed"  # the YAML section, for error messages

    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: int = Field(default=64, gt=0, json_schema_extra=RESOURCE)
    decode_threads: int = Field(default=4, gt=0, json_schema_extra=RESOURCE)
    min_actors: int = Field(default=1, ge=1, json_schema_extra=RESOURCE)
    max_actors: int = Field(default=1, ge=1, json_schema_extra=RESOURCE)
    num_gpus: float = Field(default=0.0, ge=0, json_schema_extra=RESOURCE)
    num_cpus: float = Field(default=1.0, gt=0, json_schema_extra=RESOURCE)
    reader_num_cpus: float = Field(default=0.5, gt=0, json_schema_extra=RESOURCE)
    writer_num_cpus: float = Field(default=0.25, gt=0, json_schema_extra=RESOURCE)
    writer_batch_rows: int = Field(default=4096, gt=0, json_schema_extra=RESOURCE)
    # Bytes that images being decoded at once may take per actor (a paletted PNG can take a
    # gigabyte to decode from a file of kilobytes); decodes wait for one another beyond it.
    decode_budget_bytes: int = Field(default=1 << 30, gt=0, json_schema_extra=RESOURCE)

    @model_validator(mode="after")
    def _pool(self) -> ActorPoolSection:
        name = self.section
        if self.min_actors > self.max_actors:
            raise ValueError(f"{name}.min_actors ({self.min_actors}) > {name}.max_actors "
                             f"({self.max_actors})")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError(f"{name}.device=cuda needs {name}.num_gpus > 0 (GPUs per actor)")
        return self


class EmbedConfig(ActorPoolSection):
    """The embedding spaces and the Ray actor pool that encodes them: each actor holds every
    space's encoder, decodes a batch once and runs them all."""

    spaces: list[SpaceConfig] = Field(min_length=1)
    # Random-initialised models are seeded so that every actor holds the same weights.
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    decode: Literal["cpu", "gpu"] = "cpu"
    max_tasks_in_flight_per_actor: int = Field(default=2, ge=1, json_schema_extra=RESOURCE)
    # >1 runs that many calls of one actor at once in threads (each on its own CUDA stream),
    # hiding decode and host work behind another batch's forward passes.
    concurrent_calls_per_actor: int = Field(default=1, ge=1, json_schema_extra=RESOURCE)

    @model_validator(mode="after")
    def _check(self) -> EmbedConfig:
        if self.device == "cpu" and self.decode == "gpu":
            raise ValueError("embed.decode=gpu needs embed.device=cuda")
        if self.device == "cpu" and self.precision == "fp16":
            raise ValueError("embed.precision=fp16 is not supported on embed.device=cpu")
        names = [s.name for s in self.spaces]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"embed.spaces: duplicate space name(s) {dups}")
        return self

    @property
    def space_names(self) -> list[str]:
        return [s.name for s in self.spaces]

    def space(self, name: str) -> SpaceConfig:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(name)


class IndexConfig(Strict):
    """One FAISS index per embedding space, sharded by image-id range."""

    # flat: exact; ivf_flat / ivf_pq / hnsw: approximate, for large runs.
    kind: Literal["flat", "ivf_flat", "ivf_pq", "hnsw"] = "flat"
    device: Literal["cpu", "cuda"] = Field(default="cpu", json_schema_extra=SEARCH_TIME)
    shards: int = Field(default=1, ge=1)
    nlist: int | None = Field(default=None, gt=0, description="IVF lists; None = 4*sqrt(n).")
    nprobe: int = Field(default=32, gt=0, json_schema_extra=SEARCH_TIME)
    pq_m: int = Field(default=16, gt=0)
    pq_nbits: int = Field(default=8, gt=0, le=16)
    # Keep every vector beside the PQ codes (fp16, lossless for the embed stage's vectors) and
    # re-score each shard's (k + 16) x pq_refine_k_factor best PQ candidates with them (16: the
    # tie margin a shard fetches beyond k): the scores the miner sees are then exact, and recall
    # rises. A run refuses IVF-PQ without it.
    pq_refine: bool = True
    pq_refine_k_factor: int = Field(default=8, ge=1, json_schema_extra=SEARCH_TIME)
    hnsw_m: int = Field(default=32, gt=1)
    hnsw_ef_search: int = Field(default=128, gt=0, json_schema_extra=SEARCH_TIME)
    hnsw_ef_construction: int = Field(default=200, gt=0)
    train_sample: int = Field(default=100_000, gt=0)
    # Each shard is held by one actor with these resources.
    shard_num_cpus: float = Field(default=0.5, gt=0, json_schema_extra=RESOURCE)
    shard_num_gpus: float = Field(default=0.0, ge=0, json_schema_extra=RESOURCE)
    # How long to wait for every shard actor to be placed (an autoscaler may need to add nodes).
    actor_start_timeout_s: float = Field(default=900, gt=0, json_schema_extra=RESOURCE)
    # Mining's shard actors memory-map their shard from local disk (a run on s3 copies each
    # shard to local_cache_dir on the actor's node first): IVF-PQ's refine vectors, flat codes
    # and IVF lists stay in the page cache instead of the actor's own memory.
    mmap: bool = Field(default=True, json_schema_extra=RESOURCE)
    local_cache_dir: str = Field(default="/tmp/megapairs-index-cache",
                                 json_schema_extra=RESOURCE)

    def build_fields(self) -> dict[str, Any]:
        """What the built index depends on; search-time settings (nprobe, device) and resources
        can change without a rebuild."""
        return output_settings(self, exclude=("resource", "search"))

    @model_validator(mode="after")
    def _check(self) -> IndexConfig:
        if self.device == "cuda" and self.shard_num_gpus == 0:
            raise ValueError("index.device=cuda needs index.shard_num_gpus > 0")
        return self


class MineConfig(Strict):
    """The paper's pair-mining rules (docs/method.md §1), with what it leaves open made explicit."""

    # The spaces mined, in the order targets are drawn round-robin; None: every embed space,
    # in its order. Filled in when the run config loads.
    spaces: list[str] | None = None
    k: int = Field(default=32, gt=1, description="Neighbours searched per query per space.")
    # Per-space overrides of the spaces' windows (embed.spaces[].window). When the run config
    # loads, this holds every mined space's window.
    windows: dict[str, tuple[float, float]] = {}
    targets_per_query: int = Field(default=3, ge=1)
    min_hard_negatives: int = Field(default=5, ge=0)
    max_hard_negatives: int = Field(default=10, ge=1)
    query_fraction: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    num_cpus: float = Field(default=0.5, gt=0, json_schema_extra=RESOURCE)
    actors: int = Field(default=1, ge=1, json_schema_extra=RESOURCE)

    @model_validator(mode="after")
    def _check(self) -> MineConfig:
        for space, (lo, hi) in self.windows.items():
            if not -1.0 <= lo < hi <= 1.0:
                raise ValueError(f"mine.windows[{space}] must satisfy -1 <= lo < hi <= 1")
        if self.spaces is None and self.windows:  # on its own (tests): the windows' spaces
            object.__setattr__(self, "spaces", list(self.windows))
        if self.spaces is not None:
            dups = sorted({s for s in self.spaces if self.spaces.count(s) > 1})
            if dups:
                raise ValueError(f"mine.spaces names {dups} twice")
        if self.min_hard_negatives > self.max_hard_negatives:
            raise ValueError("mine.min_hard_negatives > mine.max_hard_negatives")
        return self


class LLMStageConfig(Strict):
    """A model run through ``ray.data.llm`` on vLLM engines: what the describe and the instruct
    steps share."""

    # An HF id or local folder; a "tiny-random-*" name builds a tiny random model offline into
    # ``tiny_model_dir`` (CPU tests and the demo).
    model: str
    tiny_model_dir: str = Field(json_schema_extra=RESOURCE)
    tensor_parallel_size: int = Field(default=1, ge=1, json_schema_extra=RESOURCE)
    replicas: int = Field(default=1, ge=1, description="vLLM engine replicas (data parallel).",
                          json_schema_extra=RESOURCE)
    batch_size: int = Field(default=64, gt=0, json_schema_extra=RESOURCE)
    max_model_len: int = Field(default=4096, gt=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Environment of the step's Ray workers, engines included (e.g. VLLM_CPU_KVCACHE_SPACE for
    # vLLM's CPU backend, HF_TOKEN for gated weights).
    env_vars: dict[str, str] = Field(default_factory=dict, json_schema_extra=RESOURCE)
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_tokens: int = Field(default=256, gt=0)
    # Seeds: ``seed`` draws the per-pair prompt parts (WORD_NUM, demonstrations);
    # ``sampling_seed`` seeds vLLM's sampler (GPU engines only: vLLM's CPU sampler refuses
    # per-request seeds).
    seed: int = 0
    sampling_seed: int | None = None
    num_cpus: float = Field(default=0.25, gt=0, description="Pre- and post-processing tasks.",
                            json_schema_extra=RESOURCE)
    # Answers are committed to storage in parts of this many rows: a crash loses at most the
    # parts in flight, and a rerun sends only uncommitted rows to the engine again.
    commit_rows: int = Field(default=1024, gt=0, json_schema_extra=RESOURCE)
    # Resources of each engine worker (one per tensor-parallel rank); 0 GPUs runs vLLM's CPU
    # backend (the tiny profile).
    engine_num_gpus: float = Field(default=1, ge=0, json_schema_extra=RESOURCE)
    engine_num_cpus: float = Field(default=1, gt=0, json_schema_extra=RESOURCE)


class DescribeConfig(LLMStageConfig):
    """The vision-language model that sees both images of a pair and describes how they relate
    (paper: InternVL2-26B)."""

    model: str = "tiny-random-llava"
    tiny_model_dir: str = Field(default=".cache/megapairs/tiny-vlm",
                                json_schema_extra=RESOURCE)
    # Longest side of each image as sent to the model (both images of a pair go in one prompt).
    image_size: int = Field(default=448, ge=16)
    # Steer the reply into the paper's template with vLLM structured output (a regular
    # expression). A real MLLM follows the template from the prompt alone; a random tiny model
    # needs it to ever stop.
    template_regex: bool = False
    template_slot_chars: int = Field(default=240, ge=8, description="Per slot of the template.")
    min_words: int = Field(default=8, ge=1, description="Shorter descriptions are rejects.")
    retries: int = Field(default=1, ge=0)
    fetch_num_cpus: float = Field(default=0.25, gt=0, description="Image fetch-and-resize tasks.",
                                  json_schema_extra=RESOURCE)
    fetch_batch_size: int = Field(default=64, gt=0, json_schema_extra=RESOURCE)
    fetch_actors: int = Field(default=4, ge=1, description="Most image-fetching actors.",
                              json_schema_extra=RESOURCE)


class InstructConfig(LLMStageConfig):
    """The LLM that rewrites each pair's description into retrieval instructions (paper:
    Llama-3-8B-Instruct)."""

    model: str = "tiny-random-llama"
    tiny_model_dir: str = Field(default=".cache/megapairs/tiny-llm",
                                json_schema_extra=RESOURCE)
    # Constrain replies to a JSON list of strings (vLLM structured output).
    structured_output: bool = True
    max_instructions: int = Field(default=5, ge=3)
    max_instruction_chars: int = Field(default=300, gt=0)
    retries: int = Field(default=1, ge=0)


class ExportConfig(Strict):
    """The released MegaPairs form: triplets as JSON lines + parquet, images as JPEGs in tars."""

    image_size: int = Field(default=512, ge=16, description="Images are written size × size.")
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    images_per_tar: int = Field(default=1000, gt=0, description="Target images per tar shard.")
    min_hard_negatives: int = Field(default=4, ge=1, description="Besides hns[0], the query.")
    gallery_size: int = Field(default=24, ge=0, description="Triplets sampled into the gallery.")
    # Up to this many triplets, the parts are also joined into megapairs.jsonl / .parquet.
    single_file_max_rows: int = Field(default=200_000, ge=0)
    seed: int = 0
    num_cpus: float = Field(default=0.5, gt=0, description="Tar-writer tasks.",
                            json_schema_extra=RESOURCE)


class RayConfig(Strict):
    """How the driver reaches Ray. ``address: null`` starts a local Ray for CPU runs."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0, description="Local Ray only.")
    object_store_memory: int | None = Field(default=None, gt=0, description="Local Ray only.")


class RunConfig(Strict):
    """Everything one run needs."""

    profile: str
    run_dir: str = Field(description="Local folder or s3:// prefix for every stage's output.")
    input: InputConfig
    ingest: IngestConfig = IngestConfig()
    embed: EmbedConfig
    index: IndexConfig = IndexConfig()
    mine: MineConfig = MineConfig()
    # The synthesis steps; a run without them stops after mining.
    describe: DescribeConfig | None = None
    instruct: InstructConfig | None = None
    export: ExportConfig = ExportConfig()
    ray: RayConfig = RayConfig()

    @field_validator("run_dir")
    @classmethod
    def _run_dir_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run_dir must not be empty")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _resolve_mining(self) -> RunConfig:
        """Mine reads the embed spaces: names it gives must exist; what it leaves out (which
        spaces, their windows) is filled in from them, so ``mine`` is complete after loading."""
        known = self.embed.space_names
        for field, names in (("mine.windows", list(self.mine.windows)),
                             ("mine.spaces", self.mine.spaces or [])):
            unknown = sorted(set(names) - set(known))
            if unknown:  # a misspelt space would otherwise be ignored silently
                raise ValueError(f"{field} has unknown space(s) {unknown}; embed.spaces has "
                                 f"{known}")
        spaces = list(self.mine.spaces or known)
        windows = {s: tuple(self.mine.windows.get(s, self.embed.space(s).window))
                   for s in spaces}
        # A new section, never the shared default instance; frozen models are set this way.
        object.__setattr__(self, "mine", self.mine.model_copy(
            update={"spaces": spaces, "windows": windows}))
        return self

    @model_validator(mode="after")
    def _exact_mining_scores(self) -> RunConfig:
        if self.index.kind == "ivf_pq" and not self.index.pq_refine:
            # PQ scores are approximations: pairs would land inside or outside a window by
            # quantisation error (docs/scale-plan.md measures how often).
            raise ValueError("index.pq_refine=false: mining decides windows, near-duplicates and "
                             "hard negatives on exact similarities, which an IVF-PQ index gives "
                             "only with its refine vectors; set index.pq_refine=true")
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["embed.batch_size=32", "input.uris=[a, b]"]`` → nested dict; values parsed as YAML."""
    doc: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(doc, key.strip(), yaml.safe_load(raw))
    return doc


def _merge(base: dict[str, Any], extra: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{path}{k}.")
        elif isinstance(v, dict) and _is_named_list(out.get(k)):
            out[k] = _merge_named(out[k], v, f"{path}{k}")
        else:
            out[k] = v
    return out


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def _merge_named(items: list[dict[str, Any]], extra: dict[str, Any], path: str,
                 ) -> list[dict[str, Any]]:
    """``embed.spaces.dino_image.encoder.model=X``: a list of named sections is addressed by
    name."""
    names = [i["name"] for i in items]
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ConfigError(f"override {path}.{unknown[0]}: {path} has no entry named "
                          f"{unknown[0]!r} (it has {names})")
    out = []
    for item in items:
        value = extra.get(item["name"], item)
        out.append(_merge(item, value, f"{path}.{item['name']}.")
                   if isinstance(value, dict) and value is not item else value)
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    path: str | Path, overrides: list[str] | dict[str, Any] | None = None,
    schema: type[ConfigT] = RunConfig,  # type: ignore[assignment]
) -> ConfigT:
    """Load a YAML profile, apply ``section.field=value`` overrides, validate against
    ``schema`` (the synthesis ``RunConfig`` unless told otherwise)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        doc = _merge(doc, extra)
    return config_from_dict(doc, source=str(path), schema=schema)


def config_from_dict(doc: dict[str, Any], source: str = "<dict>",
                     schema: type[ConfigT] = RunConfig,  # type: ignore[assignment]
                     ) -> ConfigT:
    try:
        return schema.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
