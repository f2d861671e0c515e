"""The training's prepared rows follow their input: reused on relaunch while the annotation
files are the same, prepared again when one is rewritten, and a folder an earlier version
prepared (``prepared/_counts.json``, no books) or a killed attempt left half-written is
prepared again, never trusted or a crash."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from megapairs_ray.io import layout, storage
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.train import data
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.toy_triplets import write_toy_dataset

from .train_helpers import train_config


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the rows were checked (prepared), not reused."""
    calls: list[int] = []
    check = data._check_triplets

    def wrapped(cfg: TrainConfig):  # type: ignore[no-untyped-def]
        calls.append(1)
        return check(cfg)

    monkeypatch.setattr(data, "_check_triplets", wrapped)
    return calls


def _cfg(tmp_path: Path, ann: Path) -> TrainConfig:
    return TrainConfig.model_validate(train_config(str(ann.parent), str(tmp_path / "store"),
                                                   "run"))


def _stamps(folder: str) -> dict[str, int]:
    return {f: os.stat(f).st_mtime_ns for f in storage.list_files(folder)}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_same_annotations_reuse_a_rewritten_file_prepares_again(tmp_path, counted, caplog):
    ann = write_toy_dataset(tmp_path / "toy", repeats=1)
    cfg = _cfg(tmp_path, ann)
    out, counts = data.prepare_data(cfg)
    stamps = _stamps(out)
    assert counted == [1] and counts["usable"] > 0 and stamps

    assert data.prepare_data(cfg) == (out, counts)  # relaunch, same files: reused
    assert counted == [1] and _stamps(out) == stamps

    # The run has a checkpoint; the annotation file is rewritten in place with fewer rows.
    run = layout.train_run_dir(cfg.checkpoint.storage_path, cfg.checkpoint.name)
    storage.write_json(layout.train_checkpoint_snapshot(run), {})
    lines = ann.read_text().splitlines()
    ann.write_text("\n".join([*lines[:6], "{broken"]) + "\n")
    with caplog.at_level(logging.WARNING):
        out2, again = data.prepare_data(cfg)
    assert counted == [1, 1] and out2 == out
    assert again == {"rows": 7, "usable": 6, "reject:bad_json": 1}
    assert storage.read_parquet_dir(out).num_rows == 6  # the usable rows; the reject apart
    rejects = storage.read_parquet_dir(layout.rejects_dir(run, "prepare")).to_pylist()
    assert [r["reason"] for r in rejects] == ["bad_json"] and "{broken" in rejects[0]["detail"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("recomputing" in m and f"annotation file {ann}" in m for m in warned), warned
    assert any("has checkpoints trained on the earlier rows" in m for m in warned), warned

    # A file added to the listed folder counts too.
    (ann.parent / "more.jsonl").write_text(lines[0] + "\n")
    assert data.prepare_data(cfg)[1]["rows"] == 8 and counted == [1, 1, 1]


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_a_folder_prepared_before_the_books_is_prepared_again(tmp_path, counted, caplog):
    ann = write_toy_dataset(tmp_path / "toy", repeats=1)
    cfg = _cfg(tmp_path, ann)
    out, counts = data.prepare_data(cfg)
    # What an earlier version left: the rows and prepared/_counts.json, no _state.
    run = layout.train_run_dir(cfg.checkpoint.storage_path, cfg.checkpoint.name)
    storage.remove(layout.state_dir(run), recursive=True)
    old = {**counts, "usable": 1, "settings": data._data_settings(cfg.data)}
    Path(out, "_counts.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING):
        assert data.prepare_data(cfg) == (out, counts)
    assert counted == [1, 1] and not Path(out, "_counts.json").exists()
    assert any("earlier version" in r.getMessage() for r in caplog.records)
    assert data.prepare_data(cfg) == (out, counts) and counted == [1, 1]
    # A killed attempt leaves rows but no marker: they are prepared again.
    storage.remove(layout.marker(run, data.PREPARE_STAGE, data.PREPARED_UNIT))
    assert data.prepare_data(cfg) == (out, counts) and counted == [1, 1, 1]



def test_an_alignment_runs_rows_follow_the_ingest_they_read(tmp_path):
    run = str(tmp_path / "pipeline")
    StepState(run, "ingest", {"input.uris": ["a"]}).reconcile([])
    doc = train_config("unused", str(tmp_path / "store"), "align")
    doc["data"] = {**doc["data"], "annotations": [], "captions_from": run,
                   "num_hard_negatives": 0}
    cfg = TrainConfig.model_validate(doc)
    before = data.prepare_state(cfg)
    assert before.upstream == {"ingest": StepState(run, "ingest", {"input.uris": ["a"]})
                               .fingerprint}
    StepState(run, "ingest", {"input.uris": ["b"]}).reconcile([])  # ingested again, other input
    assert data.prepare_state(cfg).fingerprint != before.fingerprint


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_a_line_that_is_not_utf8_is_a_counted_reject_not_a_crash(tmp_path):
    ann = write_toy_dataset(tmp_path / "toy", repeats=1)
    lines = ann.read_bytes().splitlines(keepends=True)
    # A record whose bytes are cut in the middle of a character, then Latin-1 text.
    ann.write_bytes(b"".join(lines) + lines[0][:-3] + b"\xe2\x82\n" + b"caf\xe9\n")
    _, counts = data.prepare_data(_cfg(tmp_path, ann))
    assert counts["rows"] == len(lines) + 2 and counts["usable"] == len(lines)
    assert counts["reject:bad_json"] == 2
    rejects = storage.read_parquet_dir(layout.rejects_dir(
        str(tmp_path / "store" / "run"), "prepare")).to_pylist()
    assert {r["reason"] for r in rejects} == {"bad_json"} and len(rejects) == 2


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_mmeb_train_rows_are_read_beside_megapairs_triplets(tmp_path):
    """MMEB-train's parquet form (the paper's second stage trains on it) in the same folder as
    MegaPairs triplets: its image rows become triplets, the rows these families cannot train
    (a text-only positive or query) are counted rejects by reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ann = write_toy_dataset(tmp_path / "toy", repeats=1)
    toy = [json.loads(line) for line in ann.read_text().splitlines()]
    q, t, neg = toy[0]["q_img"], toy[0]["t_img"], toy[0]["hns"][1]
    img = "<|image_1|>\n"
    rows = [
        {"qry": f"{img}Find a red one", "qry_image_path": q, "pos_text": f"{img}Represent it",
         "pos_image_path": t, "neg_text": "", "neg_image_path": neg},
        {"qry": f"{img}Find a blue one", "qry_image_path": q, "pos_text": "",
         "pos_image_path": t, "neg_text": "", "neg_image_path": ""},
        {"qry": f"{img}Represent the image for classification", "qry_image_path": q,
         "pos_text": "a square", "pos_image_path": "", "neg_text": "", "neg_image_path": ""},
        {"qry": "Find an image of a square", "qry_image_path": "", "pos_text": img,
         "pos_image_path": t, "neg_text": "", "neg_image_path": ""},
        {"qry": f"{img}Find it", "qry_image_path": q, "pos_text": img,
         "pos_image_path": "no/such.jpg", "neg_text": "", "neg_image_path": ""},
    ]
    (tmp_path / "toy" / "CIRR").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "toy" / "CIRR" / "original.parquet")
    cfg = TrainConfig.model_validate(train_config(
        str(tmp_path / "toy"), str(tmp_path / "store"), "run", data={"num_hard_negatives": 1}))
    out, counts = data.prepare_data(cfg)
    assert counts["rows"] == len(toy) + len(rows)
    assert counts["usable"] == len(toy) + 2
    assert counts["reject:text_target"] == 1 and counts["reject:text_query"] == 1
    assert counts["reject:missing_image"] == 1
    prepared = storage.read_parquet_dir(out).to_pylist()
    mmeb = sorted((r for r in prepared if r["q_text"][0].startswith("Find a")),
                  key=lambda r: r["q_text"][0])
    # The placeholder is gone; hns[0] is the query image, as in the MegaPairs form.
    assert [r["q_text"] for r in mmeb] == [["Find a blue one"], ["Find a red one"]]
    assert [r["hns"] for r in mmeb] == [[q], [q, neg]]
    assert all(r["q_img"] == q and r["t_img"] == t for r in mmeb)
