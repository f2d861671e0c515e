"""The images' locations joined to pairs and triplets: the broadcast join a small run takes and
the hash join a large one takes give the same rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray

from megapairs_ray.io.shards import LOCATION_COLUMNS
from megapairs_ray.pipeline import locations
from megapairs_ray.pipeline.datasets import read_parquet_files
from megapairs_ray.pipeline.locations import Locations, MissingInputError
from megapairs_ray.pipeline.synth import PAIR_COLUMNS

pytestmark = pytest.mark.ray
GHOST = 10**12  # an id no images table holds


def _run(tmp_path: Path) -> tuple[str, dict[int, dict], list[dict]]:
    """Two image parts of 20 ids (random 64-bit, as ingest's are) and 13 pairs in two parts,
    one of them naming an image that was never ingested."""
    rng = np.random.default_rng(0)
    ids = rng.integers(-2**62, 2**62, 40).tolist()
    images = [{"image_id": i, "format_kind": "tar", "file_uri": f"/data/s{n % 3}.tar",
               "offset": 512 * n, "length": 100 + n, "row": None, "caption": f"c{n}"}
              for n, i in enumerate(ids)]
    (tmp_path / "images").mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(images[k::2]), tmp_path / "images" / f"{k}.parquet")
    pairs = [{"pair_id": p, "query_id": ids[p], "target_id": ids[(7 * p + 3) % 40],
              "spaces": ["clip"], "similarities": [0.9], "hard_negatives": ids[p + 1:p + 4]}
             for p in range(12)]
    pairs.append({**pairs[0], "pair_id": 12, "target_id": GHOST})
    (tmp_path / "pairs").mkdir()
    for k, part in enumerate((pairs[:6], pairs[6:])):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "pairs" / f"{k}.parquet")
    return str(tmp_path), {r["image_id"]: r for r in images}, pairs


def _both(run_dir: str, monkeypatch: pytest.MonkeyPatch,
          use: Callable[[Locations], pa.Table]) -> tuple[pa.Table, pa.Table]:
    small = Locations.of(run_dir)
    monkeypatch.setattr(locations, "BROADCAST_MAX_BYTES", 0)
    large = Locations.of(run_dir)
    assert small.copy is not None and large.copy is None
    return use(small), use(large)


def _table(ds: ray.data.Dataset) -> pa.Table:
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))


def test_pairs_are_located_the_same_by_both_joins(tmp_path, ray_cluster, monkeypatch):
    run_dir, images, pairs = _run(tmp_path)

    def locate(loc: Locations) -> pa.Table:
        ds = read_parquet_files(f"{run_dir}/pairs", PAIR_COLUMNS)
        return _table(loc.locate_pairs(ds)).sort_by("pair_id")

    small, large = _both(run_dir, monkeypatch, locate)
    assert small.num_rows == large.num_rows == len(pairs)
    assert small.select(large.column_names).to_pylist() == large.to_pylist()
    for row in small.to_pylist():
        for role, key in (("q_", "query_id"), ("t_", "target_id")):
            want = images.get(row[key])
            got = {c: row[role + c] for c in LOCATION_COLUMNS}
            assert got == ({c: want[c] for c in LOCATION_COLUMNS} if want
                           else dict.fromkeys(LOCATION_COLUMNS)), (row["pair_id"], role)
    assert small.filter(pc.equal(small.column("pair_id"), 12)).column(
        "t_file_uri").null_count == 1


def test_named_images_are_each_once_by_both_joins(tmp_path, ray_cluster, monkeypatch):
    run_dir, _, pairs = _run(tmp_path)
    named = [p["query_id"] for p in pairs] + [p["target_id"] for p in pairs] + [
        h for p in pairs for h in p["hard_negatives"]]

    def find(loc: Locations) -> pa.Table:
        ids = ray.data.from_items([{"image_id": i} for i in named])
        return _table(loc.named(ids)).sort_by("image_id")

    small, large = _both(run_dir, monkeypatch, find)
    assert small.select(large.column_names).to_pylist() == large.to_pylist()
    assert small.column("image_id").to_pylist() == sorted(set(named) - {GHOST})


def test_no_ingested_images_is_one_line(tmp_path, ray_cluster):
    with pytest.raises(MissingInputError, match=r"no ingested images under .*run ingest first"):
        Locations.of(str(tmp_path))
