"""Embed on Ray Data: shard readers -> an autoscaling pool of encoder actors -> writers.

Books per space and per shard. Each space keeps its own settings (``embed.<space>``: its
encoder and the stage-wide fields that shape every vector: seed, precision, device, decode), so
changing one space's model removes and recomputes that space alone; the others' vectors stay.
A shard of a space is finished when its marker is written; the stage's own books (``embed``,
what index and mine read) hold every space's settings and mark a shard once all its spaces are.

Resume: before the run, any output of an unfinished (shard, space) is removed (a partial
leftover); shards that miss the same spaces run together through actors that build only those
spaces' encoders. During the run the driver counts, from the writers' small summary rows, how
many of each shard's accepted images have been written or rejected, and writes the markers the
moment the count is complete. A rerun skips finished shards without reading a byte of them, and
nothing is ever written twice.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ray

from megapairs_ray.config import RunConfig, SpaceConfig, output_settings
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import Shard
from megapairs_ray.io.stepstate import StepState, stored_fingerprint
from megapairs_ray.pipeline.engine import Stage, StageRun
from megapairs_ray.pipeline.ingest import INGEST
from megapairs_ray.pipeline.shardlist import recorded_shards, run_shards
from megapairs_ray.stages.embed_io import read_accepted_images, write_embeddings


class IncompleteEmbedError(MegapairsError, RuntimeError):
    """The pipeline ended with shards whose rows were not all accounted for."""


def _settings(cfg: RunConfig) -> dict[str, Any]:
    """What decides embed's vectors: every field but resources and the mining windows."""
    return output_settings(cfg.embed, exclude=("resource", "mine"), prefix="embed.")


def space_state(cfg: RunConfig, space: SpaceConfig) -> StepState:
    """One space's books: its encoder and the stage-wide fields, not the other spaces'."""
    mine = f"embed.spaces.{space.name}."
    settings = {k: v for k, v in _settings(cfg).items()
                if not k.startswith("embed.spaces.") or k.startswith(mine)}
    return StepState(cfg.run_dir, f"embed.{space.name}", settings,
                     {"ingest": stored_fingerprint(cfg.run_dir, "ingest")})


def clear_partial(run_dir: str, stage: str, spaces: Iterable[str], slugs: Iterable[str]) -> None:
    """Remove what unfinished shards left behind: one listing per space and one of the rejects,
    so a first run over 100,000 shards sends no request per shard."""
    slugs = set(slugs)
    for space in spaces:
        for name in storage.list_dirs(layout.embeddings_dir(run_dir, space)):
            if name in slugs:
                storage.remove(layout.embeddings_shard_dir(run_dir, space, name), recursive=True)
    for f in storage.list_files(layout.rejects_dir(run_dir, stage), include_hidden=True):
        name = f.rsplit("/", 1)[-1]
        if name.startswith(".tmp-"):  # a writer's temporary name: .tmp-<uuid>-<final name>
            name = name.split("-", 2)[-1]
        if name.rsplit("-part-", 1)[0] in slugs:
            storage.remove(f)


def build_embed_dataset(cfg: RunConfig, todo: list[Shard],
                        spaces: Sequence[str] | None = None) -> ray.data.Dataset:
    """The streaming pipeline over ``spaces`` (default: all); its output is the writers'
    per-shard summary rows."""
    # Imported here, not at the top: it brings torch, and every later stage imports this module
    # (for EMBED), so each Ray worker that runs an index, mine or synthesis task would pay
    # torch's import (about a second of CPU) for nothing.
    from megapairs_ray.stages.embed import EmbedStage

    e = cfg.embed
    names = list(spaces) if spaces is not None else e.space_names
    ds = ray.data.from_items([s.to_row() for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        read_accepted_images,
        fn_kwargs={"run_dir": cfg.run_dir, "input_cfg": cfg.input,
                   "max_member_bytes": cfg.ingest.max_bytes},
        batch_size=1,
        num_cpus=e.reader_num_cpus,
    )
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"cfg": e, "spaces": names},
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=e.min_actors, max_size=e.max_actors,
            max_tasks_in_flight_per_actor=max(e.max_tasks_in_flight_per_actor,
                                              e.concurrent_calls_per_actor),
            max_concurrent_calls_per_actor=e.concurrent_calls_per_actor,
            enable_true_multi_threading=e.concurrent_calls_per_actor > 1),
        num_gpus=e.num_gpus,
        num_cpus=e.num_cpus,
    )
    return ds.map_batches(
        write_embeddings,
        fn_kwargs={"run_dir": cfg.run_dir,
                   "image_spaces": tuple(n for n in names if not e.space(n).is_text),
                   "text_spaces": tuple(n for n in names if e.space(n).is_text)},
        batch_size=e.writer_batch_rows,
        batch_format="numpy",
        num_cpus=e.writer_num_cpus,
    )


def count_until_done(summaries: Iterable[dict[str, Any]], expected: dict[str, int],
                     mark_done: Callable[[str, Counter[str]], None]) -> list[str]:
    """Add up the writers' per-shard summary rows as they stream back; call ``mark_done`` the
    moment all of a shard's ``expected`` rows are written or rejected. Returns the shards that
    ended short."""
    tallies: dict[str, Counter[str]] = {slug: Counter() for slug in expected}
    for summary in summaries:
        t = tallies[summary["shard"]]
        for k in ("rows", "embedded", "texts", "rejected"):
            t[k] += int(summary[k])
        t.update({f"reject:{r}": n for r, n in json.loads(summary["reasons"]).items()})
        if t["rows"] == expected[summary["shard"]]:
            mark_done(summary["shard"], t)
    return [slug for slug, t in tallies.items() if t["rows"] != expected[slug]]


def _space_counts(space: SpaceConfig, tally: Counter[str]) -> dict[str, int]:
    counts = {k: int(n) for k, n in tally.items()}
    counts["vectors"] = counts.get("texts" if space.is_text else "embedded", 0)
    return counts


def _run(ctx: StageRun[RunConfig], todo: list[str]) -> None:
    """Embed the shards some space has not finished, then mark the stage's shards whose every
    space is done (its counts are any space's)."""
    cfg = ctx.cfg
    shards = recorded_shards(cfg.run_dir)
    slugs = [s.slug for s in shards]
    ingest = INGEST.state(cfg)
    expected = {slug: int(m["counts"].get("images", 0))
                for slug, m in zip(slugs, ingest.read_markers(slugs))}
    ctx.record.inputs.update({"images": sum(expected.values()),
                              "spaces": cfg.embed.space_names})
    spaces = {s.name: s for s in cfg.embed.spaces}
    states = {name: space_state(cfg, s) for name, s in spaces.items()}
    # A space made under other settings goes, alone. What the stage's own books found changed
    # beyond the spaces' changes is a space added or dropped: nothing to recompute.
    ctx.changed = [c for name, st in states.items()
                   for c in st.reconcile([layout.embeddings_dir(cfg.run_dir, name)])]
    done = {name: st.done_units() for name, st in states.items()}
    missing: dict[frozenset[str], list[Shard]] = defaultdict(list)
    for s in shards:
        todo_spaces = frozenset(n for n in spaces if s.slug not in done[n])
        if todo_spaces:
            missing[todo_spaces].append(s)
    ctx.record.counts["shards_skipped_done"] = len(slugs) - sum(map(len, missing.values()))

    for names, group in missing.items():
        ordered = [n for n in spaces if n in names]  # the config's order
        clear_partial(cfg.run_dir, "embed", ordered, [s.slug for s in group])
        for s in [s for s in group if expected[s.slug] == 0]:
            for n in ordered:
                states[n].mark_done(s.slug, _space_counts(spaces[n], Counter()))
        group = [s for s in group if expected[s.slug] > 0]
        if not group:
            continue

        def done_shard(slug: str, tally: Counter[str], ordered: list[str] = ordered) -> None:
            for n in ordered:
                states[n].mark_done(slug, _space_counts(spaces[n], tally))
            ctx.count("shards_embedded")

        unfinished = count_until_done(build_embed_dataset(cfg, group, ordered).iter_rows(),
                                      {s.slug: expected[s.slug] for s in group}, done_shard)
        if unfinished:
            raise IncompleteEmbedError(
                f"{len(unfinished)} shard(s) ended with rows unaccounted for: {unfinished[:5]}")

    first = states[next(iter(spaces))]
    unmarked = sorted(set(slugs) - ctx.state.done_units())
    for slug, marker in zip(unmarked, first.read_markers(unmarked)):
        ctx.state.mark_done(slug, {k: v for k, v in marker["counts"].items() if k != "vectors"})


EMBED: Stage[RunConfig] = Stage(
    name="embed",
    help="Embed accepted images in every configured space (CLIP image, DINO image, CLIP text "
         "on captions).",
    needs=(INGEST,),
    settings=_settings,
    outputs=lambda cfg: {**{s: layout.embeddings_dir(cfg.run_dir, s)
                            for s in cfg.embed.space_names},
                         "rejects": layout.rejects_dir(cfg.run_dir, "embed")},
    # Each space keeps books of its own (``space_state``) and removes only its own vectors.
    removes=lambda cfg: [],
    units=lambda cfg: [s.slug for s in run_shards(cfg)],
    run=_run,
    unit_noun="shards",
    hidden_counts=("rows",),
    inputs=lambda ctx: {"shards": len(ctx.units)},
)
