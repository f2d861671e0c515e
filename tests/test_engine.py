"""The stage engine (pipeline/engine.py): one declared stage list, one reject shape, and run
directories written with the books before it read (upgraded once) or refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from megapairs_ray.config import RunConfig, config_from_dict
from megapairs_ray.io import layout, stepstate, storage
from megapairs_ray.io.rejects import REJECTS_SCHEMA, detail_of
from tests.helpers import bad_images, good_samples, tiny_config, write_tar

REPO = Path(__file__).resolve().parents[1]


def test_the_registry_is_the_one_list_of_stages():
    from megapairs_ray.pipeline.stages import STAGES, UnknownStageError, stage

    names = [s.name for s in STAGES]
    assert names == ["ingest", "embed", "index", "mine", "describe", "instruct", "export"]
    # Each stage needs only stages before it: the order is a valid run order.
    for i, s in enumerate(STAGES):
        assert all(names.index(n.name) < i for n in s.needs), s.name
    with pytest.raises(UnknownStageError, match="unknown stage 'embedd'; known: ingest, embed"):
        stage("embedd")
    # The CLI's commands are the registry's, with its help lines.
    out = subprocess.run([sys.executable, "-m", "megapairs_ray.cli", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for s in STAGES:
        assert s.name in out, s.name


def test_an_unknown_stage_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(tmp_path / "run", [str(tmp_path / "in")])))
    r = subprocess.run([sys.executable, "-m", "megapairs_ray.cli", "run", "-c", str(cfg),
                        "--stages", "ingest,embedd"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown stage 'embedd'; known: ingest, embed, index, mine, describe, instruct, "
        "export"]


# ------------------------------------------------------------------ books v1 on disk


def _v1(run_dir: str, stage: str, marker: dict, old_rejects: dict) -> None:
    """Write a stage's books back in the v1 shape, as the project wrote them before the one
    reject shape: no ``books`` field, ingest's reasons beside its counts, the old reject
    columns."""
    uri = layout.state_file(run_dir, stage)
    doc = storage.read_json(uri)
    doc.pop("books")
    storage.write_json(uri, doc)
    for unit in stepstate.done_units(run_dir, stage):
        m = storage.read_json(layout.marker(run_dir, stage, unit))
        storage.write_json(layout.marker(run_dir, stage, unit), marker(unit, m))
    for f in storage.list_files(layout.rejects_dir(run_dir, stage), ".parquet"):
        storage.write_parquet(f, old_rejects(storage.read_parquet(f)))


def _ingest_v1_marker(unit: str, m: dict) -> dict:
    counts = m["counts"]
    m["rejects"] = {k[7:]: counts.pop(k) for k in list(counts) if k.startswith("reject:")}
    m["shard_problems"] = {k[14:]: counts.pop(k) for k in list(counts)
                           if k.startswith("shard_problem:")}
    return m


def _ingest_v1_rejects(t: pa.Table) -> pa.Table:
    rows = [{"image_id": (r["ids"] or [None])[0], "shard": r["unit"], "key": detail_of(r)["key"],
             "stage": r["stage"], "reason": r["reason"], "detail": detail_of(r)["message"]}
            for r in t.to_pylist()]
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("image_id", pa.int64()), ("shard", pa.string()), ("key", pa.string()),
        ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())]))


@pytest.mark.ray
def test_a_run_written_with_the_old_books_is_upgraded_once_and_reads_the_same(tmp_path,
                                                                            ray_cluster):
    from megapairs_ray.pipeline.engine import run_stage
    from megapairs_ray.pipeline.ingest import INGEST

    samples = good_samples(4, prefix="a")
    samples += [{"__key__": f"bad-{n}".encode(), "jpg": data, "txt": b"x"}
                for n, (data, _) in list(bad_images().items())[:3]]
    write_tar(tmp_path / "corpus" / "a.tar", samples)
    cfg: RunConfig = config_from_dict(tiny_config(tmp_path / "run", [str(tmp_path / "corpus")]))
    first = run_stage(INGEST, cfg)
    assert sum(first.rejects.values()) == 3

    _v1(cfg.run_dir, "ingest", _ingest_v1_marker, _ingest_v1_rejects)
    again = run_stage(INGEST, cfg)
    assert again.counts["shards_skipped_done"] == 1  # read, not recomputed
    assert again.rejects == first.rejects
    assert {k: v for k, v in again.counts.items() if k != "shards_ingested"} == {
        k: v for k, v in first.counts.items() if k not in ("shards_ingested",
                                                           "shards_skipped_done")} | {
        "shards_skipped_done": 1}
    rejects = storage.read_parquet_dir(layout.rejects_dir(cfg.run_dir, "ingest"))
    assert rejects.schema.equals(REJECTS_SCHEMA)
    assert Counter(rejects.column("reason").to_pylist()) == first.rejects
    assert all(len(r["ids"]) == 1 and detail_of(r)["key"].startswith("bad-")
               for r in rejects.to_pylist())
    assert storage.read_json(layout.state_file(cfg.run_dir, "ingest"))["books"] == \
        stepstate.BOOKS

    # A run directory from a newer version is refused in one line, never half-read.
    uri = layout.state_file(cfg.run_dir, "ingest")
    storage.write_json(uri, {**storage.read_json(uri), "books": stepstate.BOOKS + 1})
    with pytest.raises(stepstate.NewerBooksError, match=r"written by a newer megapairs-ray "
                                                        r"\(books v3"):
        run_stage(INGEST, cfg)


def test_old_reject_tables_of_every_shape_are_rewritten_in_the_one_shape(tmp_path):
    from megapairs_ray.io.rejects import upgrade_rejects_file

    old = {
        "mine": pa.table({"query_id": [1], "target_id": [2], "reason": ["too_few_hard_negatives"],
                          "detail": ["2 < 5"]}),
        "export": pa.table({"pair_id": [7], "reason": ["unreadable_image"]}),
        "describe": pa.table({"pair_id": [9], "description": ["a"],
                              "reject_reason": ["too_short:3 words"]}),
    }
    for stage, table in old.items():
        uri = str(tmp_path / f"try-0-part-x-{stage}.parquet")
        storage.write_parquet(uri, table)
        assert upgrade_rejects_file(uri, stage)
        assert not upgrade_rejects_file(uri, stage)  # once
        [row] = storage.read_parquet(uri).to_pylist()
        assert row["stage"] == stage and row["reason"] == {
            "mine": "too_few_hard_negatives", "export": "unreadable_image",
            "describe": "too_short"}[stage]
        assert row["ids"] == {"mine": [1, 2], "export": [7], "describe": [9]}[stage]
    assert detail_of(row) == {"message": "too_short:3 words", "description": "a"}
    assert row["unit"] == "try-0"


def test_a_reject_with_an_unlisted_reason_is_an_internal_error():
    from megapairs_ray.io.rejects import reject_row
    from megapairs_ray.reasons import ALL, Reason

    assert Reason.NON_FINITE_VECTOR in ALL and len(ALL) == len(set(ALL))
    row = reject_row("index", "a/0", [1], Reason.NON_FINITE_VECTOR, "NaN")
    assert detail_of(row) == {"message": "NaN"} and row["ids"] == [1]
    with pytest.raises(ValueError, match=r"internal error: reject reason 'made_up' \(mine\) is "
                                         r"not listed in megapairs_ray/reasons.py"):
        reject_row("mine", "s", [1, 2], "made_up", "?")
