"""Describe and instruct on Ray: mined pairs -> descriptions -> instructions.

Pairs carry image ids. One metadata join (ids and byte locations, never bytes:
``pipeline/locations.py``) gives each pair the locations of its two images; each describe batch
then reads just those images, grouped by file.

Every try of a step streams its rows through ``ray.data.llm`` and commits the answers to
``RUN/synth/<step>/try-<n>/part-*.parquet`` in parts of ``commit_rows`` rows, each part written
whole by a Ray worker. A rerun of an unfinished try reads the committed parts' pair ids and sends
only the other rows to the engine: a crash loses at most the parts in flight. A finished try has
a marker with its counts and is not run again; the next try reads back only the rejects another
try could fix. At the end, Ray tasks gather the usable rows of every try into
``RUN/descriptions`` or ``RUN/instructions`` and the final rejects into ``RUN/rejects/<step>``,
part by part; the driver only adds up their counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from megapairs_ray import manifest
from megapairs_ray.config import LLMStageConfig, RunConfig, output_settings
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.pipeline.datasets import read_parquet_files
from megapairs_ray.pipeline.engine import Stage, StageRun
from megapairs_ray.pipeline.locations import Locations
from megapairs_ray.pipeline.mine import MINE
from megapairs_ray.synth.images import LOCATION_COLUMNS, MISSING_IMAGE, UNREADABLE_IMAGE

PAIR_COLUMNS = ("pair_id", "query_id", "target_id", "spaces", "similarities", "hard_negatives")
GATHERED = "gathered"  # the unit marking a step's gather done
# Reasons another try cannot change.
FINAL_REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE)


class SynthStageError(MegapairsError, RuntimeError):
    """A synthesis step cannot start: what it needs is missing."""


def _worth_retrying(table: pa.Table) -> pa.Array:
    """Rejected rows that another try could fix (not a missing or unreadable image)."""
    reason = table.column("reject_reason")
    final = pc.starts_with(reason, FINAL_REASONS[0])
    for r in FINAL_REASONS[1:]:
        final = pc.or_(final, pc.starts_with(reason, r))
    return pc.and_(pc.not_equal(reason, ""), pc.invert(final))


def located_pairs(cfg: RunConfig) -> ray.data.Dataset:
    """Mined pairs with ``q_<location>`` and ``t_<location>`` columns (null: not found)."""
    pairs = read_parquet_files(layout.pairs_dir(cfg.run_dir), PAIR_COLUMNS)
    if pairs is None:
        raise SynthStageError(f"no mined pairs under {cfg.run_dir}/pairs: run mine first")
    return Locations.of(cfg.run_dir).locate_pairs(pairs)


def _reason(r: str) -> str:
    return r.split(":")[0]


def _part_counts(table: pa.Table) -> Counter[str]:
    counts: Counter[str] = Counter({"rows": table.num_rows})
    for reason in table.column("reject_reason").to_pylist():
        counts["usable" if not reason else "reject:" + _reason(reason)] += 1
    return counts


def commit_part(batch: pa.Table, out: str) -> dict[str, list[str]]:
    """Write one part of a try's answers, whole. Its name comes from its pair ids, so a task
    Ray retries writes the same part again rather than a second copy."""
    ids = np.sort(batch.column("pair_id").to_numpy())
    name = f"part-{hashlib.blake2b(ids.tobytes(), digest_size=12).hexdigest()}.parquet"
    storage.write_parquet(storage.join(out, name), batch)
    return {"counts": [json.dumps(_part_counts(batch))]}


def _committed_ids(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"pair_id": storage.read_parquet(str(batch["file"][0]), ["pair_id"])
            .column("pair_id").to_numpy()}


def committed_pair_ids(out: str) -> np.ndarray:
    """The pair ids of a try's committed parts, sorted (read by Ray tasks, a part each)."""
    ds = read_parquet_files(out, ["pair_id"])
    if ds is None:
        return np.zeros(0, np.int64)
    ids = [b["pair_id"] for b in ds.iter_batches(batch_format="numpy", batch_size=None)]
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _drop_committed(batch: pa.Table, committed: np.ndarray) -> pa.Table:
    ids = batch.column("pair_id").to_numpy()
    pos = np.searchsorted(committed, ids).clip(max=max(len(committed) - 1, 0))
    done = committed[pos] == ids if len(committed) else np.zeros(len(ids), bool)
    return batch.filter(pa.array(~done))


def _count_part(batch: dict[str, Any]) -> dict[str, list[str]]:
    t = storage.read_parquet(str(batch["file"][0]), ["reject_reason"])
    return {"counts": [json.dumps(_part_counts(t))]}


def try_counts(out: str) -> Counter[str]:
    """Rows, usable rows and rejects by reason over a try's committed parts."""
    total: Counter[str] = Counter()
    files = storage.list_files(out, ".parquet")
    if not files:
        return total
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    for row in ds.map_batches(_count_part, batch_size=1, num_cpus=0.25).iter_rows():
        total.update(json.loads(row["counts"]))
    return total


def run_tries(state: StepState, section: LLMStageConfig, retries: int,
              first_input: Callable[[], ray.data.Dataset],
              pipeline_for_try: Callable[[ray.data.Dataset, int], ray.data.Dataset],
              input_columns: Sequence[str], record: manifest.StageRecord) -> int:
    """Run up to ``1 + retries`` tries (fewer when no reject is worth another); returns how
    many tries there are."""
    step, run_dir = state.stage, state.run_dir
    done = state.done_units()
    last = 0
    for attempt in range(retries + 1):
        unit, out = f"try-{attempt}", layout.try_dir(run_dir, step, attempt)
        if unit in done:
            counts = Counter(state.read_markers([unit])[0]["counts"])
            record.counts[f"try_{attempt}_resumed"] = counts["rows"]
        else:
            if attempt == 0:
                todo = first_input()
            else:
                todo = read_parquet_files(layout.try_dir(run_dir, step, attempt - 1),
                                          input_columns, keep=_worth_retrying)
                assert todo is not None
            committed = committed_pair_ids(out)
            if len(committed):  # an interrupted try: only what it did not commit goes again
                record.counts[f"try_{attempt}_rows_already_committed"] = len(committed)
                todo = todo.map_batches(_drop_committed, fn_args=(committed,),
                                        batch_format="pyarrow", num_cpus=section.num_cpus)
            # Blocks of at most ``commit_rows`` rows: a task holds no more uncommitted answers.
            # Cut before the engines start: the repartition's tasks take a whole CPU each, and
            # on a small node the engine and fetch actors would leave them none (a deadlock).
            todo = todo.repartition(target_num_rows_per_block=section.commit_rows).materialize()
            answers = pipeline_for_try(todo, attempt).map_batches(
                commit_part, fn_kwargs={"out": out}, batch_size=section.commit_rows,
                batch_format="pyarrow", num_cpus=section.num_cpus)
            for _ in answers.iter_rows():
                record.counts[f"try_{attempt}_parts_committed"] += 1
            counts = try_counts(out)
            state.mark_done(unit, counts)
        last = attempt
        if not any(n for k, n in counts.items()
                   if k.startswith("reject:") and k[7:] not in FINAL_REASONS):
            break
    return last + 1


def _gather_part(batch: dict[str, Any], step: str, good_dir: str, rejects_dir: str, last: bool,
                 drop: Sequence[str], extra: Callable[[pa.Table], Counter[str]] | None,
                 ) -> dict[str, list[str]]:
    """One committed part: usable rows to ``good_dir``, final rejects to ``rejects_dir``."""
    uri, attempt = str(batch["file"][0]), int(batch["attempt"][0])
    t = storage.read_parquet(uri)
    name = f"try-{attempt}-{uri.rsplit('/', 1)[-1]}"
    ok = pc.equal(t.column("reject_reason"), "")
    keep = [c for c in t.column_names if c not in drop]
    good = t.filter(ok).select(keep)
    counts: Counter[str] = Counter({f"usable_after_try_{attempt}": good.num_rows})
    if good.num_rows:
        storage.write_parquet(storage.join(good_dir, name), good)
        if extra is not None:
            counts.update(extra(good))
    # A try's rejects are final when no later try took them: all of the last try's, and
    # those of earlier tries whose reason another try cannot change.
    final = pc.invert(ok) if last else pc.and_(pc.invert(ok), pc.invert(_worth_retrying(t)))
    bad = t.filter(final).select(keep)
    if bad.num_rows:
        write_rejects(storage.join(rejects_dir, name), [_reject(r, attempt, step)
                                                        for r in bad.to_pylist()])
    counts.update("reject:" + _reason(r) for r in bad.column("reject_reason").to_pylist())
    return {"counts": [json.dumps(counts)]}


def _reject(row: dict[str, Any], attempt: int, step: str) -> dict[str, Any]:
    """A final reject of a synthesis step in the one shape: the model's answer in its detail."""
    reason = row.pop("reject_reason")
    payload = {k: v for k, v in row.items() if k not in PAIR_COLUMNS}
    return reject_row(step, f"try-{attempt}", [row["pair_id"]], _reason(reason), reason,
                      **payload)


def gather(state: StepState, tries: int, good_dir: str, drop: Sequence[str],
           extra: Callable[[pa.Table], Counter[str]] | None = None) -> None:
    """Usable rows of every try into ``good_dir``; final rejects into ``rejects/<step>``;
    ``extra`` counts more about the usable rows. The ``gathered`` marker, last, carries the
    step's counts."""
    rejects_dir = layout.rejects_dir(state.run_dir, state.stage)
    storage.remove(good_dir, recursive=True)
    storage.remove(rejects_dir, recursive=True)
    items = [{"file": f, "attempt": a} for a in range(tries)
             for f in storage.list_files(layout.try_dir(state.run_dir, state.stage, a),
                                         ".parquet")]
    counts: Counter[str] = Counter({f"usable_after_try_{a}": 0 for a in range(tries)})
    if items:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _gather_part_of_tries, batch_size=1, num_cpus=0.25, fn_kwargs={
                "step": state.stage, "good_dir": good_dir, "rejects_dir": rejects_dir,
                "drop": list(drop), "extra": extra, "tries": tries})
        for row in ds.iter_rows():
            counts.update(json.loads(row["counts"]))
    counts["tries"] = tries
    state.mark_done(GATHERED, counts)


def _gather_part_of_tries(batch: dict[str, Any], tries: int, **kwargs: Any,
                          ) -> dict[str, list[str]]:
    return _gather_part(batch, last=int(batch["attempt"][0]) == tries - 1, **kwargs)


def _word_counts(good: pa.Table) -> Counter[str]:
    # The paper asks for "under WORD_NUM words" and filters nothing; counted, not rejected.
    over = sum(len(text.split()) > limit for text, limit in zip(
        good.column("description").to_pylist(), good.column("word_num").to_pylist()))
    return Counter({"descriptions_over_word_num": over})


def _filtered_items(good: pa.Table) -> Counter[str]:
    # What the junk filter did to the kept replies' items, by reason.
    counts: Counter[str] = Counter()
    for dropped in good.column("dropped").to_pylist():
        for reason, n in json.loads(dropped).items():
            counts[f"items_filtered_{reason}"] += n
    return counts


def _usable(ctx: StageRun[RunConfig], name: str) -> None:
    """``pairs_<name>``: the usable rows over every try."""
    ctx.count(f"pairs_{name}", sum(n for k, n in ctx.record.counts.items()
                                   if k.startswith("usable_after_try_")))


def _run_describe(ctx: StageRun[RunConfig], todo: list[str]) -> None:
    from megapairs_ray.synth.describe import FetchPairImages, build_describe_processor

    if not todo:
        return
    cfg, d = ctx.cfg, ctx.cfg.describe
    assert d is not None
    input_columns = [*PAIR_COLUMNS, *(r + c for r in ("q_", "t_") for c in LOCATION_COLUMNS)]

    def pipeline(todo: ray.data.Dataset, attempt: int) -> ray.data.Dataset:
        fetched = todo.map_batches(
            FetchPairImages, fn_constructor_args=(cfg.input, d.image_size),
            batch_size=d.fetch_batch_size, num_cpus=d.fetch_num_cpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=d.fetch_actors))
        return build_describe_processor(d, attempt, input_columns)(fetched)

    tries = run_tries(ctx.state, d, d.retries, lambda: located_pairs(cfg).materialize(),
                      pipeline, input_columns, ctx.record)
    gather(ctx.state, tries, layout.descriptions_dir(cfg.run_dir),
           drop=[r + c for r in ("q_", "t_") for c in LOCATION_COLUMNS], extra=_word_counts)


def _run_instruct(ctx: StageRun[RunConfig], todo: list[str]) -> None:
    from megapairs_ray.synth.instruct import build_instruct_processor

    if not todo:
        return
    cfg, ins = ctx.cfg, ctx.cfg.instruct
    assert ins is not None
    src = layout.descriptions_dir(cfg.run_dir)
    input_columns = [*PAIR_COLUMNS, "description"]

    def first() -> ray.data.Dataset:
        ds = read_parquet_files(src, input_columns)
        # Nothing was described: nothing to instruct, and that is not an error.
        return ds if ds is not None else ray.data.from_items([])

    tries = 0
    if storage.list_files(src, ".parquet"):
        tries = run_tries(
            ctx.state, ins, ins.retries, first,
            lambda todo, attempt: build_instruct_processor(ins, attempt, input_columns)(todo),
            input_columns, ctx.record)
    gather(ctx.state, tries, layout.instructions_dir(cfg.run_dir), drop=[],
           extra=_filtered_items)


def _upgrade_marker(unit: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Books v1 kept the number of tries beside the gathered counts."""
    if unit == GATHERED and "tries" in doc:
        doc["counts"]["tries"] = doc.pop("tries")
    return doc


def step_settings(step: str) -> Callable[[RunConfig], dict[str, Any]]:
    """A synthesis step's settings: its section's (its model, prompts and sampling)."""

    def settings(cfg: RunConfig) -> dict[str, Any]:
        section = getattr(cfg, step)
        if section is None:
            raise SynthStageError(f"the config has no {step} section")
        return output_settings(section, prefix=f"{step}.")

    return settings


def _llm_step(name: str, help: str, needs: Stage[RunConfig], good: str,
              good_dir: Callable[[str], str], run: Callable[[StageRun[RunConfig], list[str]], None],
              finish: Callable[[StageRun[RunConfig]], Any]) -> Stage[RunConfig]:
    """Describe or instruct: a model over the rows of ``needs``, in tries. One unit, done when
    every try's usable rows are gathered into ``good_dir`` (the tries are units of the same
    books, resumed part by part: ``run_tries``)."""
    return Stage(
        name=name, help=help, needs=(needs,), settings=step_settings(name),
        outputs=lambda cfg: {good: good_dir(cfg.run_dir),
                             "tries": layout.synth_dir(cfg.run_dir, name),
                             "rejects": layout.rejects_dir(cfg.run_dir, name)},
        units=lambda cfg: [GATHERED], run=run, section=name, upgrade_marker=_upgrade_marker,
        finish=finish)


DESCRIBE = _llm_step(
    "describe", "Describe each mined pair's two images with the vision-language model.",
    MINE, "descriptions", layout.descriptions_dir, _run_describe,
    lambda ctx: (_usable(ctx, "described"), ctx.count("descriptions_over_word_num", 0)))
INSTRUCT = _llm_step(
    "instruct", "Turn each description into retrieval instructions with the LLM.",
    DESCRIBE, "instructions", layout.instructions_dir, _run_instruct,
    lambda ctx: _usable(ctx, "instructed"))
