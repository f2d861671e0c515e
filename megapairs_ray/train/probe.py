"""The data probe: does this run's data train a better retriever? (``megapairs probe``)

A small proxy training, in the spirit of DataComp's small-scale tracks, that a user runs on their
own pipeline run before spending GPU-days on it:

1. **A split.** Images are held out by a seeded hash of their id (``ids.held_out``). Training
   never sees a held-out image: alignment rejects its caption, MMRet rejects a triplet whose
   query or target is held out and drops a held-out hard negative (``train/data.py``).
2. **Held-out triplets.** The run's own mined and exported triplets whose query and target are
   both held out: the same mining, restricted to images no training saw. Their images are
   copied out of the export's tars once; the gallery is every held-out image the export has.
3. **Four retrievers per seed**, all of the towers family the two train configs name:
   untrained (the packaged towers under fresh projections), aligned only, aligned + MMRet on
   the triplets, and a negative control trained on the same triplets with their targets
   shuffled (``data.shuffle_targets``).
4. **Metrics** with the project's eval code (``train/metrics.py``): Recall@1/5/10 and mAP@5 of
   composed queries on the held-out triplets (the query image itself is not a candidate) and,
   given labels, how often image-only queries' top hits share the query's label, against
   chance.

The report is a table (mean ± standard deviation over the seeds) and ``probe.json``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from megapairs_ray.config import RayConfig, Strict, config_from_dict, load_config
from megapairs_ray.errors import MegapairsError
from megapairs_ray.ids import held_out, id_of_path
from megapairs_ray.io import layout, storage
from megapairs_ray.io.triplets import ImageStore
from megapairs_ray.train import metrics
from megapairs_ray.train.config import TrainConfig

VARIANTS = ("untrained", "aligned", "aligned+mmret", "shuffled-control")


class ProbeError(MegapairsError, ValueError):
    """A probe that cannot measure anything (no held-out triplets, a run not exported)."""


class ProbeConfig(Strict):
    profile: str
    run_dir: str = Field(description="A finished pipeline run (ingest through export).")
    out: str = Field(description="Where the probe's trainings, images and report go.")
    align: str = Field(description="The alignment train config (captions_from is set here).")
    train: str = Field(description="The MMRet train config (annotations are set here).")
    held_out_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    # JSON object: an image's key in its shard (the images table's ``key``) -> its label.
    labels: str | None = None
    top_k: int = Field(default=10, gt=0)
    ray: RayConfig = RayConfig()


def _train_config(path: str, cfg: ProbeConfig, seed: int, name: str, init: str | None = None,
                  **data: Any) -> TrainConfig:
    """A train config file as the probe runs it: this seed, the split, its own folder."""
    doc = load_config(path, schema=TrainConfig).model_dump(mode="json")
    doc["data"].update({"seed": seed, "annotations": [], "captions_from": None,
                        "split": {"fraction": cfg.held_out_fraction, "seed": cfg.split_seed},
                        **data})
    if init is not None:
        doc["model"]["init"] = init
    doc["checkpoint"].update({"storage_path": storage.join(cfg.out, f"seed-{seed}"),
                              "name": name})
    doc["ray"] = cfg.ray.model_dump(mode="json")
    return config_from_dict(doc, f"{path} (probe seed {seed})", schema=TrainConfig)


# ----------------------------------------------------------------------------- held-out set


def held_out_set(cfg: ProbeConfig) -> dict[str, Any]:
    """The held-out triplets and gallery, their images copied out of the export once."""
    triplets_dir = layout.triplets_dir(cfg.run_dir)
    annotations = storage.join(triplets_dir, "megapairs.jsonl")
    if not storage.exists(storage.join(triplets_dir, "_SUCCESS")):
        raise ProbeError(f"run_dir: {cfg.run_dir} has no finished export "
                         f"({triplets_dir}/_SUCCESS); run the pipeline through export first")
    fs, path = storage.filesystem(annotations)
    rows = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line]
    store = ImageStore(triplets_dir)
    members = sorted({p for r in rows for p in (r["q_img"], r["t_img"], *r["hns"])})
    ids = np.array([id_of_path(p) for p in members], dtype=np.int64)
    out_mask = held_out(ids, cfg.held_out_fraction, cfg.split_seed)
    gallery = [p for p, o in zip(members, out_mask) if o]
    chosen = set(gallery)
    queries = [r for r in rows if r["q_img"] in chosen and r["t_img"] in chosen]
    if not queries:
        raise ProbeError(f"held_out_fraction {cfg.held_out_fraction} (split_seed "
                         f"{cfg.split_seed}) leaves no triplet with a held-out query and target "
                         f"among {len(rows)} in {annotations}: raise the fraction or export more")
    images_dir = Path(cfg.out) / "held-out"
    images_dir.mkdir(parents=True, exist_ok=True)
    uris = {p: str(images_dir / p.replace("/", "_")) for p in gallery}
    todo = [p for p in gallery if not Path(uris[p]).exists()]
    for p, data in zip(todo, store.read_many(todo)):
        if isinstance(data, Exception):
            raise ProbeError(f"{triplets_dir}: exported image {p} cannot be read ({data})")
        Path(uris[p]).write_bytes(data)
    return {"queries": queries, "gallery": gallery, "uris": uris,
            "train_images": len(members) - len(gallery), "all_triplets": len(rows)}


def _labels(cfg: ProbeConfig, paths: list[str]) -> list[str] | None:
    if cfg.labels is None:
        return None
    by_key = storage.read_json(cfg.labels)
    images = storage.read_parquet_dir(layout.images_dir(cfg.run_dir),
                                      columns=["image_id", "key"]).to_pylist()
    key_of = {r["image_id"]: r["key"] for r in images}
    return [str(by_key.get(key_of.get(id_of_path(p), ""), "")) for p in paths]


def base_rate(labels: list[str]) -> float:
    """P(two distinct images drawn at random share a label)."""
    n = len(labels)
    return sum(c * (c - 1) for c in Counter(labels).values()) / (n * (n - 1))


def evaluate_held_out(checkpoint: str, held: dict[str, Any], labels: list[str] | None,
                      top_k: int) -> dict[str, float]:
    """Recall@1/5/10 and mAP@5 of composed queries on the held-out triplets, and the label
    rate of image-only queries' top ``top_k`` hits against chance."""
    from megapairs_ray.train.evaluate import Embedder, rank

    emb = Embedder(checkpoint, batch_size=32)
    gallery = held["gallery"]
    gallery_emb = emb.images([held["uris"][p] for p in gallery])
    queries = held["queries"]
    q_emb = emb.queries([held["uris"][r["q_img"]] for r in queries],
                        [r["q_text"][0] for r in queries])
    targets_of: dict[str, set[str]] = defaultdict(set)
    for r in queries:
        targets_of[r["q_img"]].add(r["t_img"])
    rankings = [[g for g in ranking if g != r["q_img"]]  # the query image is no candidate
                for ranking, r in zip(rank(q_emb, gallery_emb, gallery, None), queries)]
    out = metrics.recall_at_k(rankings, [r["t_img"] for r in queries], (1, 5, 10))
    out.update(metrics.circo_map_at_k(rankings, [targets_of[r["q_img"]] for r in queries], (5,)))
    if labels is not None:
        label_of = dict(zip(gallery, labels))
        hits = [label_of[h] == label_of[g]
                for g, ranking in zip(gallery, rank(gallery_emb, gallery_emb, gallery, top_k))
                for h in [x for x in ranking if x != g][:top_k]]
        out["same_label_rate"] = float(np.mean(hits))
        out["same_label_x_chance"] = float(np.mean(hits)) / base_rate(labels)
    return out


# ----------------------------------------------------------------------------- the probe


def _untrained(cfg: ProbeConfig, seed: int) -> str:
    from transformers import AutoTokenizer

    from megapairs_ray.models.towers import MMRetTowers

    folder = Path(cfg.out) / f"seed-{seed}" / "untrained"
    if not (folder / "config.json").exists():
        align = load_config(cfg.align, schema=TrainConfig)
        model = MMRetTowers.from_towers(**align.model.towers.model_dump(), seed=seed)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(model.tokenizer_source).save_pretrained(folder)
    return str(folder)


def run_probe(cfg: ProbeConfig, log: Any = print) -> dict[str, Any]:
    """Every seed's four retrievers, trained (resuming what is done) and evaluated."""
    from megapairs_ray.models.retriever import resolve_checkpoint
    from megapairs_ray.train.trainer import run_training

    align_doc = load_config(cfg.align, schema=TrainConfig)
    if align_doc.model.family != "towers" or align_doc.model.init is not None:
        raise ProbeError(f"align: {cfg.align} must build the towers family (model.family: "
                         "towers, model.init: null): the probe compares its untrained towers")
    held = held_out_set(cfg)
    labels = _labels(cfg, held["gallery"])
    log(f"held out: {len(held['gallery'])} images, {len(held['queries'])} of "
        f"{held['all_triplets']} triplets")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS[1:]}
    for seed in cfg.seeds:
        align = _train_config(cfg.align, cfg, seed, "align",
                              captions_from=cfg.run_dir, num_hard_negatives=0)
        aligned = storage.join(align.checkpoint.storage_path, "align")
        annotations = [storage.join(layout.triplets_dir(cfg.run_dir), "megapairs.jsonl")]
        mmret = _train_config(cfg.train, cfg, seed, "mmret", aligned, annotations=annotations)
        control = _train_config(cfg.train, cfg, seed, "mmret-shuffled", aligned,
                                annotations=annotations, shuffle_targets=True)
        checkpoints = {"untrained": _untrained(cfg, seed)}
        for variant, train_cfg in zip(VARIANTS[1:], (align, mmret, control)):
            summary = run_training(train_cfg)
            runs[variant].append({"seed": seed, "loss": summary["metrics"].get("loss"),
                                  "triplets": summary["triplets"]})
            checkpoints[variant] = resolve_checkpoint(storage.join(
                train_cfg.checkpoint.storage_path, train_cfg.checkpoint.name))
        for variant in VARIANTS:
            m = evaluate_held_out(checkpoints[variant], held, labels, cfg.top_k)
            results[variant].append({"seed": seed, **m})
            log(f"seed {seed} {variant}: " + ", ".join(f"{k} {v:.3g}" for k, v in m.items()))
    report = {"run_dir": cfg.run_dir, "held_out_fraction": cfg.held_out_fraction,
              "split_seed": cfg.split_seed, "seeds": cfg.seeds,
              "held_out_images": len(held["gallery"]), "held_out_triplets": len(held["queries"]),
              "triplets": held["all_triplets"], "results": results, "trainings": runs,
              "summary": summarise(results)}
    storage.write_json(storage.join(cfg.out, "probe.json"), report)
    return report


def summarise(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per variant and metric: [mean, standard deviation, min, max] over the seeds."""
    out: dict[str, dict[str, list[float]]] = {}
    for variant, rows in results.items():
        keys = [k for k in rows[0] if k != "seed"] if rows else []
        out[variant] = {k: [float(np.mean(v)), float(np.std(v)), float(min(v)), float(max(v))]
                        for k in keys for v in [[r[k] for r in rows]]}
    return out


def rows_of(report: dict[str, Any]) -> list[list[str]]:
    """The report as table rows: variant, then mean ± sd of each metric."""
    summary = report["summary"]
    metric_names = list(next(iter(summary.values())))
    rows = [["variant", *metric_names]]
    for variant, by_metric in summary.items():
        rows.append([variant, *(f"{by_metric[k][0]:.3g} ± {by_metric[k][1]:.2g}"
                                for k in metric_names)])
    return rows
