"""GeneCIS on a small fixture in its published layout (annotation files, Visual Genome images,
COCO val2017 images).

The job's numbers are checked against an independent computation: crops cut with Pillow as the
official ``VAWDataset.load_cropped_image`` cuts them (re-written here, saved as PNGs), embedded
whole by the eval embedder (as in test_evaluate.py: a random model's rankings do not survive
pixel differences, so the check shares the embedder), scored with NumPy per query, and ranked
with ties against the target counted as misses.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.imaging import decode_rgb
from megapairs_ray.train import evaluate
from megapairs_ray.train.evaluate import BenchmarkError, Embedder, genecis_crop, run_eval
from megapairs_ray.train.toy_triplets import COLOURS, SHAPES, shape_image

from .helpers import write_json
from .serve_helpers import make_checkpoint

TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
COLOUR_NAMES = list(COLOURS)
# Visual Genome boxes (x, y, w, h) on 96 x 64 scenes: inside, fractional, over the right and
# bottom edges, over the top-left corner (the last three are clamped by the crop).
BOXES = [(50.0, 20.0, 30.0, 36.0), (30.5, 8.25, 20.0, 24.5), (80.0, 40.0, 40.0, 40.0),
         (2.0, 3.0, 20.0, 10.0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))



def _scene(i: int) -> bytes:
    """A 96 x 64 Visual-Genome-style picture with two coloured shapes; image 4 is greyscale."""
    im = Image.new("RGB", (96, 64), (235, 235, 235))
    d = ImageDraw.Draw(im)
    d.rectangle([8, 10, 40, 50], fill=COLOURS[COLOUR_NAMES[i % 6]])
    d.ellipse([52, 18, 90, 58], fill=COLOURS[COLOUR_NAMES[(i + 2) % 6]])
    if i == 4:
        im = im.convert("L")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _vg(image_id: int, box: int) -> dict:
    return {"image_id": image_id, "instance_bbox": list(BOXES[box])}


def _coco(n: int) -> dict:
    return {"val_image_id": 139 + n}


def make_genecis(root: Path, tasks: tuple[str, ...] = TASKS) -> Path:
    vg = root / "VG_100K_all"
    vg.mkdir(parents=True)
    for i in range(1, 6):
        (vg / f"{i}.jpg").write_bytes(_scene(i))
    coco = root / "val2017"
    coco.mkdir(parents=True)
    for n in range(8):
        (coco / f"{139 + n:012d}.jpg").write_bytes(
            shape_image(SHAPES[n % 4], COLOUR_NAMES[n % 6], size=48 + 8 * (n % 3)))
    ann = {
        "focus_attribute": [
            # Some targets are the reference itself, so that a random model has hits too.
            {"condition": "colour", "reference": _vg(1, 0), "target": _vg(1, 0),
             "gallery": [_vg(3, 0), _vg(4, 1), _vg(5, 2)]},
            {"condition": "shape ", "reference": _vg(2, 1), "target": _vg(3, 1),
             "gallery": [_vg(1, 2), _vg(4, 3), _vg(5, 0)]},
            {"condition": "size", "reference": _vg(4, 2), "target": _vg(5, 3),
             "gallery": [_vg(1, 0), _vg(2, 2), _vg(3, 0)]},
        ],
        "change_attribute": [
            {"condition": "red", "reference": _vg(3, 3), "target": _vg(1, 1),
             "gallery": [_vg(2, 3), _vg(4, 0), _vg(5, 1)]},
            {"condition": "blue", "reference": _vg(5, 0), "target": _vg(5, 0),
             "gallery": [_vg(1, 1), _vg(2, 0), _vg(3, 2)]},
        ],
        "focus_object": [
            {"condition": "circle", "reference": _coco(0), "target": _coco(1),
             "gallery": [_coco(2), _coco(3), _coco(4), _coco(5)]},
            {"condition": "bar", "reference": _coco(6), "target": _coco(6),
             "gallery": [_coco(0), _coco(1), _coco(7), _coco(5)]},
            {"condition": "square", "reference": _coco(2), "target": _coco(7),
             "gallery": [_coco(4), _coco(6), _coco(1), _coco(0)]},
        ],
        "change_object": [
            {"condition": "triangle", "reference": _coco(4), "target": _coco(4),
             "gallery": [_coco(0), _coco(1), _coco(2), _coco(3)]},
            # As in one released change_object template: the target is also a distractor, so
            # it ties with itself and can never be a hit.
            {"condition": "square", "reference": _coco(1), "target": _coco(2),
             "gallery": [_coco(2), _coco(6), _coco(7), _coco(3)]},
        ],
    }
    for t in tasks:
        write_json(root / "genecis" / f"{t}.json", ann[t])
    return root


def official_crop(path: Path, box) -> Image.Image:
    """``VAWDataset.load_cropped_image`` with DILATION = 0.7 and PAD_CROP, re-written."""
    im = Image.open(path)
    width, height = im.size
    x, y, w, h = box
    left, top = max(0, x - 0.7 * w), max(0, y - 0.7 * h)
    right, bottom = min(width, left + 1.7 * w), min(height, top + 1.7 * h)
    im = im.crop((left, top, right, bottom))
    cw, ch = im.size
    if cw != ch:
        side = max(cw, ch)
        sq = Image.new(im.mode, (side, side), (0,) if im.mode == "L" else (0, 0, 0))
        sq.paste(im, ((side - cw) // 2, (side - ch) // 2))
        im = sq
    return im.convert("RGB")


def _templates(root: Path, task: str) -> list[dict]:
    return json.loads((root / "genecis" / f"{task}.json").read_text())


def _independent(root: Path, task: str, checkpoint: str, tmp: Path) -> dict[str, float]:
    """R@{1,2,3} of one task computed without the job's loader, crops or scoring."""
    templates = _templates(root, task)
    tmp.mkdir(parents=True, exist_ok=True)

    def path(item: dict) -> str:
        if "val_image_id" in item:
            return str(root / "val2017" / f"{item['val_image_id']:012d}.jpg")
        out = tmp / f"{item['image_id']}-{'-'.join(map(str, item['instance_bbox']))}.png"
        official_crop(root / "VG_100K_all" / f"{item['image_id']}.jpg",
                      item["instance_bbox"]).save(out)
        return str(out)

    emb = Embedder(checkpoint)
    refs = [path(t["reference"]) for t in templates]
    q = emb.queries(refs, [t["condition"].strip() for t in templates])
    hits = {1: [], 2: [], 3: []}
    for i, t in enumerate(templates):
        g = emb.images([path(x) for x in [t["target"], *t["gallery"]]])
        s = g @ q[i]
        rank = 1 + int(np.sum(s[1:] >= s[0]))  # a tie with the target is a miss
        for k in hits:
            hits[k].append(rank <= k)
    return {f"R@{k}": 100.0 * float(np.mean(v)) for k, v in hits.items()}


def test_genecis_matches_an_independent_computation(tmp_path, checkpoint, monkeypatch):
    root = make_genecis(tmp_path / "genecis")
    embedded: list[int] = []
    candidates = Embedder.candidates

    def counting(self, pixels):
        embedded.append(len(pixels))
        return candidates(self, pixels)

    monkeypatch.setattr(Embedder, "candidates", counting)
    report = run_eval(checkpoint, "genecis", str(root), batch_size=4)
    monkeypatch.undo()
    assert [r["benchmark"] for r in report["results"]] == [f"genecis-{t}" for t in TASKS]
    assert [r["queries"] for r in report["results"]] == [3, 2, 3, 2]
    # Distinct gallery crops / images per task, each embedded once.
    distinct = [len({json.dumps(x, sort_keys=True) for t in _templates(root, task)
                     for x in [t["target"], *t["gallery"]]}) for task in TASKS]
    assert [r["gallery"] for r in report["results"]] == distinct == [10, 7, 8, 7]
    assert sum(embedded) == sum(distinct)
    for r, task in zip(report["results"], TASKS):
        want = _independent(root, task, checkpoint, tmp_path / "crops" / task)
        assert r["metrics"].keys() == {"R@1", "R@2", "R@3"}
        for k, v in want.items():
            assert r["metrics"][k] == pytest.approx(v, abs=1e-9), (task, k)
    assert report["mean"] == pytest.approx(
        {k: np.mean([r["metrics"][k] for r in report["results"]]) for k in ("R@1", "R@2", "R@3")})
    # The template whose target is also a distractor is never a hit.
    assert report["results"][3]["metrics"]["R@1"] <= 50.0


def test_crops_are_the_official_crops(tmp_path, checkpoint):
    root = make_genecis(tmp_path / "genecis")
    images, pngs = [], []
    for image_id in (1, 4):  # RGB and greyscale
        path = root / "VG_100K_all" / f"{image_id}.jpg"
        image = torch.from_numpy(decode_rgb(path.read_bytes()))
        for box in BOXES:
            ours = genecis_crop(image, box, str(path))
            want = official_crop(path, box)
            assert ours.shape[0] == ours.shape[1]  # padded square
            assert np.array_equal(ours.numpy(), np.asarray(want)), box
            images.append(evaluate.GenecisImage(str(path), box))
            pngs.append(str(tmp_path / f"{image_id}-{len(pngs)}.png"))
            want.save(pngs[-1])
    assert genecis_crop(image, None) is image
    # The embedder's crops embed as the official crops do, gallery and composed queries alike.
    emb = Embedder(checkpoint, batch_size=3)
    np.testing.assert_allclose(emb.crop_candidates(images), emb.images(pngs), atol=1e-5)
    texts = [f"text {i}" for i in range(len(images))]
    np.testing.assert_allclose(emb.crop_queries(images, texts), emb.queries(pngs, texts),
                               atol=1e-5)


def test_a_box_outside_the_image_is_a_clear_error(tmp_path, checkpoint):
    image = torch.zeros((64, 96, 3), dtype=torch.uint8)
    with pytest.raises(BenchmarkError, match=r"outside vg/7.jpg \(96x64\)"):
        genecis_crop(image, (120.0, 10.0, 10.0, 10.0), "vg/7.jpg")
    with pytest.raises(BenchmarkError, match="outside"):
        genecis_crop(image, (10.0, 10.0, 0.0, 10.0), "vg/7.jpg")  # empty box
    root = make_genecis(tmp_path / "genecis", tasks=("focus_attribute",))
    ann = json.loads((root / "genecis" / "focus_attribute.json").read_text())
    ann[1]["gallery"][0]["instance_bbox"] = [200, 10, 20, 20]
    write_json(root / "genecis" / "focus_attribute.json", ann)
    with pytest.raises(BenchmarkError, match=r"lies outside .*VG_100K_all/1\.jpg"):
        run_eval(checkpoint, "genecis", str(root))


def test_bad_genecis_folders_are_clear_errors(tmp_path, checkpoint):
    root = make_genecis(tmp_path / "genecis")
    with pytest.raises(BenchmarkError, match="no test split"):
        run_eval(checkpoint, "genecis", str(root), split="test")
    with pytest.raises(BenchmarkError, match="no genecis val annotations"):
        run_eval(checkpoint, "genecis", str(tmp_path / "nowhere"))
    (root / "val2017" / f"{139 + 7:012d}.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"missing.*val2017/000000000146\.jpg"):
        run_eval(checkpoint, "genecis", str(root))
    (root / "VG_100K_all" / "5.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"missing.*VG_100K_all/5\.jpg"):
        run_eval(checkpoint, "genecis", str(root))

    hidden = make_genecis(tmp_path / "hidden", tasks=("change_object",))
    ann = json.loads((hidden / "genecis" / "change_object.json").read_text())
    del ann[1]["target"]
    write_json(hidden / "genecis" / "change_object.json", ann)
    with pytest.raises(BenchmarkError, match=r"query 1 has no target.*hidden"):
        run_eval(checkpoint, "genecis", str(hidden))
    ann[1]["target"] = {"image_id": 3}
    write_json(hidden / "genecis" / "change_object.json", ann)
    with pytest.raises(BenchmarkError, match="query 1: its target needs val_image_id"):
        evaluate.load_genecis(str(hidden), "change_object")
    write_json(hidden / "genecis" / "change_object.json", [])
    with pytest.raises(BenchmarkError, match="not a non-empty list of GeneCIS templates"):
        run_eval(checkpoint, "genecis", str(hidden))


def test_only_the_tasks_present_are_evaluated(tmp_path, checkpoint):
    root = make_genecis(tmp_path / "genecis", tasks=("focus_object", "change_object"))
    report = run_eval(checkpoint, "genecis", str(root))
    assert [r["benchmark"] for r in report["results"]] == ["genecis-focus_object",
                                                           "genecis-change_object"]
    assert report["mean"]["R@3"] == pytest.approx(
        np.mean([r["metrics"]["R@3"] for r in report["results"]]))


def test_eval_cli_prints_each_task_and_the_mean(tmp_path, checkpoint):
    root = make_genecis(tmp_path / "genecis")
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["eval", "--checkpoint", checkpoint, "--benchmark", "genecis",
                                   "--data", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for t in TASKS:
        assert f"genecis-{t}" in res.output
    assert "mean: R@1=" in res.output
    report = json.loads(out.read_text())
    assert set(report["mean"]) == {"R@1", "R@2", "R@3"}
    bad = CliRunner().invoke(app, ["eval", "--checkpoint", checkpoint, "--benchmark", "genecis",
                                   "--data", str(root), "--split", "test"])
    assert bad.exit_code == 1 and "no test split" in bad.output
