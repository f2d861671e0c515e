"""The Ray Train job: triplet checks, 2 gloo workers, loss, checkpoints, failures, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ray.io import storage
from megapairs_ray.io.rejects import detail_of
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.entry import read_metrics
from megapairs_ray.train.toy_triplets import write_jsonl, write_triplet_set
from megapairs_ray.train.trainer import TrainDataError, run_training

from .train_helpers import kill_at_first_checkpoint, train_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_too_few_triplets_for_one_batch_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    write_jsonl(root / "a.jsonl", write_triplet_set(root)[:5])
    with pytest.raises(TrainDataError, match="cannot fill one batch of 8"):
        run_training(TrainConfig.model_validate(
            train_config(str(root), str(tmp_path / "store"), "run")))


def _bad_triplet_set(root):
    """The toy triplets, half in a JSON-lines file with broken lines among them and half in a
    parquet file. (All of them: a pass over 120 is 15 steps, and the 64-step run makes
    several passes in one loader stream.)"""
    recs = write_triplet_set(root)
    bad_lines = [
        "{not json",
        "[1, 2, 3]",
        json.dumps({**recs[0], "q_text": []}),
        json.dumps({k: v for k, v in recs[1].items() if k != "t_img"}),
        json.dumps({**recs[2], "hns": recs[2]["hns"][:2]}),
        json.dumps({**recs[3], "t_img": "images/00001/gone.jpg"}),
        "",  # a blank line is not a record
    ]
    write_jsonl(root / "a.jsonl", recs[:60], bad_lines)
    pq.write_table(pa.Table.from_pylist(recs[60:]), root / "b.parquet")
    return root


def test_bad_triplets_are_rejects_the_good_ones_train_and_a_killed_run_resumes(tmp_path):
    """Bad triplets are counted rejects and the good ones train: two gloo workers learn the toy
    set, in a run whose driver is killed at its first checkpoint and relaunched. (One run for
    all of it: each costs a worker group's start. A worker lost inside a run, restored by
    ``FailureConfig``: tests/test_cluster_jobs.py, where a node goes.)"""
    root = _bad_triplet_set(tmp_path / "ds")
    store = tmp_path / "store"
    steps, lr = 64, 2e-3
    overrides = {"optim": {"max_steps": steps, "lr": lr},
                 "checkpoint": {"every_steps": 8, "log_every_steps": 4}}
    doc = train_config(str(root), str(store), "resume", **overrides)
    saved = kill_at_first_checkpoint(doc, tmp_path / "train.yaml")
    before = read_metrics(str(store / "resume" / "metrics.jsonl"))
    assert saved and before[-1]["step"] < steps
    summary = run_training(TrainConfig.model_validate(doc))
    after = read_metrics(str(store / "resume" / "metrics.jsonl"))[len(before):]
    assert after[0]["step"] == saved[-1] + 4, (saved, [r["step"] for r in after])
    assert after[-1]["step"] == steps and summary["metrics"]["step"] == steps
    assert summary["triplets"] == {
        "rows": 126, "usable": 120, "reject:bad_json": 1, "reject:not_an_object": 1,
        "reject:no_instruction": 1, "reject:missing_t_img": 1,
        "reject:too_few_hard_negatives": 1, "reject:missing_image": 1}
    # Each rejected row is a reject (the one shape) with its reason and where it came from;
    # the prepared rows are the usable ones.
    prepared = storage.read_parquet_dir(str(store / "resume" / "prepared"))
    assert prepared.num_rows == 120 and None not in prepared.column("q_img").to_pylist()
    rejects = storage.read_parquet_dir(str(store / "resume" / "rejects" / "prepare"))
    assert rejects.num_rows == 6 and set(rejects.column("stage").to_pylist()) == {"prepare"}
    gone = [detail_of(r)["message"] for r in rejects.to_pylist()
            if r["reason"] == "missing_image"]
    assert gone and "gone.jpg" in gone[0] and "a.jsonl" in gone[0]
    # The schedule resumed too: the lr at the first resumed log is the fresh schedule's value.
    from megapairs_ray.train.step import linear_schedule

    assert after[0]["lr"] == pytest.approx(lr * linear_schedule(2, steps)(after[0]["step"]))
    # It learns, across the relaunch: chance is ln(8 positives + 32 negatives) = 3.69. The
    # loaders draw captions and negatives at random, so runs differ: over 64 steps, unkilled
    # runs ended at 1.2-2.2 (three seeds); at 48 steps they ended at 2.0-2.9, and a killed one
    # at 3.17.
    losses = [r["loss"] for r in before + after]
    first, last = losses[0], min(losses[-3:])
    assert last < 3.2 and last < first - 0.6, [round(x, 3) for x in losses]
    # The last checkpoint is a Hugging Face CLIP folder with the trainer's state beside it.
    ckpt = summary["checkpoint"]
    assert ckpt.endswith(f"resume/step_{steps:08d}"), ckpt
    assert {"config.json", "model.safetensors", "trainer_state.pt"} <= {
        p.name for p in Path(ckpt).iterdir()}
    from megapairs_ray.models.mmret import MMRetCLIP
    from megapairs_ray.models.tokenizer import load_tokenizer

    MMRetCLIP.from_pretrained(ckpt)
    assert len(load_tokenizer(ckpt)) == 49408
