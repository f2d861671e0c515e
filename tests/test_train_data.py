"""Training data: the MegaPairs form, the image store, the loader stage, the tokenizer."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from megapairs_ray.io.triplets import ImageStore, triplet_problem
from megapairs_ray.models.tokenizer import CLIP_VOCAB_SIZE, load_tokenizer
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.data import (
    MAX_STREAM_READS,
    ModelInput,
    TripletLoader,
    passes_needed,
    stream_passes,
)
from megapairs_ray.train.toy_triplets import shape_image, write_triplet_set

from .train_helpers import train_config


def test_tokenizer_is_openai_clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer

    tok = load_tokenizer(None)
    assert len(tok) == CLIP_VOCAB_SIZE
    texts = ["Find a picture that also shows two dogs, but in the snow.", "make it RED!!"]
    ours = tok(texts, padding="max_length", max_length=77)["input_ids"]
    ref = SimpleTokenizer()(texts).tolist()
    for a, b in zip(ours, ref):
        n = a.index(49407) + 1  # up to end-of-text; padding differs (eot vs 0) by design
        assert a[:n] == b[:n]


def test_the_default_tokenizer_reads_open_clip_s_vocabulary_without_importing_open_clip():
    """Importing open_clip costs every training, loader and encoder process seconds of CPU for
    models it never builds; the vocabulary file is all the tokenizer needs."""
    code = ("import sys; from megapairs_ray.models.tokenizer import load_tokenizer; "
            f"assert len(load_tokenizer(None)) == {CLIP_VOCAB_SIZE}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]", out


def test_what_ray_train_s_controller_unpickles_imports_no_torch():
    """Ray Train's controller, and Ray Data's coordinators of the loaders' stream, unpickle the
    loop's entry, the metrics callback, the config and the loaders; none of them runs a model.
    Importing torch and transformers there cost each launch seconds of CPU before its first
    worker started. (The loaders import them where they run: tested above.)"""
    code = ("import sys; import megapairs_ray.train.entry, megapairs_ray.train.data, "
            "megapairs_ray.train.config; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]", out


GOOD = {"q_img": "images/00000/a.jpg", "q_text": ["x", "y"], "t_img": "images/00000/b.jpg",
        "hns": ["images/00000/a.jpg", "c", "d", "e"]}


@pytest.mark.parametrize(("change", "reason"), [
    ({}, None),
    ({"q_img": None}, "missing_q_img"),
    ({"q_text": []}, "no_instruction"),
    ({"q_text": ["", "  "]}, "no_instruction"),
    ({"q_text": "make it red"}, "no_instruction"),  # a string, not a list
    ({"hns": ["a", 3, "c", "d"]}, "bad_hns"),
    ({"hns": ["a", "c"]}, "too_few_hard_negatives"),
    ({"t_img": "images/00000/a.jpg"}, "target_is_query"),
    ({"t_img": ""}, "bad_t_img"),
])
def test_triplet_problems(change, reason):
    assert triplet_problem({**GOOD, **change}, 4, keep_query_negative=True) == reason


def test_without_the_query_negative_one_more_is_needed():
    assert triplet_problem(GOOD, 4, keep_query_negative=False) == "too_few_hard_negatives"
    assert triplet_problem(GOOD, 3, keep_query_negative=False) is None


def _store_roots(tmp_path):
    tarred, extracted = tmp_path / "tarred", tmp_path / "extracted"
    recs = write_triplet_set(tarred)
    assert recs == write_triplet_set(extracted, extracted=True)
    return recs, tarred, extracted


def test_image_store_reads_tars_and_extracted_folders_alike(tmp_path):
    recs, tarred, extracted = _store_roots(tmp_path)
    paths = sorted({p for r in recs for p in [r["q_img"], r["t_img"], *r["hns"]]})
    from_tar = ImageStore(str(tarred)).read_many(paths)
    from_files = ImageStore(str(extracted)).read_many(paths)
    assert all(isinstance(b, bytes) for b in from_tar)
    assert from_tar == from_files
    # The annotated path is the tar member of the folder's name: extraction keeps paths valid.
    with tarfile.open(tarred / "images" / "00000.tar") as tf:
        name = tf.getmembers()[0].name
        assert tf.extractfile(name).read() == (extracted / "images" / "00000" / name).read_bytes()
    missing = ImageStore(str(tarred)).read_many(["images/00000/nope.jpg", "images/00009/a.jpg"])
    assert all(isinstance(m, Exception) for m in missing)
    assert ImageStore(str(tarred)).exists_many([paths[0], "images/00000/nope.jpg"]) == [True,
                                                                                          False]


def test_image_store_on_s3(tmp_path, bucket):
    import s3fs

    recs, tarred, _ = _store_roots(tmp_path)
    fs = s3fs.S3FileSystem()
    fs.put(str(tarred / "images"), f"{bucket}/ds/images", recursive=True)
    store = ImageStore(f"s3://{bucket}/ds")
    want = ImageStore(str(tarred)).read_many([recs[0]["q_img"], recs[5]["t_img"]])
    assert store.read_many([recs[0]["q_img"], recs[5]["t_img"]]) == want


def _loader(tmp_path, **data):
    recs = write_triplet_set(tmp_path / "ds")
    cfg = TrainConfig.model_validate(train_config(str(tmp_path / "ds" / "train.jsonl"),
                                                  str(tmp_path / "s"), "t", data=data))
    return recs, TripletLoader(cfg.data, ModelInput(image_size=32, max_text_len=16), None)


def _batch(recs):
    return {k: np.array([r[k] for r in recs], dtype=object) for k in recs[0]}


def test_loader_builds_a_training_batch(tmp_path):
    recs, loader = _loader(tmp_path)
    out = loader(_batch(recs[:6]))
    assert out["query_pixels"].shape == (6, 3, 32, 32) and out["query_pixels"].dtype == np.uint8
    assert out["target_pixels"].shape == (6, 3, 32, 32)
    assert out["negative_pixels"].shape == (6, 4, 3, 32, 32)
    assert out["input_ids"].shape == (6, 16) and out["attention_mask"].shape == (6, 16)
    # hns[0] (the query itself) is always the first negative.
    assert np.array_equal(out["negative_pixels"][:, 0], out["query_pixels"])
    # Pixels are the image resized to the model's input: compare one with Pillow's bicubic.
    ref = np.asarray(Image.open(io.BytesIO(shape_image("square", "red"))).convert("RGB")
                     .resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1).astype(int)
    idx = [i for i, r in enumerate(recs[:6]) if r["q_img"].endswith("square-red.jpg")]
    if idx:
        assert np.abs(out["query_pixels"][idx[0]].astype(int) - ref).mean() < 3
    # Each instruction is one of the row's own.
    tok = loader.tokenizer
    for i, r in enumerate(recs[:6]):
        text = tok.decode(out["input_ids"][i], skip_special_tokens=True).strip()
        assert text in [t.lower() for t in r["q_text"]]
    # The target is never among the negatives.
    for i in range(6):
        for j in range(4):
            assert not np.array_equal(out["negative_pixels"][i, j], out["target_pixels"][i])


def test_loader_samples_instructions_and_negatives_afresh(tmp_path):
    recs, loader = _loader(tmp_path)
    rows = _batch([recs[0]] * 40)
    out = loader(rows)
    assert len({tuple(ids) for ids in out["input_ids"]}) > 1
    assert len({out["negative_pixels"][i, 1:].tobytes() for i in range(40)}) > 1


def test_loader_drops_a_row_whose_image_is_broken_and_keeps_the_rest(tmp_path):
    recs, loader = _loader(tmp_path)
    bad = dict(recs[1], t_img="images/00000/not-there.jpg")
    out = loader(_batch([recs[0], bad, recs[2]]))
    assert out["query_pixels"].shape[0] == 2
    assert out["negative_pixels"].shape == (2, 4, 3, 32, 32)
    assert out["input_ids"].shape[0] == 2


def test_one_loader_stream_holds_the_runs_passes_within_its_read_budget(tmp_path):
    """A run's passes go in one stream (each stream starts the loader actors again), up to
    ``MAX_STREAM_READS`` file reads; a set bigger than a run's steps is one pass."""
    doc = train_config(str(tmp_path), str(tmp_path / "store"), "run",
                       optim={"max_steps": 64, "batch_size": 4, "grad_accum_steps": 2})
    cfg = TrainConfig.model_validate(doc)  # 2 workers: 16 rows a step, 1,024 in the run
    assert passes_needed(cfg, 120) == 9  # 1,024 / 120 = 8.5
    assert passes_needed(cfg, 1024) == 1 and passes_needed(cfg, 5000) == 1
    assert stream_passes(9, 2) == 9
    assert stream_passes(10_000, 4) == MAX_STREAM_READS // 4
    assert stream_passes(3, MAX_STREAM_READS * 2) == 1  # a big set: one pass a stream
