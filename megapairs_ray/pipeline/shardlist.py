"""The run's shard list, fixed when the run starts.

Ids and resume markers are per shard, and a folder input's shards are chunks of a listing: if the
input changed under a run (files added, removed, a shard rewritten), finished markers would vouch
for shards that are no longer what they were. So the first stage to run writes the list to
``RUN/shards.json``; every later stage and rerun uses it, and refuses to go on if the input no
longer matches.
"""

from __future__ import annotations

from typing import Protocol

from megapairs_ray.config import IngestConfig, InputConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import Shard, list_shards


class InputChangedError(MegapairsError, RuntimeError):
    """The input no longer matches the shard list this run started with."""


class Ingests(Protocol):
    """What the shard list and ingest read of a config: a run's, or a gallery's that ingests
    its own images."""

    @property
    def run_dir(self) -> str: ...

    @property
    def input(self) -> InputConfig | None: ...

    @property
    def ingest(self) -> IngestConfig: ...


def run_shards(cfg: Ingests) -> list[Shard]:
    """The run's shards: written by the first stage, checked against the input by every other
    (one listing of the input)."""
    assert cfg.input is not None, "a run with shards has an input"
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


def recorded_shards(run_dir: str) -> list[Shard]:
    """The shard list as the run recorded it (one read, no listing of the input)."""
    return [Shard.from_row(r) for r in storage.read_json(layout.shards_file(run_dir))]
