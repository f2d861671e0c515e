"""Export on Ray: instructed pairs -> the released MegaPairs form under ``RUN/triplets``.

    RUN/triplets/parts/part-*.jsonl     one triplet per line: q_img, q_text, t_img, hns + provenance
    RUN/triplets/parts/part-*.parquet   the same rows, a parquet part beside each JSON-lines part
    RUN/triplets/megapairs.jsonl        single-file view of the parts, for runs up to
    RUN/triplets/megapairs.parquet        ``export.single_file_max_rows`` triplets
    RUN/triplets/images/00000.tar       size x size JPEGs; path images/00000/<id>.jpg is a member
    RUN/triplets/README.md              the dataset card
    RUN/triplets/gallery.html           sampled triplets to look at in a browser
    RUN/triplets/_SUCCESS               written last: the export is whole

The images every triplet names are found by one metadata join (ids against the ingested
locations, a semi-join: each image once; ``pipeline/locations.py``), grouped by the tar their id
hashes to, and each group writes its tar, reading its images grouped by source file (a small
run's images are one group of every tar). Bytes are never shuffled. An image that cannot be
read rejects the triplets that need it (a hard negative is dropped instead, while enough
remain), with the reason counted. Ray workers write the tars and the triplet parts; the
driver only adds up their counts and keeps the ids of the few images that failed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from megapairs_ray.config import InputConfig, RunConfig
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.pipeline.datasets import cluster_partitions, read_parquet_files
from megapairs_ray.pipeline.engine import Stage, StageRun
from megapairs_ray.pipeline.locations import Locations
from megapairs_ray.pipeline.synth import INSTRUCT, PAIR_COLUMNS, step_settings
from megapairs_ray.synth.export import (
    REJECT_MESSAGES,
    ids_of_batch,
    tar_name,
    tar_of,
    triplet_record,
    write_tar,
)

TRIPLET_SCHEMA = pa.schema([
    ("q_img", pa.string()), ("q_text", pa.list_(pa.string())), ("t_img", pa.string()),
    ("hns", pa.list_(pa.string())),
    ("pair_id", pa.int64()), ("query_id", pa.int64()), ("target_id", pa.int64()),
    ("hard_negative_ids", pa.list_(pa.int64())), ("spaces", pa.list_(pa.string())),
    ("similarities", pa.list_(pa.float32())), ("description", pa.string()),
    ("describe_model", pa.string()), ("instruct_model", pa.string()),
])
DONE = "export"  # the unit: the whole export


class WriteTar:
    """All located images of one or more tars in (each tar's images whole); per tar, its
    counts and the ids of the images that could not be written (with why) out."""

    def __init__(self, out_dir: str, input_cfg: InputConfig, size: int, quality: int) -> None:
        self.out_dir, self.input_cfg, self.size, self.quality = out_dir, input_cfg, size, quality

    def __call__(self, group: pa.Table) -> pa.Table:
        rows: dict[str, list] = {"written": [], "failed_ids": [], "failed_reasons": []}
        tars = group.column("tar")
        for tar in sorted(set(tars.to_pylist())):
            uri = storage.join(self.out_dir, "images", f"{tar_name(tar)}.tar")
            result = write_tar(group.filter(pc.equal(tars, tar)).to_pylist(), uri,
                               self.input_cfg, self.size, self.quality)
            failed = [(i, e) for i, e in result if e]
            rows["written"].append(len(result) - len(failed))
            rows["failed_ids"].append([i for i, _ in failed])
            rows["failed_reasons"].append([e for _, e in failed])
        return pa.table({"written": pa.array(rows["written"], pa.int64()),
                         "failed_ids": pa.array(rows["failed_ids"], pa.list_(pa.int64())),
                         "failed_reasons": pa.array(rows["failed_reasons"],
                                                    pa.list_(pa.string()))})


class WriteTriplets:
    """One block of instructed pairs -> a JSON-lines part, a parquet part and its rejects;
    returns the block's counts. Part names come from the pair ids: a retried task rewrites the
    same part."""

    def __init__(self, parts_dir: str, rejects_dir: str, num_tars: int, failed: dict[int, str],
                 min_negatives: int, models: dict[str, str]) -> None:
        self.parts_dir, self.rejects_dir, self.num_tars = parts_dir, rejects_dir, num_tars
        self.failed, self.min_negatives, self.models = set(failed), min_negatives, models

    def __call__(self, batch: pa.Table) -> dict[str, list[str]]:
        ids = np.sort(batch.column("pair_id").to_numpy())
        name = f"part-{hashlib.blake2b(ids.tobytes(), digest_size=12).hexdigest()}"
        records, rejects = [], []
        counts: Counter[str] = Counter()
        for row in batch.to_pylist():
            rec, reason = triplet_record(row, self.num_tars, self.failed, self.min_negatives,
                                         self.models)
            if rec is None:
                rejects.append(reject_row("export", name, [int(row["pair_id"])], reason,
                                          REJECT_MESSAGES[reason]))
                counts["reject:" + reason] += 1
            else:
                records.append(rec)
        if records:
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            with storage.open_atomic(storage.join(self.parts_dir, f"{name}.jsonl"),
                                     "wb") as f:
                f.write(lines.encode())
            storage.write_parquet(storage.join(self.parts_dir, f"{name}.parquet"),
                                  pa.Table.from_pylist(records, schema=TRIPLET_SCHEMA))
        if rejects:
            write_rejects(storage.join(self.rejects_dir, f"{name}.parquet"), rejects)
        counts["triplets"] = len(records)
        return {"counts": [json.dumps(counts)]}


def write_single_file_view(run_dir: str) -> None:
    """``megapairs.jsonl`` and ``megapairs.parquet``: the parts joined, in part order (a Ray
    task runs this, never the driver)."""
    out_dir = layout.triplets_dir(run_dir)
    parts = storage.list_files(layout.triplet_parts_dir(run_dir))
    with storage.open_atomic(storage.join(out_dir, "megapairs.jsonl"), "wb") as fj:
        for uri in [p for p in parts if p.endswith(".jsonl")]:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                fj.write(f.read())
    with storage.open_atomic(storage.join(out_dir, "megapairs.parquet"), "wb") as fp:
        writer = pq.ParquetWriter(fp, TRIPLET_SCHEMA)
        for uri in [p for p in parts if p.endswith(".parquet")]:
            writer.write_table(storage.read_parquet(uri).cast(TRIPLET_SCHEMA))
        writer.close()


def _add_tar(batch: pa.Table, num_tars: int) -> pa.Table:
    ids = batch.column("image_id").to_numpy()
    return batch.append_column("tar", pa.array(tar_of(ids, num_tars), pa.int64()))


def _run(ctx: StageRun[RunConfig], todo: list[str]) -> None:
    from megapairs_ray.pipeline.stages import STAGES
    from megapairs_ray.synth.report import write_card_and_gallery

    if not todo:
        return
    cfg, e = ctx.cfg, ctx.cfg.export
    out = layout.triplets_dir(cfg.run_dir)
    rejects_dir = layout.rejects_dir(cfg.run_dir, "export")
    storage.remove(out, recursive=True)  # what an interrupted export left
    storage.remove(rejects_dir, recursive=True)
    counts = _export(cfg, out, rejects_dir)
    if counts["triplets"] <= e.single_file_max_rows:
        ray.get(ray.remote(num_cpus=e.num_cpus)(write_single_file_view).remote(cfg.run_dir))
    # The card shows every stage's record, this one's included: the marker, last, vouches
    # for the card, the gallery and _SUCCESS.
    ctx.record_preview(counts)
    write_card_and_gallery(cfg, out, int(counts["image_tars"]), [s.name for s in STAGES])
    with storage.open_atomic(storage.join(out, "_SUCCESS"), "wb") as f:
        f.write(b"")
    ctx.state.mark_done(DONE, counts)


EXPORT: Stage[RunConfig] = Stage(
    name="export",
    help="Write the triplets in the released MegaPairs form, with a dataset card and gallery.",
    needs=(INSTRUCT,),
    settings=step_settings("export"),
    outputs=lambda cfg: {"triplets": layout.triplets_dir(cfg.run_dir),
                         "rejects": layout.rejects_dir(cfg.run_dir, "export")},
    units=lambda cfg: [DONE],
    run=_run,
    section="export",
)


def _export(cfg: RunConfig, out: str, rejects_dir: str) -> Counter[str]:
    """Tars, then triplet parts; their counts."""
    e = cfg.export
    counts: Counter[str] = Counter({"triplets": 0, "images_written": 0, "image_tars": 0})
    src = read_parquet_files(layout.instructions_dir(cfg.run_dir),
                             [*PAIR_COLUMNS, "description", "instructions"])
    if src is None:
        return counts
    models = {"describe": cfg.describe.model if cfg.describe else "",
              "instruct": cfg.instruct.model if cfg.instruct else ""}
    src = src.materialize()  # text and ids only: read once, used twice
    ids = src.map_batches(ids_of_batch, batch_format="numpy", num_cpus=e.num_cpus)
    parts = cluster_partitions()
    locations = Locations.of(cfg.run_dir)
    images = locations.named(ids).materialize()
    num_tars = max(1, math.ceil(images.count() / e.images_per_tar))
    written = images.map_batches(_add_tar, fn_kwargs={"num_tars": num_tars},
                                 batch_format="pyarrow", num_cpus=e.num_cpus)
    write = {"fn_constructor_args": (out, cfg.input, e.image_size, e.jpeg_quality),
             "batch_format": "pyarrow", "num_cpus": e.num_cpus,
             "compute": ray.data.ActorPoolStrategy(size=1)}
    if locations.copy is not None:  # a small run's images in one block: no grouping shuffle
        written = written.repartition(1).map_batches(WriteTar, batch_size=None, **write)
    else:
        written = written.groupby("tar", num_partitions=min(parts, num_tars)).map_groups(
            WriteTar, **write)
    failed: dict[int, str] = {}
    for row in written.iter_rows():
        counts["images_written"] += int(row["written"])
        counts["image_tars"] += 1
        failed.update(zip((int(i) for i in row["failed_ids"]), row["failed_reasons"]))
    counts.update("reject:image_" + reason for reason in failed.values())
    triplets = src.map_batches(
        WriteTriplets, fn_constructor_args=(layout.triplet_parts_dir(cfg.run_dir), rejects_dir,
                                            num_tars, failed, e.min_hard_negatives, models),
        batch_size=None, batch_format="pyarrow", num_cpus=e.num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=parts))
    for row in triplets.iter_rows():
        counts.update(json.loads(row["counts"]))
    return counts
