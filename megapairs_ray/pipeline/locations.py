"""Where each image's bytes are: the ingested images' locations (``RUN/images``) joined to rows
that name images by id (the describe step's pairs, the export's triplets).

Two ways, one result. When the images table is small (at most ``BROADCAST_MAX_BYTES`` of
parquet), one Ray task reads it into the object store and every block joins against that one
copy where it is (a broadcast join: nothing is shuffled). A larger table goes through Ray Data's
hash join, which shuffles both sides by id. A hash join's fixed cost (its aggregator actors,
about 10 s a join on a 2-CPU node) is most of a small run's synthesis time; above the threshold
a copy on every worker would cost more than the shuffle. Bytes are never read here, only ids and
locations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import LOCATION_COLUMNS
from megapairs_ray.pipeline.datasets import cluster_partitions, read_parquet_files

# About a million images' locations (their file names compress well); a few hundred MB in memory.
BROADCAST_MAX_BYTES = 64 * 2**20
ROLES = (("q_", "query_id"), ("t_", "target_id"))  # a pair's two images: column prefix, id


class MissingInputError(MegapairsError, RuntimeError):
    """A step cannot start: what it reads is missing."""


def image_locations(run_dir: str) -> ray.data.Dataset:
    """The ingested images' ids and locations, as a dataset."""
    ds = read_parquet_files(layout.images_dir(run_dir), ["image_id", *LOCATION_COLUMNS])
    if ds is None:
        raise MissingInputError(f"no ingested images under {run_dir}/images: run ingest first")
    return ds


def _read_all(images_dir: str) -> pa.Table:
    tables = [storage.read_parquet(f, ["image_id", *LOCATION_COLUMNS])
              for f in storage.list_files(images_dir, ".parquet")]
    return pa.concat_tables(tables).sort_by("image_id")


@dataclass(frozen=True)
class Locations:
    """The images' locations of one run, and how joins against them go: against one broadcast
    copy (``copy``) or through Ray Data's hash join (``copy`` is None)."""

    run_dir: str
    copy: ray.ObjectRef | None

    @classmethod
    def of(cls, run_dir: str) -> Locations:
        """A run's locations; a small table is read once into the object store (by a Ray task,
        not the driver)."""
        images_dir = layout.images_dir(run_dir)
        size = storage.total_size(images_dir, ".parquet")
        if size == 0:
            raise MissingInputError(f"no ingested images under {run_dir}/images: "
                                    "run ingest first")
        copy = (ray.remote(num_cpus=0.25)(_read_all).remote(images_dir)
                if size <= BROADCAST_MAX_BYTES else None)
        return cls(run_dir, copy)

    def locate_pairs(self, pairs: ray.data.Dataset) -> ray.data.Dataset:
        """Pairs with ``q_<location>`` and ``t_<location>`` columns (null: not ingested)."""
        if self.copy is not None:
            # The reference travels in a list: a bare one would be resolved and copied per task.
            return pairs.map_batches(_locate_block, fn_kwargs={"locations": [self.copy]},
                                     batch_format="pyarrow", num_cpus=0.25)
        images = image_locations(self.run_dir)
        for role, key in ROLES:
            side = images.rename_columns({"image_id": key,
                                          **{c: role + c for c in LOCATION_COLUMNS}})
            pairs = pairs.join(side, join_type="left_outer", num_partitions=cluster_partitions(),
                               on=(key,))
        return pairs

    def named(self, ids: ray.data.Dataset) -> ray.data.Dataset:
        """The located images that ``ids`` (an ``image_id`` column, repeats allowed) names, each
        once; ids that no images table holds are left out. With a broadcast copy, the result
        is one block."""
        if self.copy is not None:
            # At most the images table's ids, a small run's: they may pass the driver.
            wanted = _distinct_ids(ids)
            return ray.data.from_arrow_refs([
                ray.remote(num_cpus=0.25)(_named_block).remote(self.copy, wanted)])
        return image_locations(self.run_dir).join(ids, join_type="left_semi",
                                                  num_partitions=cluster_partitions(),
                                                  on=("image_id",))


def _locate_block(batch: pa.Table, locations: list[ray.ObjectRef]) -> pa.Table:
    table = ray.get(locations[0])  # sorted by image_id
    keys = table.column("image_id").to_numpy()
    for role, key in ROLES:
        ids = batch.column(key).to_numpy()
        pos = np.searchsorted(keys, ids).clip(max=max(len(keys) - 1, 0))
        found = keys[pos] == ids
        rows = table.take(pa.array(pos, mask=~found))  # a null index takes a null row
        for c in LOCATION_COLUMNS:
            batch = batch.append_column(role + c, rows.column(c))
    return batch


def _distinct_ids(ids: ray.data.Dataset) -> pa.Array:
    seen = {int(i) for b in ids.iter_batches(batch_format="numpy", batch_size=None)
            for i in b["image_id"]}
    return pa.array(sorted(seen), pa.int64())


def _named_block(locations: pa.Table, ids: pa.Array) -> pa.Table:
    return locations.filter(pc.is_in(locations.column("image_id"), value_set=ids))
