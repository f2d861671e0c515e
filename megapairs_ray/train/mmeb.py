"""MMEB, the Massive Multimodal Embedding Benchmark: 36 datasets in four meta-tasks, each row a
query and its own short list of candidates (``megapairs eval --benchmark mmeb``).

Layout (TIGER-Lab/MMEB-eval as published): one folder per dataset under the benchmark folder,
holding its ``test`` parquet (``<dataset>/test-*.parquet``) with the columns ``qry_text``,
``qry_img_path``, ``tgt_text`` (list) and ``tgt_img_path`` (list), the positive first. Image
paths are relative to an images folder (the published ``images.zip``, unpacked; by default
``<benchmark>/eval_images``); an empty path means no image. Texts carry the published
instruction prefixes and an image placeholder (``<|image_1|>``): the placeholder is removed and
the rest used as given. A CLIP-family retriever turns each (image, text) into one vector by its
score fusion, ``normalize(image + text)`` (``models/retriever.py``), image-only or text-only
where one is missing.

Score: Precision@1 per dataset, as the official evaluation counts it: each row's candidates
ranked by cosine similarity to its query, a hit when the positive (index 0) wins. An exact tie
with the positive is a miss (the project's rule for GeneCIS too; the official argmax would take
the first). Aggregates: each meta-task's mean, the in-distribution (IND, the 20 datasets of
MMEB's training sets) and out-of-distribution (OOD, the other 16) means, and the overall mean,
each over the datasets evaluated.

Scale: each dataset's distinct (text, image) items, queries and candidates together, are
embedded once (candidates shared across rows, like a classification dataset's label texts, go
through the model once), and every dataset's items stream through one Ray Data actor pool, so
the model is loaded once per actor for the whole run, not once per dataset. Each dataset is
scored as soon as its last item is back and its result written to the work folder, so a rerun
with the same checkpoint recomputes nothing finished.

Problems with a dataset are counted and named, never a crash: a parquet that cannot be read or
lacks the columns (the dataset is skipped); a row without candidates, or with candidate lists
of different lengths; an image that is missing, unreadable or undecodable (each row that needs
it is not scored).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage
from megapairs_ray.io.triplets import without_placeholder
from megapairs_ray.reasons import Reason

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
# Dataset -> (meta-task, IND or OOD), in the order MMEB's tables print them. IND: the 20
# datasets whose training sets are MMEB-train (VLM2Vec's split); OOD: the 16 others.
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    **{d: ("Classification", "IND") for d in (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{d: ("Classification", "OOD") for d in (
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{d: ("VQA", "IND") for d in (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{d: ("VQA", "OOD") for d in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{d: ("Retrieval", "IND") for d in (
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
        "NIGHTS", "WebQA")},
    **{d: ("Retrieval", "OOD") for d in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("Grounding", "IND"),
    **{d: ("Grounding", "OOD") for d in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
METRIC = "P@1"
# Row problems (counted per dataset; the row is not scored).
NO_CANDIDATES = "no_candidates"
CANDIDATES_MISMATCH = "candidate_lists_differ"
CANDIDATES_NOT_LISTS = "candidates_not_lists"
MISSING_COLUMNS = "missing_columns"  # the whole dataset
UNREADABLE_PARQUET = "unreadable_parquet"  # the whole dataset


class MMEBError(MegapairsError, ValueError):
    """An MMEB folder the runner cannot evaluate at all (no dataset found, unknown names)."""


Item = tuple[str, str]  # (text as published, image path relative to the images folder; "": none)


@dataclass
class Subset:
    """One dataset's rows, as item indices, and what was wrong with the rest."""

    name: str
    items: list[Item] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    candidates: list[list[int]] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # problem -> its first instance

    def problem(self, kind: str, example: str, n: int = 1) -> None:
        self.problems[kind] += n
        self.examples.setdefault(kind, example)


def query_text(text: str) -> str | None:
    """The text a CLIP-family retriever embeds: the published text without its image
    placeholder; None when nothing is left."""
    return without_placeholder(text) or None


def dataset_folders(root: str, names: Sequence[str] | None = None) -> list[str]:
    """The datasets to evaluate: ``names`` if given (each must be a folder), else every folder
    of ``root`` that holds a parquet, MMEB's own order first."""
    present = {d.rstrip("/").rsplit("/", 1)[-1] for d in storage.list_dirs(root)}
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            raise MMEBError(f"no dataset folder {', '.join(missing)} under {root}")
        return list(names)
    # One level deep: a recursive listing would walk the unpacked images (every file of them).
    fs, base = storage.filesystem(root)
    found = [d for d in present
             if fs.glob(f"{base.rstrip('/')}/{d}/*.parquet")]
    order = list(MMEB_DATASETS)
    found.sort(key=lambda d: (order.index(d) if d in order else len(order), d))
    if not found:
        raise MMEBError(f"no MMEB dataset under {root}: expected folders like "
                        f"{root.rstrip('/')}/ImageNet-1K/test-00000-of-00001.parquet")
    return found


def read_subset(root: str, name: str, split: str = "test") -> Subset:
    """A dataset's rows as item indices; malformed rows counted, not raised."""
    sub = Subset(name)
    folder = storage.join(root, name)
    files = [f for f in storage.list_files(folder, ".parquet")
             if f.rsplit("/", 1)[-1].startswith(split)]
    if not files:
        sub.problem(f"no_{split}_parquet", folder)
        return sub
    index: dict[Item, int] = {}

    def item(text: Any, path: Any) -> int:
        key = (str(text or ""), str(path or ""))
        if key not in index:
            index[key] = len(sub.items)
            sub.items.append(key)
        return index[key]

    for uri in sorted(files):
        try:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
            missing = [c for c in COLUMNS if c not in schema.names]
            table = None if missing else storage.read_parquet(uri, list(COLUMNS))
        except (OSError, pa.ArrowException) as e:  # e.g. a Git LFS pointer, not the parquet
            sub.problem(UNREADABLE_PARQUET, f"{uri}: {type(e).__name__}: {e}"[:300])
            return Subset(name, problems=sub.problems, examples=sub.examples)
        if table is None:
            sub.problem(MISSING_COLUMNS, f"{uri} has no {', '.join(missing)}")
            return Subset(name, problems=sub.problems, examples=sub.examples)
        for r in table.to_pylist():
            texts, paths = r["tgt_text"], r["tgt_img_path"]
            # A null list beside a full one: text-only (or image-only) candidates.
            if texts is None and isinstance(paths, list):
                texts = [""] * len(paths)
            if paths is None and isinstance(texts, list):
                paths = [""] * len(texts)
            texts, paths = texts or [], paths or []
            where = f"{uri}: query {r['qry_text']!r:.80}"
            if not isinstance(texts, list) or not isinstance(paths, list):
                sub.problem(CANDIDATES_NOT_LISTS, f"{where} (tgt_text and tgt_img_path must be "
                                                  "lists)")
            elif not texts and not paths:
                sub.problem(NO_CANDIDATES, where)
            elif len(texts) != len(paths):
                sub.problem(CANDIDATES_MISMATCH, f"{where} ({len(texts)} texts, "
                                                 f"{len(paths)} images)")
            else:
                sub.queries.append(item(r["qry_text"], r["qry_img_path"]))
                sub.candidates.append([item(t, p) for t, p in zip(texts, paths)])
    return sub


# ----------------------------------------------------------------------------- embedding


class MMEBEncoder:
    """Ray Data actor: (text, image path) items in, unit-norm retriever vectors out. An image
    that is missing or does not decode gives a zero vector and a status naming it."""

    def __init__(self, checkpoint: str, images_root: str, device: str = "cpu",
                 precision: str = "fp32", batch_size: int = 64, threads: int = 4) -> None:
        from megapairs_ray.models.retriever import RetrieverEncoder

        self.encoder = RetrieverEncoder(checkpoint, device=device, batch_size=batch_size,
                                        threads=threads, precision=precision)
        self.images_root = images_root
        self.pool = ThreadPoolExecutor(threads)

    def _read(self, path: str) -> bytes | Exception:
        try:
            fs, p = storage.filesystem(storage.join(self.images_root, path))
            return fs.cat_file(p)
        except OSError as e:  # missing, a folder, unreadable: that item's rows are not scored
            return e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["item"])
        texts = [query_text(str(t)) for t in batch["text"]]
        paths = [str(p) for p in batch["image"]]
        status = np.array([""] * n, dtype=object)
        with_image = [i for i in range(n) if paths[i]]
        raw = dict(zip(with_image, self.pool.map(self._read, [paths[i] for i in with_image])))
        readable = [i for i in with_image if not isinstance(raw[i], Exception)]
        decoded = dict(zip(readable, self.encoder.decode([raw[i] for i in readable])))
        for i in with_image:
            if isinstance(raw[i], Exception):
                reason = (Reason.MISSING_IMAGE if isinstance(raw[i], FileNotFoundError)
                          else Reason.UNREADABLE_IMAGE)
                status[i] = f"{reason}: {paths[i]}: {raw[i]}"[:300]
            elif isinstance(decoded[i], Exception):
                status[i] = f"{Reason.DECODE_FAILED}: {paths[i]}: {decoded[i]}"[:300]
        vectors = np.zeros((n, self.encoder.dim), dtype=np.float32)
        ok = [i for i in range(n) if not status[i] and (paths[i] or texts[i] is not None)]
        empty = [i for i in range(n) if not paths[i] and texts[i] is None]
        for i in empty:
            status[i] = "no_content: neither an image nor a text"
        if ok:
            vectors[ok] = self.encoder.queries_of_decoded(
                [decoded.get(i) for i in ok], [texts[i] for i in ok])
        return {"subset": batch["subset"], "item": batch["item"], "vector": vectors,
                "status": status}


@dataclass
class EncoderSettings:
    """How the items are embedded: the actor pool and each actor's encoder."""

    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64
    threads: int = 4
    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


def embed_items(subsets: Sequence[Subset], checkpoint: str, images_root: str,
                enc: EncoderSettings) -> Iterator[tuple[Subset, np.ndarray, list[str]]]:
    """Every item of every subset through one actor pool (the actors load the model once for
    the whole run); yields each subset with its vectors (item order) and statuses ("" when
    embedded) as soon as all its items are back. Only unfinished subsets hold vectors."""
    import ray

    rows = [{"subset": s, "item": i, "text": t, "image": p}
            for s, sub in enumerate(subsets) for i, (t, p) in enumerate(sub.items)]
    if not rows:
        return
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(256, len(rows) // 256)))
    out = ds.map_batches(
        MMEBEncoder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "images_root": images_root,
                               "device": enc.device, "precision": enc.precision,
                               "batch_size": enc.batch_size, "threads": enc.threads},
        batch_size=enc.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=enc.min_actors, max_size=enc.max_actors),
        num_cpus=enc.num_cpus, num_gpus=enc.num_gpus)
    vectors: dict[int, np.ndarray] = {}
    status: dict[int, list[str]] = {}
    left = {s: len(sub.items) for s, sub in enumerate(subsets) if sub.items}
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        for s in np.unique(b["subset"]):
            mine = b["subset"] == s
            s = int(s)
            if s not in vectors:
                vectors[s] = np.zeros((len(subsets[s].items), b["vector"].shape[1]),
                                      np.float32)
                status[s] = [""] * len(subsets[s].items)
            idx = b["item"][mine].astype(np.int64)
            vectors[s][idx] = b["vector"][mine]
            for i, st in zip(idx, b["status"][mine]):
                status[s][i] = str(st)
            left[s] -= len(idx)
            if left[s] == 0:
                yield subsets[s], vectors.pop(s), status.pop(s)


# ----------------------------------------------------------------------------- scoring


def precision_at_1(vectors: np.ndarray, queries: Sequence[int],
                   candidates: Sequence[Sequence[int]]) -> list[bool]:
    """Per row: does the positive (candidate 0) score strictly above every other candidate?"""
    hits = []
    for q, cands in zip(queries, candidates):
        scores = vectors[list(cands)] @ vectors[q]
        hits.append(bool(len(scores) == 1 or scores[0] > scores[1:].max()))
    return hits


def score_subset(sub: Subset, vectors: np.ndarray, status: Sequence[str]) -> dict[str, Any]:
    """The dataset's P@1 over the rows whose items all embedded; the others counted."""
    failed = {i: s for i, s in enumerate(status) if s}
    for s in failed.values():
        sub.problem(s.split(":", 1)[0] + "_items", s)
    keep = [r for r, (q, c) in enumerate(zip(sub.queries, sub.candidates))
            if q not in failed and not any(i in failed for i in c)]
    if len(keep) < len(sub.queries):
        sub.problems["rows_not_scored"] += len(sub.queries) - len(keep)
    hits = precision_at_1(vectors, [sub.queries[r] for r in keep],
                          [sub.candidates[r] for r in keep])
    return result_of(sub, len(keep), 100.0 * float(np.mean(hits)) if hits else None,
                     gallery=len(sub.items))


def result_of(sub: Subset, scored_rows: int = 0, p1: float | None = None, gallery: int = 0,
              ) -> dict[str, Any]:
    """A dataset's result in the eval report's form, with its problems."""
    meta, dist = MMEB_DATASETS.get(sub.name, ("other", "other"))
    return {"benchmark": sub.name, "meta_task": meta, "distribution": dist,
            "queries": scored_rows, "gallery": gallery,
            "metrics": {METRIC: p1}, "problems": dict(sub.problems),
            "problem_examples": dict(sub.examples)}


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each meta-task's mean P@1, then IND, OOD and Overall, over the MMEB datasets scored."""
    scored = [r for r in results
              if r["meta_task"] != "other" and r["metrics"][METRIC] is not None]
    out: dict[str, float] = {}
    groups = [(m, lambda r, m=m: r["meta_task"] == m) for m in META_TASKS]
    groups += [(d, lambda r, d=d: r["distribution"] == d) for d in ("IND", "OOD")]
    groups.append(("Overall", lambda r: True))
    for name, member in groups:
        values = [r["metrics"][METRIC] for r in scored if member(r)]
        if values:
            out[name] = float(np.mean(values))
    return out


# ----------------------------------------------------------------------------- the runner


def run_mmeb(checkpoint: str, root: str, images: str | None = None, split: str = "test",
             datasets: Sequence[str] | None = None, work: str | None = None,
             encoder: EncoderSettings | None = None, log: Any = print) -> dict[str, Any]:
    """Every dataset's P@1 and the aggregates; each finished dataset kept under ``work``."""
    enc = encoder or EncoderSettings()
    images_root = images or storage.join(root, "eval_images")
    settings = {"checkpoint": checkpoint, "data": root, "images": images_root, "split": split,
                "precision": enc.precision}
    names = dataset_folders(root, datasets)
    results: dict[str, dict[str, Any]] = {}
    todo: list[Subset] = []
    for name in names:
        done = storage.join(work, f"{name}.json") if work else None
        prior = storage.read_json(done) if done and storage.exists(done) else None
        if prior is not None and prior.get("settings") == settings:
            log(f"{name}: finished before, not recomputed")
            results[name] = prior["result"]
            continue
        sub = read_subset(root, name, split)
        if sub.queries:
            todo.append(sub)
        else:
            results[name] = result_of(sub)
    # Written as each dataset finishes, so a run stopped midway keeps what it finished. A
    # dataset with nothing scored is not kept: a rerun reads it again (it may have been fixed).
    for sub, vectors, status in (embed_items(todo, checkpoint, images_root, enc) if todo
                                 else ()):
        results[sub.name] = result = score_subset(sub, vectors, status)
        if work and result["queries"]:
            storage.write_json(storage.join(work, f"{sub.name}.json"),
                               {"settings": settings, "result": result})
    for name in names:
        result = results[name]
        p1 = result["metrics"][METRIC]
        log(f"{name}: P@1 {'-' if p1 is None else f'{p1:.2f}'} over {result['queries']} rows"
            + (f"; problems: {result['problems']}" if result["problems"] else ""))
    ordered = [results[n] for n in names]
    problems: Counter[str] = Counter()
    for r in ordered:
        problems.update({f"{r['benchmark']}:{k}": v for k, v in r["problems"].items()})
    return {"checkpoint": checkpoint, "benchmark": "mmeb", "split": split,
            "datasets": len(ordered), "results": ordered, "mean": aggregate(ordered),
            "problems": dict(problems)}
