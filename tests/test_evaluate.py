"""The eval job on small benchmark-shaped fixtures (CIRCO, CIRR and FashionIQ layouts).

The job's numbers are checked against an independent computation: queries built from the
published templates here in the test, brute-force ranking with NumPy, then the metric functions
(themselves checked against hand-computed cases). The job's pixels are checked separately
against the released CLIP image processor (tests/test_pixel_parity.py checks them on awkward
images): a random model's rankings are too fragile to survive even last-bit pixel differences,
so the ranking check shares the job's embedder.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.train import metrics
from megapairs_ray.train.evaluate import BenchmarkError, Embedder, rank, run_eval
from megapairs_ray.train.toy_triplets import COLOURS, SHAPES, shape_image

from .helpers import write_json
from .serve_helpers import make_checkpoint

KEYS = [(s, c) for s in SHAPES for c in COLOURS]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
STD = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))



def _queries():
    """(reference key, shared concept, relative caption, ground-truth keys) per query."""
    out = []
    for i, (s, c) in enumerate(KEYS[::3]):
        c2 = list(COLOURS)[(list(COLOURS).index(c) + 1) % len(COLOURS)]
        gts = [(s, c2)] + ([(SHAPES[(SHAPES.index(s) + 1) % 4], c2)] if i % 2 else [])
        out.append(((s, c), f"a {s}", f"is {c2}", gts))
    return out


def make_circo(root: Path) -> Path:
    ids = {k: 1000 + i for i, k in enumerate(KEYS)}
    img_dir = root / "COCO2017_unlabeled" / "unlabeled2017"
    img_dir.mkdir(parents=True)
    for k, i in ids.items():
        (img_dir / f"{i:012d}.jpg").write_bytes(shape_image(*k))
    write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json",
           {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids.values()]})
    write_json(root / "annotations" / "val.json", [
        {"id": n, "reference_img_id": ids[ref], "target_img_id": ids[gts[0]],
         "shared_concept": shared, "relative_caption": rel, "gt_img_ids": [ids[g] for g in gts]}
        for n, (ref, shared, rel, gts) in enumerate(_queries())])
    write_json(root / "annotations" / "test.json", [
        {"id": 0, "reference_img_id": 1000, "shared_concept": "x", "relative_caption": "y"}])
    return root


def make_cirr(root: Path) -> Path:
    names = {k: f"dev-{k[0]}-{k[1]}" for k in KEYS}
    for k, n in names.items():
        (root / "dev").mkdir(parents=True, exist_ok=True)
        (root / "dev" / f"{n}.png").write_bytes(shape_image(*k))
    write_json(root / "image_splits" / "split.rc2.val.json",
           {n: f"./dev/{n}.png" for n in names.values()})
    caps = []
    for i, (ref, _, rel, gts) in enumerate(_queries()):
        members = [names[ref], names[gts[0]]] + [names[k] for k in KEYS[i : i + 4]]
        caps.append({"pairid": i, "reference": names[ref], "target_hard": names[gts[0]],
                     "caption": f"make it {rel.split()[-1]}",
                     "img_set": {"id": i, "members": list(dict.fromkeys(members))[:6]}})
    write_json(root / "captions" / "cap.rc2.val.json", caps)
    return root


def make_fashioniq(root: Path, ext: str = "png") -> Path:
    for cat, shapes in (("dress", SHAPES[:2]), ("shirt", SHAPES[2:])):
        keys = [k for k in KEYS if k[0] in shapes]
        names = {k: f"{cat}-{k[0]}-{k[1]}" for k in keys}
        for k, n in names.items():
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / "images" / f"{n}.{ext}").write_bytes(shape_image(*k))
        write_json(root / "image_splits" / f"split.{cat}.val.json", list(names.values()))
        caps = []
        for ref, _, rel, gts in _queries():
            if ref in names and gts[0] in names:
                caps.append({"candidate": names[ref], "target": names[gts[0]],
                             "captions": [f"{rel}.", "has the same shape"]})
        write_json(root / "captions" / f"cap.{cat}.val.json", caps)
    return root


def _embed_images(model, paths):
    """The pixels Hugging Face's Pillow CLIP processor (what the released checkpoints were
    evaluated with) makes of these files, at the test checkpoint's 32 px."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_mean=MEAN.ravel().tolist(), image_std=STD.ravel().tolist())
    return torch.cat([proc(Image.open(io.BytesIO(Path(p).read_bytes())),
                           return_tensors="pt")["pixel_values"] for p in paths])


def _reference_rankings(checkpoint, ref_paths, texts, gallery_paths, gallery_keys):
    emb = Embedder(checkpoint)
    g = emb.images([str(p) for p in gallery_paths])
    q = emb.queries([str(p) for p in ref_paths], texts)
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    return [[gallery_keys[j] for j in row] for row in order]


def test_eval_pixels_are_the_clip_transform(tmp_path, checkpoint):
    root = make_circo(tmp_path / "circo")
    paths = sorted((root / "COCO2017_unlabeled" / "unlabeled2017").glob("*.jpg"))[:6]
    ours = Embedder(checkpoint)._pixels([str(p) for p in paths])
    ref = _embed_images(None, paths)
    assert ours.shape == ref.shape == (6, 3, 32, 32)
    # Equal to float rounding on these; test_pixel_parity bounds the rare rounding ties.
    assert (ours - ref).abs().max() < 0.015  # under one 8-bit level


def test_circo_matches_an_independent_computation(tmp_path, checkpoint):
    root = make_circo(tmp_path / "circo")
    report = run_eval(checkpoint, "circo", str(root))
    (res,) = report["results"]
    assert res["queries"] == len(_queries()) and res["gallery"] == len(KEYS)
    ids = {k: str(1000 + i) for i, k in enumerate(KEYS)}
    keys = sorted(ids.values())
    img = root / "COCO2017_unlabeled" / "unlabeled2017"
    qs = _queries()
    texts = [f"Find a picture that also {shared}, but {rel}." for _, shared, rel, _ in qs]
    rankings = _reference_rankings(checkpoint, [img / f"{int(ids[r]):012d}.jpg" for r, *_ in qs],
                                   texts, [img / f"{int(k):012d}.jpg" for k in keys], keys)
    want = metrics.circo_map_at_k(rankings, [{ids[g] for g in gts} for *_, gts in qs])
    assert res["metrics"].keys() == {"mAP@5", "mAP@10", "mAP@25", "mAP@50"}
    for k, v in want.items():
        assert res["metrics"][k] == pytest.approx(v, abs=1e-6)


def test_cirr_and_fashioniq_run_in_their_published_layouts(tmp_path, checkpoint):
    cirr = run_eval(checkpoint, "cirr", str(make_cirr(tmp_path / "cirr")))
    m = cirr["results"][0]["metrics"]
    assert set(m) == {"R@1", "R@5", "R@10", "R@50", "R_subset@1", "R_subset@2", "R_subset@3"}
    # The gallery without the reference holds every target: R@50 over 23 images is 100.
    assert m["R@50"] == 100.0 and m["R_subset@3"] >= m["R_subset@1"]
    fiq = run_eval(checkpoint, "fashioniq", str(make_fashioniq(tmp_path / "fiq")))
    assert [r["benchmark"] for r in fiq["results"]] == ["fashioniq-dress", "fashioniq-shirt"]
    assert fiq["mean"]["R@10"] == pytest.approx(
        np.mean([r["metrics"]["R@10"] for r in fiq["results"]]))
    assert fiq["mean"]["R@50"] == 100.0  # galleries of 12: every target is in the top 50
    jpg = run_eval(checkpoint, "fashioniq", str(make_fashioniq(tmp_path / "fiq-jpg", "jpg")))
    assert jpg["mean"] == pytest.approx(fiq["mean"])


def test_rank_orders_ties_by_gallery_order():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 8)).astype(np.float32)
    g[[1, 3, 4]] = g[0]  # four identical gallery vectors: equal scores for every query
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = np.concatenate([g[:1], -g[:1], rng.normal(size=(3, 8)).astype(np.float32)])
    keys = ["a", "b", "c", "d", "e", "f"]
    scores = (torch.from_numpy(q) @ torch.from_numpy(g).T).numpy()
    for depth in (None, 2, 10):
        for row, s in zip(rank(q, g, keys, depth), scores):
            tied = [k for k in row if k in {"a", "b", "d", "e"}]
            assert tied == [k for k in ("a", "b", "d", "e") if k in row]  # gallery order
            assert [s[keys.index(k)] for k in row] == sorted(s, reverse=True)[: len(row)]
    assert rank(q, g, keys, 2)[0] == ["a", "b", "d"]  # depth + 1 deep


def test_bad_benchmarks_are_clear_errors(tmp_path, checkpoint):
    root = make_circo(tmp_path / "circo")
    with pytest.raises(BenchmarkError, match="hidden"):
        run_eval(checkpoint, "circo", str(root), split="test")
    with pytest.raises(BenchmarkError, match="missing"):
        run_eval(checkpoint, "circo", str(tmp_path / "nowhere"))
    next((root / "COCO2017_unlabeled" / "unlabeled2017").glob("*.jpg")).unlink()
    with pytest.raises(BenchmarkError, match="image"):
        run_eval(checkpoint, "circo", str(root))
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        run_eval(checkpoint, "genecis-ish", str(root))


def test_eval_cli_prints_a_table_and_writes_json(tmp_path, checkpoint):
    root = make_circo(tmp_path / "circo")
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["eval", "--checkpoint", checkpoint, "--benchmark", "circo",
                                   "--data", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "mAP@5" in res.output
    report = json.loads(out.read_text())
    assert report["results"][0]["metrics"]["mAP@5"] == pytest.approx(
        run_eval(checkpoint, "circo", str(root))["results"][0]["metrics"]["mAP@5"])
    bad = CliRunner().invoke(app, ["eval", "--checkpoint", checkpoint, "--benchmark", "circo",
                                   "--data", str(root), "--split", "test"])
    assert bad.exit_code == 1


def test_a_checkpoint_on_s3_evaluates_as_its_local_folder(tmp_path, checkpoint, bucket,
                                                          monkeypatch):
    import s3fs

    from megapairs_ray.models import retriever

    monkeypatch.setattr(retriever, "CHECKPOINT_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem()
    fs.put(checkpoint.rstrip("/") + "/", f"{bucket}/ckpt/", recursive=True)
    root = make_circo(tmp_path / "circo")
    remote = run_eval(f"s3://{bucket}/ckpt", "circo", str(root))
    assert remote["checkpoint"] == f"s3://{bucket}/ckpt"
    assert remote["results"][0]["metrics"] == pytest.approx(
        run_eval(checkpoint, "circo", str(root))["results"][0]["metrics"])
    # Copied once: a second load reads the same copy...
    assert len(list((tmp_path / "cache").iterdir())) == 1
    run_eval(f"s3://{bucket}/ckpt", "circo", str(root))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # ...and a checkpoint rewritten in place is copied again, never read stale.
    fs.pipe(f"{bucket}/ckpt/preprocessor_config.json",
            json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}).encode())
    fs.invalidate_cache()
    changed = run_eval(f"s3://{bucket}/ckpt", "circo", str(root))
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert changed["results"][0]["metrics"] != remote["results"][0]["metrics"]


def test_eval_of_a_training_run_without_a_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"metrics": {"step": 0}}))
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--benchmark", "circo",
                                   "--data", str(tmp_path)])
    assert res.exit_code == 1
    assert "has no checkpoint yet" in res.output and "Traceback" not in res.output
