"""Every path of a run directory (local or s3://), in one place.

    RUN/shards.json                  the run's shard list, fixed by the first stage
    RUN/manifest.json                what each stage consumed, produced, counted and took
    RUN/_state/<stage>.json          the settings a stage's output was made with (fingerprint)
    RUN/_state/<stage>/<unit>.json   a finished unit of a stage (a shard, a space, a try part)
    RUN/_state/lock.json             the driver that holds the run
    RUN/images/<shard>.parquet       ingest: accepted records and where their bytes live
    RUN/rejects/<stage>/...          every stage's rejects, one shape, with a reason
    RUN/embeddings/<space>/<shard>/  embed: vectors per space, per input shard
    RUN/index/<space>/               index: FAISS shards and index.json
    RUN/pairs/<shard>.parquet        mine: (query, target) pairs with hard negatives
    RUN/synth/<step>/try-<n>/        describe / instruct: every answer of a try, part files
    RUN/descriptions/, RUN/instructions/   the usable answers of every try
    RUN/triplets/                    export: the released MegaPairs form

A ``megapairs train`` run has a folder of its own, TRAIN = ``checkpoint.storage_path/name``,
where Ray Train keeps its checkpoints; its books are kept the same way:

    TRAIN/_state/prepare.json        the data settings and input files the prepared rows came from
    TRAIN/_state/prepare/rows.json   the prepared rows' counts, written once they are complete
    TRAIN/prepared/                  the checked training rows, a reason on each rejected one
    TRAIN/metrics.jsonl              every report's metrics
    TRAIN/summary.json               the finished run: its last checkpoint, metrics, counts
    TRAIN/checkpoint_manager_snapshot.json   Ray Train's: a relaunch resumes from its newest

Only ``io/stepstate.py`` reads and writes ``_state``: the books are kept one way for every
stage.
"""

from __future__ import annotations

from megapairs_ray.io import storage


def shards_file(run_dir: str) -> str:
    return storage.join(run_dir, "shards.json")


def manifest_file(run_dir: str) -> str:
    return storage.join(run_dir, "manifest.json")


# ------------------------------------------------------------------------------- the books


def state_dir(run_dir: str) -> str:
    return storage.join(run_dir, "_state")


def state_file(run_dir: str, stage: str) -> str:
    return storage.join(state_dir(run_dir), f"{stage}.json")


def markers_dir(run_dir: str, stage: str) -> str:
    return storage.join(state_dir(run_dir), stage)


def marker(run_dir: str, stage: str, unit: str) -> str:
    return storage.join(markers_dir(run_dir, stage), f"{unit}.json")


def lock_file(run_dir: str) -> str:
    return storage.join(state_dir(run_dir), "lock.json")


def internal_error_file(run_dir: str, name: str) -> str:
    """Where the CLI writes the traceback of an internal fault it reports in one line."""
    return storage.join(run_dir, "_logs", name)


# ------------------------------------------------------------------------------- the outputs


def images_dir(run_dir: str) -> str:
    return storage.join(run_dir, "images")


def images_file(run_dir: str, slug: str) -> str:
    return storage.join(images_dir(run_dir), f"{slug}.parquet")


def rejects_dir(run_dir: str, stage: str) -> str:
    return storage.join(run_dir, "rejects", stage)


def rejects_file(run_dir: str, stage: str, name: str) -> str:
    return storage.join(rejects_dir(run_dir, stage), f"{name}.parquet")


def embeddings_dir(run_dir: str, space: str) -> str:
    return storage.join(run_dir, "embeddings", space)


def embeddings_shard_dir(run_dir: str, space: str, slug: str) -> str:
    return storage.join(embeddings_dir(run_dir, space), slug)


def index_root(run_dir: str) -> str:
    return storage.join(run_dir, "index")


def index_dir(run_dir: str, space: str) -> str:
    return storage.join(index_root(run_dir), space)


def index_meta_file(run_dir: str, space: str) -> str:
    return storage.join(index_dir(run_dir, space), "index.json")


def pairs_dir(run_dir: str) -> str:
    return storage.join(run_dir, "pairs")


def pairs_file(run_dir: str, slug: str) -> str:
    return storage.join(pairs_dir(run_dir), f"{slug}.parquet")


def synth_dir(run_dir: str, step: str) -> str:
    return storage.join(run_dir, "synth", step)


def try_dir(run_dir: str, step: str, attempt: int) -> str:
    return storage.join(synth_dir(run_dir, step), f"try-{attempt}")


def descriptions_dir(run_dir: str) -> str:
    return storage.join(run_dir, "descriptions")


def instructions_dir(run_dir: str) -> str:
    return storage.join(run_dir, "instructions")


def triplets_dir(run_dir: str) -> str:
    return storage.join(run_dir, "triplets")


def triplet_parts_dir(run_dir: str) -> str:
    return storage.join(triplets_dir(run_dir), "parts")


# ------------------------------------------------------------------------------ a training run


def train_run_dir(storage_path: str, name: str) -> str:
    return storage.join(storage_path, name)


def prepared_dir(train_run: str) -> str:
    return storage.join(train_run, "prepared")


def prepare_staging_dir(train_run: str) -> str:
    """The checked rows, usable and not, before they are split into the prepared data and the
    rejects (``RUN/rejects/prepare``)."""
    return storage.join(train_run, "_checked")


def train_metrics_file(train_run: str) -> str:
    return storage.join(train_run, "metrics.jsonl")


def train_summary_file(train_run: str) -> str:
    return storage.join(train_run, "summary.json")


def train_checkpoint_snapshot(train_run: str) -> str:
    """Ray Train's record of the run's checkpoints (Train V2): a relaunch resumes from it."""
    return storage.join(train_run, "checkpoint_manager_snapshot.json")
