"""Datasets over the run's own parquet files.

Ray Data's ``read_parquet`` lists and inspects its files in tasks that ask for a whole CPU
each (its ``ListFiles`` step), which a small cluster whose CPUs are held by actors frees late or
never: on a 3-node test cluster that step alone took 20 s a space in the index stage, against
under a second for the reads themselves. The run's parquet files are ones the project wrote and
lists itself, so they are read here by one task per file at a CPU share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import ray

from megapairs_ray.io import storage


def _read_table(batch: dict[str, Any], columns: Sequence[str] | None,
                keep: Callable[[pa.Table], pa.Array] | None) -> pa.Table:
    table = storage.read_parquet(str(batch["file"][0]))
    if keep is not None:
        table = table.filter(keep(table))
    return table.select(list(columns)) if columns else table


def read_parquet_files(uri: str, columns: Sequence[str] | None = None,
                       keep: Callable[[pa.Table], pa.Array] | None = None,
                       num_cpus: float = 0.25) -> ray.data.Dataset | None:
    """A dataset over the parquet files under ``uri`` (rows where ``keep`` is true: Ray Data's
    own ``filter`` asks for a whole CPU too), one read task per file; None when there is none."""
    files = storage.list_files(uri, ".parquet")
    if not files:
        return None
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(_read_table, fn_kwargs={"columns": columns, "keep": keep},
                          batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def cluster_partitions() -> int:
    """Partitions for a shuffle (a join, a groupby): one per CPU of the cluster."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
