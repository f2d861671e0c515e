"""Export on Ray: instructed pairs -> the released MegaPairs form under ``RUN/triplets``.

    RUN/triplets/megapairs.jsonl      one triplet per line: q_img, q_text, t_img, hns + provenance
    RUN/triplets/megapairs.parquet    the same rows
    RUN/triplets/images/00000.tar     size x size JPEGs; path images/00000/<id>.jpg is a member
    RUN/triplets/README.md            the dataset card
    RUN/triplets/gallery.html         sampled triplets to look at in a browser

The images every triplet names are found by one metadata join (ids against the ingested
locations, a semi-join: each image once), grouped by the tar their id hashes to, and each group
writes its tar, reading its images grouped by source file. Bytes are never shuffled. An image
that cannot be read rejects the triplets that need it (a hard negative is dropped instead, while
enough remain), with the reason counted.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from megapairs_ray import manifest
from megapairs_ray.config import InputConfig, RunConfig
from megapairs_ray.io import storage
from megapairs_ray.pipeline.synth import (
    PAIR_COLUMNS,
    SynthStageError,
    image_locations,
    instructions_dir,
    read_parquet_files,
)
from megapairs_ray.stages import layout
from megapairs_ray.synth.export import ids_of_batch, tar_name, tar_of, triplet_record, write_tar

TRIPLET_SCHEMA = pa.schema([
    ("q_img", pa.string()), ("q_text", pa.list_(pa.string())), ("t_img", pa.string()),
    ("hns", pa.list_(pa.string())),
    ("pair_id", pa.int64()), ("query_id", pa.int64()), ("target_id", pa.int64()),
    ("hard_negative_ids", pa.list_(pa.int64())), ("spaces", pa.list_(pa.string())),
    ("similarities", pa.list_(pa.float32())), ("description", pa.string()),
    ("describe_model", pa.string()), ("instruct_model", pa.string()),
])
EXPORT_REJECTS_SCHEMA = pa.schema([("pair_id", pa.int64()), ("reason", pa.string())])


def triplets_dir(run_dir: str) -> str:
    return storage.join(run_dir, "triplets")


class WriteTar:
    """``map_groups`` callable: all located images of one tar in, ``(image_id, error)`` out."""

    def __init__(self, out_dir: str, input_cfg: InputConfig, size: int, quality: int) -> None:
        self.out_dir, self.input_cfg, self.size, self.quality = out_dir, input_cfg, size, quality

    def __call__(self, group: pa.Table) -> pa.Table:
        rows = group.to_pylist()
        tar = int(rows[0]["tar"])
        uri = storage.join(self.out_dir, "images", f"{tar_name(tar)}.tar")
        result = write_tar(rows, uri, self.input_cfg, self.size, self.quality)
        return pa.table({"image_id": pa.array([i for i, _ in result], pa.int64()),
                         "error": pa.array([e for _, e in result], pa.string()),
                         "tar": pa.array([tar] * len(result), pa.int64())})


def _add_tar(batch: pa.Table, num_tars: int) -> pa.Table:
    ids = batch.column("image_id").to_numpy()
    return batch.append_column("tar", pa.array(tar_of(ids, num_tars), pa.int64()))


def run_export(cfg: RunConfig) -> manifest.StageRecord:
    from megapairs_ray.synth.report import write_card_and_gallery

    record = manifest.StageRecord("export").start()
    e = cfg.export
    out = triplets_dir(cfg.run_dir)
    src = read_parquet_files(instructions_dir(cfg.run_dir),
                             [*PAIR_COLUMNS, "description", "instructions"])
    if src is None and not storage.exists(storage.join(cfg.run_dir, "synth", "instruct")):
        raise SynthStageError(f"no instructions under {instructions_dir(cfg.run_dir)}: "
                              "run instruct first")
    storage.remove(out, recursive=True)
    storage.remove(layout.rejects_dir(cfg.run_dir, "export"), recursive=True)
    models = {"describe": cfg.describe.model if cfg.describe else "",
              "instruct": cfg.instruct.model if cfg.instruct else ""}

    failed: dict[int, str] = {}
    num_tars = 1
    if src is not None:
        src = src.materialize()  # text and ids only: read once, used twice
        ids = src.map_batches(ids_of_batch, batch_format="numpy", num_cpus=e.num_cpus)
        parts = max(1, int(ray.cluster_resources().get("CPU", 1)))
        images = image_locations(cfg).join(ids, join_type="left_semi", num_partitions=parts,
                                           on=("image_id",)).materialize()
        num_images = images.count()
        num_tars = max(1, math.ceil(num_images / e.images_per_tar))
        written = images.map_batches(_add_tar, fn_kwargs={"num_tars": num_tars},
                                     batch_format="pyarrow", num_cpus=e.num_cpus)
        written = written.groupby("tar", num_partitions=min(parts, num_tars)).map_groups(
            WriteTar, fn_constructor_args=(out, cfg.input, e.image_size, e.jpeg_quality),
            batch_format="pyarrow", num_cpus=e.num_cpus,
            compute=ray.data.ActorPoolStrategy(size=1))
        for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
            for i, err in zip(batch.column("image_id").to_pylist(),
                              batch.column("error").to_pylist()):
                if err:
                    failed[int(i)] = err
                else:
                    record.counts["images_written"] += 1
        record.counts["image_tars"] = len(storage.list_files(storage.join(out, "images"),
                                                             ".tar"))
        for reason in failed.values():
            record.rejects["image_" + reason] += 1

    rejects: list[dict[str, Any]] = []
    kept = 0
    with storage.open_atomic(storage.join(out, "megapairs.jsonl"), "wb") as fj, \
            storage.open_atomic(storage.join(out, "megapairs.parquet"), "wb") as fp:
        writer = pq.ParquetWriter(fp, TRIPLET_SCHEMA)
        if src is not None:
            failed_ids = set(failed)
            for batch in src.iter_batches(batch_format="pyarrow", batch_size=4096):
                records = []
                for row in batch.to_pylist():
                    rec, reason = triplet_record(row, num_tars, failed_ids,
                                                 e.min_hard_negatives, models)
                    if rec is None:
                        rejects.append({"pair_id": int(row["pair_id"]), "reason": reason})
                        record.rejects[reason] += 1
                        continue
                    records.append(rec)
                    fj.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
                if records:
                    writer.write_table(pa.Table.from_pylist(records, schema=TRIPLET_SCHEMA))
                    kept += len(records)
        writer.close()
    if rejects:
        storage.write_parquet(layout.rejects_file(cfg.run_dir, "export", "triplets"),
                              pa.Table.from_pylist(rejects, schema=EXPORT_REJECTS_SCHEMA))
    record.counts["triplets"] = kept
    record.outputs = {"triplets": out}
    record.finish()
    manifest.record_stage(cfg.run_dir, record)
    write_card_and_gallery(cfg, out, num_tars)
    return record
