"""The towers family trained on Ray Train: alignment on a run's captions, then MMRet on triplets
from the aligned checkpoint; a held-out split that no training row crosses; an alignment
checkpoint that resumes exactly where its run stopped; the shuffled-target control; the probe's
errors. (A killed driver relaunched: tests/test_train_job.py, the same trainer; a lost node
restored: tests/test_cluster_jobs.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megapairs_ray.ids import held_out, id_of_path
from megapairs_ray.io import storage
from megapairs_ray.models.family import load_retriever
from megapairs_ray.models.retriever import resolve_checkpoint
from megapairs_ray.models.tokenizer import load_tokenizer
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.data import prepare_data
from megapairs_ray.train.probe import ProbeConfig, ProbeError, held_out_set
from megapairs_ray.train.step import TrainStep
from megapairs_ray.train.toy_triplets import write_toy_dataset
from megapairs_ray.train.trainer import (
    build_model,
    restore_checkpoint,
    run_training,
    save_checkpoint,
    tokenizer_source,
)

from .test_towers import _captioned_batch

SPLIT = {"fraction": 0.3, "seed": 5}
TOWERS = {"family": "towers", "towers": {"image_size": 64, "projection_dim": 32,
                                         "max_text_len": 16},
          "freeze_image_tower": True, "text_layers_trained": 1, "image_feature_cache": 1000}


def _doc(storage_path: Path, name: str, data: dict, model: dict, steps: int = 12) -> dict:
    return {
        "profile": "test",
        "data": {"loader_num_cpus": 0.25, "loader_batch_rows": 8, "decode_threads": 1,
                 "split": SPLIT, **data},
        "model": model,
        "optim": {"lr": 1e-3, "max_steps": steps, "batch_size": 4, "warmup_steps": 2,
                  "temperature": 0.1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpoint": {"storage_path": str(storage_path), "name": name, "every_steps": 4,
                       "log_every_steps": 2, "max_failures": 1},
    }


def _usable(prepared: str) -> list[dict]:
    """The prepared rows: the usable ones only (the rejects are beside, in the one shape)."""
    return storage.read_parquet_dir(prepared).to_pylist()


@pytest.mark.ray
@pytest.mark.slow
def test_alignment_then_mmret_and_neither_sees_held_out_images(retriever_gallery, tmp_path):
    run_dir = retriever_gallery["gallery_dir"]  # an ingested folder of captioned photos
    store = tmp_path / "store"
    align = _doc(store, "align", {"captions_from": run_dir, "num_hard_negatives": 0}, TOWERS)
    summary = run_training(TrainConfig.model_validate(align))
    assert summary["metrics"]["step"] == align["optim"]["max_steps"]
    counts = summary["triplets"]
    assert counts["reject:held_out"] > 0 and counts["usable"] > 0
    images = storage.read_parquet_dir(storage.join(run_dir, "images")).to_pylist()
    out = held_out(np.array([r["image_id"] for r in images]), **SPLIT)
    held = {r["image_id"] for r, o in zip(images, out) if o}
    usable = _usable(str(store / "align" / "prepared"))
    assert len(usable) == len(images) - len(held) == counts["usable"]
    assert not held & {r["image_id"] for r in usable}
    aligned = load_retriever(resolve_checkpoint(str(store / "align")))
    assert aligned.family == "towers"

    ann = write_toy_dataset(tmp_path / "toy", repeats=2)
    mmret = _doc(store, "mmret", {"annotations": [str(ann)], "num_hard_negatives": 2},
                 {"init": str(store / "align"), "freeze_image_tower": True,
                  "text_layers_trained": 1, "image_feature_cache": 1000})
    summary = run_training(TrainConfig.model_validate(mmret))
    assert summary["metrics"]["step"] == mmret["optim"]["max_steps"]
    usable = _usable(str(store / "mmret" / "prepared"))
    paths = [p for r in usable for p in (r["q_img"], r["t_img"], *r["hns"])]
    assert usable and summary["triplets"]["reject:held_out"] > 0
    assert not held_out(np.array([id_of_path(p) for p in paths]), **SPLIT).any()
    trained = load_retriever(resolve_checkpoint(str(store / "mmret")))
    # The frozen image tower never moved, batch-norm statistics included; what trains did.
    for (name, a), b in zip(aligned.image_tower.state_dict().items(),
                            trained.image_tower.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(aligned.image_projection.weight, trained.image_projection.weight)


def test_an_alignment_checkpoint_resumes_where_its_run_stopped(tmp_path):
    """The family's half of resuming, without Ray: the folder a worker checkpoints
    (``save_checkpoint``) restores (``restore_checkpoint``) to the run it came from, frozen
    tower, feature cache, optimiser, schedule and step: two more steps from it equal two more
    steps of the run that never stopped."""
    cfg = TrainConfig.model_validate(_doc(tmp_path / "store", "align", {
        "captions_from": str(tmp_path / "run"), "num_hard_negatives": 0}, TOWERS))
    batches = [_captioned_batch(4) for _ in range(5)]
    for b, batch in enumerate(batches):  # each batch its own pairs (the keys name the images)
        batch["target_pixels"] = batch["target_pixels"].roll(b, 0)
        batch["target_keys"] = batch["target_keys"].roll(b, 0)

    def train_step(model):
        return TrainStep(model, model, cfg.optim, 0, model.model_input, torch.device("cpu"))

    model = build_model(cfg)
    step = train_step(model)
    model.train()
    for batch in batches[:3]:
        step(batch)
    save_checkpoint(tmp_path / "ckpt", model, load_tokenizer(tokenizer_source(cfg)), step)
    saved = model.text_projection.weight.detach().clone()
    torch.manual_seed(7)  # the text tower's dropout: the same draws on both sides
    for batch in batches[3:]:
        step(batch)

    restored, state = restore_checkpoint(cfg, tmp_path / "ckpt")
    again = train_step(restored)
    again.load_state_dict(state)
    restored.train()
    assert again.step == 3 and restored.feature_cache is not None
    torch.manual_seed(7)
    for batch in batches[3:]:
        again(batch)
    assert again.step == step.step == 5
    assert again.scheduler.get_last_lr() == step.scheduler.get_last_lr()
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(saved, model.text_projection.weight)  # the two steps trained


@pytest.mark.ray
def test_the_shuffled_control_keeps_the_targets_but_not_their_queries(tmp_path):
    ann = write_toy_dataset(tmp_path / "toy", repeats=1)
    data = {"annotations": [str(ann)], "num_hard_negatives": 2, "split": None}
    plain = TrainConfig.model_validate(_doc(tmp_path / "store", "plain", data, TOWERS))
    shuffled = TrainConfig.model_validate(
        _doc(tmp_path / "store", "shuffled", {**data, "shuffle_targets": True}, TOWERS))
    rows = [_usable(prepare_data(c)[0]) for c in (plain, shuffled)]
    # The same queries and instructions; every target one of the run's own targets.
    assert sorted(r["q_img"] for r in rows[0]) == sorted(r["q_img"] for r in rows[1])
    assert sorted(map(str, (r["q_text"] for r in rows[0]))) == sorted(
        map(str, (r["q_text"] for r in rows[1])))
    assert {r["t_img"] for r in rows[1]} <= {r["t_img"] for r in rows[0]}
    pairs = {(r["q_img"], r["t_img"]) for r in rows[0]}
    kept = sum((r["q_img"], r["t_img"]) in pairs for r in rows[1])
    assert kept < len(rows[0]) // 2, (kept, len(rows[0]))
    assert all(r["t_img"] != r["q_img"] for r in rows[1])
    # Relaunched with other data settings, the prepared rows are made again, not reused.
    again = TrainConfig.model_validate(_doc(tmp_path / "store", "plain",
                                            {**data, "num_hard_negatives": 1}, TOWERS))
    assert prepare_data(again)[1]["usable"] == len(rows[0])
    assert json.loads((tmp_path / "store/plain/_state/prepare.json").read_text())[
        "settings"]["data.num_hard_negatives"] == 1


def test_a_split_that_leaves_no_held_out_triplet_is_one_line(tmp_path):
    run = tmp_path / "run"
    cfg = ProbeConfig(profile="t", run_dir=str(run), out=str(tmp_path / "out"),
                      align="a.yaml", train="t.yaml", held_out_fraction=0.001)
    with pytest.raises(ProbeError, match="has no finished export"):
        held_out_set(cfg)
    (run / "triplets").mkdir(parents=True)
    (run / "triplets" / "_SUCCESS").write_text("")
    rows = [{"q_img": f"images/00000/{i:016x}.jpg", "q_text": ["x"],
             "t_img": f"images/00000/{i + 1:016x}.jpg", "hns": []} for i in range(3)]
    (run / "triplets" / "megapairs.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ProbeError, match=r"held_out_fraction 0\.001 .* leaves no triplet"):
        held_out_set(cfg)
