"""The main job end to end through the CLI, as the README runs it: the tiny profile on a small
bundled corpus, ingest to export, with real vLLM (CPU) behind ``ray.data.llm`` for both
synthesis steps and tiny random models built offline.

Between mining and synthesis the test breaks things the way a long run meets them: one image's
bytes are damaged after ingest, and one pair names an image no images table holds. Every pair
must come out exactly once — a triplet, or a reject with its reason — and the export must be the
released MegaPairs form that our trainer reads, with a card and a gallery that renders.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.config import InputConfig, config_from_dict, load_config
from megapairs_ray.corpus import OPENCLIPART
from megapairs_ray.io.shards import fetch_bytes
from megapairs_ray.io.triplets import TRIPLET_FIELDS, ImageStore
from megapairs_ray.pipeline.mine import PAIRS_SCHEMA
from megapairs_ray.synth.export import path_of
from megapairs_ray.train.config import TrainConfig
from tests.helpers import chromium, pair_rejects
from tests.train_helpers import train_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_SPACES = load_config(ROOT / "configs" / "tiny.yaml").embed.space_names
runner = CliRunner()
pytestmark = [
    pytest.mark.ray, pytest.mark.slow,
    pytest.mark.skipif(not (OPENCLIPART / "png").is_dir(),
                       reason="Debian's openclipart packages are not installed "
                              "(scripts/setup.sh installs them)")]

MISSING_ID = 123456789
MIN_WORDS = 28
INPUT = InputConfig(uris=["unused"])


def _cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output[-3000:]


def _damage(run_dir: Path, image_id: int) -> None:
    """Overwrite an ingested image's bytes in its tar, in place (offsets stay valid)."""
    images = pq.read_table(run_dir / "images").to_pylist()
    row = next(r for r in images if r["image_id"] == image_id)
    with open(row["file_uri"], "r+b") as f:
        f.seek(row["offset"])
        f.write(b"\x00" * row["length"])


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, ray_cluster, tiny_synth_models):
    tmp = tmp_path_factory.mktemp("synth")
    corpus, run_dir = tmp / "corpus", tmp / "run"
    _cli("corpus", "build", "--out", str(corpus), "--n-images", "30", "--shard-size", "15")
    common = ["-c", str(ROOT / "configs" / "tiny.yaml"), "-s", f"run_dir={run_dir}",
              "-s", f"input.uris=[{corpus}]", "-s", "embed.num_cpus=0.5",
              "-s", "ingest.num_cpus=0.25",
              "-s", f"describe.tiny_model_dir={tiny_synth_models['describe']}",
              "-s", f"instruct.tiny_model_dir={tiny_synth_models['instruct']}",
              # Every image a query: 30 images give the demo's real spaces about 20 pairs.
              "-s", "mine.query_fraction=1.0",
              # One try for instruct: describe's two exercise the tries (both steps run the
              # same loop, pipeline/synth.py run_tries), and a vLLM engine's start is about
              # 40 s of this machine (three processes, each importing torch and vLLM).
              "-s", "instruct.retries=0"]
    _cli("run", *common, "--stages", "ingest,embed,index,mine")
    pairs = pq.read_table(run_dir / "pairs").to_pylist()
    assert len(pairs) >= 10
    # The most used target is damaged; one more pair names an image that was never ingested.
    damaged = Counter(p["target_id"] for p in pairs).most_common(1)[0][0]
    _damage(run_dir, damaged)
    ghost = {**pairs[0], "pair_id": 42, "target_id": MISSING_ID}
    pq.write_table(pa.Table.from_pylist([ghost], schema=PAIRS_SCHEMA),
                   run_dir / "pairs" / "zz-injected.parquet")
    # A bar on description length that about half the tiny model's replies miss, so the describe
    # step's retry and its final rejects are exercised too.
    # Tars of 10 images: the export writes several, from one block of a small run.
    _cli("run", *common, "-s", f"describe.min_words={MIN_WORDS}",
         "-s", "export.images_per_tar=10", "--stages", "describe,instruct,export")
    doc = json.loads((run_dir / "manifest.json").read_text())
    return run_dir, [*pairs, ghost], damaged, doc, common


def test_every_pair_is_a_triplet_or_a_reject_with_its_reason(synth_run):
    run_dir, pairs, damaged, doc, _ = synth_run
    st = doc["stages"]
    broken = {p["pair_id"] for p in pairs if damaged in (p["query_id"], p["target_id"])}
    assert broken
    described = pq.read_table(run_dir / "descriptions").to_pylist()
    describe_rejects = pair_rejects(run_dir / "rejects" / "describe")
    ids = [r["pair_id"] for r in described + describe_rejects]
    assert sorted(ids) == sorted(p["pair_id"] for p in pairs)  # each exactly once
    reasons = {r["pair_id"]: r["reject_reason"] for r in describe_rejects}
    assert {pid for pid, r in reasons.items() if r.startswith("unreadable_image")} == broken
    assert reasons[42] == "missing_image:t"
    assert st["describe"]["rejects"]["unreadable_image"] == len(broken)
    assert st["describe"]["counts"]["pairs_described"] == len(described)
    for r in described:
        assert r["description"].startswith("Both images") and "Target Image" in r["description"]
        assert len(r["description"].split()) >= MIN_WORDS
        assert r["attempts"] in (1, 2) and r["word_num"] in range(60, 101)
    # Short replies were tried again; what failed twice is a reject with its reason.
    assert st["describe"]["counts"]["tries"] == 2
    retried = [r for r in described + describe_rejects if r["attempts"] == 2]
    assert retried
    for r in describe_rejects:
        if not r["reject_reason"].startswith(("unreadable_image", "missing_image")):
            assert r["reject_reason"] in {"too_short", "truncated", "empty_description"}
            assert r["attempts"] == 2
        else:
            assert r["attempts"] == 1  # no second try can read a missing image

    instructed = pq.read_table(run_dir / "instructions").to_pylist()
    instruct_rejects = pair_rejects(run_dir / "rejects" / "instruct")
    assert sorted(r["pair_id"] for r in instructed + instruct_rejects) == sorted(
        r["pair_id"] for r in described)
    assert len(instructed) >= len(described) // 2
    for r in instruct_rejects:
        assert r["reject_reason"] in {"no_list", "truncated", "too_few_instructions"}
        assert r["attempts"] == 1  # the run's one try (instruct.retries=0)

    triplets = [json.loads(line) for line in
                (run_dir / "triplets" / "megapairs.jsonl").read_text().splitlines()]
    export_rejects = pair_rejects(run_dir / "rejects" / "export")
    assert sorted([t["pair_id"] for t in triplets] + [r["pair_id"] for r in export_rejects]) \
        == sorted(r["pair_id"] for r in instructed)
    assert st["export"]["counts"]["triplets"] == len(triplets) > 0
    # The damaged image is no negative of any triplet (dropped, or the triplet rejected); the
    # export met it only where an instructed pair named it as a negative.
    assert all(damaged not in t["hard_negative_ids"] for t in triplets)
    named = any(damaged in r["hard_negatives"] for r in instructed)
    assert st["export"]["rejects"].get("image_unreadable_image", 0) == int(named)


def test_export_is_the_released_form_with_real_images(synth_run):
    run_dir, pairs, _, doc, _ = synth_run
    out = run_dir / "triplets"
    lines = [json.loads(x) for x in (out / "megapairs.jsonl").read_text().splitlines()]
    table = pq.read_table(out / "megapairs.parquet")
    assert table.column_names[:4] == list(TRIPLET_FIELDS)
    assert table.to_pylist() == [{**r, "similarities": table.to_pylist()[i]["similarities"]}
                                 for i, r in enumerate(lines)]
    num_tars = doc["stages"]["export"]["counts"]["image_tars"]
    assert num_tars > 1
    by_pair = {p["pair_id"]: p for p in pairs}
    store = ImageStore(str(out))
    for t in lines:
        assert list(t)[:4] == list(TRIPLET_FIELDS)
        p = by_pair[t["pair_id"]]
        assert t["q_img"] == path_of(p["query_id"], num_tars) == t["hns"][0]
        assert t["t_img"] == path_of(p["target_id"], num_tars) != t["q_img"]
        assert len(t["hns"]) >= 5 and len(set(t["hns"])) == len(t["hns"])
        assert len(t["q_text"]) >= 3 and all(s.isprintable() for s in t["q_text"])
        assert t["describe_model"] == "tiny-random-llava"
        assert t["instruct_model"] == "tiny-random-llama"
        assert set(t["spaces"]) <= set(DEMO_SPACES)
    paths = sorted({p for t in lines for p in [t["q_img"], t["t_img"], *t["hns"]]})
    data = store.read_many(paths)
    assert all(isinstance(d, bytes) for d in data), "every annotated path is in a tar"
    assert doc["stages"]["export"]["counts"]["images_written"] == len(paths)
    # Each image is its source's picture, resized: compare with the source read independently.
    located = {r["image_id"]: r for r in pq.read_table(run_dir / "images").to_pylist()}
    ids = {path_of(i, num_tars): i for i in located}
    for path, d in list(zip(paths, data))[:6]:
        im = Image.open(io.BytesIO(d))
        assert im.format == "JPEG" and im.size == (512, 512)
        source = Image.open(io.BytesIO(fetch_bytes([located[ids[path]]], INPUT)[0]))
        # Ingest's rule for transparent images: onto white (a no-op for opaque ones).
        source = Image.alpha_composite(Image.new("RGBA", source.size, "white"),
                                       source.convert("RGBA"))
        want = np.asarray(source.convert("RGB").resize((512, 512), Image.Resampling.BICUBIC),
                          dtype=float)
        assert np.abs(np.asarray(im, dtype=float) - want).mean() < 4


def test_a_large_run_s_export_writes_the_same_tars_and_triplets(synth_run, tmp_path,
                                                               monkeypatch):
    """A run too large to broadcast its images table locates the named images by a hash join and
    writes the tars grouped by tar: the same members in the same tars, the same triplets, as the
    small run's one-block path the fixture took."""
    import shutil
    import tarfile

    from megapairs_ray.pipeline import export, locations

    run_dir, _, _, doc, common = synth_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("triplets"))
    args = common[common.index("-s") + 1:]
    overrides = [a for a in args if a != "-s" and not a.startswith("run_dir=")]
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [*overrides, f"run_dir={copy}", "export.images_per_tar=10"])
    monkeypatch.setattr(locations, "BROADCAST_MAX_BYTES", 0)
    counts = export._export(cfg, str(copy / "triplets"), str(copy / "rejects" / "export"))
    want = doc["stages"]["export"]["counts"]
    for key in ("images_written", "image_tars", "triplets"):
        assert counts[key] == want[key], key

    def members(folder: Path) -> dict[str, set[str]]:
        return {t.name: set(tarfile.open(t).getnames()) for t in folder.rglob("*.tar")}

    assert members(copy / "triplets") == members(run_dir / "triplets")

    def triplets(folder: Path) -> list[dict]:
        rows = [r for f in (folder / "triplets" / "parts").glob("*.parquet")
                for r in pq.read_table(f).to_pylist()]
        return sorted(rows, key=lambda r: r["pair_id"])

    assert triplets(copy) == triplets(run_dir) != []


def test_our_trainer_reads_the_export_without_a_reject(synth_run, tmp_path):
    from megapairs_ray.train.data import prepare_data

    run_dir = synth_run[0]
    cfg = config_from_dict(train_config(str(run_dir / "triplets" / "megapairs.jsonl"),
                                        str(tmp_path), "read-export",
                                        data={"num_hard_negatives": 4}),
                           schema=TrainConfig)
    _, counts = prepare_data(cfg)
    n = len((run_dir / "triplets" / "megapairs.jsonl").read_text().splitlines())
    assert counts["rows"] == counts["usable"] == n


def test_card_and_gallery(synth_run, tmp_path):
    run_dir, _, _, doc, _ = synth_run
    card = (run_dir / "triplets" / "README.md").read_text()
    assert "| describe: unreadable_image | " in card and "| describe: missing_image | 1 |" in card
    assert f"| export: triplets | {doc['stages']['export']['counts']['triplets']} |" in card
    assert "tiny-random-llava" in card and "profile: tiny" in card
    page = run_dir / "triplets" / "gallery.html"
    n_imgs = page.read_text().count("<img ")
    assert n_imgs >= 7  # query, target and at least 5 negatives per sampled triplet
    dom = chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path / "p")
    assert f'data-images-loaded="{n_imgs}"' in dom and 'data-images-broken="0"' in dom
    shot = tmp_path / "gallery.png"
    chromium(["--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()], tmp_path / "p")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape == (1400, 1200, 3)
    # Rendered images, not an empty page: many distinct colours, and the query's blue frame.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    blue = (np.abs(pixels - [0x2B, 0x6C, 0xB0]).sum(axis=2) < 30).sum()
    assert blue > 200


def test_a_rerun_resumes_the_finished_tries(synth_run):
    run_dir, _, _, _, common = synth_run
    before = pq.read_table(run_dir / "descriptions").sort_by("pair_id")
    # A finished step is skipped whole.
    _cli("run", *common, "-s", f"describe.min_words={MIN_WORDS}", "--stages", "describe")
    doc = json.loads((run_dir / "manifest.json").read_text())
    counts = doc["stages"]["describe"]["counts"]
    assert counts["units_skipped_done"] == 1 and counts["tries"] == 2
    assert "recomputed_changed_settings" not in counts and "try_0_resumed" not in counts
    # Killed after its tries, before their rows were gathered: the tries are not run again.
    (run_dir / "_state" / "describe" / "gathered.json").unlink()
    _cli("run", *common, "-s", f"describe.min_words={MIN_WORDS}", "--stages", "describe")
    doc = json.loads((run_dir / "manifest.json").read_text())
    counts = doc["stages"]["describe"]["counts"]
    assert counts["try_0_resumed"] > 0 and counts["try_1_resumed"] > 0
    assert "recomputed_changed_settings" not in counts
    assert pq.read_table(run_dir / "descriptions").sort_by("pair_id").equals(before)


def _engine_actor_logs(since: float, timeout: float = 90.0) -> list[Path]:
    """The log files of every worker that held a vLLM engine stage in this session (what Ray
    forwards to the driver's log) and wrote after ``since`` (other modules' engines ended
    before), once each such worker has exited: teardown writes last."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    files = [f for f in logs.glob("worker-*.*") if f.suffix in (".out", ".err")
             and f.stat().st_mtime >= since
             and "vLLMEngineStageUDF" in f.read_text(errors="replace")]
    pids = {int(f.stem.rsplit("-", 1)[-1]) for f in files}
    deadline = time.time() + timeout
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(1)
    assert not any(Path(f"/proc/{p}").exists() for p in pids), "engine actors still running"
    return files


def test_the_llm_steps_end_without_a_traceback_or_a_left_engine(synth_run):
    """Each vLLM engine actor of the run (a describe try, its retry, instruct's one) shuts down in
    order: its log holds no traceback (vLLM's output loop racing the engine's shutdown, the
    resource tracker's KeyErrors) and no engine process outlives it."""
    doc = synth_run[3]
    since = datetime.fromisoformat(doc["stages"]["describe"]["started_at"]).timestamp() - 1
    files = _engine_actor_logs(since)
    assert len({f.stem for f in files}) >= 3  # describe's two tries and instruct
    for f in files:
        text = f.read_text(errors="replace")
        assert "Traceback" not in text and "KeyError" not in text, f"{f.name}:\n{text[-3000:]}"
    assert not _engines_of_this_ray(), "engine processes outlived their actors"


def _engines_of_this_ray() -> list[int]:
    """vLLM engine processes started under this session's raylet (a soak or another Ray on the
    machine may run its own)."""
    import ray

    raylet = ray._private.worker.global_worker.node.all_processes["raylet"][0].process.pid
    found = subprocess.run(["pgrep", "-f", "VLLM::EngineCore"], capture_output=True,
                           text=True).stdout.split()
    mine = []
    for pid in map(int, found):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if f"RAY_RAYLET_PID={raylet}".encode() in env:
            mine.append(pid)
    return mine
