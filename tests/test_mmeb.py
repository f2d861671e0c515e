"""MMEB on a small folder in its published layout, built here offline.

Every meta-task, in- and out-of-distribution datasets, and queries and candidates that are
text-only, image-only or both. The runner's scores are checked against an independent
computation of the official rule (argmax over each row's candidates, a hit when the positive,
index 0, wins; exact ties are misses): the texts cleaned, the items embedded one by one and
scored with NumPy here. The embedder is shared, as in ``test_evaluate``: a random model's
scores cannot be recomputed any other way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from megapairs_ray.cli import app
from megapairs_ray.models.retriever import RetrieverEncoder
from megapairs_ray.train import mmeb
from megapairs_ray.train.mmeb import MMEB_DATASETS, EncoderSettings, run_mmeb

from .helpers import encode, photo
from .serve_helpers import make_checkpoint

IMG = "<|image_1|>\n"
LABELS = ["a cat", "a dog", "a tree", "a car", "a boat"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _image(root: Path, path: str, seed: int) -> str:
    f = root / "eval_images" / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(encode(photo(seed, (40 + seed % 17, 30 + seed % 11))))
    return path


def _write(root: Path, name: str, rows: list[dict[str, Any]], **columns: Any) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows) if rows else pa.table(columns)
    pq.write_table(table, folder / "test-00000-of-00001.parquet")


def make_mmeb(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Six datasets of the 36 (each meta-task, IND and OOD), six rows each; returns the rows."""
    rng = np.random.default_rng(0)
    data: dict[str, list[dict[str, Any]]] = {}
    seed = 0

    def img(ds: str) -> str:
        nonlocal seed
        seed += 1
        return _image(root, f"{ds}/{seed}.jpg", seed)

    # Classification (IND): image + instruction -> label texts (text-only candidates).
    data["ImageNet-1K"] = [{
        "qry_text": f"{IMG}Represent the given image for classification",
        "qry_img_path": img("ImageNet-1K"),
        "tgt_text": list(rng.permutation(LABELS)), "tgt_img_path": [""] * len(LABELS)}
        for _ in range(6)]
    # Classification (OOD), the same form.
    data["Place365"] = [{
        "qry_text": f"{IMG}Identify the scene shown in the image",
        "qry_img_path": img("Place365"),
        "tgt_text": list(rng.permutation(LABELS)[:3]), "tgt_img_path": [""] * 3}
        for _ in range(6)]
    # VQA (IND): image + question -> answer texts.
    data["OK-VQA"] = [{
        "qry_text": f"{IMG}Represent the given image with the following question: what is "
                    f"this {i}?", "qry_img_path": img("OK-VQA"),
        "tgt_text": [f"answer {i}", f"answer {i + 1}", f"answer {i + 2}"],
        "tgt_img_path": ["", "", ""]} for i in range(6)]
    # Retrieval (IND): text-only queries -> images with an instruction (both).
    pool = [img("MSCOCO_t2i") for _ in range(8)]
    data["MSCOCO_t2i"] = [{
        "qry_text": f"Find me an everyday image that matches the given caption: photo {i}",
        "qry_img_path": "", "tgt_text": [f"{IMG}Represent the given image."] * 4,
        "tgt_img_path": [pool[(i + j) % 8] for j in range(4)]} for i in range(6)]
    # Retrieval (IND): image-only queries (the placeholder alone) -> image-only candidates.
    pool = [img("NIGHTS") for _ in range(8)]
    data["NIGHTS"] = [{
        "qry_text": IMG, "qry_img_path": pool[i],
        "tgt_text": ["", "", ""], "tgt_img_path": [pool[(i + 1) % 8], pool[(i + 2) % 8],
                                                   pool[(i + 3) % 8]]} for i in range(6)]
    # Grounding (OOD): image + referring text -> image candidates with text.
    data["RefCOCO"] = [{
        "qry_text": f"{IMG}Select the portion of the image that isolates the object: {i}",
        "qry_img_path": img("RefCOCO"),
        "tgt_text": [f"{IMG}Represent the given cropped image of the object"] * 3,
        "tgt_img_path": [img("RefCOCO") for _ in range(3)]} for i in range(6)]
    # A row whose positive has an exact duplicate among its negatives: the same item, the same
    # score, a tie, a miss (the official argmax would count it as a hit).
    data["ImageNet-1K"][0]["tgt_text"] = ["a cat", "a dog", "a cat"]
    data["ImageNet-1K"][0]["tgt_img_path"] = ["", "", ""]
    for name, rows in data.items():
        _write(root, name, rows)
    return data


def independent_scores(checkpoint: str, root: Path,
                       data: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """P@1 per dataset by the official rule, with ties as misses, embedding item by item."""
    enc = RetrieverEncoder(checkpoint)

    def embed(text: str, path: str) -> np.ndarray:
        t = text.replace("<|image_1|>", " ").strip() or None
        image = (root / "eval_images" / path).read_bytes() if path else None
        return enc.queries([image], [t])[0]

    out = {}
    for name, rows in data.items():
        hits = []
        for r in rows:
            q = embed(r["qry_text"], r["qry_img_path"])
            scores = np.array([embed(t, p) @ q for t, p in zip(r["tgt_text"],
                                                               r["tgt_img_path"])])
            best = np.flatnonzero(scores == scores.max())
            hits.append(list(best) == [0])
        out[name] = 100.0 * float(np.mean(hits))
    return out


def test_mmeb_scores_equal_an_independent_computation(tmp_path, checkpoint, ray_cluster):
    root = tmp_path / "mmeb"
    data = make_mmeb(root)
    expected = independent_scores(checkpoint, root, data)
    report = run_mmeb(checkpoint, str(root), encoder=EncoderSettings(batch_size=5),
                      work=str(tmp_path / "work"), log=lambda *_: None)
    got = {r["benchmark"]: r["metrics"]["P@1"] for r in report["results"]}
    assert got == pytest.approx(expected, abs=1e-9)
    # MMEB's own order, whatever the folder listing's.
    assert [r["benchmark"] for r in report["results"]] == [
        d for d in MMEB_DATASETS if d in data]
    # Shared candidates embedded once: ImageNet-1K's 5 labels plus its 6 queries.
    assert report["results"][0]["gallery"] == 6 + len(LABELS)
    # Aggregates: meta-task means, IND (ImageNet-1K, OK-VQA, MSCOCO_t2i, NIGHTS) and OOD
    # (Place365, RefCOCO), overall over all six.
    mean = report["mean"]
    assert mean["Classification"] == pytest.approx(
        (expected["ImageNet-1K"] + expected["Place365"]) / 2)
    assert mean["Retrieval"] == pytest.approx(
        (expected["MSCOCO_t2i"] + expected["NIGHTS"]) / 2)
    assert mean["VQA"] == pytest.approx(expected["OK-VQA"])
    assert mean["Grounding"] == pytest.approx(expected["RefCOCO"])
    assert mean["IND"] == pytest.approx(np.mean(
        [expected[d] for d in ("ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "NIGHTS")]))
    assert mean["OOD"] == pytest.approx((expected["Place365"] + expected["RefCOCO"]) / 2)
    assert mean["Overall"] == pytest.approx(np.mean(list(expected.values())))
    assert report["problems"] == {}


def test_an_exact_tie_with_the_positive_is_a_miss():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    # Query 0; candidates: the positive (item 1), a negative tying it exactly (item 1 again or
    # an equal vector), a weaker one.
    assert mmeb.precision_at_1(vectors, [0, 0, 0], [[1, 2, 3], [1, 1, 2], [3, 1]]) == [
        True, False, False]
    assert mmeb.precision_at_1(vectors, [0], [[1]]) == [True]  # a lone positive wins


def test_a_resumed_run_recomputes_nothing_finished(tmp_path, checkpoint, ray_cluster,
                                                   monkeypatch):
    root = tmp_path / "mmeb"
    make_mmeb(root)
    work = str(tmp_path / "work")
    first = run_mmeb(checkpoint, str(root), datasets=["NIGHTS", "OK-VQA"], work=work,
                     log=lambda *_: None)

    def no_embedding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished dataset was embedded again")

    monkeypatch.setattr(mmeb, "embed_items", no_embedding)
    said: list[str] = []
    again = run_mmeb(checkpoint, str(root), datasets=["NIGHTS", "OK-VQA"], work=work,
                     log=said.append)
    assert again["results"] == first["results"]
    assert sum("not recomputed" in s for s in said) == 2
    # Another checkpoint's results are not reused.
    other = make_checkpoint(tmp_path / "other", seed=9)
    with pytest.raises(AssertionError, match="embedded again"):
        run_mmeb(other, str(root), datasets=["NIGHTS"], work=work, log=lambda *_: None)


def test_malformed_datasets_are_counted_and_named(tmp_path, checkpoint, ray_cluster):
    root = tmp_path / "mmeb"
    data = make_mmeb(root)
    # A parquet without the candidate images column: the dataset is skipped, named.
    _write(root, "VizWiz", [], qry_text=["q"], qry_img_path=[""], tgt_text=[["a"]])
    # A row without candidates; a row whose lists differ in length.
    rows = [dict(r) for r in data["OK-VQA"]]
    rows[1] = {**rows[1], "tgt_text": [], "tgt_img_path": []}
    rows[2] = {**rows[2], "tgt_img_path": [""]}
    _write(root, "OK-VQA", rows)
    # A missing image: the rows that need it are not scored, the others are.
    (root / "eval_images" / data["NIGHTS"][0]["qry_img_path"]).unlink()
    # Candidates that are not lists; a query with neither an image nor a text.
    _write(root, "GQA", [{"qry_text": "q", "qry_img_path": "", "tgt_text": "a",
                          "tgt_img_path": ""}])
    _write(root, "TextVQA", [{"qry_text": IMG, "qry_img_path": "", "tgt_text": ["a", "b"],
                              "tgt_img_path": ["", ""]},
                             {"qry_text": "what?", "qry_img_path": "", "tgt_text": ["a", "b"],
                              "tgt_img_path": ["", ""]}])
    # A parquet that is not one (a Git LFS pointer); text-only candidates whose image column
    # is null are candidates, not a malformed row.
    (root / "DocVQA").mkdir()
    (root / "DocVQA" / "test-00000-of-00001.parquet").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    _write(root, "ChartQA", [{"qry_text": "which?", "qry_img_path": "",
                              "tgt_text": ["a", "b"], "tgt_img_path": None}])
    report = run_mmeb(checkpoint, str(root), log=lambda *_: None)
    by_name = {r["benchmark"]: r for r in report["results"]}
    assert by_name["DocVQA"]["problems"] == {"unreadable_parquet": 1}
    assert by_name["ChartQA"]["queries"] == 1 and by_name["ChartQA"]["problems"] == {}
    assert by_name["GQA"]["problems"] == {"candidates_not_lists": 1}
    assert by_name["TextVQA"]["queries"] == 1
    assert by_name["TextVQA"]["problems"] == {"no_content_items": 1, "rows_not_scored": 1}
    viz = by_name["VizWiz"]
    assert viz["metrics"]["P@1"] is None and viz["queries"] == 0
    assert viz["problems"] == {"missing_columns": 1}
    assert "tgt_img_path" in viz["problem_examples"]["missing_columns"]
    okvqa = by_name["OK-VQA"]
    assert okvqa["queries"] == 4
    assert okvqa["problems"] == {"no_candidates": 1, "candidate_lists_differ": 1}
    nights = by_name["NIGHTS"]
    missing = data["NIGHTS"][0]["qry_img_path"]
    # Every row that uses the image, as query or candidate.
    users = sum(missing in (r["qry_img_path"], *r["tgt_img_path"]) for r in data["NIGHTS"])
    assert nights["queries"] == 6 - users
    # Items are (text, image): the image is the query of one item, a candidate of another.
    items = {(t, p) for r in data["NIGHTS"]
             for t, p in [(r["qry_text"], r["qry_img_path"]),
                          *zip(r["tgt_text"], r["tgt_img_path"])] if p == missing}
    assert len(items) == 2
    assert nights["problems"] == {"missing_image_items": 2, "rows_not_scored": users}
    assert missing in nights["problem_examples"]["missing_image_items"]
    # The aggregates leave out the dataset with no score; the problems are in the report.
    assert "VQA" in report["mean"]
    assert report["problems"]["VizWiz:missing_columns"] == 1


def test_mmeb_cli_prints_tables_and_writes_json(tmp_path, checkpoint, ray_cluster):
    root = tmp_path / "mmeb"
    make_mmeb(root)
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["eval", "--checkpoint", checkpoint, "--benchmark", "mmeb",
                                   "--data", str(root), "--datasets", "NIGHTS,RefCOCO",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "NIGHTS" in res.output and "Overall" in res.output
    report = json.loads(out.read_text())
    assert [r["benchmark"] for r in report["results"]] == ["NIGHTS", "RefCOCO"]
    assert (tmp_path / "report.json.parts" / "NIGHTS.json").exists()
    bad = CliRunner().invoke(app, ["eval", "--checkpoint", checkpoint, "--benchmark", "mmeb",
                                   "--data", str(root), "--datasets", "NoSuchSet"])
    assert bad.exit_code == 2 or bad.exit_code == 1
    assert "NoSuchSet" in bad.output and "Traceback" not in bad.output
