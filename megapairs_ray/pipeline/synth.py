"""Describe and instruct on Ray: mined pairs -> descriptions -> instructions.

Pairs carry image ids. One metadata join (Ray Data ``join``: ids and byte locations, never
bytes) gives each pair the locations of its two images; each describe batch then reads just
those images, grouped by file. Every try of a step streams its rows through ``ray.data.llm``
into ``RUN/synth/<step>/try-<n>/`` on storage, not into the object store, and the next try reads
back only that try's rejects; a try with a ``_done.json`` is not run again, so a rerun resumes
after the last finished try. At the end the usable rows of every try are gathered into
``RUN/descriptions`` or ``RUN/instructions`` and the last try's rejects into ``RUN/rejects/<step>``,
each with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from megapairs_ray import manifest
from megapairs_ray.config import RunConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage
from megapairs_ray.stages import layout
from megapairs_ray.synth.images import LOCATION_COLUMNS, MISSING_IMAGE, UNREADABLE_IMAGE

PAIR_COLUMNS = ("pair_id", "query_id", "target_id", "spaces", "similarities", "hard_negatives")
# How a step is run, not what it makes: changing these keeps earlier outputs.
RESOURCE_FIELDS = {"num_cpus", "replicas", "batch_size", "fetch_num_cpus", "fetch_batch_size",
                   "fetch_actors", "engine_num_cpus", "engine_num_gpus"}
# Reasons another try cannot change.
FINAL_REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE)


class SynthStageError(MegapairsError, RuntimeError):
    """A synthesis step cannot start: what it needs is missing."""


def _read_table(batch: dict[str, Any], columns: Sequence[str] | None,
                keep: Callable[[pa.Table], pa.Array] | None) -> pa.Table:
    table = storage.read_parquet(str(batch["file"][0]))
    if keep is not None:
        table = table.filter(keep(table))
    return table.select(list(columns)) if columns else table


def read_parquet_files(uri: str, columns: Sequence[str] | None = None,
                       keep: Callable[[pa.Table], pa.Array] | None = None,
                       num_cpus: float = 0.25) -> ray.data.Dataset | None:
    """A dataset over the parquet files under ``uri`` (rows where ``keep`` is true), one read
    task per file at a CPU share. Ray Data's own file listing, and its ``filter``, ask for a
    whole CPU each, which a small cluster whose CPUs are held by engine actors never frees."""
    files = storage.list_files(uri, ".parquet")
    if not files:
        return None
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return ds.map_batches(_read_table, fn_kwargs={"columns": columns, "keep": keep},
                          batch_size=1, batch_format="pyarrow", num_cpus=num_cpus)


def _worth_retrying(table: pa.Table) -> pa.Array:
    """Rejected rows that another try could fix (not a missing or unreadable image)."""
    reason = table.column("reject_reason")
    final = pc.starts_with(reason, FINAL_REASONS[0])
    for r in FINAL_REASONS[1:]:
        final = pc.or_(final, pc.starts_with(reason, r))
    return pc.and_(pc.not_equal(reason, ""), pc.invert(final))


def image_locations(cfg: RunConfig) -> ray.data.Dataset:
    ds = read_parquet_files(storage.join(cfg.run_dir, "images"), ["image_id", *LOCATION_COLUMNS])
    if ds is None:
        raise SynthStageError(f"no ingested images under {cfg.run_dir}/images: run ingest first")
    return ds


def located_pairs(cfg: RunConfig) -> ray.data.Dataset:
    """Mined pairs with ``q_<location>`` and ``t_<location>`` columns (null: not found)."""
    pairs = read_parquet_files(storage.join(cfg.run_dir, "pairs"), PAIR_COLUMNS)
    if pairs is None:
        raise SynthStageError(f"no mined pairs under {cfg.run_dir}/pairs: run mine first")
    images = image_locations(cfg)
    parts = max(1, int(ray.cluster_resources().get("CPU", 1)))
    for role, key in (("q_", "query_id"), ("t_", "target_id")):
        side = images.rename_columns({"image_id": key, **{c: role + c for c in LOCATION_COLUMNS}})
        pairs = pairs.join(side, join_type="left_outer", num_partitions=parts, on=(key,))
    return pairs


def _try_dir(cfg: RunConfig, step: str, attempt: int) -> str:
    return storage.join(cfg.run_dir, "synth", step, f"try-{attempt}")


def _state_uri(cfg: RunConfig, step: str) -> str:
    return storage.join(cfg.run_dir, "synth", step, "_state.json")


def _reset_if_changed(cfg: RunConfig, step: str, state: dict[str, Any], outputs: list[str]) -> bool:
    """Clear a step's tries and outputs made under other settings or from other inputs."""
    uri = _state_uri(cfg, step)
    if storage.exists(uri) and storage.read_json(uri) == state:
        return False
    stale = storage.exists(uri)
    storage.remove(storage.join(cfg.run_dir, "synth", step), recursive=True)
    for out in outputs:
        storage.remove(out, recursive=True)
    storage.write_json(uri, state)
    return stale


def run_tries(cfg: RunConfig, step: str, retries: int,
              first_input: Callable[[], ray.data.Dataset],
              pipeline_for_try: Callable[[ray.data.Dataset, int], ray.data.Dataset],
              input_columns: Sequence[str], record: manifest.StageRecord) -> int:
    """Run up to ``1 + retries`` tries (fewer when no reject is worth another); returns how
    many tries there are."""
    last = 0
    for attempt in range(retries + 1):
        out = _try_dir(cfg, step, attempt)
        done = storage.join(out, "_done.json")
        if storage.exists(done):
            record.counts[f"try_{attempt}_resumed"] = storage.read_json(done)["rows"]
        else:
            if attempt == 0:
                todo = first_input()
            else:
                todo = read_parquet_files(_try_dir(cfg, step, attempt - 1), input_columns,
                                          keep=_worth_retrying)
                assert todo is not None
            storage.remove(out, recursive=True)
            pipeline_for_try(todo, attempt).write_parquet(out)
            written = storage.read_parquet_dir(out, ["pair_id"])
            storage.write_json(done, {"rows": 0 if written is None else written.num_rows})
        last = attempt
        reasons = _reject_reasons(out)
        if not any(r.split(":")[0] not in FINAL_REASONS for r in reasons):
            break
    return last + 1


def _reject_reasons(try_dir: str) -> list[str]:
    t = storage.read_parquet_dir(try_dir, ["reject_reason"])
    if t is None:
        return []
    col = t.column("reject_reason")
    return pc.filter(col, pc.not_equal(col, "")).to_pylist()


def gather(cfg: RunConfig, step: str, tries: int, good_dir: str, drop: Sequence[str],
           record: manifest.StageRecord) -> None:
    """Usable rows of every try into ``good_dir``; final rejects into ``rejects/<step>``."""
    storage.remove(good_dir, recursive=True)
    rejects_dir = layout.rejects_dir(cfg.run_dir, step)
    storage.remove(rejects_dir, recursive=True)
    for attempt in range(tries):
        t = storage.read_parquet_dir(_try_dir(cfg, step, attempt))
        if t is None:
            continue
        ok = pc.equal(t.column("reject_reason"), "")
        keep = [c for c in t.column_names if c not in drop]
        good = t.filter(ok).select(keep)
        record.counts[f"usable_after_try_{attempt}"] = good.num_rows
        if good.num_rows:
            storage.write_parquet(storage.join(good_dir, f"try-{attempt}.parquet"), good)
        # A try's rejects are final when no later try took them: all of the last try's, and
        # those of earlier tries whose reason another try cannot change.
        final = pc.invert(ok) if attempt == tries - 1 else pc.and_(
            pc.invert(ok), pc.invert(_worth_retrying(t)))
        bad = t.filter(final).select(keep)
        if bad.num_rows:
            storage.write_parquet(storage.join(rejects_dir, f"try-{attempt}.parquet"), bad)
        for reason in bad.column("reject_reason").to_pylist():
            record.rejects[reason.split(":")[0]] += 1


def _pairs_state(cfg: RunConfig) -> Any:
    uri = storage.join(cfg.run_dir, "pairs", "_state.json")
    if not storage.exists(uri):
        raise SynthStageError(f"no mined pairs under {cfg.run_dir}/pairs: run mine first")
    files = storage.list_files(storage.join(cfg.run_dir, "pairs"), ".parquet")
    return {"mine": storage.read_json(uri), "pair_files": len(files)}


def descriptions_dir(run_dir: str) -> str:
    return storage.join(run_dir, "descriptions")


def instructions_dir(run_dir: str) -> str:
    return storage.join(run_dir, "instructions")


def run_describe(cfg: RunConfig) -> manifest.StageRecord:
    from megapairs_ray.synth.describe import FetchPairImages, build_describe_processor

    if cfg.describe is None:
        raise SynthStageError("the config has no describe section")
    d = cfg.describe
    record = manifest.StageRecord("describe").start()
    state = {"describe": d.model_dump(mode="json", exclude=RESOURCE_FIELDS),
             "pairs": _pairs_state(cfg)}
    if _reset_if_changed(cfg, "describe", state, [descriptions_dir(cfg.run_dir),
                                                   layout.rejects_dir(cfg.run_dir, "describe")]):
        record.counts["earlier_descriptions_discarded"] = 1
    input_columns = [*PAIR_COLUMNS, *(r + c for r in ("q_", "t_") for c in LOCATION_COLUMNS)]

    def pipeline(todo: ray.data.Dataset, attempt: int) -> ray.data.Dataset:
        fetched = todo.map_batches(
            FetchPairImages, fn_constructor_args=(cfg.input, d.image_size),
            batch_size=d.fetch_batch_size, num_cpus=d.fetch_num_cpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=d.fetch_actors))
        return build_describe_processor(d, attempt, input_columns)(fetched)

    tries = run_tries(cfg, "describe", d.retries, lambda: located_pairs(cfg).materialize(),
                         pipeline, input_columns, record)
    gather(cfg, "describe", tries, descriptions_dir(cfg.run_dir),
           drop=[r + c for r in ("q_", "t_") for c in LOCATION_COLUMNS], record=record)
    good = storage.read_parquet_dir(descriptions_dir(cfg.run_dir),
                                    ["pair_id", "description", "word_num"])
    record.counts["pairs_described"] = 0 if good is None else good.num_rows
    # The paper asks for "under WORD_NUM words" and filters nothing; counted, not rejected.
    for text, limit in ([] if good is None else zip(good.column("description").to_pylist(),
                                                    good.column("word_num").to_pylist())):
        record.counts["descriptions_over_word_num"] += len(text.split()) > limit
    record.counts["tries"] = tries
    record.outputs = {"descriptions": descriptions_dir(cfg.run_dir)}
    record.finish()
    manifest.record_stage(cfg.run_dir, record)
    return record


def run_instruct_stage(cfg: RunConfig) -> manifest.StageRecord:
    from megapairs_ray.synth.instruct import build_instruct_processor

    if cfg.instruct is None:
        raise SynthStageError("the config has no instruct section")
    ins = cfg.instruct
    record = manifest.StageRecord("instruct").start()
    src = descriptions_dir(cfg.run_dir)
    files = storage.list_files(src, ".parquet")
    if not storage.exists(_state_uri(cfg, "describe")):
        raise SynthStageError(f"no descriptions under {src}: run describe first")
    state = {"instruct": ins.model_dump(mode="json", exclude=RESOURCE_FIELDS),
             "describe": storage.read_json(_state_uri(cfg, "describe")),
             "description_files": [f.rsplit("/", 1)[-1] for f in files]}
    if _reset_if_changed(cfg, "instruct", state, [instructions_dir(cfg.run_dir),
                                                   layout.rejects_dir(cfg.run_dir, "instruct")]):
        record.counts["earlier_instructions_discarded"] = 1
    input_columns = [*PAIR_COLUMNS, "description"]
    if not files:  # nothing was described: nothing to instruct, and that is not an error
        record.counts["pairs_instructed"] = 0
    else:
        def first() -> ray.data.Dataset:
            ds = read_parquet_files(src, input_columns)
            assert ds is not None
            return ds

        tries = run_tries(
            cfg, "instruct", ins.retries, first,
            lambda todo, attempt: build_instruct_processor(ins, attempt, input_columns)(todo),
            input_columns, record)
        gather(cfg, "instruct", tries, instructions_dir(cfg.run_dir), drop=[], record=record)
        good = storage.read_parquet_dir(instructions_dir(cfg.run_dir), ["pair_id", "dropped"])
        record.counts["pairs_instructed"] = 0 if good is None else good.num_rows
        # What the junk filter did to the kept replies' items, by reason.
        for dropped in ([] if good is None else good.column("dropped").to_pylist()):
            for reason, n in json.loads(dropped).items():
                record.counts[f"items_filtered_{reason}"] += n
        record.counts["tries"] = tries
    record.outputs = {"instructions": instructions_dir(cfg.run_dir)}
    record.finish()
    manifest.record_stage(cfg.run_dir, record)
    return record
