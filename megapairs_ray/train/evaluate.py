"""Zero-shot composed-image-retrieval evaluation of a retriever checkpoint of either family.

Reads a benchmark laid out as its authors publish it (local or s3://), builds the composed
queries as the official MegaPairs evaluation does, embeds the gallery and the queries with
the checkpoint's retriever (``models/family.py``), ranks by cosine similarity and reports the
benchmark's metrics.

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
- GeneCIS (the official repo's paths: ``genecis_root``, ``visual_genome_images``, ``coco_root``):
  ``genecis/{focus_attribute,change_attribute,focus_object,change_object}.json`` (the repo's
  ``genecis/`` folder); Visual Genome 1.2 images ``VG_100K_all/<image_id>.jpg`` (all 108,249 in
  one folder: VG_100K and VG_100K_2 merged); COCO 2017 val images ``val2017/<val_image_id:012d>
  .jpg``. Attribute tasks are crops of VG boxes (``instance_bbox``: x, y, w, h), cut as the
  official ``VAWDataset`` does (``genecis_crop``); object tasks are whole COCO images. Query: the
  reference (crop) and the condition text as given (the official evaluation tokenises
  ``sample['condition']`` alone). Each query ranks its own gallery, the target followed by the
  distractors; Recall@{1,2,3} per task and their mean, ties against the target counted as misses.
  The files are GeneCIS's only split, read as ``val``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage
from megapairs_ray.models.retriever import RetrieverEncoder, UndecodableImage
from megapairs_ray.train import metrics

BENCHMARKS = ("circo", "cirr", "fashioniq", "genecis")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
# The paper's order: focus / change an attribute (Visual Genome crops), then an object (COCO).
GENECIS_TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
GENECIS_DILATION = 0.7  # the official VAWDataset's DILATION


class BenchmarkError(MegapairsError, ValueError):
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


@dataclass(frozen=True)
class GenecisImage:
    uri: str
    box: tuple[float, float, float, float] | None = None  # VG instance_bbox; None: whole image


@dataclass
class GenecisQuery:
    qid: str
    reference: GenecisImage
    text: str
    gallery: list[GenecisImage]  # the target first (index 0), then the distractors


@dataclass
class GenecisTask:
    name: str
    queries: list[GenecisQuery]


def _genecis_split(split: str) -> None:
    if split != "val":
        raise BenchmarkError(f"GeneCIS has no {split} split: its four annotation files (targets "
                             "included) are its one split; evaluate with --split val")


def load_genecis(root: str, task: str, split: str = "val") -> GenecisTask:
    _genecis_split(split)
    uri = storage.join(root, "genecis", f"{task}.json")
    ann = _load(uri)
    if not isinstance(ann, list) or not ann:
        raise BenchmarkError(f"{uri} is not a non-empty list of GeneCIS templates")
    attribute = task.endswith("_attribute")
    folder = storage.join(root, "VG_100K_all" if attribute else "val2017")

    def image(item: Any, role: str, i: int) -> GenecisImage:
        try:
            if attribute:
                x, y, w, h = (float(v) for v in item["instance_bbox"])
                return GenecisImage(storage.join(folder, f"{item['image_id']}.jpg"),
                                    (x, y, w, h))
            return GenecisImage(storage.join(folder, f"{int(item['val_image_id']):012d}.jpg"))
        except (KeyError, TypeError, ValueError):
            want = "image_id and instance_bbox [x, y, w, h]" if attribute else "val_image_id"
            raise BenchmarkError(f"GeneCIS {task} query {i}: its {role} needs {want}, "
                                 f"got {json.dumps(item)[:200]}") from None

    queries = []
    for i, a in enumerate(ann):
        if not isinstance(a, dict):
            raise BenchmarkError(f"GeneCIS {task} query {i} is not a template object")
        if "target" not in a:
            raise BenchmarkError(f"GeneCIS {task} query {i} has no target (hidden ground truths "
                                 "cannot be scored here)")
        if not isinstance(a.get("condition"), str) or not isinstance(a.get("gallery"), list):
            raise BenchmarkError(f"GeneCIS {task} query {i} needs a condition text and a "
                                 "gallery list")
        queries.append(GenecisQuery(
            qid=f"{task}-{i}", reference=image(a.get("reference"), "reference", i),
            text=a["condition"].strip(),
            gallery=[image(a["target"], "target", i)]
            + [image(g, "gallery item", i) for g in a["gallery"]]))
    return GenecisTask(f"genecis-{task}", queries)


def genecis_crop(image: torch.Tensor, box: Sequence[float] | None, name: str = "image",
                 ) -> torch.Tensor:
    """The official GeneCIS crop (``datasets/vaw_dataset.py``) of an HWC uint8 image.

    The box (x, y, w, h) grows by ``GENECIS_DILATION`` of its size up and to the left (right and
    bottom stay put: the official ``right = left + 1.7 w``), is clamped to the image, rounded as
    Pillow's ``crop`` rounds, and the crop is padded to a square with black, centred. A box that
    leaves nothing once clamped is an error. ``None``: the whole image."""
    if box is None:
        return image
    img_h, img_w = int(image.shape[0]), int(image.shape[1])
    x, y, w, h = box
    left, top = max(0.0, x - GENECIS_DILATION * w), max(0.0, y - GENECIS_DILATION * h)
    right = min(float(img_w), left + (1 + GENECIS_DILATION) * w)
    bottom = min(float(img_h), top + (1 + GENECIS_DILATION) * h)
    x0, y0, x1, y1 = (round(v) for v in (left, top, right, bottom))
    if x1 <= x0 or y1 <= y0:
        raise BenchmarkError(f"GeneCIS box {list(box)} lies outside {name} ({img_w}x{img_h}): "
                             "nothing to crop")
    crop = image[y0:y1, x0:x1]
    ch, cw = y1 - y0, x1 - x0
    if ch == cw:
        return crop
    side = max(ch, cw)
    out = image.new_zeros((side, side, image.shape[2]))
    top_pad, left_pad = (side - ch) // 2, (side - cw) // 2
    out[top_pad : top_pad + ch, left_pad : left_pad + cw] = crop
    return out


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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

    def _decoded(self, uris: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each distinct image of ``uris``, read and decoded once."""
        distinct = list(dict.fromkeys(uris))
        decoded = self.decode(self._read(distinct))
        for uri, d in zip(distinct, decoded):
            if isinstance(d, Exception):
                raise BenchmarkError(f"benchmark image {uri} cannot be decoded: {d}")
        return dict(zip(distinct, decoded))  # type: ignore[arg-type]

    def crops(self, images: Sequence[GenecisImage]) -> list[torch.Tensor]:
        decoded = self._decoded([im.uri for im in images])
        return [genecis_crop(decoded[im.uri], im.box, im.uri) for im in images]

    def crop_candidates(self, images: Sequence[GenecisImage]) -> np.ndarray:
        """Gallery embeddings of (cropped) images, in batches; each image decoded once a batch."""
        out = [self.candidates(self.pixels(self.crops(images[i : i + self.batch_size])))
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def crop_queries(self, images: Sequence[GenecisImage], texts: Sequence[str]) -> np.ndarray:
        """Composed queries of (cropped) reference images and texts. Crops go to the encoder as
        lossless PNGs, so they take its one query path (same pixels, same composition)."""
        if all(im.box is None for im in images):
            return self.queries([im.uri for im in images], texts)
        out = []
        for i in range(0, len(images), self.batch_size):
            pngs = list(self.pool.map(_png, self.crops(images[i : i + self.batch_size])))
            out.append(super().queries(pngs, list(texts[i : i + self.batch_size])))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def rank(query_emb: np.ndarray, gallery_emb: np.ndarray, keys: Sequence[str],
         depth: int | None) -> list[list[str]]:
    """Gallery keys by descending cosine similarity, ``depth`` deep (ties: gallery order)."""
    scores = (torch.from_numpy(query_emb) @ torch.from_numpy(gallery_emb).T).numpy()
    k = scores.shape[1] if depth is None else min(depth + 1, scores.shape[1])
    out: list[list[str]] = []
    for i in range(0, len(scores), 256):  # bounded memory: a full argsort per row
        order = np.argsort(-scores[i : i + 256], axis=1, kind="stable")[:, :k]
        out.extend([keys[j] for j in row] for row in order)
    return out


def evaluate_genecis(task: GenecisTask, embedder: Embedder) -> dict[str, Any]:
    """Every distinct gallery image (or crop) embedded once; each query scored on its own."""
    # In image order, so a batch reads and decodes an image once for all its boxes.
    gallery = sorted({g for q in task.queries for g in q.gallery},
                     key=lambda g: (g.uri, g.box or ()))
    index = {g: i for i, g in enumerate(gallery)}
    emb = embedder.crop_candidates(gallery)
    queries = embedder.crop_queries([q.reference for q in task.queries],
                                    [q.text for q in task.queries])
    scores = [emb[[index[g] for g in q.gallery]] @ queries[i]
              for i, q in enumerate(task.queries)]
    return {"benchmark": task.name, "queries": len(task.queries), "gallery": len(gallery),
            "metrics": metrics.genecis_recall_at_k(scores, [0] * len(scores))}


def evaluate_benchmark(bench: Benchmark | GenecisTask, embedder: Embedder) -> dict[str, Any]:
    if isinstance(bench, GenecisTask):
        return evaluate_genecis(bench, embedder)
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


def load_benchmarks(name: str, root: str, split: str = "val",
                    ) -> list[Benchmark | GenecisTask]:
    if name == "circo":
        return [load_circo(root, split)]
    if name == "cirr":
        return [load_cirr(root, split)]
    if name == "fashioniq":
        return [load_fashioniq(root, c, split) for c in FASHIONIQ_CATEGORIES
                if storage.exists(storage.join(root, "captions", f"cap.{c}.{split}.json"))]
    if name == "genecis":
        _genecis_split(split)
        return [load_genecis(root, t, split) for t in GENECIS_TASKS
                if storage.exists(storage.join(root, "genecis", f"{t}.json"))]
    raise BenchmarkError(f"unknown benchmark {name!r}; choose from "
                         f"{', '.join((*BENCHMARKS, 'mmeb'))}")


def run_eval(checkpoint: str, benchmark: str, root: str, split: str = "val",
             device: str = "cpu", batch_size: int = 64, precision: str = "fp32",
             ) -> dict[str, Any]:
    """Every metric of ``benchmark`` for ``checkpoint``; FashionIQ adds the category mean,
    GeneCIS the task mean (the paper's GeneCIS number is the mean R@1 of all four tasks)."""
    benches = load_benchmarks(benchmark, root, split)
    if not benches:
        raise BenchmarkError(f"no {benchmark} {split} annotations under {root}")
    embedder = Embedder(checkpoint, device=device, batch_size=batch_size, precision=precision)
    results = [evaluate_benchmark(b, embedder) for b in benches]
    report: dict[str, Any] = {"checkpoint": checkpoint, "benchmark": benchmark, "split": split,
                              "results": results}
    if benchmark in ("fashioniq", "genecis"):
        names = results[0]["metrics"].keys()
        report["mean"] = {k: float(np.mean([r["metrics"][k] for r in results])) for k in names}
    return report
