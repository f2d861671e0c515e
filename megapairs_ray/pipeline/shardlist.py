"""The run's shard list, fixed when the run starts.

Ids and resume markers are per shard, and a folder input's shards are chunks of a listing: if the
input changed under a run (files added, removed, a shard rewritten), finished markers would vouch
for shards that are no longer what they were. So the first stage to run writes the list to
``RUN/shards.json``; every later stage and rerun uses it, and refuses to go on if the input no
longer matches.
"""

from __future__ import annotations

from megapairs_ray import manifest
from megapairs_ray.config import InputConfig, RunConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import Shard, list_shards
from megapairs_ray.io.stepstate import done_units, read_json_many


class InputChangedError(MegapairsError, RuntimeError):
    """The input no longer matches the shard list this run started with."""


def run_shards(cfg: RunConfig) -> list[Shard]:
    current = list_shards(cfg.input)
    uri = layout.shards_file(cfg.run_dir)
    if not storage.exists(uri):
        storage.write_json(uri, [s.to_row() for s in current])
        return current
    recorded = [Shard.from_row(r) for r in storage.read_json(uri)]
    if recorded != current:
        before = {s.name: s for s in recorded}
        now = {s.name: s for s in current}
        added = sorted(now.keys() - before.keys())
        removed = sorted(before.keys() - now.keys())
        changed = sorted(n for n in now.keys() & before.keys() if now[n] != before[n])
        raise InputChangedError(
            f"the input changed since this run started ({uri}): added {added[:3]}, removed "
            f"{removed[:3]}, changed {changed[:3]}; start a new run_dir for the new input")
    return recorded


class RunNotIngested(MegapairsError, ValueError):
    """A run directory given as a source of images that is not one, or not ingested yet."""


def ingested_images(root: str, field: str, error: type[Exception] = RunNotIngested,
                    ) -> tuple[list[tuple[str, str, int]], InputConfig]:
    """A finished ingest's images, for a job that reuses another run's (the gallery's
    ``images_from``, an alignment's ``captions_from``): [(shard slug, images table, accepted
    rows)] and the input's reading config (where the bytes the tables point at are read)."""
    if not storage.exists(layout.shards_file(root)):
        raise error(f"{field}: {root} is not a run directory (no shards.json)")
    shards = [Shard.from_row(r) for r in storage.read_json(layout.shards_file(root))]
    doc = manifest.load(root).get("config", {})
    input_cfg = InputConfig.model_validate(doc.get("input") or {"uris": [root]})
    return ingested_tables(root, shards, error), input_cfg


def ingested_tables(root: str, shards: list[Shard], error: type[Exception] = RunNotIngested,
                    ) -> list[tuple[str, str, int]]:
    """[(shard slug, images table, accepted rows)] of a run whose every shard is ingested."""
    ingested = done_units(root, "ingest")
    missing = [s.name for s in shards if s.slug not in ingested]
    if missing:
        raise error(f"{len(missing)} shard(s) of {root} are not ingested (e.g. "
                    f"{missing[:3]}); finish ingest there first")
    markers = read_json_many([layout.marker(root, "ingest", s.slug) for s in shards])
    return [(s.slug, layout.images_file(root, s.slug), int(m["counts"].get("images", 0)))
            for s, m in zip(shards, markers)]
