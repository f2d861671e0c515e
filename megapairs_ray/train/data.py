"""Training rows into the trainers, through Ray Data: triplets, or for an alignment run a
pipeline run's captioned images (``data.captions_from``; ``CaptionLoader`` reads each image where
ingest found it).

Two steps. ``prepare_data`` reads the annotations once (JSON lines parsed row by row, so one
broken line is one reject, not a failed file), checks every record and that every image it names
exists, and writes the result as parquet beside the run's checkpoints with a reason on each
rejected row; a relaunch reuses it while the data settings and the input files are the same
(books kept by ``io/stepstate``). ``training_dataset`` then streams the good rows through
``TripletLoader`` actors, which draw one instruction and the hard negatives per row afresh on
every pass, read the images (grouped by tar), decode and resize them to the model's input size.
Pixels leave the loaders as uint8 — a quarter of the bytes of floats — and are normalised on the
trainer's device. A row whose image fails to decode is dropped and tallied by reason in a small
actor the driver reads at the end.

Ray Train's controller and Ray Data's coordinators unpickle the loaders with the dataset, so
importing this module is part of their start-up: it imports no torch and no pixel code. The
loaders load those where they run (``_pixels``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from megapairs_ray.ids import held_out, id_of_path, image_ids
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.io.runs import ingested_images
from megapairs_ray.io.shards import LOCATION_COLUMNS, fetch_bytes_tolerant
from megapairs_ray.io.stepstate import StepState, stored_fingerprint
from megapairs_ray.io.triplets import (
    ImageStore,
    from_mmeb_train,
    is_mmeb_train,
    triplet_problem,
)
from megapairs_ray.models.inputs import ModelInput, tokenize_queries
from megapairs_ray.reasons import Reason
from megapairs_ray.train.config import HeldOutSplit, TrainConfig, TrainDataConfig

log = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".jsonl", ".json", ".parquet")
CAPTION_COLUMNS = ["image_id", *LOCATION_COLUMNS, "caption"]
PREPARED_SCHEMA = pa.schema([
    ("q_img", pa.string()), ("q_text", pa.list_(pa.string())), ("t_img", pa.string()),
    ("hns", pa.list_(pa.string())), ("reject_reason", pa.string()), ("source", pa.string()),
])


def annotation_files(uris: list[str]) -> list[str]:
    files: list[str] = []
    for uri in uris:
        if uri.endswith(ANNOTATION_SUFFIXES) and "*" not in uri:
            if not storage.exists(uri):
                raise FileNotFoundError(f"annotations not found: {uri}")
            files.append(uri)
            continue
        fs, path = storage.filesystem(uri)
        found = fs.glob(path) if "*" in uri else [path]
        for p in found:
            if fs.isdir(p):
                files += [f for f in storage.list_files(storage.with_scheme(fs, p))
                          if f.endswith(ANNOTATION_SUFFIXES)]
            elif p.endswith(ANNOTATION_SUFFIXES):
                files.append(storage.with_scheme(fs, p))
    if not files:
        raise FileNotFoundError(f"no annotation files (.jsonl/.json/.parquet) under {uris}")
    return sorted(set(files))


def image_root(cfg: TrainDataConfig) -> str:
    if cfg.image_root:
        return cfg.image_root.rstrip("/")
    first = cfg.annotations[0].rstrip("/")
    return first if not first.endswith(ANNOTATION_SUFFIXES) else posixpath.dirname(first)


def _rows_from_batch(batch: pa.Table) -> list[tuple[dict[str, Any] | None, str, str]]:
    """(record or None, reject reason if unparseable, source) per input row.

    A batch may mix JSON-lines rows (a ``text`` column) with parquet rows (the fields as
    columns): Ray Data unifies the blocks' schemas, leaving the other kind's columns null.
    """
    out: list[tuple[dict[str, Any] | None, str, str]] = []
    for row in batch.to_pylist():
        path = row.pop("path", None) or ""
        line = row.pop("text", None)
        if line is None:
            out.append((row, "", path))
            continue
        if not line.strip():
            continue  # blank lines are not records
        try:
            rec = json.loads(line)
        except ValueError:
            out.append((None, Reason.BAD_JSON, f"{path}: {line[:200]}"))
            continue
        if not isinstance(rec, dict):
            out.append((None, Reason.NOT_AN_OBJECT, f"{path}: {line[:200]}"))
            continue
        out.append((rec, "", path))
    return out


def _held_out_paths(paths: list[str], split: HeldOutSplit | None) -> set[str]:
    if split is None or not paths:
        return set()
    ids = np.array([id_of_path(p) for p in paths], dtype=np.int64)
    return {p for p, out in zip(paths, held_out(ids, split.fraction, split.seed)) if out}


class CheckTriplets:
    """Ray Data stage: validate records and the existence of every image they name; with a
    split, reject the rows whose query or target is held out and drop held-out hard
    negatives."""

    def __init__(self, root: str, num_hard_negatives: int, keep_query_negative: bool,
                 split: HeldOutSplit | None = None) -> None:
        self.store = ImageStore(root)
        self.h = num_hard_negatives
        self.keep_query = keep_query_negative
        self.split = split

    def _without_held_out(self, rec: dict[str, Any]) -> str:
        hns = rec["hns"] if isinstance(rec.get("hns"), list) else []
        paths = [p for p in (rec.get("q_img"), rec.get("t_img"), *hns) if isinstance(p, str)]
        out = _held_out_paths(paths, self.split)
        if rec.get("q_img") in out or rec.get("t_img") in out:
            return Reason.HELD_OUT
        rec["hns"] = [h for h in hns if h not in out]
        return ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols: dict[str, list[Any]] = {f: [] for f in PREPARED_SCHEMA.names}
        for rec, reason, source in _rows_from_batch(batch):
            if rec is not None and is_mmeb_train(rec):
                rec, mmeb_reason = from_mmeb_train(rec)
                reason = mmeb_reason or reason
            if rec is not None and self.split is not None:
                reason = self._without_held_out(rec)
            if rec is not None and not reason:
                reason = triplet_problem(rec, self.h, self.keep_query) or ""
            if not reason and rec is not None:
                paths = [rec["q_img"], rec["t_img"], *rec["hns"]]
                missing = [p for p, ok in zip(paths, self.store.exists_many(paths)) if not ok]
                if missing:
                    reason = Reason.MISSING_IMAGE
                    source = f"{source}: {missing[0]}"
            good = rec is not None and not reason
            cols["q_img"].append(rec.get("q_img") if good else None)
            cols["q_text"].append([t for t in rec["q_text"] if isinstance(t, str) and t.strip()]
                                  if good else None)
            cols["t_img"].append(rec.get("t_img") if good else None)
            cols["hns"].append(list(rec["hns"]) if good else None)
            cols["reject_reason"].append(reason)
            cols["source"].append(source if reason else "")
        return pa.table(cols, schema=PREPARED_SCHEMA)


PREPARE_STAGE = "prepare"  # the books of the prepared rows, in the training run's own folder
PREPARED_UNIT = "rows"  # its one unit: the marker, written last, holds the counts


def _data_settings(data: TrainDataConfig) -> dict[str, Any]:
    """What the prepared rows depend on: a relaunch with other data prepares them again."""
    fields = {"annotations", "captions_from", "image_root", "num_hard_negatives",
              "keep_query_negative", "split", "shuffle_targets"}
    if data.shuffle_targets:  # the seed draws the shuffle; otherwise only the loaders use it
        fields.add("seed")
    return data.model_dump(mode="json", include=fields)


def _file_identity(info: dict[str, Any]) -> str:
    """A file's size and version as its filesystem reports them: the ETag where there is one
    (object stores), else the modification time. Rewriting the file changes it."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"{info.get('size')} bytes, etag {str(etag).strip(chr(34))}"
    stamp = (info.get("mtime") or info.get("LastModified") or info.get("updated")
             or info.get("last_modified") or "")
    return f"{info.get('size')} bytes, modified {stamp}"


def annotation_identity(files: list[str]) -> dict[str, str]:
    """Each annotation file's uri -> its size and version (``_file_identity``)."""
    def one(uri: str) -> str:
        fs, path = storage.filesystem(uri)
        return _file_identity(fs.info(path))

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(files, pool.map(one, files)))


def prepare_state(cfg: TrainConfig) -> StepState:
    """The prepared rows' books, in the training run's folder. Their fingerprint covers what
    the rows are made from: the data settings, and the input itself: each annotation file's
    uri, size and version (the folders listed as ``annotation_files`` lists them), or, for an
    alignment run, the fingerprint of the ``captions_from`` run's ingest output."""
    run = layout.train_run_dir(cfg.checkpoint.storage_path, cfg.checkpoint.name)
    # The form of the prepared folder: 2 holds usable rows only, the rejects apart in the one
    # reject shape (1 kept them inline with a reason column): a folder of the other form is
    # prepared again.
    # Form 3: MMEB-train rows are read (they were rejects before).
    settings: dict[str, Any] = {"prepared.form": 3}
    settings.update({f"data.{k}": v for k, v in _data_settings(cfg.data).items()})
    upstream: dict[str, str] = {}
    if cfg.data.captions_from:
        upstream["ingest"] = stored_fingerprint(str(cfg.data.captions_from), "ingest")
    else:
        files = annotation_identity(annotation_files(cfg.data.annotations))
        settings.update({f"annotation file {uri}": ident for uri, ident in files.items()})
    return StepState(run, PREPARE_STAGE, settings, upstream)


def prepare_data(cfg: TrainConfig) -> tuple[str, dict[str, int]]:
    """Checked training rows as parquet in the run's folder; returns the folder and the
    counts: ``rows``, ``usable`` and one ``reject:<reason>`` per reason. Triplets, or an
    alignment run's captioned images.

    A relaunch reuses the rows while their books (``prepare_state``) match: the same data
    settings and the same input files. Anything else — a setting, an annotation file
    rewritten, added or removed, the captions run ingested again — and they are prepared
    again, with a one-line warning naming what changed; so are rows prepared by an earlier
    version that kept no books (a ``prepared/_counts.json``), and rows a killed attempt left
    half-written (no marker).

    If the run already has checkpoints, they were trained on the earlier rows, and Ray Train
    resumes from the newest of them (same ``checkpoint.storage_path`` and ``name``) on the new
    rows. That is left to the user, with a warning: continuing a run on corrected or extended
    data can be what is wanted; a fresh start is another ``checkpoint.name``."""
    state = prepare_state(cfg)
    out = layout.prepared_dir(state.run_dir)
    had_rows = storage.exists(out)
    changed = state.reconcile([out])  # logs what changed, if anything did
    removed = had_rows and not storage.exists(out)
    if removed and not changed:
        log.warning("%s was prepared by an earlier version that kept no record of its input: "
                    "preparing it again", out)
    if removed and storage.exists(layout.train_checkpoint_snapshot(state.run_dir)):
        log.warning("%s has checkpoints trained on the earlier rows: the training resumes from "
                    "the newest on the new rows (for a fresh start, use another "
                    "checkpoint.name)", state.run_dir)
    if PREPARED_UNIT in state.done_units():
        return out, dict(state.read_markers([PREPARED_UNIT])[0]["counts"])
    staging = layout.prepare_staging_dir(state.run_dir)
    rejects_dir = layout.rejects_dir(state.run_dir, PREPARE_STAGE)
    for leftover in (out, staging, rejects_dir):  # what a killed attempt left half-written
        storage.remove(leftover, recursive=True)
    checked = _check_captions(cfg) if cfg.data.captions_from else _check_triplets(cfg)
    checked.write_parquet(staging)
    # Each checked file -> its usable rows (the prepared data) and its rejects (the one
    # reject shape), by Ray tasks, a file each; the driver adds up their counts.
    files = storage.list_files(staging, suffix=".parquet")
    counts: Counter[str] = Counter({"rows": 0, "usable": 0})
    if files:
        split = ray.data.from_items([{"file": f} for f in files],
                                    override_num_blocks=len(files)).map_batches(
            _split_checked, fn_kwargs={"out": out, "rejects_dir": rejects_dir}, batch_size=1,
            num_cpus=cfg.data.loader_num_cpus)
        for row in split.iter_rows():
            counts.update(json.loads(row["counts"]))
    storage.remove(staging, recursive=True)
    if cfg.data.shuffle_targets:
        _shuffle_targets(out, cfg.data.seed)
    state.mark_done(PREPARED_UNIT, counts)
    return out, dict(counts)


def _split_checked(batch: dict[str, np.ndarray], out: str, rejects_dir: str,
                   ) -> dict[str, list[str]]:
    """One checked file -> its usable rows in ``out`` and its rejects in ``rejects_dir``
    (``io/rejects.py``), under the file's own name: a retried task rewrites the same two."""
    uri = str(batch["file"][0])
    name = uri.rsplit("/", 1)[-1]
    table = storage.read_parquet(uri)
    reason = table.column("reject_reason")
    good = table.filter(pc.equal(reason, "")).drop_columns(["reject_reason", "source"])
    bad = table.filter(pc.not_equal(reason, "")).to_pylist()
    if good.num_rows:
        storage.write_parquet(storage.join(out, name), good)
    if bad:
        write_rejects(storage.join(rejects_dir, name), [
            reject_row(PREPARE_STAGE, r["source"].split(": ", 1)[0],
                       [r["image_id"]] if r.get("image_id") is not None else [],
                       r["reject_reason"], r["source"]) for r in bad])
    counts = Counter({"rows": table.num_rows, "usable": good.num_rows})
    counts.update(f"reject:{r['reject_reason']}" for r in bad)
    return {"counts": [json.dumps(counts)]}


def _read_annotation_file(batch: dict[str, np.ndarray]) -> pa.Table:
    """One annotation file -> its rows, each with its ``path``: a JSON-lines file's lines as
    ``text`` (parsed by the check, so a bad line is a counted reject), a parquet file's
    records as columns. Bytes that are not UTF-8 are replaced, never fatal: the line they
    spoil is rejected like any other."""
    uri = str(batch["file"][0])
    if uri.endswith(".parquet"):
        table = storage.read_parquet(uri)
    else:
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        table = pa.table({"text": pa.array(text.splitlines(), pa.string())})
    return table.append_column("path", pa.array([uri] * table.num_rows, pa.string()))


def _check_triplets(cfg: TrainConfig) -> ray.data.Dataset:
    # One read task per file at the loaders' CPU share (Ray Data's readers list and inspect
    # files in tasks of a whole CPU each: see pipeline/datasets.py).
    files = annotation_files(cfg.data.annotations)
    ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    ds = ds.map_batches(_read_annotation_file, batch_size=1,
                        num_cpus=cfg.data.loader_num_cpus)
    return ds.map_batches(
        CheckTriplets, fn_constructor_args=(image_root(cfg.data), cfg.data.num_hard_negatives,
                                            cfg.data.keep_query_negative, cfg.data.split),
        batch_format="pyarrow", batch_size=1024, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=min(1.0, cfg.data.loader_num_cpus))


def _captioned(batch: dict[str, np.ndarray], split: HeldOutSplit | None) -> pa.Table:
    """One images table -> its rows, each with ``held_out``, ``no_caption`` or "" as its
    reject reason."""
    table = storage.read_parquet(str(batch["file"][0]), CAPTION_COLUMNS)
    caption = pc.utf8_trim_whitespace(pc.fill_null(table.column("caption"), ""))
    reason = pc.if_else(pc.equal(caption, ""), Reason.NO_CAPTION, "")
    if split is not None:
        out = held_out(table.column("image_id").to_numpy(), split.fraction, split.seed)
        reason = pc.if_else(pa.array(out, pa.bool_()), Reason.HELD_OUT, reason)
    return (table.set_column(table.schema.get_field_index("caption"), "caption", caption)
            .append_column("reject_reason", reason)
            .append_column("source", pc.if_else(pc.equal(reason, ""), "", table["file_uri"])))


def _check_captions(cfg: TrainConfig) -> ray.data.Dataset:
    tables, _ = ingested_images(str(cfg.data.captions_from), "data.captions_from")
    ds = ray.data.from_items([{"file": t} for _, t, _ in tables], override_num_blocks=len(tables))
    return ds.map_batches(_captioned, fn_kwargs={"split": cfg.data.split}, batch_size=1,
                          num_cpus=cfg.data.loader_num_cpus)


def _shuffle_targets(prepared: str, seed: int) -> None:
    """The negative control: the triplets' targets permuted among them (seeded); a
    triplet whose new target is its own query keeps its old one. The prepared files are
    rewritten in place, before training reads them (a control, not a scale path: the driver
    holds every target path)."""
    files = storage.list_files(prepared, suffix=".parquet")
    tables = [storage.read_parquet(f) for f in files]
    targets = np.array([p for t in tables for p in t.column("t_img").to_pylist()], object)
    shuffled = targets[np.random.default_rng(seed).permutation(len(targets))]
    start = 0
    for f, t in zip(files, tables):
        col = np.asarray(t.column("t_img").to_pylist(), object)
        queries = np.asarray(t.column("q_img").to_pylist(), object)
        new = shuffled[start : start + len(col)]
        start += len(col)
        col = np.where(new == queries, col, new)
        t = t.set_column(t.schema.get_field_index("t_img"), "t_img",
                         pa.array(col.tolist(), pa.string()))
        with storage.open_atomic(f, "wb") as out:
            pq.write_table(t, out)


def _read_usable(batch: dict[str, np.ndarray]) -> pa.Table:
    """One prepared parquet file: its rows, all usable (triplets or captioned images), in a
    fresh random order on every pass. Annotation files are often sorted (by query image, as
    the export writes them), and a batch of one query image's triplets teaches the contrast
    between its instructions only; a retriever slow to read text then learns nothing at all
    (the mllm twin on the toy set did not, until its rows were shuffled)."""
    table = storage.read_parquet(str(batch["file"][0]))
    return table.take(np.random.default_rng().permutation(table.num_rows))


@ray.remote(num_cpus=0)
class RejectTally:
    """Counts the rows the loaders had to drop, by reason, across all passes."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def tally_name(cfg: TrainConfig) -> str:
    return f"megapairs-train-rejects-{cfg.checkpoint.name}"


def _pixels(num_threads: float) -> Any:
    """The pixel code (``megapairs_ray.pixels``, and torch with it), for a loader actor: its
    import costs seconds of CPU, which the processes that only unpickle a loader never pay."""
    import torch

    from megapairs_ray import pixels

    torch.set_num_threads(max(1, math.floor(num_threads)))
    return pixels


def _decoded(x: Any) -> bool:
    """Whether ``pixels.decode_cpu`` decoded it (it returns the error for an image it could
    not); ``None`` for an image that was never read."""
    return x is not None and not isinstance(x, Exception)


class TripletLoader:
    """Ray Data stage: annotation rows -> uint8 pixels and token ids for one training step.

    Output columns: ``query_pixels`` [n,3,S,S], ``target_pixels`` [n,3,S,S],
    ``negative_pixels`` [n,H,3,S,S] (uint8), ``input_ids`` / ``attention_mask`` [n,L] (int64),
    and each image's key: ``query_keys``, ``target_keys`` [n], ``negative_keys`` [n,H].
    """

    def __init__(self, data: TrainDataConfig, model_input: ModelInput, tokenizer_path: str | None,
                 tally: str | None = None) -> None:
        from megapairs_ray.models.tokenizer import load_tokenizer

        self.pixels = _pixels(data.loader_num_cpus)
        self.data = data
        self.store = ImageStore(image_root(data))
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.input = model_input
        # Identity normalisation: resized, cropped pixels stay in 0..255 and travel as uint8;
        # the family's preprocessing otherwise, as eval and the service prepare them.
        self.spec = model_input.image_spec(normalise=False)
        self.pool = ThreadPoolExecutor(data.decode_threads)
        self.rng = np.random.default_rng([data.seed, os.getpid()])
        self.tally = ray.get_actor(tally) if tally else None

    def _negatives(self, hns: list[str]) -> list[str]:
        h = self.data.num_hard_negatives
        if h == 0:
            return []
        pool = hns[1:]
        if self.data.keep_query_negative:
            return [hns[0], *self.rng.choice(pool, size=h - 1, replace=False).tolist()]
        return self.rng.choice(pool, size=h, replace=False).tolist()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["q_img"])
        texts = [str(self.rng.choice(list(t))) for t in batch["q_text"]]
        negs = [self._negatives(list(h)) for h in batch["hns"]]
        per_row = [[str(batch["q_img"][i]), str(batch["t_img"][i]), *negs[i]] for i in range(n)]
        unique = sorted({p for row in per_row for p in row})
        raw = dict(zip(unique, self.store.read_many(unique)))
        ok_paths = [p for p in unique if isinstance(raw[p], bytes)]
        decoded = dict(zip(ok_paths, self.pixels.decode_cpu(
            [raw[p] for p in ok_paths], self.input.image_size, self.pool,
            self.input.transparency)))
        keep, dropped = [], Counter()
        for i, row in enumerate(per_row):
            bad = next((p for p in row if not _decoded(decoded.get(p))), None)
            if bad is None:
                keep.append(i)
            else:
                dropped["unreadable_image" if not isinstance(raw[bad], bytes)
                        else "undecodable_image"] += 1
        if dropped:
            log.warning("dropped %d of %d triplets: %s", sum(dropped.values()), n, dict(dropped))
            if self.tally is not None:
                self.tally.add.remote(dict(dropped))
        needed = sorted({p for i in keep for p in per_row[i]})
        slot = {p: j for j, p in enumerate(needed)}
        s, h = self.input.image_size, self.data.num_hard_negatives
        stack = self.pixels.to_uint8_input([decoded[p] for p in needed], self.spec)
        ids, mask = tokenize_queries(self.tokenizer, self.input, [texts[i] for i in keep],
                                     [True] * len(keep))
        return {
            "query_pixels": stack[[slot[per_row[i][0]] for i in keep]].reshape(-1, 3, s, s),
            "target_pixels": stack[[slot[per_row[i][1]] for i in keep]].reshape(-1, 3, s, s),
            "negative_pixels": stack[[slot[p] for i in keep for p in per_row[i][2:]]]
            .reshape(len(keep), h, 3, s, s),
            "input_ids": ids,
            "attention_mask": mask,
            # Each image's name as a stable 64-bit key (a frozen tower's feature cache).
            "query_keys": image_ids("", [per_row[i][0] for i in keep]),
            "target_keys": image_ids("", [per_row[i][1] for i in keep]),
            "negative_keys": image_ids("", [p for i in keep for p in per_row[i][2:]])
            .reshape(len(keep), h),
        }


class CaptionLoader:
    """Ray Data stage for alignment: captioned images -> uint8 ``target_pixels`` [n,3,S,S] and
    the captions' ``input_ids`` / ``attention_mask`` [n,L]; the images are read where ingest
    found them, grouped by file."""

    def __init__(self, data: TrainDataConfig, model_input: ModelInput, tokenizer_path: str | None,
                 tally: str | None = None) -> None:
        from megapairs_ray.models.tokenizer import load_tokenizer

        self.pixels = _pixels(data.loader_num_cpus)
        _, self.input_cfg = ingested_images(str(data.captions_from), "data.captions_from")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.input = model_input
        self.spec = model_input.image_spec(normalise=False)
        self.pool = ThreadPoolExecutor(data.decode_threads)
        self.tally = ray.get_actor(tally) if tally else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["caption"])
        rows = [{c: batch[c][i] for c in LOCATION_COLUMNS} for i in range(n)]
        raw = fetch_bytes_tolerant(rows, self.input_cfg)
        decoded = self.pixels.decode_cpu([r or b"\0" for r in raw], self.input.image_size,
                                         self.pool, self.input.transparency)
        keep = [i for i in range(n) if _decoded(decoded[i])]
        if len(keep) < n:
            dropped = Counter("unreadable_image" if not raw[i] else "undecodable_image"
                              for i in range(n) if not _decoded(decoded[i]))
            log.warning("dropped %d of %d captioned images: %s", n - len(keep), n, dict(dropped))
            if self.tally is not None:
                self.tally.add.remote(dict(dropped))
        stack = self.pixels.to_uint8_input([decoded[i] for i in keep], self.spec)
        ids, mask = tokenize_queries(self.tokenizer, self.input,
                                     [str(batch["caption"][i]) for i in keep], [False] * len(keep))
        return {"target_pixels": stack,
                "target_keys": np.asarray(batch["image_id"], np.int64)[keep],
                "input_ids": ids, "attention_mask": mask}


# The most file reads one loader stream plans: a long run over a small set would otherwise plan
# tens of thousands of read tasks up front. The trainers start another stream when one runs out.
MAX_STREAM_READS = 1024


def passes_needed(cfg: TrainConfig, usable: int) -> int:
    """Passes over ``usable`` rows that a run of ``optim.max_steps`` steps consumes."""
    o = cfg.optim
    per_step = o.batch_size * o.grad_accum_steps * cfg.scaling.num_workers
    return max(1, math.ceil(o.max_steps * per_step / usable))


def stream_passes(passes: int, files: int) -> int:
    """The passes one stream holds: ``passes``, within ``MAX_STREAM_READS`` reads of ``files``
    files, and at least one."""
    return max(1, min(passes, MAX_STREAM_READS // max(1, files)))


def training_dataset(cfg: TrainConfig, prepared: str, model_input: ModelInput,
                     tokenizer_path: str | None, tally: str | None,
                     passes: int = 1) -> ray.data.Dataset:
    """The loaders' stream: ``passes`` passes over the prepared files, each file read in a fresh
    order each time, in one execution. (One execution a pass would start the loader actors
    again on every pass: seconds each, more than a pass over a small set takes.)"""
    # One read task per prepared file and pass, at the loaders' CPU share: Ray Data's own file
    # listing asks for a whole CPU, which a small cluster busy with trainers may never have free.
    files = storage.list_files(prepared, suffix=".parquet")
    items = [{"file": f} for _ in range(stream_passes(passes, len(files))) for f in files]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_usable, batch_size=1, num_cpus=cfg.data.loader_num_cpus)
    loader = CaptionLoader if cfg.data.captions_from else TripletLoader
    return ds.map_batches(
        loader, fn_constructor_args=(cfg.data, model_input, tokenizer_path, tally),
        batch_size=cfg.data.loader_batch_rows, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.data.loader_actors),
        num_cpus=cfg.data.loader_num_cpus)
