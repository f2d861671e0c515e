"""The gallery job on Ray: its vectors are the eval code's, bad images are counted rejects, it
resumes, and a change of checkpoint never mixes two models' vectors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import REJECTS_SCHEMA, detail_of
from megapairs_ray.pipeline.gallery import run_gallery
from megapairs_ray.serve.config import SPACE
from megapairs_ray.serve.gallery import GalleryError, read_gallery
from megapairs_ray.serve.search import GallerySearcher
from megapairs_ray.stages.embed_io import embedding_matrix
from megapairs_ray.train.evaluate import Embedder

from .serve_helpers import gallery_config, make_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _ids_by_path(gallery_dir: str) -> dict[str, int]:
    tables = [pq.read_table(f) for f in storage.list_files(storage.join(gallery_dir, "images"),
                                                          ".parquet")]
    return {r["file_uri"]: r["image_id"] for t in tables for r in t.to_pylist()}


def test_gallery_vectors_equal_the_eval_codes(retriever_gallery):
    g = retriever_gallery
    record = g["record"]
    assert record.counts["embedded"] == record.counts["indexed"] == len(g["images"])
    ids, vectors = embedding_matrix(layout.embeddings_dir(g["gallery_dir"], SPACE))
    by_id = dict(zip(ids.tolist(), vectors.astype(np.float32)))
    paths = {str(p): iid for p, iid in _ids_by_path(g["gallery_dir"]).items()}
    order = sorted(paths)
    want = Embedder(g["checkpoint"]).images(order)  # what `megapairs eval` computes
    got = np.stack([by_id[paths[p]] for p in order])
    assert got.shape == want.shape
    # Stored as fp16: equal to the eval code's vectors within fp16 rounding.
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=2e-3)
    meta = read_gallery(g["gallery_dir"])
    assert meta["checkpoint"] == g["checkpoint"] and meta["count"] == len(order)


def test_rerun_resumes_without_embedding_again(retriever_gallery):
    g = retriever_gallery
    before = storage.read_json(storage.join(g["gallery_dir"], "gallery.json"))
    again = run_gallery(g["config"])
    assert again.counts["tables_skipped_done"] == 1
    assert "tables_embedded" not in again.counts
    assert again.counts["embedded"] == len(g["images"])
    assert storage.read_json(storage.join(g["gallery_dir"], "gallery.json")) == before


def test_bad_images_are_counted_rejects_and_a_new_checkpoint_resets(retriever_gallery,
                                                                     tmp_path):
    """A gallery built from another gallery's images (``images_from``): an image damaged after
    ingest is a reject with its reason, every other image is searchable; switching the
    checkpoint re-embeds everything instead of mixing two models."""
    g = retriever_gallery
    images = [p for p in g["images"]]
    victim, gone = images[0], images[1]
    saved = victim.read_bytes(), gone.read_bytes()
    try:
        victim.write_bytes(b"\xff\xd8\xff\xe0 this is no longer a JPEG" * 20)
        gone.unlink()
        cfg = gallery_config(tmp_path / "g2", g["checkpoint"], images_from=g["gallery_dir"])
        record = run_gallery(cfg)
    finally:
        victim.write_bytes(saved[0])
        gone.write_bytes(saved[1])
    assert record.rejects == {"decode_failed": 1, "unreadable_image": 1}
    assert record.counts["embedded"] == len(images) - 2
    rejects = storage.read_parquet_dir(layout.rejects_dir(cfg.run_dir, "gallery"))
    ids = _ids_by_path(g["gallery_dir"])
    assert rejects.schema.equals(REJECTS_SCHEMA)
    assert sorted(i for r in rejects.column("ids").to_pylist() for i in r) == sorted(
        [ids[str(victim)], ids[str(gone)]])
    assert all(detail_of(r)["message"] for r in rejects.to_pylist())
    searcher = GallerySearcher(cfg.run_dir)
    assert searcher.count == len(images) - 2
    assert searcher.caption(ids[str(images[2])]) is not None  # metadata: the source's tables

    other = make_checkpoint(tmp_path / "other", seed=11)
    switched = run_gallery(gallery_config(tmp_path / "g2", other, images_from=g["gallery_dir"]))
    assert switched.counts["recomputed_changed_settings"] == 1
    assert switched.counts["tables_embedded"] == 1
    assert json.loads((tmp_path / "g2" / "gallery.json").read_text())["checkpoint"] == other


def test_a_gallery_needs_a_finished_source(tmp_path, retriever_gallery):
    cfg = gallery_config(tmp_path / "g", retriever_gallery["checkpoint"],
                         images_from=str(tmp_path / "no-run"))
    with pytest.raises(GalleryError, match="not a run directory"):
        run_gallery(cfg)
    with pytest.raises(GalleryError, match="megapairs gallery"):
        read_gallery(str(tmp_path / "nothing"))


def test_gallery_config_needs_exactly_one_source(tmp_path):
    from megapairs_ray.config import ConfigError

    with pytest.raises(ConfigError, match="exactly one gallery source"):
        gallery_config(tmp_path / "g", "ckpt")
    with pytest.raises(ConfigError, match="exactly one gallery source"):
        gallery_config(tmp_path / "g", "ckpt", images_from="runs/x",
                       input={"uris": ["data/corpus"]})


def test_a_clip_gallery_records_its_pixels_form_and_a_towers_gallery_does_not(
        retriever_gallery, towers_gallery):
    """CLIP's pixels changed to the released processor's (pixels.form 2): a CLIP gallery built
    before lacks the setting, so its next build embeds again; the towers' pixels did not change,
    so their galleries keep their books."""
    from megapairs_ray.models.family import CLIP_PIXELS_FORM
    from megapairs_ray.serve.gallery import read_gallery

    clip = read_gallery(retriever_gallery["gallery_dir"])["settings"]
    towers = read_gallery(towers_gallery["gallery_dir"])["settings"]
    assert clip["pixels.form"] == CLIP_PIXELS_FORM
    assert "pixels.form" not in towers


def test_an_input_ingest_refused_whole_names_ingests_reasons(tmp_path, retriever_gallery):
    """Every image without the caption ingest requires: the gallery has nothing to embed, and
    its one line says why (ingest's rejects), not only that the input looks empty."""
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    for p in retriever_gallery["images"][:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    cfg = gallery_config(tmp_path / "g", retriever_gallery["checkpoint"],
                         input={"uris": [str(folder)], "format": "folder"})
    with pytest.raises(GalleryError, match=r"rejects: \{'missing_caption': 3\}"):
        run_gallery(cfg)
