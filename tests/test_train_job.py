"""The Ray Train job: triplet checks, 2 gloo workers, loss, checkpoints, failures, resume."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ray.io import storage
from megapairs_ray.io.rejects import detail_of
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.toy_triplets import write_jsonl, write_toy_dataset, write_triplet_set
from megapairs_ray.train.trainer import TrainDataError, read_metrics, run_training

from .train_helpers import kill_at_first_checkpoint, train_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _cfg(tmp_path, annotations, storage_path=None, name="run", **sections) -> TrainConfig:
    return TrainConfig.model_validate(train_config(
        str(annotations), storage_path or str(tmp_path / "store"), name, **sections))


def test_too_few_triplets_for_one_batch_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    write_jsonl(root / "a.jsonl", write_triplet_set(root)[:5])
    with pytest.raises(TrainDataError, match="cannot fill one batch of 8"):
        run_training(_cfg(tmp_path, root))


def _kill_one_train_worker(killed: list[int]) -> None:
    """SIGKILL one Ray Train worker process, as a lost node would. (Ray titles each actor's
    process ``ray::<class>...``.)"""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any("ray::RayTrainWorker" in part for part in p.info["cmdline"] or []):
            p.kill()
            killed.append(p.pid)
            return


def test_two_workers_learn_checkpoint_and_survive_a_worker_failure(tmp_path, bucket):
    ann = write_toy_dataset(tmp_path / "ds")
    cfg = _cfg(tmp_path, ann, storage_path=f"s3://{bucket}/train", name="learn",
               optim={"max_steps": 80, "warmup_steps": 5},
               checkpoint={"every_steps": 20, "log_every_steps": 5, "max_failures": 1})
    killed: list[int] = []
    # The checkpoints go to s3 (moto); a watcher kills a worker once the first one is there.
    import s3fs

    fs = s3fs.S3FileSystem()

    def watch() -> None:
        deadline = time.time() + 180
        while time.time() < deadline and not fs.glob(f"{bucket}/train/learn/step_*"):
            time.sleep(0.3)
            fs.invalidate_cache()
        _kill_one_train_worker(killed)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    summary = run_training(cfg)
    t.join(timeout=5)
    assert killed, "no worker was killed: the failure path went untested"
    rows = read_metrics(f"s3://{bucket}/train/learn/metrics.jsonl")
    steps = [r["step"] for r in rows]
    # The restarted group resumed from the step-20 checkpoint: steps after it are logged twice
    # at most, and the run still reached its last step.
    assert steps[-1] == 80 and summary["metrics"]["step"] == 80
    assert 20 in steps and steps.count(20) == 1
    assert any(b <= a for a, b in itertools.pairwise(steps)), f"no restart visible in {steps}"
    first, last = rows[0]["loss"], min(r["loss"] for r in rows[-3:])
    # Chance level is ln(8 positives + 32 negatives) = 3.69; the task is learnable.
    assert last < 3.0 and last < first - 0.6, [round(r["loss"], 3) for r in rows]
    ckpt = summary["checkpoint"]
    assert ckpt.startswith(f"s3://{bucket}/train/learn/step_00000080")
    local = tmp_path / "ckpt"
    fs.get(ckpt.removeprefix("s3://"), str(local), recursive=True)
    assert {"config.json", "model.safetensors", "trainer_state.pt"} <= {
        p.name for p in local.iterdir()}
    from megapairs_ray.models.mmret import MMRetCLIP
    from megapairs_ray.models.tokenizer import load_tokenizer

    MMRetCLIP.from_pretrained(local)
    assert len(load_tokenizer(str(local))) == 49408


def _bad_triplet_set(root):
    """The toy triplets, half in a JSON-lines file with broken lines among them and half in a
    parquet file. (All of them: a pass over 120 is 15 steps, and each pass restarts the
    loaders.)"""
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


def test_bad_triplets_are_counted_rejects_and_a_killed_run_resumes_at_its_checkpoint_step(
        tmp_path):
    """Bad triplets are counted rejects and the good ones train, in a run whose driver is
    killed at its first checkpoint and relaunched (one run for both: each costs a worker
    group's start)."""
    root = _bad_triplet_set(tmp_path / "ds")
    store = tmp_path / "store"
    steps = 30
    overrides = {"optim": {"max_steps": steps}, "checkpoint": {"every_steps": 6,
                                                                "log_every_steps": 3}}
    doc = train_config(str(root), str(store), "resume", **overrides)
    saved = kill_at_first_checkpoint(doc, tmp_path / "train.yaml")
    before = read_metrics(str(store / "resume" / "metrics.jsonl"))
    assert saved and before[-1]["step"] < steps
    summary = run_training(TrainConfig.model_validate(doc))
    after = read_metrics(str(store / "resume" / "metrics.jsonl"))[len(before):]
    assert after[0]["step"] == saved[-1] + 3, (saved, [r["step"] for r in after])
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

    assert after[0]["lr"] == pytest.approx(5e-4 * linear_schedule(2, steps)(after[0]["step"]))
