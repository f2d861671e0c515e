"""The synthesis steps' try bookkeeping on Ray Data, with the run directory on s3 (moto).

The model is replaced by a plain step that answers like one — usable, retryable, or final — so
what is tested is ours: tries streamed to storage, only retryable rejects tried again, usable
rows of every try gathered, every final reject kept with its reason, and a rerun that resumes
finished tries without running the step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import s3fs

from megapairs_ray import manifest
from megapairs_ray.config import config_from_dict
from megapairs_ray.io import storage
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.pipeline.engine import StageRun
from megapairs_ray.pipeline.synth import GATHERED, gather, run_tries
from tests.helpers import pair_rejects, tiny_config

pytestmark = pytest.mark.ray


def _answer(batch: dict[str, np.ndarray], attempt: int) -> dict[str, Any]:
    """Ids divisible by 5: an unreadable image (final). By 3: too short on the first try, and
    by 9 on the second too. The rest: usable."""
    ids = batch["pair_id"].astype(int)
    reasons = []
    for i in ids:
        if i % 5 == 0:
            reasons.append("unreadable_image:t")
        elif i % 9 == 0 or (i % 3 == 0 and attempt == 0):
            reasons.append("too_short")
        else:
            reasons.append("")
    return {"pair_id": ids, "description": np.array([f"d{i}" for i in ids]),
            "reject_reason": np.array(reasons), "attempts": np.full(len(ids), attempt + 1)}


def test_tries_on_s3_keep_every_row_once_and_resume(bucket, ray_cluster):
    import ray

    run_dir = f"s3://{bucket}/run"
    cfg = config_from_dict(tiny_config(run_dir, ["unused"], describe={}))
    rows = [{"pair_id": i} for i in range(1, 61)]
    calls: list[int] = []

    def step(todo: ray.data.Dataset, attempt: int) -> ray.data.Dataset:
        calls.append(attempt)
        return todo.map_batches(_answer, fn_kwargs={"attempt": attempt}, batch_format="numpy",
                                num_cpus=0.25)

    def run() -> manifest.StageRecord:
        record = manifest.StageRecord("describe")
        state = StepState(run_dir, "describe", {"describe.model": "stand-in"})
        state.reconcile([])
        tries = run_tries(state, cfg.describe, 1,
                          lambda: ray.data.from_items(rows, override_num_blocks=3), step,
                          ["pair_id"], record)
        gather(state, tries, storage.join(run_dir, "descriptions"), drop=[])
        # What the stage engine's tally makes of the books: the gathered marker's counts.
        counts, rejects = StageRun(cfg, state, record, [GATHERED]).tally()
        record.counts.update(counts)
        record.rejects.update(rejects)
        return record

    record = run()
    assert calls == [0, 1]
    good = storage.read_parquet_dir(storage.join(run_dir, "descriptions")).to_pylist()
    bad = pair_rejects(storage.join(run_dir, "rejects", "describe"))
    assert sorted(r["pair_id"] for r in good + bad) == list(range(1, 61))  # each exactly once
    reasons = {r["pair_id"]: (r["reject_reason"], r["attempts"]) for r in bad}
    for i in range(1, 61):
        if i % 5 == 0:
            assert reasons[i] == ("unreadable_image:t", 1)  # final: never tried again
        elif i % 9 == 0:
            assert reasons[i] == ("too_short", 2)
    attempts = {r["pair_id"]: r["attempts"] for r in good}
    assert {i for i, a in attempts.items() if a == 2} == {
        i for i in range(1, 61) if i % 3 == 0 and i % 5 and i % 9}
    assert record.rejects == {"unreadable_image": 12, "too_short": 5}
    assert record.counts["usable_after_try_0"] + record.counts["usable_after_try_1"] == len(good)
    assert record.counts["tries"] == 2
    assert s3fs.S3FileSystem().exists(f"{bucket}/run/_state/describe/try-1.json")

    calls.clear()
    again = run()  # both tries are done: nothing runs, the same rows come out
    assert calls == []
    assert again.counts["try_0_resumed"] == 60 and again.rejects == record.rejects
    assert sorted(r["pair_id"] for r in storage.read_parquet_dir(
        storage.join(run_dir, "descriptions")).to_pylist()) == sorted(r["pair_id"] for r in good)
