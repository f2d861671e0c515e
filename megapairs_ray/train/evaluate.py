"""Zero-shot composed-image-retrieval evaluation of any HF-form CLIP checkpoint.

Reads a benchmark laid out as its authors publish it (local or s3://), builds the composed
queries as the official MegaPairs evaluation does, embeds the gallery and the queries with
``MMRetCLIP``, ranks by cosine similarity and reports the benchmark's metrics.

Layouts (relative to the folder given):
- CIRCO: ``annotations/{split}.json``; gallery ``COCO2017_unlabeled/annotations/
  image_info_unlabeled2017.json``, images ``COCO2017_unlabeled/unlabeled2017/<file_name>``.
  Query: "Find a picture that also {shared_concept}, but {relative_caption}."; mAP@{5,10,25,50}.
- CIRR: ``captions/cap.rc2.{split}.json``, ``image_splits/split.rc2.{split}.json`` (name ->
  relative image path). Query: the caption; Recall@{1,5,10,50} without the reference image and
  Recall_subset@{1,2,3}.
- FashionIQ: ``captions/cap.{category}.{split}.json``, ``image_splits/split.{category}.
  {split}.json``, images ``images/<name>.png`` (or ``.jpg``). Query: "{c1} and {c2}";
  Recall@{10,50} per category and their mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from megapairs_ray.io import storage
from megapairs_ray.models.retriever import RetrieverEncoder, UndecodableImage
from megapairs_ray.train import metrics

BENCHMARKS = ("circo", "cirr", "fashioniq")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


class BenchmarkError(ValueError):
    """A benchmark folder that does not hold what its published layout promises."""


@dataclass
class CirQuery:
    qid: str
    reference: str  # gallery key of the reference image
    text: str
    targets: list[str]  # ground truths; CIRR and FashionIQ have one
    subset: list[str] | None = None  # CIRR's img_set members


@dataclass
class Benchmark:
    name: str
    queries: list[CirQuery]
    gallery: dict[str, str]  # key -> image URI
    score: Callable[[list[list[str]], list[CirQuery]], dict[str, float]]
    # How many ranked gallery items the metrics need; None: the whole gallery.
    depth: int | None = 51
    extra_images: dict[str, str] = field(default_factory=dict)  # query images outside gallery


def _load(uri: str) -> Any:
    try:
        return storage.read_json(uri)
    except FileNotFoundError:
        raise BenchmarkError(f"missing {uri}") from None
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{uri} is not valid JSON: {e}") from None


def circo_query_text(shared_concept: str, relative_caption: str) -> str:
    return f"Find a picture that also {shared_concept.strip()}, but {relative_caption.strip()}."


def load_circo(root: str, split: str = "val") -> Benchmark:
    ann = _load(storage.join(root, "annotations", f"{split}.json"))
    info = _load(storage.join(root, "COCO2017_unlabeled", "annotations",
                              "image_info_unlabeled2017.json"))
    images = storage.join(root, "COCO2017_unlabeled", "unlabeled2017")
    gallery = {str(im["id"]): storage.join(images, im["file_name"]) for im in info["images"]}
    queries = []
    for a in ann:
        if "gt_img_ids" not in a:
            raise BenchmarkError(f"CIRCO {split} has no ground truths (the test split's are "
                                 "hidden; evaluate on val or submit to the CIRCO server)")
        queries.append(CirQuery(
            qid=str(a["id"]), reference=str(a["reference_img_id"]),
            text=circo_query_text(a["shared_concept"], a["relative_caption"]),
            targets=[str(g) for g in a["gt_img_ids"] if g is not None]))

    def score(rankings: list[list[str]], qs: list[CirQuery]) -> dict[str, float]:
        return metrics.circo_map_at_k(rankings, [set(q.targets) for q in qs])

    return Benchmark("circo", queries, gallery, score, depth=50)


def load_cirr(root: str, split: str = "val") -> Benchmark:
    caps = _load(storage.join(root, "captions", f"cap.rc2.{split}.json"))
    names = _load(storage.join(root, "image_splits", f"split.rc2.{split}.json"))
    gallery = {k: storage.join(root, v.removeprefix("./")) for k, v in names.items()}
    if caps and "target_hard" not in caps[0]:
        raise BenchmarkError(f"CIRR {split} has no targets (the test split's are hidden; "
                             "evaluate on val or submit to the CIRR server)")
    queries = [CirQuery(qid=str(c["pairid"]), reference=c["reference"], text=c["caption"],
                        targets=[c["target_hard"]], subset=list(c["img_set"]["members"]))
               for c in caps]

    def score(rankings: list[list[str]], qs: list[CirQuery]) -> dict[str, float]:
        return metrics.cirr_metrics(rankings, [q.targets[0] for q in qs],
                                    [q.subset or [] for q in qs], [q.reference for q in qs])

    return Benchmark("cirr", queries, gallery, score, depth=None)


def fashioniq_query_text(captions: Sequence[str]) -> str:
    first, second = (c.strip(".?, ") for c in captions[:2])
    return f"{first.capitalize()} and {second}"


def load_fashioniq(root: str, category: str, split: str = "val") -> Benchmark:
    caps = _load(storage.join(root, "captions", f"cap.{category}.{split}.json"))
    names = _load(storage.join(root, "image_splits", f"split.{category}.{split}.json"))
    # Released copies differ in image format (.png in the original release, .jpg in others).
    ext = next((e for e in ("png", "jpg") if names and storage.exists(
        storage.join(root, "images", f"{names[0]}.{e}"))), "png")
    gallery = {n: storage.join(root, "images", f"{n}.{ext}") for n in names}
    queries = []
    for i, c in enumerate(caps):
        if len(c["captions"]) < 2:
            raise BenchmarkError(f"FashionIQ {category} query {i} has fewer than 2 captions")
        queries.append(CirQuery(qid=f"{category}-{i}", reference=c["candidate"],
                                text=fashioniq_query_text(c["captions"]),
                                targets=[c["target"]]))
    extra = {q.reference: storage.join(root, "images", f"{q.reference}.{ext}")
             for q in queries if q.reference not in gallery}

    def score(rankings: list[list[str]], qs: list[CirQuery]) -> dict[str, float]:
        return metrics.recall_at_k(rankings, [q.targets[0] for q in qs], (10, 50))

    return Benchmark(f"fashioniq-{category}", queries, gallery, score, depth=50,
                     extra_images=extra)


class Embedder(RetrieverEncoder):
    """The retriever's encoders reading benchmark images by URI (local or s3://)."""

    def _read(self, uris: Sequence[str]) -> list[bytes]:
        def read(uri: str) -> bytes:
            fs, path = storage.filesystem(uri)
            return fs.cat_file(path)

        try:
            return list(self.pool.map(read, uris))
        except FileNotFoundError as e:
            raise BenchmarkError(f"benchmark image missing: {e}") from None

    def _pixels(self, uris: Sequence[str]) -> torch.Tensor:
        try:
            return self.pixels_of(self._read(uris), names=[f"benchmark image {u}" for u in uris])
        except UndecodableImage as e:
            raise BenchmarkError(str(e)) from None

    def images(self, uris: Sequence[str]) -> np.ndarray:
        out = [self.candidates(self._pixels(uris[i : i + self.batch_size]))
               for i in range(0, len(uris), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def queries(self, uris: Sequence[str], texts: Sequence[str]) -> np.ndarray:  # type: ignore[override]
        out = []
        for i in range(0, len(uris), self.batch_size):
            chunk = uris[i : i + self.batch_size]
            try:
                out.append(super().queries(self._read(chunk),
                                           list(texts[i : i + self.batch_size])))
            except UndecodableImage:
                self._pixels(chunk)  # raises the benchmark error that names the image
                raise
        return np.concatenate(out)


def rank(query_emb: np.ndarray, gallery_emb: np.ndarray, keys: Sequence[str],
         depth: int | None) -> list[list[str]]:
    """Gallery keys by descending cosine similarity, ``depth`` deep (ties: gallery order)."""
    scores = torch.from_numpy(query_emb) @ torch.from_numpy(gallery_emb).T
    k = scores.shape[1] if depth is None else min(depth + 1, scores.shape[1])
    order = torch.topk(scores, k=k, dim=1, sorted=True).indices.numpy()
    return [[keys[j] for j in row] for row in order]


def evaluate_benchmark(bench: Benchmark, embedder: Embedder) -> dict[str, Any]:
    keys = sorted(bench.gallery)
    gallery = embedder.images([bench.gallery[k] for k in keys])
    ref_uris = []
    for q in bench.queries:
        uri = bench.gallery.get(q.reference) or bench.extra_images.get(q.reference)
        if uri is None:
            raise BenchmarkError(f"{bench.name}: query {q.qid}'s reference {q.reference} "
                                 "is not in the gallery")
        ref_uris.append(uri)
    queries = embedder.queries(ref_uris, [q.text for q in bench.queries])
    rankings = rank(queries, gallery, keys, bench.depth)
    return {"benchmark": bench.name, "queries": len(bench.queries), "gallery": len(keys),
            "metrics": bench.score(rankings, bench.queries)}


def load_benchmarks(name: str, root: str, split: str = "val") -> list[Benchmark]:
    if name == "circo":
        return [load_circo(root, split)]
    if name == "cirr":
        return [load_cirr(root, split)]
    if name == "fashioniq":
        return [load_fashioniq(root, c, split) for c in FASHIONIQ_CATEGORIES
                if storage.exists(storage.join(root, "captions", f"cap.{c}.{split}.json"))]
    raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")


def run_eval(checkpoint: str, benchmark: str, root: str, split: str = "val",
             device: str = "cpu", batch_size: int = 64, precision: str = "fp32",
             ) -> dict[str, Any]:
    """Every metric of ``benchmark`` for ``checkpoint``; FashionIQ adds the category mean."""
    benches = load_benchmarks(benchmark, root, split)
    if not benches:
        raise BenchmarkError(f"no {benchmark} {split} annotations under {root}")
    embedder = Embedder(checkpoint, device=device, batch_size=batch_size, precision=precision)
    results = [evaluate_benchmark(b, embedder) for b in benches]
    report: dict[str, Any] = {"checkpoint": checkpoint, "benchmark": benchmark, "split": split,
                              "results": results}
    if benchmark == "fashioniq":
        names = results[0]["metrics"].keys()
        report["mean"] = {k: float(np.mean([r["metrics"][k] for r in results])) for k in names}
    return report
