"""``megapairs plan``: what a run of N images costs, and where every number comes from.

A plan is arithmetic on three kinds of figure, and each figure says which kind it is:

- **measured**: a value read from a result file (the file and key are named): the embed stage's
  images/s per GPU, JPEG decodes per CPU core, the CPU's inner-product and PQ-scan rates
  (calibrated on the index benchmark's measured queries/s), the GPU's exact-search rate, the
  training step's triplets/s per GPU, the card's memory. By default the files shipped in the
  package, ``megapairs_ray/plan_sources/<machine>/``: the few files of ``benchmarks/results/``
  a plan reads, copied as they are (``tests/test_plan.py`` fails while a copy differs from its
  benchmark result), so an installed ``megapairs plan`` needs no repository; or those of
  ``--results DIR``, laid out the same way;
- **config** or **input**: a setting of the run config (``--config``) or a command-line value;
- **assumption**: anything not measured here, said so with the reason (the vLLM steps' pairs/s
  per GPU, bytes per source image, text lengths, FAISS's k-means iterations, cluster shapes
  nobody gave).

A derived figure carries its formula and the union of the sources it rests on. Everything is a
pure function of (inputs, run config, train config, result files): no Ray, no models, no
network, so a plan takes well under a second and a test can recompute any figure by hand.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megapairs_ray.config import ConfigError, RunConfig
from megapairs_ray.stages.index import TIE_MARGIN
from megapairs_ray.train.config import TrainConfig

if TYPE_CHECKING:
    from importlib.abc import Traversable  # importlib.resources.abc from Python 3.11

# The measured results shipped with the package (package data): copies of the files of
# benchmarks/results/ a plan reads. Values read from them are labelled with this path.
PACKAGED_RESULTS = "megapairs_ray/plan_sources"
CPU_RESULTS = "cpu-2core"  # the calibration of the CPU rates (index kinds, measured there)
HOUR = 3600.0
GB = 1e9
# Ray's default object store: this share of a node's memory, capped (ray._private.ray_constants
# DEFAULT_OBJECT_STORE_MEMORY_PROPORTION and DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES, Ray 2.60).
RAY_STORE_PROPORTION, RAY_STORE_CAP = 0.3, 200e9
KMEANS_ITERATIONS = 25  # faiss.ClusteringParameters().niter


@dataclass(frozen=True)
class Figure:
    """A number, its unit, and where it comes from. ``formula`` is set for derived figures;
    ``sources`` lists the leaves: ``measured: FILE (KEY)``, ``config: ...``, ``input: ...``,
    ``assumption: ...``, ``code: ...`` (how this repository's code does it), ``ray: ...``."""

    value: float
    unit: str
    sources: tuple[str, ...]
    formula: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "unit": self.unit}
        if self.formula:
            out["formula"] = self.formula
        out["sources"] = list(self.sources)
        return out


def derive(value: float, unit: str, formula: str, *parts: Figure) -> Figure:
    """A figure computed from ``parts``: their leaf sources, in first-seen order."""
    seen: dict[str, None] = {}
    for p in parts:
        for s in p.sources:
            seen.setdefault(s)
    return Figure(float(value), unit, tuple(seen), formula)


def assumed(value: float, unit: str, why: str) -> Figure:
    return Figure(float(value), unit, (f"assumption: {why}",))


# --- inputs -------------------------------------------------------------------------------------

# Inputs nobody gave: the value and why it is a sensible stand-in. (None: from the run config.)
ASSUMED_INPUTS: dict[str, tuple[float | None, str, str]] = {
    "nodes": (8, "nodes", "8 GPU nodes"),
    "gpus_per_node": (8, "GPUs", "8-GPU nodes"),
    "cpus_per_node": (192, "cores", "an 8×H200 node such as AWS p5en.48xlarge: 192 vCPUs"),
    "memory_per_node_gib": (2048, "GiB", "an 8×H200 node such as AWS p5en.48xlarge: 2 TiB"),
    "cpu_nodes": (0, "nodes", "no CPU-only nodes"),
    "cpus_per_cpu_node": (16, "cores", "the cpu worker group's pods in cluster/kuberay/"),
    "memory_per_cpu_node_gib": (64, "GiB", "the cpu worker group's pods in cluster/kuberay/"),
    "image_kb": (100, "kB", "a web JPEG as img2dataset stores it is ~100 kB (~100 TB per "
                 "billion images)"),
    "caption_chars": (300, "chars", "Recap-DataComp-1B's re-captions run ~50 words"),
    "export_image_kb": (60, "kB", "a 512×512 photo as a q90 JPEG is 50–70 kB"),
    "description_chars": (500, "chars", "the describe prompt asks for 60–100 words"),
    "instruction_chars": (80, "chars", "one instruction is a sentence of ~15 words"),
    "describe_pairs_per_gpu_s": (4, "pairs/s/GPU", "not measured (no vLLM on the lent GPU "
                                 "machine): InternVL2-26B sees two 448-px images (InternViT-6B, "
                                 "~12 TFLOP each) and prefills ~650 tokens on a 20 B LLM (~26 "
                                 "TFLOP), ~55 TFLOP a pair, ~6 pairs/s at 350 TFLOP/s; 4 leaves "
                                 "room for decoding ~130 tokens"),
    "instruct_pairs_per_gpu_s": (25, "pairs/s/GPU", "not measured (no vLLM on the lent GPU "
                                 "machine): Llama-3-8B prefills ~750 tokens (5 demonstrations + "
                                 "a description, ~12 TFLOP) and decodes ~120, ~25 pairs/s on one "
                                 "H200 in vLLM's batched serving"),
}
ASSUMPTION_FIELDS = ("image_kb", "caption_chars", "export_image_kb", "description_chars",
                     "instruction_chars", "describe_pairs_per_gpu_s", "instruct_pairs_per_gpu_s")
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


class PlanInputs(BaseModel):
    """What the plan is for: the corpus size, the hardware, and the settings that change the
    work. Fields left unset come from the run config (``None`` defaults) or are assumptions
    (``ASSUMED_INPUTS``); ``model_fields_set`` tells the two apart from what was given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: float = Field(ge=1, description="Images in the corpus (1e9, 500M, 2B ...).")
    gpu: str = "h200"
    nodes: int = Field(default=8, ge=1, description="GPU nodes.")
    gpus_per_node: int = Field(default=8, ge=1)
    cpus_per_node: int = Field(default=192, ge=1)
    memory_per_node_gib: float = Field(default=2048, gt=0)
    cpu_nodes: int = Field(default=0, ge=0, description="CPU-only nodes besides the GPU nodes.")
    cpus_per_cpu_node: int = Field(default=16, ge=1)
    memory_per_cpu_node_gib: float = Field(default=64, gt=0)
    query_fraction: float | None = Field(default=None, gt=0, le=1)
    pairs_per_query: float | None = Field(default=None, gt=0)
    hard_negatives: int | None = Field(default=None, ge=0)
    instructions_per_pair: float | None = Field(default=None, gt=0)
    image_kb: float = Field(default=100, gt=0)
    caption_chars: float = Field(default=300, ge=0)
    export_image_kb: float = Field(default=60, gt=0)
    description_chars: float = Field(default=500, ge=0)
    instruction_chars: float = Field(default=80, ge=0)
    describe_pairs_per_gpu_s: float = Field(default=4, gt=0)
    instruct_pairs_per_gpu_s: float = Field(default=25, gt=0)

    @field_validator("images", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        """``1e9``, ``1_000_000_000``, ``500M``, ``2B``."""
        if isinstance(v, str):
            s = v.strip().lower().replace("_", "").replace(",", "")
            scale = _SUFFIX.get(s[-1:], 1.0) if s else 1.0
            try:
                n = float(s[:-1] if scale != 1.0 else s) * scale
            except ValueError:
                raise ValueError(f"not a number: {v!r} (e.g. 1e9 or 500M)") from None
            if not math.isfinite(n):
                raise ValueError(f"not a finite number: {v!r}")
            return n
        return v

    @field_validator("gpu")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()


def plan_inputs(values: dict[str, Any]) -> PlanInputs:
    """``PlanInputs`` from loosely typed values (the CLI's strings); a bad one is a
    ``ConfigError`` naming the field."""
    try:
        return PlanInputs.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"invalid plan input: {problems}") from None


# --- measured results ---------------------------------------------------------------------------


def packaged_results() -> Traversable:
    """The folder of measured results shipped in the package."""
    return importlib.resources.files("megapairs_ray").joinpath("plan_sources")


class Results:
    """Measured result files, ``<machine>/<file>``: the package's own (``root`` None) or a
    folder's; every value read names its file."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root: Traversable | Path = packaged_results() if root is None else Path(root)
        self.name = PACKAGED_RESULTS if root is None else str(root)
        if not self.root.is_dir():
            raise ConfigError(f"no measured results at {self.name}: pass --results DIR")

    def label(self, rel: str = "") -> str:
        """How a figure names the file ``rel`` (the folder itself without ``rel``)."""
        return posixpath.join(self.name, rel) if rel else self.name

    def file(self, rel: str) -> Traversable | Path:
        node = self.root
        for part in rel.split("/"):
            node = node.joinpath(part)
        return node

    def doc(self, rel: str) -> dict[str, Any]:
        path = self.file(rel)
        if not path.is_file():
            raise ConfigError(f"measured result {self.label(rel)} is missing")
        return json.loads(path.read_text())

    def value(self, rel: str, key: str, unit: str, scale: float = 1.0) -> Figure:
        """The number at dotted ``key`` of the result file ``rel``."""
        node: Any = self.doc(rel)
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{self.label(rel)} has no {key!r}")
            node = node[part]
        return Figure(float(node) * scale, unit,
                      (f"measured: {self.label(rel)} ({key})",))

    def gpus(self) -> list[str]:
        """GPU names that have measured embed results (the folders' names)."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and self.embed_files(p.name))

    def embed_files(self, gpu: str) -> list[str]:
        folder = self.file(gpu)
        return sorted(f"{gpu}/{p.name}" for p in (folder.iterdir() if folder.is_dir() else [])
                      if re.fullmatch(r"embed_gpu_[a-z0-9-]+\.json", p.name))


# --- models: dimensions and which measured result stands for them -----------------------------

# DINOv2 widths (the published configs; the class token is the embedding).
_DINO_WIDTHS = {"small": 384, "base": 768, "large": 1024, "giant": 1536}


def _open_clip_config(name: str) -> dict[str, Any]:
    """An open_clip model config, read from the package's JSON files without importing it."""
    folders = [Path(__file__).resolve().parent / "models" / "open_clip_configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "model_configs")
    for folder in folders:
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise ConfigError(f"open_clip model {name!r}: no open_clip config of that name")


def _clip_tower_size(name: str) -> str:
    """'L', 'B', ... : the image tower's size class (width 1024 = L, 768 = B)."""
    vision = _open_clip_config(name)["vision_cfg"]
    width = vision.get("width")
    timm_name = str(vision.get("timm_model_name", ""))
    for word, size in (("large", "L"), ("base", "B"), ("huge", "H"), ("giant", "g")):
        if word in timm_name:
            return size
    return {1024: "L", 768: "B", 1280: "H", 1408: "g"}.get(width, f"width {width}")


def _clip_space(cfg: RunConfig) -> tuple[str, Any]:
    """The first open_clip space: its name and encoder (the measured embed rates are for the
    paper's spaces, an open_clip model and a DINOv2)."""
    for s in cfg.embed.spaces:
        if s.encoder.kind.startswith("open_clip"):
            return s.name, s.encoder
    raise ConfigError("embed.spaces has no open_clip space: the plan's measured embed rates "
                      "are for the paper's spaces (an open_clip CLIP and a DINOv2)")


def _dino_space(cfg: RunConfig) -> tuple[str, Any]:
    for s in cfg.embed.spaces:
        if s.encoder.kind == "transformers_image":
            return s.name, s.encoder
    raise ConfigError("embed.spaces has no transformers_image (DINOv2) space: the plan's "
                      "measured embed rates are for the paper's spaces (a CLIP and a DINOv2)")


def space_dims(cfg: RunConfig) -> dict[str, Figure]:
    """The embedding width of every space the run mines."""
    out = {}
    for name in cfg.mine.spaces:
        enc = cfg.embed.space(name).encoder
        if enc.kind.startswith("open_clip"):
            out[name] = Figure(float(_open_clip_config(enc.model)["embed_dim"]), "dims",
                               (f"config: embed.spaces.{name}.encoder.model={enc.model} "
                                "(open_clip's config: embed_dim)",))
        elif enc.kind == "transformers_image":
            out[name] = _dino_dim(name, enc)
        else:
            raise ConfigError(f"embed.spaces.{name}: the plan knows the widths of open_clip "
                              f"and DINOv2 encoders, not of {enc.kind}")
    return out


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class StagePlan:
    stage: str
    gpu_hours: Figure
    cpu_core_hours: Figure
    gpus: Figure
    cores: Figure
    nodes: Figure
    wall_hours: Figure
    bound_by: str
    separate: bool = False  # a job of its own (training), not part of the pipeline's wall time
    # mine: the share of exact mining's pairs the configured index mines (measured).
    fidelity: Figure | None = None

    def figures(self) -> dict[str, Figure]:
        out = {k: getattr(self, k) for k in
               ("gpu_hours", "cpu_core_hours", "gpus", "cores", "nodes", "wall_hours")}
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        return out

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "bound_by": self.bound_by, "separate_job": self.separate,
                **{k: f.to_json() for k, f in self.figures().items()}}


@dataclass
class Plan:
    inputs: dict[str, Figure]
    rates: dict[str, Figure]
    counts: dict[str, Figure]
    stages: list[StagePlan]
    index: dict[str, dict[str, Figure]]
    object_store: dict[str, Figure]
    storage: dict[str, Figure]
    totals: dict[str, Figure]
    warnings: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StagePlan:
        (found,) = [s for s in self.stages if s.stage == name]
        return found

    def figures(self) -> list[tuple[str, Figure]]:
        """Every figure with a dotted name, for tables and checks."""
        out: list[tuple[str, Figure]] = []
        for section in ("inputs", "rates", "counts", "object_store", "storage", "totals"):
            out += [(f"{section}.{k}", v) for k, v in getattr(self, section).items()]
        for s in self.stages:
            out += [(f"stages.{s.stage}.{k}", f) for k, f in s.figures().items()]
        for space, figs in self.index.items():
            out += [(f"index.{space}.{k}", v) for k, v in figs.items()]
        return out

    def to_json(self) -> dict[str, Any]:
        def section(d: dict[str, Figure]) -> dict[str, Any]:
            return {k: v.to_json() for k, v in d.items()}

        return {"inputs": section(self.inputs), "rates": section(self.rates),
                "counts": section(self.counts), "stages": [s.to_json() for s in self.stages],
                "index": {sp: section(f) for sp, f in self.index.items()},
                "object_store": section(self.object_store), "storage": section(self.storage),
                "totals": section(self.totals), "warnings": self.warnings}


def _inputs(p: PlanInputs, cfg: RunConfig, config_label: str) -> dict[str, Figure]:
    """Every input as a figure: given (input), from the config, or assumed."""
    given = p.model_fields_set
    out: dict[str, Figure] = {}
    from_config = {
        "query_fraction": (cfg.mine.query_fraction, "", "mine.query_fraction"),
        "pairs_per_query": (cfg.mine.targets_per_query, "pairs",
                            "mine.targets_per_query (an upper bound: every query fills its "
                            "targets)"),
        "hard_negatives": (cfg.mine.max_hard_negatives, "images",
                           "mine.max_hard_negatives (an upper bound)"),
        "instructions_per_pair": (cfg.instruct.max_instructions if cfg.instruct else 0, "",
                                  "instruct.max_instructions (an upper bound)"),
    }
    for name in PlanInputs.model_fields:
        if name == "gpu":
            continue
        flag = "--" + name.replace("_", "-")
        value = getattr(p, name)
        if name in given:
            unit = (ASSUMED_INPUTS[name][1] if name in ASSUMED_INPUTS
                    else from_config[name][1] if name in from_config else "images")
            out[name] = Figure(float(value), unit, (f"input: {flag}",))
        elif name in from_config:
            v, unit, where = from_config[name]
            out[name] = Figure(float(v), unit, (f"config: {config_label} {where}",))
        else:
            default, unit, why = ASSUMED_INPUTS[name]
            out[name] = assumed(float(value if default is None else default), unit, why)
    return out


def _dino_dim(name: str, dino: Any) -> Figure:
    field = f"embed.spaces.{name}.encoder"
    if "hidden_size" in dino.config_overrides:
        return Figure(float(dino.config_overrides["hidden_size"]), "dims",
                      (f"config: {field}.config_overrides.hidden_size",))
    sizes = [w for word, w in _DINO_WIDTHS.items() if word in dino.model.lower()]
    if not sizes:
        raise ConfigError(f"{field}.model={dino.model!r}: width unknown to the plan "
                          f"(known: DINOv2 {', '.join(_DINO_WIDTHS)})")
    return assumed(sizes[0], "dims", f"{field}.model={dino.model} is {sizes[0]} wide "
                   "(DINOv2's published configs)")


def _embed_rate(res: Results, gpu: str, cfg: RunConfig, warnings: list[str],
                ) -> tuple[Figure, str]:
    """The embed stage's measured images/s on one GPU for the config's encoder sizes, and the
    result file it comes from."""
    clip = _clip_space(cfg)[1].model
    dino_name, dino = _dino_space(cfg)
    want_clip = _clip_tower_size(clip)
    want_dino = int(_dino_dim(dino_name, dino).value)
    files = res.embed_files(gpu)
    for rel in files:
        doc = res.doc(rel)
        if _clip_tower_size(doc["clip_model"]) != want_clip or \
                doc["dino"]["hidden_size"] != want_dino:
            continue
        key = ("stage_2_concurrent_calls_img_per_s"
               if cfg.embed.concurrent_calls_per_actor >= 2
               and "stage_2_concurrent_calls_img_per_s" in doc else "stage_img_per_s")
        rate = res.value(rel, key, "img/s/GPU")
        if doc["clip_model"] != clip:
            same = assumed(0, "", f"{clip} costs what the measured "
                           f"{doc['clip_model']} costs (both ViT-{want_clip} image towers at "
                           "224 px)")
            rate = derive(rate.value, rate.unit, "as measured", rate, same)
        if (dino.image_size or 224) != 224:
            warnings.append(f"embed: measured with DINOv2 at 224 px, the config has "
                            f"{dino.image_size} px")
        return rate, rel
    raise ConfigError(f"no measured embed result on {gpu} for a ViT-{want_clip} CLIP with a "
                      f"{want_dino}-wide DINOv2; measured: {', '.join(files) or 'none'}")


def _cpu_rates(res: Results) -> dict[str, Figure]:
    """Per-core CPU rates calibrated on the index benchmark's measured queries/s (kinds at
    200 k x 128 on a 2-core machine): inner products (exact search: 2·n·d flops a query), then
    the IVF scans after taking the coarse search (and PQ re-ranking) out of each query's time."""
    rel = f"{CPU_RESULTS}/index_recall.json"
    doc = res.doc(rel)
    cores = float(re.search(r"(\d+) cores?", doc["machine"]).group(1))  # type: ignore[union-attr]
    n, d, shards, k = doc["n"], doc["dim"], doc["shards"], doc["k"]
    core_count = Figure(cores, "cores", (f"measured: {res.label(rel)} (machine)",))
    flat = res.value(rel, "kinds.flat.queries_per_s", "queries/s")
    flops = derive(flat.value / cores * 2 * n * d, "flop/s/core",
                   "flat queries/s / cores × 2·n·d", flat, core_count)
    kinds = doc["kinds"]

    def scan_time(kind: str, extra_flops: float) -> tuple[Figure, float]:
        qps = res.value(rel, f"kinds.{kind}.queries_per_s", "queries/s")
        nlist = kinds[kind]["params"]["nlist"]
        coarse = shards * 2 * nlist * d + extra_flops
        left = cores / qps.value - coarse / flops.value
        if left <= 0:
            raise ConfigError(f"{rel}: {kind} is faster than its coarse search; cannot calibrate")
        return qps, left

    ivf = kinds["ivf_flat"]["params"]
    qps, left = scan_time("ivf_flat", 0)
    scanned = n * ivf["nprobe"] / ivf["nlist"]
    ivf_rate = derive(2 * scanned * d / left, "flop/s/core",
                      "2·(n·nprobe/nlist)·d / (cores/qps − coarse search time)", qps, flops)
    pq = kinds["ivf_pq"]["params"]
    refine = shards * 2 * k * pq.get("pq_refine_k_factor", 0) * d
    qps, left = scan_time("ivf_pq", refine)
    pq_rate = derive(n * pq["nprobe"] / pq["nlist"] * pq["pq_m"] / left, "lookups/s/core",
                     "(n·nprobe/nlist)·pq_m / (cores/qps − coarse search − re-ranking)",
                     qps, flops)
    return {"cpu_flops_per_core": flops, "ivf_flat_scan_flops_per_core": ivf_rate,
            "pq_lookups_per_core": pq_rate}


def _index_space(cfg: RunConfig, n: Figure, dim: Figure) -> dict[str, Figure]:
    """Size of one space's index: bytes per vector on disk and in a shard actor's memory."""
    ic = cfg.index
    kind = ic.kind
    src_kind = Figure(0, "", (f"config: index.kind={kind}",))
    # IndexIDMap2 keeps the id of every vector (8 B) and, once loaded, a reverse hash map.
    rev_map = assumed(32, "B/vector", "IndexIDMap2's reverse id map, rebuilt when a shard "
                      "loads (~32 B a vector: checked with faiss 1.x on 2 M vectors)")
    d = dim.value
    if kind == "flat":
        disk = derive(4 * d + 8, "B/vector", "4·d (fp32) + 8 (id)", dim, src_kind)
        coarse = Figure(0, "B", src_kind.sources)
        nlist = Figure(0, "lists", src_kind.sources)
    elif kind in ("ivf_flat", "ivf_pq"):
        if ic.nlist:
            nlist = Figure(ic.nlist, "lists", ("config: index.nlist",))
        else:
            nlist = derive(max(1, int(4 * math.sqrt(n.value))), "lists", "4·√n", n)
        ksub = 2 ** ic.pq_nbits if kind == "ivf_pq" else 0
        coarse = derive((nlist.value + ksub) * d * 4, "B",
                        "(nlist + 2^pq_nbits)·d·4 (fp32 centroids and PQ codebooks)", nlist, dim)
        if kind == "ivf_flat":
            disk = derive(4 * d + 16, "B/vector", "4·d + 8 (IVF list id) + 8 (id map)", dim,
                          src_kind)
        else:  # a run's IVF-PQ always refines (config.py refuses it without)
            code = ic.pq_m * ic.pq_nbits / 8
            disk = derive(code + 16 + 2 * d, "B/vector",
                          "pq_m·pq_nbits/8 + 8 (IVF list id) + 8 (id map) + 2·d (fp16 refine)",
                          dim, Figure(0, "", ("config: index.pq_m, index.pq_nbits",)), src_kind)
    else:
        raise ConfigError(f"index.kind={kind}: the plan has no cost model for it; known: "
                          "flat, ivf_flat, ivf_pq")
    # A memory-mapped shard (stages/index.py mmap_flags) leaves its largest part on local disk,
    # read through the page cache: flat codes, IVF lists (codes and list ids), or the refine
    # vectors.
    mapped_bytes = {"flat": 4 * d, "ivf_flat": 4 * d + 8, "ivf_pq": 2 * d}[kind] if ic.mmap \
        else 0
    mapped = Figure(mapped_bytes, "B/vector", (f"config: index.mmap={ic.mmap}",
                                               f"config: index.kind={kind}"),
                    {"flat": "4·d (flat codes)", "ivf_flat": "4·d + 8 (IVF lists)",
                     "ivf_pq": "2·d (fp16 refine vectors)"}[kind] if ic.mmap else "not mapped")
    memory = derive(disk.value - mapped.value + rev_map.value, "B/vector",
                    "on disk − memory-mapped + reverse id map", disk, mapped, rev_map)
    # Every shard file and every shard actor holds the trained centroids and codebooks.
    total_disk = derive(n.value * disk.value + ic.shards * coarse.value, "GB",
                        "images·B/vector + centroids in every shard", n, disk, coarse)
    total_mem = derive(n.value * memory.value + ic.shards * coarse.value, "GB",
                       "images·B/vector + centroids in every shard", n, memory, coarse)
    shards = Figure(ic.shards, "", ("config: index.shards",))
    out = {"dims": dim, "nlist": nlist, "disk_bytes_per_vector": disk,
           "memory_bytes_per_vector": memory, "mapped_bytes_per_vector": mapped,
           "disk": Figure(total_disk.value / GB, "GB", total_disk.sources, total_disk.formula),
           "memory": Figure(total_mem.value / GB, "GB", total_mem.sources, total_mem.formula)}
    out["memory_per_shard"] = derive(out["memory"].value / ic.shards, "GB",
                                     "memory / index.shards", out["memory"], shards)
    out["mapped_per_shard"] = derive(n.value * mapped.value / ic.shards / GB, "GB",
                                     "images · mapped B/vector / index.shards (local disk, read "
                                     "through the page cache)", n, mapped, shards)
    if ic.device == "cuda" and kind == "flat":
        out["gpu_memory_per_shard"] = derive(n.value / ic.shards * (2 * d + 8) / GB, "GB",
                                             "images/shards·(2·d + 8) (fp16 vectors + ids)",
                                             n, dim)
    return out


@dataclass
class _Cluster:
    gpus: Figure
    cores: Figure
    nodes: float
    gpus_per_node: float
    cpus_per_node: float


def _cluster(i: dict[str, Figure]) -> _Cluster:
    gpus = derive(i["nodes"].value * i["gpus_per_node"].value, "GPUs", "nodes × GPUs per node",
                  i["nodes"], i["gpus_per_node"])
    cores = derive(i["nodes"].value * i["cpus_per_node"].value
                   + i["cpu_nodes"].value * i["cpus_per_cpu_node"].value, "cores",
                   "nodes × CPUs per node + CPU nodes × their CPUs", i["nodes"],
                   i["cpus_per_node"], i["cpu_nodes"], i["cpus_per_cpu_node"])
    return _Cluster(gpus, cores, i["nodes"].value + i["cpu_nodes"].value,
                    i["gpus_per_node"].value, i["cpus_per_node"].value)


def _stage(name: str, cl: _Cluster, gpu_h: Figure, cpu_h: Figure, gpu_cap: Figure | None,
           core_cap: Figure | None, separate: bool = False) -> StagePlan:
    """Wall time: the slower of GPU-hours over the GPUs the stage can use and core-hours over
    the cores it can use, each capped by the config (``*_cap``) and by the cluster."""
    def usable(total: Figure, cap: Figure | None, unit: str) -> tuple[Figure, str]:
        if cap is None or cap.value >= total.value:
            return total, f"the cluster's {total.value:,.0f} {unit}"
        return cap, f"{cap.formula or 'the config'} = {cap.value:,.0f} {unit}"

    gpus, gpu_why = usable(cl.gpus, gpu_cap, "GPUs")
    cores, core_why = usable(cl.cores, core_cap, "cores")
    if gpu_h.value == 0:
        gpus = Figure(0, "GPUs", gpu_h.sources, "no GPU work")
    gpu_wall = gpu_h.value / gpus.value if gpus.value else 0.0
    cpu_wall = cpu_h.value / cores.value if cores.value else 0.0
    if gpu_wall >= cpu_wall and gpu_wall > 0:
        bound, wall = f"GPUs: {gpu_why}", derive(gpu_wall, "h", "GPU-hours / GPUs", gpu_h, gpus)
    else:
        bound, wall = f"CPUs: {core_why}", derive(cpu_wall, "h", "core-hours / cores", cpu_h,
                                                  cores)
    node_count = max(math.ceil(gpus.value / cl.gpus_per_node) if gpus.value else 0,
                     min(cl.nodes, math.ceil(cores.value / cl.cpus_per_node)) if cpu_h.value
                     else 0)
    nodes = derive(node_count, "nodes", "⌈GPUs / GPUs per node⌉ or ⌈cores / CPUs per node⌉",
                   gpus, cores)
    return StagePlan(name, gpu_h, cpu_h, gpus, cores, nodes, wall, bound, separate)


def _cap(value: float, unit: str, formula: str, field_names: str) -> Figure:
    return Figure(value, unit, (f"config: {field_names}",), formula)


@dataclass
class _Ctx:
    """What every stage's arithmetic reads."""

    cfg: RunConfig
    i: dict[str, Figure]
    cl: _Cluster
    rates: dict[str, Figure]
    counts: dict[str, Figure]
    dims: dict[str, Figure]
    index: dict[str, dict[str, Figure]]
    warnings: list[str]
    gpu_memory_gib: float | None = None

    @property
    def n(self) -> Figure:
        return self.i["images"]


NO_GPU = Figure(0, "GPU-h", ("code: the stage asks Ray for no GPUs",))
TWO_DECODES = assumed(2, "", "decode + resize + JPEG re-encode ≈ 2 decodes")


def make_plan(p: PlanInputs, cfg: RunConfig, train: TrainConfig | None = None,
              results: Path | str | None = None, config_label: str = "configs/paper.yaml",
              train_label: str = "configs/train-paper.yaml") -> Plan:
    """The plan for ``p.images`` images on ``p.gpu`` GPUs under the run config ``cfg``."""
    res = Results(results)
    known = res.gpus()
    if p.gpu not in known:
        raise ConfigError(f"unknown GPU {p.gpu!r}; known (measured under {res.label()}"
                          f"): {', '.join(known) or 'none'}")
    warnings: list[str] = []
    i = _inputs(p, cfg, config_label)
    dims = space_dims(cfg)
    c = _Ctx(cfg, i, _cluster(i), _rates(res, p.gpu, cfg, i, warnings), _counts(i), dims,
             {s: _index_space(cfg, i["images"], d) for s, d in dims.items()}, warnings,
             _gpu_memory_gib(res, p.gpu))
    stages = _pipeline_stages(c)
    mine = next(s for s in stages if s.stage == "mine")
    mine.fidelity = _mining_fidelity(res, cfg, warnings)
    if train is not None:
        stages.append(_train_stage(res, p.gpu, train, train_label, c.cl, warnings))
    storage = _storage(cfg, i, c.counts, dims, c.index)
    _check_memory(c)
    return Plan(i, c.rates, c.counts, stages, c.index, _object_store(cfg, i), storage,
                _totals(stages, storage), list(dict.fromkeys(warnings)))


def _pipeline_stages(c: _Ctx) -> list[StagePlan]:
    """One estimate per stage of the pipeline's registry, in its order."""
    from megapairs_ray.pipeline.stages import stage_names

    estimates = {s.stage: s for s in [_ingest(c), _embed(c), _index_build(c), _mine(c),
                                      *_synth(c)]}
    missing = [n for n in stage_names() if n not in estimates]
    if missing:
        raise RuntimeError(f"plan has no estimate for the stage(s) {missing} of "
                           "pipeline/stages.py: internal error, add one to plan.py")
    return [estimates[n] for n in stage_names()]


def _rates(res: Results, gpu: str, cfg: RunConfig, i: dict[str, Figure],
           warnings: list[str]) -> dict[str, Figure]:
    """What one GPU or one core does: measured, or (the vLLM steps) assumed."""
    embed, rel = _embed_rate(res, gpu, cfg, warnings)
    decode_all = res.value(rel, "cpu_decode_img_per_s", "img/s")
    threads = res.value(rel, "cpu_decode_threads", "threads")
    rates = {"embed_img_per_gpu_s": embed,
             "decode_img_per_core_s": derive(decode_all.value / threads.value, "img/s/core",
                                             "cpu_decode_img_per_s / cpu_decode_threads "
                                             "(Pillow decode + resize)", decode_all, threads),
             **_cpu_rates(res)}
    if cfg.index.kind == "ivf_pq":  # only re-scoring reads it
        rates["refine_dims_per_core_s"] = _refine_rate(res)
    gpu_index = f"{gpu}/index_gpu_1shards.json"
    if res.file(gpu_index).is_file():
        g = res.doc(gpu_index)
        qps = res.value(gpu_index, "stage_qps", "queries/s")
        rates["gpu_search_flops"] = derive(qps.value * 2 * g["n"] * g["dim"], "flop/s",
                                           "stage_qps × 2·n·d (exact fp16 search)", qps)
    for key in ("describe_pairs_per_gpu_s", "instruct_pairs_per_gpu_s"):
        rates[key] = i[key]
    return rates


def _counts(i: dict[str, Figure]) -> dict[str, Figure]:
    n, hn = i["images"], i["hard_negatives"]
    queries = derive(n.value * i["query_fraction"].value, "queries", "images × query_fraction",
                     n, i["query_fraction"])
    pairs = derive(queries.value * i["pairs_per_query"].value, "pairs",
                   "queries × pairs_per_query", queries, i["pairs_per_query"])
    export = derive(min(n.value, queries.value + pairs.value * (1 + hn.value)), "images",
                    "min(images, queries + pairs·(1 + hard_negatives)): no image shared (an "
                    "upper bound)", n, queries, pairs, hn)
    return {"queries": queries, "pairs": pairs, "export_images": export}


def _ingest(c: _Ctx) -> StagePlan:
    """Every image decoded once (JPEGs at 1/8 scale: cheaper than the measured decode and
    resize, so an upper bound)."""
    dec = c.rates["decode_img_per_core_s"]
    hours = derive(c.n.value / dec.value / HOUR, "core-h", "images / decodes per core / 3600 "
                   "(ingest verifies at 1/8 scale: an upper bound)", c.n, dec)
    return _stage("ingest", c.cl, NO_GPU, hours, None, None)


def _embed(c: _Ctx) -> StagePlan:
    """The measured stage rate per GPU, or the actors' own CPU decoding if that is slower."""
    e, rate, dec = c.cfg.embed, c.rates["embed_img_per_gpu_s"], c.rates["decode_img_per_core_s"]
    per_actor = rate.value * e.num_gpus
    if e.decode == "cpu":
        per_actor = min(per_actor, e.num_cpus * dec.value)
    actor = derive(per_actor, "img/s/actor", "min(GPU rate × embed.num_gpus, embed.num_cpus × "
                   "decodes per core if decode=cpu)", rate, dec,
                   Figure(0, "", (f"config: embed.decode={e.decode}",)))
    gpu_h = derive(c.n.value / actor.value * e.num_gpus / HOUR, "GPU-h",
                   "images / img/s per actor × embed.num_gpus / 3600", c.n, actor)
    cpu_h = derive(c.n.value / actor.value * e.num_cpus / HOUR, "core-h",
                   "images / img/s per actor × embed.num_cpus / 3600 (CPUs the actors hold)",
                   c.n, actor)
    stage = _stage("embed", c.cl, gpu_h, cpu_h, _cap(e.max_actors * e.num_gpus, "GPUs",
                                                      "embed.max_actors × num_gpus",
                                                      "embed.max_actors, embed.num_gpus"), None)
    if per_actor < rate.value * e.num_gpus:
        stage.bound_by = (f"CPUs: each actor decodes on its embed.num_cpus={e.num_cpus:g} cores, "
                          f"slower than its GPU ({stage.gpus.value:,.0f} actors)")
    return stage


def _index_build(c: _Ctx) -> StagePlan:
    """Per space: k-means on the training sample in one task, then every vector assigned to
    its list (and PQ-encoded) in one task per shard; spaces one after another
    (pipeline/index.py)."""
    ic, flops = c.cfg.index, c.rates["cpu_flops_per_core"]
    shard_cores = ic.shards * ic.shard_num_cpus
    train_h = add_h = wall = 0.0
    for space, d in c.dims.items():
        if ic.kind == "ivf_pq" and d.value % ic.pq_m:
            c.warnings.append(f"index: pq_m={ic.pq_m} does not divide {space}'s {d.value:g} "
                              "dims: the index stage refuses it (choose a pq_m dividing every "
                              "space)")
        if ic.kind == "flat":
            continue
        nl = c.index[space]["nlist"].value
        sample = min(ic.train_sample, c.n.value)
        t = 2 * sample * nl * d.value * KMEANS_ITERATIONS / flops.value / HOUR
        ksub = 2 ** ic.pq_nbits if ic.kind == "ivf_pq" else 0
        a = c.n.value * 2 * (nl + ksub) * d.value / flops.value / HOUR
        train_h, add_h = train_h + t, add_h + a
        wall += t / ic.shard_num_cpus + a / min(shard_cores, c.cl.cores.value)
        if sample < 39 * nl:
            c.warnings.append(f"index: {sample:,.0f} training vectors for {nl:,.0f} lists "
                              "(FAISS wants ≥ 39 per list)")
    if ic.kind == "flat":
        cpu_h = Figure(0, "core-h", ("code: a flat index is a copy of the vectors: no training, "
                                     "no assignment (the copy's I/O is not modeled)",))
        return _stage("index", c.cl, NO_GPU, cpu_h, None, None)
    kmeans = assumed(KMEANS_ITERATIONS, "iterations", "FAISS's k-means default (niter 25)")
    cpu_h = derive(train_h + add_h, "core-h", "Σ spaces [2·train_sample·nlist·d·iterations + "
                   "images·2·(nlist + 2^pq_nbits)·d] / flop/s per core / 3600", c.n, flops,
                   kmeans, Figure(0, "", ("config: index.kind, index.train_sample, "
                                          "index.pq_nbits",)),
                   *c.dims.values(), *(c.index[s]["nlist"] for s in c.dims))
    stage = _stage("index", c.cl, NO_GPU, cpu_h, None, _cap(
        shard_cores, "cores", "index.shards × shard_num_cpus",
        "index.shards, index.shard_num_cpus"))
    one_task = Figure(0, "", ("code: pipeline/index.py trains each space in one task of "
                              "index.shard_num_cpus, then fills its shards, one space after "
                              "another",))
    stage.wall_hours = derive(wall, "h", "Σ spaces [training core-h / shard_num_cpus + fill "
                              "core-h / min(cluster cores, shards × shard_num_cpus)]",
                              cpu_h, c.cl.cores, one_task)
    stage.bound_by = (f"CPUs: per space one training task of {ic.shard_num_cpus:g} cores, then "
                      f"{ic.shards} shard tasks")
    return stage


def _mine(c: _Ctx) -> StagePlan:
    """Every query searched in every space, by every shard of it: each shard runs the whole
    coarse search, then scans its part of the nprobe lists."""
    ic, n, queries = c.cfg.index, c.n.value, c.counts["queries"]
    flops = c.rates["cpu_flops_per_core"]
    if ic.device == "cuda" and ic.kind != "flat":
        raise ConfigError(f"index.device=cuda with kind={ic.kind}: no measured GPU search rate "
                          "for it (measured: flat on cuda)")
    if ic.device == "cuda" and "gpu_search_flops" not in c.rates:
        raise ConfigError("index.device=cuda: no measured GPU search (index_gpu_1shards.json)")
    per_query = 0.0
    for space, d in c.dims.items():
        nl = c.index[space]["nlist"].value
        coarse = ic.shards * 2 * nl * d.value / flops.value
        if ic.kind == "flat":
            rate = c.rates["gpu_search_flops" if ic.device == "cuda" else "cpu_flops_per_core"]
            per_query += 2 * n * d.value / rate.value
            if ic.device == "cuda":  # the exact mode, sized per space
                c.index[space]["exact_search_gpu_hours"] = derive(
                    queries.value * 2 * n * d.value / rate.value / HOUR, "GPU-h",
                    "queries × 2·images·d / GPU flop/s / 3600", queries, c.n, d, rate)
        elif ic.kind == "ivf_flat":
            per_query += coarse + 2 * n * ic.nprobe / nl * d.value / c.rates[
                "ivf_flat_scan_flops_per_core"].value
        else:
            refine = (ic.shards * (c.cfg.mine.k + TIE_MARGIN) * ic.pq_refine_k_factor * d.value
                      / c.rates["refine_dims_per_core_s"].value)
            per_query += coarse + refine + n * ic.nprobe / nl * ic.pq_m / c.rates[
                "pq_lookups_per_core"].value
    formula, basis = {
        "flat": ("queries × Σ spaces 2·images·d / flop/s", ["gpu_search_flops" if ic.device ==
                                                             "cuda" else "cpu_flops_per_core"]),
        "ivf_flat": ("queries × Σ spaces [shards·2·nlist·d / flop/s (coarse search, in every "
                     "shard) + 2·images·nprobe/nlist·d / scan flop/s]",
                     ["cpu_flops_per_core", "ivf_flat_scan_flops_per_core"]),
        "ivf_pq": ("queries × Σ spaces [shards·2·nlist·d / flop/s (coarse search, in every "
                   "shard) + images·nprobe/nlist·pq_m / lookups/s (PQ scan) + shards·(k + "
                   f"{TIE_MARGIN})·k_factor·d / refine dims/s (re-scoring)]",
                   ["cpu_flops_per_core", "pq_lookups_per_core", "refine_dims_per_core_s"]),
    }[ic.kind]
    search = derive(queries.value * per_query / HOUR, "GPU-h" if ic.device == "cuda" else
                    "core-h", formula + " / 3600", queries, c.n, *(c.rates[k] for k in basis),
                    *c.dims.values(), *(c.index[s]["nlist"] for s in c.dims),
                    Figure(0, "", ("config: index.shards, index.nprobe, index.pq_m, "
                                   "index.pq_refine_k_factor, mine.k",)))
    actors = len(c.dims) * ic.shards
    core_cap = _cap(actors * ic.shard_num_cpus, "cores", "spaces × shards × shard_num_cpus "
                    "(shard actors)", "mine.spaces, index.shards, index.shard_num_cpus")
    if ic.device != "cuda":
        return _stage("mine", c.cl, NO_GPU, search, None, core_cap)
    held = derive(search.value * ic.shard_num_cpus / ic.shard_num_gpus, "core-h",
                  "GPU-h × shard_num_cpus / shard_num_gpus (CPUs the shard actors hold)", search)
    return _stage("mine", c.cl, search, held, _cap(
        actors * ic.shard_num_gpus, "GPUs", "spaces × shards × shard_num_gpus",
        "mine.spaces, index.shards, index.shard_num_gpus"), core_cap)


MINING_FIDELITY = f"{CPU_RESULTS}/mining_fidelity.json"


def _refine_rate(res: Results) -> Figure:
    """What re-scoring a refine candidate costs (its fp16 vector read from the page cache and
    its inner product), per dimension: the fidelity benchmark's refined IVF-PQ search (x8) less
    the same index's PQ search alone, over the candidates it re-scored ((k + TIE_MARGIN) x 8 a
    query), pooled over its spaces."""
    doc = res.doc(MINING_FIDELITY)
    cores = float(doc["machine"]["cpu_count"])
    candidates = (doc["rules"]["k"] + TIE_MARGIN) * 8
    refined, plain = "ivf_pq + fp16 refine x8", "ivf_pq, no refine (the paper profile before)"
    dims = seconds = 0.0
    parts: list[Figure] = []
    for space, dim in doc["data"]["spaces"].items():
        key = "settings.{}.spaces." + space + ".queries_per_s"
        r = res.value(MINING_FIDELITY, key.format(refined), "queries/s")
        p = res.value(MINING_FIDELITY, key.format(plain), "queries/s")
        dims += candidates * dim
        seconds += cores / r.value - cores / p.value
        parts += [r, p]
    if seconds <= 0:
        raise ConfigError(f"{res.label(MINING_FIDELITY)}: refined search is not slower than "
                          "PQ alone; cannot calibrate re-scoring")
    return derive(dims / seconds, "dims/s/core",
                  f"Σ spaces (k + {TIE_MARGIN})·8 candidates · d / Σ spaces (cores/qps refined "
                  "x8 − cores/qps PQ alone)", *parts)


def _mining_fidelity(res: Results, cfg: RunConfig, warnings: list[str]) -> Figure | None:
    """The share of exact mining's pairs mined with the configured index, where the fidelity
    benchmark measured that setting (kind, nprobe, PQ size, refine factor); else a warning."""
    ic = cfg.index
    doc = res.doc(MINING_FIDELITY)
    bench = doc["index"]
    name = {"flat": "flat (exact)", "ivf_flat": "ivf_flat",
            "ivf_pq": f"ivf_pq + fp16 refine x{ic.pq_refine_k_factor}"}.get(ic.kind, ic.kind)
    same = ic.kind == "flat" or (ic.nprobe == bench["nprobe"] and (
        ic.kind != "ivf_pq" or (ic.pq_m, ic.pq_nbits) == (bench["pq_m"], bench["pq_nbits"])))
    if name not in doc["settings"] or not same:
        warnings.append(f"mine: no measured fidelity for index.kind={ic.kind} at these settings "
                        f"({res.label(MINING_FIDELITY)} has {sorted(doc['settings'])} at "
                        f"nprobe {bench['nprobe']}, PQ{bench['pq_m']}x{bench['pq_nbits']}): run "
                        "benchmarks/mining_fidelity.py")
        return None
    run = doc["settings"][name]
    f = res.value(MINING_FIDELITY, f"settings.{name}.share_of_exact_pairs_mined",
                  "of exact pairs")
    data = doc["data"]
    recall = min(run["recall_at_k"].values())
    return Figure(f.value, f.unit, (
        *f.sources,
        f"measured: {res.label(MINING_FIDELITY)} (recall@{doc['rules']['k']} ≥ {recall:.3f} in "
        f"every space, {run['similarities_outside_window']} mined similarities outside their "
        f"window, on {data['n']:,} clustered vectors per space and {data['queries']:,} "
        "queries)"),
        "pairs mined / pairs exact search mines, same rules and queries")


def _synth(c: _Ctx) -> list[StagePlan]:
    """describe and instruct at the assumed pairs/s per GPU (the engines hold their CPUs;
    describe's fetchers decode, resize and re-encode both images of a pair), then export:
    every image a triplet names decoded, resized to 512² and re-encoded once."""
    if c.cfg.describe is None or c.cfg.instruct is None:
        return []
    pairs, dec = c.counts["pairs"], c.rates["decode_img_per_core_s"]
    out = []
    for step in ("describe", "instruct"):
        sc = getattr(c.cfg, step)
        rate = c.rates[f"{step}_pairs_per_gpu_s"]
        gpu_h = derive(pairs.value / rate.value / HOUR, "GPU-h", "pairs / pairs/s per GPU / "
                       "3600", pairs, rate)
        cpu = gpu_h.value * sc.engine_num_cpus / max(sc.engine_num_gpus, 1e-9)
        formula, parts = "GPU-h × engine_num_cpus / engine_num_gpus", [gpu_h]
        if step == "describe":
            cpu += 2 * pairs.value * TWO_DECODES.value / dec.value / HOUR
            formula += " + 2·pairs × 2 decodes / decodes per core / 3600"
            parts += [pairs, TWO_DECODES, dec]
        gpus = sc.replicas * sc.tensor_parallel_size * sc.engine_num_gpus
        out.append(_stage(step, c.cl, gpu_h, derive(cpu, "core-h", formula, *parts), _cap(
            gpus, "GPUs", f"{step}.replicas × tensor_parallel_size × engine_num_gpus",
            f"{step}.replicas, {step}.tensor_parallel_size, {step}.engine_num_gpus"), None))
    images = c.counts["export_images"]
    hours = derive(images.value * TWO_DECODES.value / dec.value / HOUR, "core-h",
                   "export images × 2 decodes / decodes per core / 3600", images, TWO_DECODES,
                   dec)
    return [*out, _stage("export", c.cl, NO_GPU, hours, None, None)]


def _totals(stages: list[StagePlan], storage: dict[str, Figure]) -> dict[str, Figure]:
    pipeline = [s for s in stages if not s.separate]

    def total(attr: str, unit: str, formula: str) -> Figure:
        parts = [getattr(s, attr) for s in pipeline]
        return derive(sum(p.value for p in parts), unit, formula, *parts)

    return {"pipeline_gpu_hours": total("gpu_hours", "GPU-h", "Σ pipeline stages"),
            "pipeline_cpu_core_hours": total("cpu_core_hours", "core-h", "Σ pipeline stages"),
            "pipeline_wall_hours": total("wall_hours", "h", "Σ pipeline stages (they run one "
                                         "after another)"),
            "storage": derive(sum(v.value for v in storage.values()), "TB", "Σ storage",
                              *storage.values())}


def _check_memory(c: _Ctx) -> None:
    """The shard actors hold every space's index at once while mining."""
    need = sum(v["memory"].value for v in c.index.values())
    i = c.i
    have = (i["nodes"].value * i["memory_per_node_gib"].value
            + i["cpu_nodes"].value * i["memory_per_cpu_node_gib"].value) * 2**30 / GB
    if need > (1 - RAY_STORE_PROPORTION) * have:
        c.warnings.append(f"mine: the indexes need {need:,.0f} GB of actor memory, more than "
                          f"the cluster's {have:,.0f} GB leave beside the object store")
    mapped = sum(v["mapped_per_shard"].value for v in c.index.values()) * c.cfg.index.shards
    if mapped > (1 - RAY_STORE_PROPORTION) * have - need:
        c.warnings.append(f"mine: the shards' memory-mapped part ({mapped:,.0f} GB) is more "
                          "than the page cache the nodes have left, so part of it is read from "
                          "local disk: one random read per re-scored candidate (index.shards × "
                          f"(mine.k + {TIE_MARGIN}) × pq_refine_k_factor a query and space)")
    card = c.gpu_memory_gib
    for space, figs in c.index.items():
        on_gpu = figs.get("gpu_memory_per_shard")
        if on_gpu and card and on_gpu.value * GB / 2**30 > card:
            c.warnings.append(f"mine: a {space} shard holds {on_gpu.value:,.0f} GB on its GPU, "
                              f"more than the card's {card:,.0f} GiB: raise index.shards")


def _train_stage(res: Results, gpu: str, t: TrainConfig, label: str, cl: _Cluster,
                 warnings: list[str]) -> StagePlan:
    """Training: the measured train-step triplets/s per GPU for the model's size (the mllm
    family: its step's FLOPs at an assumed utilisation, until a GPU measures it)."""
    if t.model.family == "mllm":
        return _mllm_train_stage(res, gpu, t, label, cl, warnings)
    init = (t.model.init or "").lower()
    model = "l14" if "large" in init or "l14" in init else "b16"
    rel = f"{gpu}/train_gpu_{model}.json"
    rate = res.value(rel, "triplets_per_s.train_step", "triplets/s/GPU")
    measured_batch = res.doc(rel)["batch_queries"]
    o, s = t.optim, t.scaling
    triplets = Figure(o.max_steps * o.batch_size * o.grad_accum_steps * s.num_workers,
                      "triplets", (f"config: {label} optim.max_steps × batch_size × "
                                   "grad_accum_steps × scaling.num_workers",))
    factor = 4 / 3 if o.gradient_checkpointing else 1.0
    ckpt = assumed(factor, "", "gradient checkpointing recomputes activations: ~1/3 more "
                   "compute" if o.gradient_checkpointing else "no gradient checkpointing")
    gpu_h = derive(triplets.value / rate.value * factor / HOUR, "GPU-h",
                   "triplets / triplets/s per GPU × recompute factor / 3600 (per-GPU rate "
                   f"measured at {measured_batch} queries a GPU)", triplets, rate, ckpt)
    gpus_per_worker = s.gpus_per_worker or 1.0
    workers = _cap(s.num_workers * gpus_per_worker, "GPUs", "scaling.num_workers × "
                   "gpus_per_worker", f"{label} scaling.num_workers")
    held = s.num_workers * s.cpus_per_worker + t.data.loader_actors * t.data.loader_num_cpus
    wall = gpu_h.value / min(workers.value, cl.gpus.value)
    cpu_h = derive(wall * held, "core-h", "wall × (workers' CPUs + loader actors' CPUs)", gpu_h,
                   workers, Figure(0, "", (f"config: {label} data.loader_actors, "
                                           "loader_num_cpus, scaling.cpus_per_worker",)))
    if not o.gradient_checkpointing and o.batch_size > measured_batch:
        peak = res.value(rel, "peak_memory_gib", "GiB")
        card = _gpu_memory_gib(res, gpu)
        est = peak.value * o.batch_size / measured_batch
        if card and est > card:
            warnings.append(f"train: {o.batch_size} queries a GPU needs ≈{est:,.0f} GiB by "
                            f"scaling the measured {peak.value:.1f} GiB at {measured_batch} "
                            f"({rel}), above the card's {card:,.0f} GiB: set "
                            "optim.gradient_checkpointing or lower optim.batch_size")
    return _stage("train", cl, gpu_h, cpu_h, workers, None, separate=True)


# LLaVA-1.6-Mistral-7B as BGE-VL-MLLM releases it, and LLaVA-NeXT's tiles (models/mllm.py).
MLLM_PARAMS, MLLM_HIDDEN, MLLM_LAYERS = 7.57e9, 4096, 32
MLLM_TILE, MLLM_PATCH = 336, 14
MLLM_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
BF16_PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0}  # dense bf16, the vendor's figure


def _mllm_train_stage(res: Results, gpu: str, t: TrainConfig, label: str, cl: _Cluster,
                      warnings: list[str]) -> StagePlan:
    """MMRet-MLLM on GPUs: DDP with LoRA, each GPU holding the bf16 backbone. The per-GPU rate
    is the step's FLOPs (forward passes of 2·params·tokens) at an assumed utilisation: no GPU
    has measured this family's step yet (benchmarks/run_gpu_mllm.sh will)."""
    from megapairs_ray.models.mllm import image_token_count

    o, s, m = t.optim, t.scaling, t.model.mllm
    params = assumed(MLLM_PARAMS, "parameters", "LLaVA-1.6-Mistral-7B, as BGE-VL-MLLM is "
                     "released (7.57 B)")
    image_tokens = image_token_count(m.image_size, MLLM_PINPOINTS, MLLM_TILE, MLLM_PATCH)
    prompt = assumed(60, "tokens", "the prompt's words and an instruction, beside the image")
    tokens = derive(image_tokens + prompt.value, "tokens", "image tokens at "
                    "model.mllm.image_size (LLaVA-NeXT anyres) + prompt", prompt,
                    Figure(0, "", (f"config: {label} model.mllm.image_size",)))
    sequences = 2 + t.data.num_hard_negatives
    # Forward-pass equivalents: GradCache's pass without a graph, the pass with one, the
    # backward (activation gradients only: the frozen weights take none), and checkpointing's
    # recompute.
    passes = (2 if o.grad_cache_chunk else 1) + 1 + (1 if o.gradient_checkpointing else 0)
    flops = derive(passes * 2 * params.value * tokens.value * sequences, "FLOP/triplet",
                   f"{passes} forward equivalents × 2·params·tokens × (2 + "
                   "num_hard_negatives) sequences", params, tokens,
                   Figure(0, "", (f"config: {label} optim.grad_cache_chunk, "
                                  "gradient_checkpointing, data.num_hard_negatives",)))
    peak = assumed(BF16_PEAK_TFLOPS.get(gpu, 989.0), "TFLOP/s", f"{gpu} dense bf16 peak")
    mfu = assumed(0.35, "", "35 % of peak: long sequences, LoRA, bf16 (not measured)")
    rate = derive(mfu.value * peak.value * 1e12 / flops.value, "triplets/s/GPU",
                  "utilisation × peak / FLOP per triplet", mfu, peak, flops)
    triplets = Figure(o.max_steps * o.batch_size * o.grad_accum_steps * s.num_workers,
                      "triplets", (f"config: {label} optim.max_steps × batch_size × "
                                   "grad_accum_steps × scaling.num_workers",))
    gpu_h = derive(triplets.value / rate.value / HOUR, "GPU-h", "triplets / triplets/s per GPU "
                   "/ 3600", triplets, rate)
    workers = _cap(s.num_workers * (s.gpus_per_worker or 1.0), "GPUs",
                   "scaling.num_workers × gpus_per_worker", f"{label} scaling.num_workers")
    held = s.num_workers * s.cpus_per_worker + t.data.loader_actors * t.data.loader_num_cpus
    wall = gpu_h.value / min(workers.value, cl.gpus.value)
    cpu_h = derive(wall * held, "core-h", "wall × (workers' CPUs + loader actors' CPUs)", gpu_h,
                   workers)
    # Memory: the bf16 weights, the adapter's fp32 weights, gradients and Adam moments, and
    # one chunk's activations at each layer boundary (checkpointing) or all of them.
    lora = 2 * m.lora.r * (4 * MLLM_HIDDEN + 2 * MLLM_HIDDEN // 4 + 3 * (MLLM_HIDDEN + 14336))
    chunk = o.grad_cache_chunk or o.batch_size * sequences
    per_layer = chunk * tokens.value * MLLM_HIDDEN * 2
    act = per_layer * MLLM_LAYERS * (1 if o.gradient_checkpointing else 12)
    need = (2 * params.value + 16 * lora * MLLM_LAYERS + act) / 2**30
    card = _gpu_memory_gib(res, gpu)
    if card and need > card:
        warnings.append(f"train: ≈{need:,.0f} GiB a GPU (bf16 weights, LoRA states, "
                        f"{chunk} sequences' activations) is above the card's {card:,.0f} GiB: "
                        "set optim.grad_cache_chunk lower or optim.gradient_checkpointing")
    return _stage("train", cl, gpu_h, cpu_h, workers, None, separate=True)


def _gpu_memory_gib(res: Results, gpu: str) -> float | None:
    """The card's memory from ``<gpu>/gpu.txt`` (nvidia-smi: name, MiB, driver)."""
    path = res.file(f"{gpu}/gpu.txt")
    m = re.search(r"(\d+)\s*MiB", path.read_text()) if path.is_file() else None
    return int(m.group(1)) / 1024 if m else None


def _object_store(cfg: RunConfig, i: dict[str, Figure]) -> dict[str, Figure]:
    """The object store a GPU node needs while embedding (the stage that streams the most
    bytes), next to Ray's default for the node."""
    e = cfg.embed
    actors = i["gpus_per_node"].value / e.num_gpus
    in_flight = assumed(e.max_tasks_in_flight_per_actor + 1, "batches",
                        "embed.max_tasks_in_flight_per_actor + 1 queued at the readers")
    working = derive(actors * in_flight.value * e.batch_size * i["image_kb"].value * 1e3 / GB,
                     "GB", "actors per node × batches in flight × embed.batch_size × image "
                     "bytes", i["gpus_per_node"], in_flight, i["image_kb"],
                     Figure(0, "", ("config: embed.num_gpus, embed.batch_size",)))
    headroom = assumed(2, "×", "room for readers' and writers' blocks beside the actors'")
    default = Figure(min(RAY_STORE_PROPORTION * i["memory_per_node_gib"].value * 2**30,
                         RAY_STORE_CAP) / GB, "GB",
                     ("ray: default object store = min(30 % of node memory, 200 GB)",
                      *i["memory_per_node_gib"].sources), "min(0.3·memory, 200 GB)")
    return {"embed_working_set_per_gpu_node": working,
            "recommended_per_gpu_node": derive(working.value * headroom.value, "GB",
                                               "working set × headroom", working, headroom),
            "ray_default_per_gpu_node": default}


def _storage(cfg: RunConfig, i: dict[str, Figure], counts: dict[str, Figure],
             dims: dict[str, Figure], index: dict[str, dict[str, Figure]]) -> dict[str, Figure]:
    """Bytes on storage per output, from the tables' schemas (uncompressed Arrow: fixed-width
    columns exactly, strings as 4-byte offsets plus the assumed characters)."""
    n, pairs = i["images"], counts["pairs"]
    rows = row_bytes(cfg, i, dims)
    tb = 1e12

    def total(count: Figure, row: Figure, what: str) -> Figure:
        return derive(count.value * row.value / tb, "TB", f"{what} × bytes per row", count, row)

    out = {
        "source_images": derive(n.value * i["image_kb"].value * 1e3 / tb, "TB",
                                "images × image_kb", n, i["image_kb"]),
        "images_table": total(n, rows["images"], "images"),
        "embeddings": total(n, rows["embeddings"], "images"),
        "indexes": derive(sum(v["disk"].value for v in index.values()) * GB / tb, "TB",
                          "Σ spaces index on disk", *(v["disk"] for v in index.values())),
        "pairs": total(pairs, rows["pairs"], "pairs"),
    }
    if cfg.describe is not None and cfg.instruct is not None:
        out["descriptions"] = total(pairs, rows["descriptions"], "pairs")
        out["instructions"] = total(pairs, rows["instructions"], "pairs")
        out["triplets"] = derive(2 * pairs.value * rows["triplets"].value / tb, "TB",
                                 "pairs × bytes per row × 2 (parquet + JSON lines, assumed the "
                                 "same size)", pairs, rows["triplets"])
        out["export_images"] = derive(counts["export_images"].value * i["export_image_kb"].value
                                      * 1e3 / tb, "TB", "export images × export_image_kb",
                                      counts["export_images"], i["export_image_kb"])
    return out


# Characters of the short strings in the tables: assumptions, named in each row's sources.
SHORT_STRINGS = {"shard": 30, "key": 9, "format_kind": 10, "file_uri": 60, "format": 4,
                 "mode": 3, "space": 10, "path": 37, "model": 35}


def row_bytes(cfg: RunConfig, i: dict[str, Figure], dims: dict[str, Figure]) -> dict[str, Figure]:
    """Uncompressed Arrow bytes of one row of each table the run writes (the schemas:
    stages/ingest.py IMAGES_SCHEMA, stages/embed_io.py embedding_table, pipeline/mine.py
    PAIRS_SCHEMA, pipeline/export.py TRIPLET_SCHEMA)."""
    c = SHORT_STRINGS
    short = assumed(0, "", "short strings: " + ", ".join(f"{k} {v}" for k, v in c.items())
                    + " characters (img2dataset keys, s3 URIs, 'images/NNNNN/<id>.jpg')")
    spaces = assumed(1, "spaces", "a pair is found in one space")
    hn, ins = i["hard_negatives"].value, i["instructions_per_pair"].value
    caption = i["caption_chars"]

    def s(chars: float) -> float:  # a string value: its offset and its bytes
        return 4 + chars

    images = (4 * 8 + 2 * 4 + s(c["shard"]) + s(c["key"]) + s(c["format_kind"])
              + s(c["file_uri"]) + s(c["format"]) + s(c["mode"]) + s(caption.value))
    embeddings = sum(8 + 2 * d.value for d in dims.values())
    # pair_id, query_id, target_id; spaces, similarities; hard negatives (the query first).
    pair = (3 * 8 + 4 + spaces.value * s(c["space"]) + 4 + 4 * spaces.value
            + 4 + 8 * (hn + 1))
    descriptions = pair + s(i["description_chars"].value) + 2 * 8  # + word_num, attempts
    instructions = descriptions + 4 + ins * s(i["instruction_chars"].value)
    triplet = (s(c["path"]) + 4 + ins * s(i["instruction_chars"].value) + s(c["path"])
               + 4 + (hn + 1) * s(c["path"]) + 3 * 8 + 4 + 8 * hn
               + 4 + spaces.value * s(c["space"]) + 4 + 4 * spaces.value
               + s(i["description_chars"].value) + 2 * s(c["model"]))
    hnf, insf = i["hard_negatives"], i["instructions_per_pair"]
    return {
        "images": derive(images, "B/row", "IMAGES_SCHEMA: 4 int64 + 2 int32 + 7 strings",
                         caption, short),
        "embeddings": derive(embeddings, "B/image", "Σ spaces (8 + 2·d): int64 id + fp16 vector",
                             *dims.values()),
        "pairs": derive(pair, "B/row", "PAIRS_SCHEMA: 3 int64 + spaces + similarities + "
                        "hard_negatives (query first)", hnf, spaces, short),
        "descriptions": derive(descriptions, "B/row", "pair + description + word_num, attempts",
                               hnf, spaces, short, i["description_chars"]),
        "instructions": derive(instructions, "B/row", "description row + instructions", hnf,
                               spaces, short, i["description_chars"], insf,
                               i["instruction_chars"]),
        "triplets": derive(triplet, "B/row", "TRIPLET_SCHEMA: paths, instructions, ids, "
                           "spaces, similarities, description, models", hnf, spaces, short,
                           insf, i["instruction_chars"], i["description_chars"]),
    }


# --- output -------------------------------------------------------------------------------------


def _fmt(f: Figure) -> str:
    v = f.value
    if f.unit in ("GB", "TB") and v < 10:
        return f"{v:,.2f} {f.unit}"
    if abs(v) >= 100 or v == int(v):
        return f"{v:,.0f} {f.unit}".strip()
    return f"{v:,.2f} {f.unit}".strip()


def render(plan: Plan, console: Any) -> None:
    """The plan as tables: stages, index memory, storage and the object store, then every
    figure with its formula and sources."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"plan: {plan.inputs['images'].value:,.0f} images")
    for col in ("stage", "GPU-hours", "CPU core-hours", "GPUs", "cores", "nodes", "wall",
                "bound by", "pairs vs exact"):
        t.add_column(col)
    for s in plan.stages:
        t.add_row(s.stage + (" (own job)" if s.separate else ""), _fmt(s.gpu_hours),
                  _fmt(s.cpu_core_hours), _fmt(s.gpus), _fmt(s.cores), _fmt(s.nodes),
                  _fmt(s.wall_hours), s.bound_by,
                  f"{s.fidelity.value:.3f}" if s.fidelity is not None else "")
    tot = plan.totals
    t.add_row("pipeline", _fmt(tot["pipeline_gpu_hours"]), _fmt(tot["pipeline_cpu_core_hours"]),
              "", "", "", _fmt(tot["pipeline_wall_hours"]), "stages run one after another", "")
    console.print(t)

    t = Table(title="index per space")
    for col in ("space", "dims", "bytes/vector (disk / memory)", "disk", "memory",
                "memory per shard", "mapped per shard"):
        t.add_column(col)
    for space, f in plan.index.items():
        t.add_row(space, _fmt(f["dims"]), f"{f['disk_bytes_per_vector'].value:,.0f} / "
                  f"{f['memory_bytes_per_vector'].value:,.0f}", _fmt(f["disk"]),
                  _fmt(f["memory"]), _fmt(f["memory_per_shard"]), _fmt(f["mapped_per_shard"]))
    console.print(t)

    t = Table(title="storage and object store")
    t.add_column("what")
    t.add_column("size")
    for k, v in plan.storage.items():
        t.add_row(k, _fmt(v))
    t.add_row("storage total", _fmt(tot["storage"]))
    for k, v in plan.object_store.items():
        t.add_row(f"object store: {k}", _fmt(v))
    console.print(t)

    console.print("[bold]every figure and its sources[/bold]")
    for name, f in plan.figures():
        console.print(escape(f"{name} = {_fmt(f)}" + (f"  ({f.formula})" if f.formula else "")),
                      soft_wrap=True)
        for source in f.sources:
            console.print(escape(f"    {source}"), soft_wrap=True)
    for w in plan.warnings:
        console.print(f"[yellow]warning: {escape(w)}[/yellow]", soft_wrap=True)
