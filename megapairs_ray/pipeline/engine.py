"""The stage engine: a stage is declared once (``Stage``) and run one way (``run_stage``).

A ``Stage`` says what it is; the engine does everything a stage's books need, the same way for
every stage (the books themselves are ``io/stepstate.py``):

1. the upstream checks: every stage in ``needs`` has run with this config's settings and
   finished every unit;
2. the settings: the stage's fingerprint is its ``settings`` plus the fingerprints of the
   output it reads; output made under other settings is removed before any work
   (``reconcile``) and the changed fields are reported;
3. the units: finished ones (a marker each) are skipped; ``run`` gets the others;
4. the tally: the manifest's counts and rejects are the sum of every unit's marker, this
   invocation's and earlier ones' (a marker's ``reject:<reason>`` keys are its rejects);
5. the stage's record in ``RUN/manifest.json``.

A stage's ``run`` does the work of its unfinished units, on Ray, and writes each unit's marker
(``ctx.state.mark_done``) after everything the unit wrote. It knows nothing of resume beyond
"these units are not done". Stages are listed, in order, in ``pipeline/stages.py``: the one list
the CLI, the dataset card and ``megapairs plan`` read.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from megapairs_ray import manifest
from megapairs_ray.io import layout, stepstate, storage
from megapairs_ray.io.rejects import upgrade_rejects_file
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.runtime import reenter_working_dir

log = logging.getLogger(__name__)

C = TypeVar("C")


@dataclass
class StageRun(Generic[C]):
    """What a stage's ``run`` works with: the config, the books, the record being written."""

    cfg: C
    state: StepState
    record: manifest.StageRecord
    units: list[str]
    # What changed since the output was made; a stage with books of its own (embed's spaces)
    # replaces it with what it recomputed.
    changed: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        """A count of this invocation (not summed from markers): work done now."""
        self.record.counts[key] += n

    def record_preview(self, counts: Counter[str]) -> None:
        """Write this stage's manifest record as it will read once ``counts`` are a marker's:
        for what a stage writes from the manifest before its last marker (export's card)."""
        preview = copy.deepcopy(self.record)
        for key, n in counts.items():
            (preview.rejects if key.startswith("reject:") else preview.counts)[
                key.removeprefix("reject:")] += n
        manifest.record_stage(self.cfg.run_dir, preview.finish())  # type: ignore[attr-defined]

    def tally(self) -> tuple[Counter[str], Counter[str]]:
        """(counts, rejects) summed over every unit's marker."""
        counts: Counter[str] = Counter()
        rejects: Counter[str] = Counter()
        for key, n in self.state.sum_counts(self.units).items():
            if key.startswith("reject:"):
                rejects[key.removeprefix("reject:")] += n
            else:
                counts[key] += n
        return counts, +rejects


@dataclass(frozen=True)
class Stage(Generic[C]):
    """A declared stage. Every callable takes the config (``ctx.cfg`` in ``run``)."""

    name: str
    help: str  # one line: the CLI command's help
    # Upstream stages whose output this one reads: checked finished, and their fingerprints
    # are part of this stage's (a change upstream recomputes this stage on its next run).
    needs: tuple[Stage[Any], ...]
    # The config fields this stage's output depends on (dotted name -> value).
    settings: Callable[[C], dict[str, Any]]
    # Where it writes (name -> uri, from ``io/layout.py``): removed when the settings change.
    outputs: Callable[[C], dict[str, str]]
    # Its units of work and resume (shard slugs, spaces, or one named unit).
    units: Callable[[C], list[str]]
    # Does the unfinished units' work (always called, with an empty list when all are done,
    # so a stage can refresh what it derives from finished units).
    run: Callable[[StageRun[C], list[str]], None]
    # What a change of settings removes, when not all of ``outputs`` (a stage whose parts
    # keep books of their own).
    removes: Callable[[C], list[str]] | None = None
    # The noun of "<noun>_skipped_done" in the record.
    unit_noun: str = "units"
    # Marker counts kept in the books but not shown in the manifest.
    hidden_counts: tuple[str, ...] = ()
    # Brings a marker written with the books v1 to the current shape: (unit, doc) -> doc.
    upgrade_marker: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    # The stage runs only when its config section is present (the synthesis steps).
    section: str | None = None
    # The upstream fingerprints, when they are not this run directory's own ``needs`` (the
    # gallery reads another run's images).
    upstream: Callable[[C], dict[str, str]] | None = None
    # What the stage read, for the record (shards, images, spaces...).
    inputs: Callable[[StageRun[C]], dict[str, Any]] | None = None
    # Counts derived once the tally is done (always-present keys, sums over counts).
    finish: Callable[[StageRun[C]], None] | None = None

    def state(self, cfg: C) -> StepState:
        """This stage's books under ``cfg``, reading its upstream's stored fingerprints."""
        run_dir = cfg.run_dir  # type: ignore[attr-defined]
        upstream = (self.upstream(cfg) if self.upstream is not None else
                    {n.name: stepstate.stored_fingerprint(run_dir, n.name) for n in self.needs})
        return StepState(run_dir, self.name, self.settings(cfg), upstream)

    def require_finished(self, cfg: C) -> None:
        """For a stage that reads this one: its output is there, made under ``cfg``'s
        settings, every unit finished."""
        self.state(cfg).require_finished(self.units(cfg))


def run_stage(stage: Stage[C], cfg: C) -> manifest.StageRecord:
    """Run one stage on ``cfg``'s run directory, resuming; returns its manifest record."""
    reenter_working_dir()
    record = manifest.StageRecord(stage.name).start()
    for need in stage.needs:
        need.require_finished(cfg)
    upgrade_books(stage, cfg.run_dir)  # type: ignore[attr-defined]
    state = stage.state(cfg)
    outputs = stage.outputs(cfg)
    removes = stage.removes(cfg) if stage.removes is not None else list(outputs.values())
    ctx = StageRun(cfg, state, record, [], state.reconcile(removes))
    ctx.units = stage.units(cfg)
    if stage.inputs is not None:
        record.inputs.update(stage.inputs(ctx))
    done = state.done_units()
    todo = [u for u in ctx.units if u not in done]
    record.counts[f"{stage.unit_noun}_skipped_done"] = len(ctx.units) - len(todo)
    stage.run(ctx, todo)
    if ctx.changed:
        record.counts["recomputed_changed_settings"] = 1
        record.inputs["changed"] = sorted(set(ctx.changed))
    counts, rejects = ctx.tally()
    record.counts.update({k: v for k, v in counts.items() if k not in stage.hidden_counts})
    record.rejects.update(rejects)
    if stage.finish is not None:
        stage.finish(ctx)
    record.outputs = outputs
    record.finish()
    # The config goes with every record: a later job reading this run (the gallery's
    # ``images_from``, an alignment's ``captions_from``) finds how its input was read.
    manifest.record_stage(cfg.run_dir, record,  # type: ignore[attr-defined]
                          config=cfg.model_dump(mode="json"))  # type: ignore[attr-defined]
    return record


def upgrade_books(stage: Stage[Any], run_dir: str) -> None:
    """A stage's output written with older books (``stepstate.BOOKS``): its markers and reject
    tables rewritten in the current shape, once, before the stage reads them."""
    version = stepstate.books_version(run_dir, stage.name)
    if version is None or version == stepstate.BOOKS:
        return
    changed = stage.upgrade_marker or (lambda unit, doc: doc)
    files = storage.list_files(layout.rejects_dir(run_dir, stage.name), ".parquet")
    rewritten = sum(upgrade_rejects_file(f, stage.name) for f in files)
    markers = stepstate.rewrite_markers(run_dir, stage.name, changed)
    log.warning("%s: books of %s upgraded from v%d to v%d (%d markers, %d reject tables)",
                stage.name, run_dir, version, stepstate.BOOKS, markers, rewritten)
