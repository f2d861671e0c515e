"""`megapairs plan`: every figure follows from a measured result file, the config or a stated
assumption, and the command line prints it as a table or JSON, or fails in one line.

No Ray, no models: a plan is arithmetic on JSON files, so each test recomputes a figure by hand
from the file it names and compares.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.config import ConfigError, RunConfig, load_config
from megapairs_ray.plan import (
    CPU_RESULTS,
    PACKAGED_RESULTS,
    SHORT_STRINGS,
    Figure,
    Plan,
    Results,
    make_plan,
    plan_inputs,
)
from megapairs_ray.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHIPPED = ROOT / PACKAGED_RESULTS  # the copies plan reads by default (package data)
PAPER = ROOT / "configs" / "paper.yaml"
TRAIN = ROOT / "configs" / "train-paper.yaml"
runner = CliRunner()
SOURCE_KINDS = ("measured: ", "config: ", "input: ", "assumption: ", "code: ", "ray: ")


def _result(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


@pytest.fixture(scope="module")
def paper() -> RunConfig:
    return load_config(PAPER)


@pytest.fixture(scope="module")
def train_cfg() -> TrainConfig:
    return load_config(TRAIN, schema=TrainConfig)


def _plan(cfg: RunConfig, train: TrainConfig | None = None, **inputs: object) -> Plan:
    return make_plan(plan_inputs({"images": "1e9", "gpu": "h200", **inputs}), cfg, train)


@pytest.fixture(scope="module")
def billion(paper: RunConfig, train_cfg: TrainConfig) -> Plan:
    return _plan(paper, train_cfg)


def test_the_plan_has_a_stage_for_each_of_the_registry_and_training(billion: Plan) -> None:
    from megapairs_ray.pipeline.stages import stage_names

    assert [s.stage for s in billion.stages] == [*stage_names(), "train"]


# --- figures follow from their sources ----------------------------------------------------------


def test_embed_gpu_hours_are_images_over_the_measured_rate(billion: Plan) -> None:
    rate = _result("h200/embed_gpu_vit-l.json")["stage_img_per_s"]
    embed = billion.stage("embed")
    assert embed.gpu_hours.value == pytest.approx(1e9 / rate / 3600)
    assert 240 < embed.gpu_hours.value < 250
    assert f"measured: {PACKAGED_RESULTS}/h200/embed_gpu_vit-l.json (stage_img_per_s)" in \
        embed.gpu_hours.sources
    # EVA02-L-14 was not the model measured: the plan says it assumes the same cost.
    assert any(s.startswith("assumption: EVA02-L-14 costs what the measured ViT-L-14")
               for s in embed.gpu_hours.sources)
    # 64 GPUs on 8 nodes, capped by nothing: wall = GPU-hours / 64.
    assert embed.gpus.value == 64
    assert embed.wall_hours.value == pytest.approx(embed.gpu_hours.value / 64)


def test_a_vit_b_config_takes_the_vit_b_result(paper: RunConfig) -> None:
    cfg = load_config(PAPER, ["embed.spaces.clip_image.encoder.model=ViT-B-16",
                              "embed.spaces.clip_text.encoder.model=ViT-B-16",
                              "embed.spaces.dino_image.encoder.model=facebook/dinov2-base"])
    embed = _plan(cfg).stage("embed")
    rate = _result("h200/embed_gpu_vit-b.json")["stage_img_per_s"]
    assert embed.gpu_hours.value == pytest.approx(1e9 / rate / 3600)
    assert not any(s.startswith("assumption:") for s in embed.gpu_hours.sources)


def test_two_concurrent_calls_take_their_measured_rate(paper: RunConfig) -> None:
    cfg = load_config(PAPER, ["embed.concurrent_calls_per_actor=2"])
    rate = _result("h200/embed_gpu_vit-l.json")["stage_2_concurrent_calls_img_per_s"]
    assert _plan(cfg).stage("embed").gpu_hours.value == pytest.approx(1e9 / rate / 3600)


def test_cpu_decoding_bounds_the_embed_actors(paper: RunConfig) -> None:
    """decode=cpu: an actor decodes on its embed.num_cpus cores at the measured per-core rate."""
    doc = _result("h200/embed_gpu_vit-l.json")
    per_core = doc["cpu_decode_img_per_s"] / doc["cpu_decode_threads"]
    cfg = load_config(PAPER, ["embed.decode=cpu"])
    embed = _plan(cfg).stage("embed")
    assert embed.gpu_hours.value == pytest.approx(1e9 / (4 * per_core) / 3600)


def test_ingest_and_export_decode_at_the_measured_per_core_rate(billion: Plan) -> None:
    doc = _result("h200/embed_gpu_vit-l.json")
    per_core = doc["cpu_decode_img_per_s"] / doc["cpu_decode_threads"]
    assert billion.stage("ingest").cpu_core_hours.value == pytest.approx(1e9 / per_core / 3600)
    queries, pairs = 1e9 * 0.02, 1e9 * 0.02 * 3
    unique = min(1e9, queries + pairs * (1 + 10))
    assert billion.counts["export_images"].value == pytest.approx(unique)
    assert billion.stage("export").cpu_core_hours.value == pytest.approx(
        unique * 2 / per_core / 3600)


def test_cpu_rates_are_calibrated_on_the_index_benchmark(billion: Plan) -> None:
    doc = _result("cpu-2core/index_recall.json")
    n, d, cores = doc["n"], doc["dim"], 2
    flops = doc["kinds"]["flat"]["queries_per_s"] / cores * 2 * n * d
    assert billion.rates["cpu_flops_per_core"].value == pytest.approx(flops)
    pq = doc["kinds"]["ivf_pq"]
    p = pq["params"]
    left = (cores / pq["queries_per_s"] - doc["shards"] * 2 * p["nlist"] * d / flops
            - doc["shards"] * 2 * doc["k"] * p["pq_refine_k_factor"] * d / flops)
    lookups = n * p["nprobe"] / p["nlist"] * p["pq_m"] / left
    assert billion.rates["pq_lookups_per_core"].value == pytest.approx(lookups)
    assert any("cpu-2core/index_recall.json" in s
               for s in billion.stage("mine").cpu_core_hours.sources)


def test_mine_core_hours_by_hand(paper: RunConfig, billion: Plan) -> None:
    ic, flops = paper.index, billion.rates["cpu_flops_per_core"].value
    lookups = billion.rates["pq_lookups_per_core"].value
    # Re-scoring, at the rate the fidelity benchmark measured: refined search less PQ alone.
    fid = _result("cpu-2core/mining_fidelity.json")
    refined = fid["settings"]["ivf_pq + fp16 refine x8"]["spaces"]
    pq = fid["settings"]["ivf_pq, no refine (the paper profile before)"]["spaces"]
    seconds = sum(fid["machine"]["cpu_count"] * (1 / refined[s]["queries_per_s"]
                                                 - 1 / pq[s]["queries_per_s"]) for s in pq)
    refine_rate = (32 + 16) * 8 * (768 + 1024 + 768) / seconds
    assert billion.rates["refine_dims_per_core_s"].value == pytest.approx(refine_rate)
    per_query = sum(ic.shards * 2 * ic.nlist * d / flops + 1e9 * ic.nprobe / ic.nlist * ic.pq_m
                    / lookups + ic.shards * (paper.mine.k + 16) * ic.pq_refine_k_factor * d
                    / refine_rate for d in (768, 1024, 768))
    mine = billion.stage("mine")
    assert mine.cpu_core_hours.value == pytest.approx(2e7 * per_query / 3600)
    # The shard actors are all the cores mining can use: 3 spaces x 16 shards x 8 CPUs.
    assert mine.cores.value == 384
    assert mine.wall_hours.value == pytest.approx(mine.cpu_core_hours.value / 384)


def test_exact_gpu_search_uses_the_measured_gpu_rate(paper: RunConfig) -> None:
    cfg = load_config(PAPER, ["index.kind=flat", "index.device=cuda", "index.shard_num_gpus=1"])
    doc = _result("h200/index_gpu_1shards.json")
    gpu_flops = doc["stage_qps"] * 2 * doc["n"] * doc["dim"]
    mine = _plan(cfg).stage("mine")
    assert mine.gpu_hours.value == pytest.approx(2e7 * sum(2 * 1e9 * d / gpu_flops
                                                           for d in (768, 1024, 768)) / 3600)
    assert mine.gpus.value == 48
    per_space = [_plan(cfg).index[s]["exact_search_gpu_hours"].value
                 for s in ("clip_image", "dino_image", "clip_text")]
    assert sum(per_space) == pytest.approx(mine.gpu_hours.value)


def test_index_build_by_hand(paper: RunConfig, billion: Plan) -> None:
    ic, flops = paper.index, billion.rates["cpu_flops_per_core"].value
    dims = (768, 1024, 768)
    train = sum(2 * ic.train_sample * ic.nlist * d * 25 / flops / 3600 for d in dims)
    add = sum(1e9 * 2 * (ic.nlist + 256) * d / flops / 3600 for d in dims)
    index = billion.stage("index")
    assert index.cpu_core_hours.value == pytest.approx(train + add)
    # One training task of shard_num_cpus per space, then shards x shard_num_cpus filling.
    walls = [2 * ic.train_sample * ic.nlist * d * 25 / flops / 3600 / ic.shard_num_cpus
             + 1e9 * 2 * (ic.nlist + 256) * d / flops / 3600 / (ic.shards * ic.shard_num_cpus)
             for d in dims]
    assert index.wall_hours.value == pytest.approx(sum(walls))


def test_llm_steps_use_the_stated_assumptions_and_the_config_replicas(billion: Plan) -> None:
    pairs = 1e9 * 0.02 * 3
    describe, instruct = billion.stage("describe"), billion.stage("instruct")
    assert describe.gpu_hours.value == pytest.approx(pairs / 4 / 3600)
    assert instruct.gpu_hours.value == pytest.approx(pairs / 25 / 3600)
    for stage in (describe, instruct):
        assert any(s.startswith("assumption: not measured") for s in stage.gpu_hours.sources)
    # describe: 16 engines x tensor-parallel 2 = 32 GPUs, although the cluster has 64.
    assert describe.gpus.value == 32
    assert describe.wall_hours.value == pytest.approx(describe.gpu_hours.value / 32)
    assert "describe.replicas" in describe.bound_by


def test_train_gpu_hours_from_the_measured_step(billion: Plan, train_cfg: TrainConfig) -> None:
    rate = _result("h200/train_gpu_b16.json")["triplets_per_s"]["train_step"]
    o = train_cfg.optim
    triplets = o.max_steps * o.batch_size * o.grad_accum_steps * train_cfg.scaling.num_workers
    train = billion.stage("train")
    assert train.separate
    assert train.gpu_hours.value == pytest.approx(triplets / rate / 3600)
    assert train.wall_hours.value == pytest.approx(train.gpu_hours.value / 8)
    total = billion.totals["pipeline_gpu_hours"].value
    assert total == pytest.approx(sum(s.gpu_hours.value for s in billion.stages
                                      if not s.separate))


def test_the_mllm_training_row_is_its_step_flops_at_the_stated_utilisation(
        paper: RunConfig) -> None:
    """configs/train-paper-mllm.yaml: 144 queries a step on 8 GPUs, each query 5 sequences of
    2,928 image tokens + 60 prompt tokens, 4 forward equivalents (GradCache's two passes, the
    LoRA backward, checkpointing's recompute) of 2 FLOP per parameter and token, at 35 % of
    989 TFLOP/s."""
    t = load_config(ROOT / "configs" / "train-paper-mllm.yaml", schema=TrainConfig)
    train = _plan(paper, t).stage("train")
    flops = 4 * 2 * 7.57e9 * (2928 + 60) * 5
    triplets = 2000 * 18 * 8
    assert train.gpu_hours.value == pytest.approx(triplets * flops / (0.35 * 989e12) / 3600)
    assert train.wall_hours.value == pytest.approx(train.gpu_hours.value / 8)
    assert any(s.startswith("assumption: 35 % of peak") for s in train.gpu_hours.sources)
    plain = t.model_copy(update={"optim": t.optim.model_copy(update={
        "grad_cache_chunk": None, "gradient_checkpointing": False})})
    assert _plan(paper, plain).stage("train").gpu_hours.value == pytest.approx(
        train.gpu_hours.value * 2 / 4)


def test_every_figure_names_its_sources(billion: Plan) -> None:
    figures = billion.figures()
    assert len(figures) > 80
    for name, f in figures:
        assert f.sources, name
        for s in f.sources:
            assert s.startswith(SOURCE_KINDS), (name, s)
            m = re.match(r"measured: (\S+) \(", s)
            if m:
                assert (ROOT / m.group(1)).is_file(), (name, s)
        if len(f.sources) > 1:
            assert f.formula, f"{name} rests on several sources but names no formula"
    measured = {s for _, f in figures for s in f.sources if s.startswith("measured: ")}
    for rel in ("h200/embed_gpu_vit-l.json", "cpu-2core/index_recall.json",
                "h200/index_gpu_1shards.json", "h200/train_gpu_b16.json"):
        assert any(rel in s for s in measured), rel


def test_given_inputs_are_inputs_and_defaults_are_assumptions(paper: RunConfig) -> None:
    plan = _plan(paper, nodes="4", query_fraction="0.05")
    assert plan.inputs["nodes"].sources == ("input: --nodes",)
    assert plan.inputs["query_fraction"].sources == ("input: --query-fraction",)
    assert plan.inputs["pairs_per_query"].sources[0].startswith(
        "config: configs/paper.yaml mine.targets_per_query")
    assert plan.inputs["cpus_per_node"].sources[0].startswith("assumption: ")
    assert plan.counts["queries"].value == pytest.approx(5e7)


# --- scaling ------------------------------------------------------------------------------------


def test_linear_in_images(paper: RunConfig) -> None:
    one, two = _plan(paper, images="1e9"), _plan(paper, images="2e9")
    for stage in ("ingest", "embed", "describe", "instruct", "export"):
        a, b = one.stage(stage), two.stage(stage)
        assert b.gpu_hours.value == pytest.approx(2 * a.gpu_hours.value), stage
        assert b.cpu_core_hours.value == pytest.approx(2 * a.cpu_core_hours.value), stage
        assert b.wall_hours.value == pytest.approx(2 * a.wall_hours.value), stage
    for key in ("source_images", "images_table", "embeddings", "pairs", "triplets"):
        assert two.storage[key].value == pytest.approx(2 * one.storage[key].value), key
    # Mining is not linear: twice the queries, each scanning lists twice as long.
    assert two.stage("mine").cpu_core_hours.value > 2 * one.stage("mine").cpu_core_hours.value


def test_fewer_gpus_than_the_cap_take_longer(paper: RunConfig) -> None:
    small = _plan(paper, nodes="2")
    embed = small.stage("embed")
    assert embed.gpus.value == 16 and embed.nodes.value == 2
    assert embed.wall_hours.value == pytest.approx(embed.gpu_hours.value / 16)
    assert "cluster" in embed.bound_by


# --- storage and memory from the schemas --------------------------------------------------------


def test_embedding_bytes_per_image_match_the_written_table(billion: Plan) -> None:
    from megapairs_ray.stages.embed_io import embedding_table

    n = 1000
    per_image = sum(embedding_table(np.arange(n), np.zeros((n, d), np.float32)).nbytes / n
                    for d in (768, 1024, 768))
    assert billion.storage["embeddings"].value * 1e12 / 1e9 == pytest.approx(per_image)


def _table(schema: pa.Schema, row: dict, n: int = 1000) -> pa.Table:
    return pa.Table.from_pylist([row] * n, schema=schema)


def _chars(k: int) -> str:
    return "x" * k


def test_table_bytes_per_row_match_the_schemas(billion: Plan) -> None:
    """One row of each table, built with the real schema and the plan's assumed lengths, takes
    the bytes the plan counts."""
    from megapairs_ray.pipeline.export import TRIPLET_SCHEMA
    from megapairs_ray.pipeline.mine import PAIRS_SCHEMA
    from megapairs_ray.stages.ingest import IMAGES_SCHEMA

    c, tb, n, pairs = SHORT_STRINGS, 1e12, 1e9, 6e7
    image = {"image_id": 1, "shard": _chars(c["shard"]), "key": _chars(c["key"]),
             "format_kind": _chars(c["format_kind"]), "file_uri": _chars(c["file_uri"]),
             "offset": 1, "length": 1, "row": 1, "format": _chars(c["format"]),
             "mode": _chars(c["mode"]), "width": 1, "height": 1, "caption": _chars(300)}
    assert set(image) == set(IMAGES_SCHEMA.names)
    want = _table(IMAGES_SCHEMA, image).nbytes / 1000
    assert billion.storage["images_table"].value * tb / n == pytest.approx(want, rel=0.01)

    pair = {"pair_id": 1, "query_id": 1, "target_id": 1, "spaces": [_chars(c["space"])],
            "similarities": [0.9], "hard_negatives": list(range(11))}
    assert set(pair) == set(PAIRS_SCHEMA.names)
    want = _table(PAIRS_SCHEMA, pair).nbytes / 1000
    assert billion.storage["pairs"].value * tb / pairs == pytest.approx(want, rel=0.01)

    path = _chars(c["path"])
    triplet = {"q_img": path, "q_text": [_chars(80)] * 5, "t_img": path, "hns": [path] * 11,
               "pair_id": 1, "query_id": 1, "target_id": 1, "hard_negative_ids": list(range(10)),
               "spaces": [_chars(c["space"])], "similarities": [0.9],
               "description": _chars(500), "describe_model": _chars(c["model"]),
               "instruct_model": _chars(c["model"])}
    assert set(triplet) == set(TRIPLET_SCHEMA.names)
    want = 2 * _table(TRIPLET_SCHEMA, triplet).nbytes / 1000  # parquet + JSON lines
    assert billion.storage["triplets"].value * tb / pairs == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("settings", [
    ["index.kind=ivf_pq", "index.pq_nbits=4"],  # with its fp16 refine vectors
    ["index.kind=ivf_flat"],
    ["index.kind=flat"],
], ids=["ivf_pq", "ivf_flat", "flat"])
def test_index_bytes_on_disk_match_faiss(settings: list[str]) -> None:
    """The plan's on-disk size of a shard is what the index stage's own code writes."""
    import faiss

    from megapairs_ray.plan import _index_space
    from megapairs_ray.stages.index import build_shard, train_index

    n, d = 20_000, 32
    cfg = load_config(PAPER, ["index.nlist=32", "index.pq_m=8", "index.train_sample=2000",
                              "index.shards=1", *settings])
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means on a shared 2-core machine: no OpenMP spinning
    try:
        index = build_shard(train_index(cfg.index, x[:2000], n), np.arange(n, dtype=np.int64), x)
    finally:
        faiss.omp_set_num_threads(threads)
    written = len(faiss.serialize_index(index))
    planned = _index_space(cfg, Figure(n, "images", ("input: test",)),
                           Figure(d, "dims", ("input: test",)))["disk"].value * 1e9
    assert planned == pytest.approx(written, rel=0.01)


def test_index_memory_per_space(billion: Plan, paper: RunConfig) -> None:
    ic = paper.index
    clip = billion.index["clip_image"]
    # On disk: PQ code, IVF list id, id, and the fp16 refine vector; in the mapped shard's own
    # memory all but the refine vector (left in the page cache), plus the reverse id map.
    assert clip["disk_bytes_per_vector"].value == ic.pq_m + 16 + 2 * 768
    assert clip["mapped_bytes_per_vector"].value == 2 * 768
    assert clip["memory_bytes_per_vector"].value == ic.pq_m + 16 + 32
    assert clip["mapped_per_shard"].value == pytest.approx(1e9 * 2 * 768 / ic.shards / 1e9)
    centroids = (ic.nlist + 256) * 768 * 4
    assert clip["memory"].value == pytest.approx((1e9 * (ic.pq_m + 48) + ic.shards * centroids)
                                                 / 1e9)
    assert clip["memory_per_shard"].value == pytest.approx(clip["memory"].value / ic.shards)


def test_the_mine_row_carries_the_measured_fidelity_of_the_configured_index(
        billion: Plan, paper: RunConfig) -> None:
    doc = _result("cpu-2core/mining_fidelity.json")
    name = f"ivf_pq + fp16 refine x{paper.index.pq_refine_k_factor}"
    fidelity = billion.stage("mine").fidelity
    assert fidelity is not None
    assert fidelity.value == doc["settings"][name]["share_of_exact_pairs_mined"]
    assert any("mining_fidelity.json" in src for src in fidelity.sources)
    flat = _plan(load_config(PAPER, ["index.kind=flat"])).stage("mine").fidelity
    assert flat is not None and flat.value == 1.0  # the reference itself
    unmeasured = _plan(load_config(PAPER, ["index.nprobe=7"]))
    assert unmeasured.stage("mine").fidelity is None
    assert any("no measured fidelity for index.kind=ivf_pq" in w for w in unmeasured.warnings)


def test_pq_m_that_does_not_divide_a_space_is_warned_about(paper: RunConfig) -> None:
    bad = _plan(load_config(PAPER, ["index.pq_m=96"]))
    assert any("pq_m=96 does not divide dino_image's 1024" in w for w in bad.warnings)
    good = _plan(load_config(PAPER, ["index.pq_m=128"]))
    assert not any("does not divide" in w for w in good.warnings)


def test_object_store_working_set(billion: Plan, paper: RunConfig) -> None:
    e = paper.embed
    want = 8 * (e.max_tasks_in_flight_per_actor + 1) * e.batch_size * 100e3 / 1e9
    assert billion.object_store["embed_working_set_per_gpu_node"].value == pytest.approx(want)
    assert billion.object_store["ray_default_per_gpu_node"].value == pytest.approx(200)


def test_unknown_gpu_and_index_kind_are_config_errors(paper: RunConfig) -> None:
    with pytest.raises(ConfigError, match=r"unknown GPU 'a100'; known .*: h200"):
        _plan(paper, gpu="a100")
    with pytest.raises(ConfigError, match=r"index\.kind=hnsw: the plan has no cost model"):
        _plan(load_config(PAPER, ["index.kind=hnsw"]))


# --- the command line ---------------------------------------------------------------------------


def _cli(*args: str):
    return runner.invoke(app, ["plan", "--config", str(PAPER), "--train-config", str(TRAIN),
                               *args])


def test_cli_prints_a_table() -> None:
    result = _cli("--images", "1e9", "--gpu", "h200", "--nodes", "8")
    assert result.exit_code == 0, result.output
    for needle in ("plan: 1,000,000,000 images", "embed", "describe", "GPU-hours",
                   "stages.mine.fidelity", "index.clip_image.mapped_per_shard",
                   "index per space", "dino_image", "every figure and its sources",
                   "embed_gpu_vit-l.json", "warning: index: 5,000,000 training vectors"):
        assert needle in result.output, needle


def test_cli_prints_valid_json() -> None:
    result = _cli("--images", "500M", "--nodes", "4", "--assume", "image_kb=150", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["inputs"]["images"]["value"] == 5e8
    assert doc["inputs"]["image_kb"] == {"value": 150.0, "unit": "kB",
                                         "sources": ["input: --image-kb"]}
    assert [s["stage"] for s in doc["stages"]] == [
        "ingest", "embed", "index", "mine", "describe", "instruct", "export", "train"]
    embed = doc["stages"][1]
    rate = _result("h200/embed_gpu_vit-l.json")["stage_img_per_s"]
    assert embed["gpu_hours"]["value"] == pytest.approx(5e8 / rate / 3600)
    assert doc["storage"]["source_images"]["value"] == pytest.approx(5e8 * 150e3 / 1e12)
    assert set(doc["index"]) == {"clip_image", "dino_image", "clip_text"}


def test_cli_without_training() -> None:
    result = runner.invoke(app, ["plan", "--images", "1e9", "--config", str(PAPER),
                                 "--train-config", "none", "--json"])
    assert result.exit_code == 0, result.output
    assert "train" not in [s["stage"] for s in json.loads(result.output)["stages"]]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--images", "1e9", "--gpu", "a100"], ["unknown GPU 'a100'", "known", "h200"]),
        (["--images", "lots"], ["--images", "not a number"]),
        (["--images", "0"], ["--images", "greater than or equal to 1"]),
        (["--images", "inf"], ["--images", "not a finite number"]),
        (["--images", "1e9", "--nodes", "0"], ["--nodes"]),
        (["--images", "1e9", "--nodes", "eight"], ["--nodes", "valid integer"]),
        (["--images", "1e9", "--query-fraction", "2"], ["--query-fraction"]),
        (["--images", "1e9", "--assume", "speed=3"], ["--assume 'speed=3'", "image_kb"]),
        ([], ["--images is required"]),
        (["--images", "1e9", "--set", "index.kind=hnsw"], ["index.kind=hnsw"]),
        (["--images", "1e9", "--set", "index.nprobe=-1"], ["index.nprobe"]),
    ],
    ids=["unknown-gpu", "images-not-a-number", "images-zero", "images-inf", "nodes-zero",
         "nodes-not-a-number", "query-fraction-above-1", "unknown-assumption", "no-images",
         "index-kind-without-a-model", "bad-config-field"],
)
def test_cli_bad_inputs_are_one_line_exit_2(args: list[str], needles: list[str]) -> None:
    result = _cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], result.output


# --- the measured sources travel with the package -------------------------------------------


def _shipped() -> set[str]:
    return {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*")
            if p.is_file() and p.name != "README.md"}


def test_the_shipped_results_are_the_benchmark_results_plan_reads() -> None:
    """Each copy equals its benchmark result (a rerun that forgets to refresh the copy fails
    here), and the copies are exactly the files a plan can read from benchmarks/results."""
    for rel in sorted(_shipped()):
        assert (SHIPPED / rel).read_bytes() == (RESULTS / rel).read_bytes(), (
            f"{PACKAGED_RESULTS}/{rel} differs from benchmarks/results/{rel}: "
            f"cp benchmarks/results/{rel} {PACKAGED_RESULTS}/{rel}")
    bench = Results(RESULTS)
    readable = {f"{CPU_RESULTS}/index_recall.json", f"{CPU_RESULTS}/mining_fidelity.json"}
    for gpu in bench.gpus():
        readable |= set(bench.embed_files(gpu))
        readable |= {f"{gpu}/{name}" for name in ("gpu.txt", "index_gpu_1shards.json",
                                                  "train_gpu_b16.json", "train_gpu_l14.json")
                     if (RESULTS / gpu / name).is_file()}
    assert _shipped() == readable


def test_the_shipped_results_are_package_data() -> None:
    """pyproject's package data takes every shipped file into a wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["megapairs_ray"]
    package = ROOT / "megapairs_ray"
    declared = {p.relative_to(SHIPPED).as_posix() for pattern in patterns
                for p in package.glob(pattern) if p.is_relative_to(SHIPPED)}
    assert _shipped() <= declared, _shipped() - declared


def test_the_installed_command_finds_its_sources_from_any_folder(tmp_path: Path) -> None:
    megapairs = Path(sys.executable).parent / "megapairs"
    args = [str(megapairs), "plan", "--images", "1e9", "--config", str(PAPER),
            "--train-config", str(TRAIN), "--json"]
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    embed = json.loads(run.stdout)["stages"][1]
    rate = _result("h200/embed_gpu_vit-l.json")["stage_img_per_s"]
    assert embed["gpu_hours"]["value"] == pytest.approx(1e9 / rate / 3600)
    assert (f"measured: {PACKAGED_RESULTS}/h200/embed_gpu_vit-l.json (stage_img_per_s)"
            in embed["gpu_hours"]["sources"])


def test_results_from_a_folder_replace_the_shipped_ones(tmp_path: Path) -> None:
    mine = tmp_path / "measured"
    shutil.copytree(SHIPPED, mine)
    doc = _result("h200/embed_gpu_vit-l.json")
    (mine / "h200" / "embed_gpu_vit-l.json").write_text(
        json.dumps({**doc, "stage_img_per_s": doc["stage_img_per_s"] / 2}))
    result = _cli("--images", "1e9", "--results", str(mine), "--json")
    assert result.exit_code == 0, result.output
    embed = json.loads(result.output)["stages"][1]
    assert embed["gpu_hours"]["value"] == pytest.approx(2e9 / doc["stage_img_per_s"] / 3600)
    assert f"measured: {mine}/h200/embed_gpu_vit-l.json (stage_img_per_s)" in \
        embed["gpu_hours"]["sources"]
    empty = _cli("--images", "1e9", "--results", str(tmp_path / "none"))
    assert empty.exit_code == 2 and "no measured results at" in empty.output
