"""Another run's ingested images, for a job that reuses them (the gallery's ``images_from``, an
alignment's ``captions_from``): the run's shard list, its ingest markers and the input config its
manifest recorded."""

from __future__ import annotations

from megapairs_ray.config import InputConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import Shard
from megapairs_ray.io.stepstate import done_units, read_json_many


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
    manifest_uri = layout.manifest_file(root)  # megapairs_ray.manifest is above io: read it here
    doc = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    doc = doc.get("config", {})
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
