"""The synthesis steps' plain parts, without Ray or vLLM: fetching a pair's images by location,
the describe prompt rows and reply checks, tar writing, triplet records and the gallery."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from megapairs_ray.config import DescribeConfig, InputConfig
from megapairs_ray.io.triplets import TRIPLET_FIELDS, ImageStore
from megapairs_ray.synth.describe import (
    FetchPairImages,
    describe_problem,
    make_postprocess,
    make_preprocess,
    template_regex,
)
from megapairs_ray.synth.export import (
    member_name,
    path_of,
    tar_name,
    tar_of,
    triplet_record,
    write_tar,
)
from megapairs_ray.synth.prompts import word_num
from megapairs_ray.synth.report import gallery_html
from tests.helpers import encode, good_samples, photo, tar_locations
from tests.helpers import write_tar as write_shard

INPUT = InputConfig(uris=["unused"])


@pytest.fixture()
def shard(tmp_path):
    samples = good_samples(4)
    samples[0]["jpg"] = encode(photo(0, size=(300, 120)))  # wide: aspect must survive
    samples[3]["jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(200)
    path = write_shard(tmp_path / "shard.tar", samples)
    return tar_locations(path)


def _pair(locs, q, t, pair_id=1):
    row = {"pair_id": pair_id, "query_id": 10, "target_id": 20, "hard_negatives": [10, 30]}
    for prefix, name in (("q_", q), ("t_", t)):
        loc = locs.get(name, dict.fromkeys(("format_kind", "file_uri", "offset", "length",
                                             "row")))
        row.update({prefix + k: v for k, v in loc.items()})
    return row


def _batch(rows):
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_fetch_reads_each_pair_s_images_and_names_what_failed(shard):
    rows = [_pair(shard, "00000.jpg", "00001.jpg", 1),
            _pair(shard, "00002.jpg", "00003.jpg", 2),   # target bytes are not an image
            _pair(shard, "nowhere.jpg", "00001.jpg", 3)]  # query not in any images table
    out = FetchPairImages(INPUT, image_size=64)(_batch(rows))
    assert out["fetch_error"] == ["", "unreadable_image:t", "missing_image:q"]
    q = Image.open(io.BytesIO(out["q_image"][0]))
    assert q.format == "JPEG" and q.size == (64, 26)  # longest side 64, aspect 300:120 kept
    t = Image.open(io.BytesIO(out["t_image"][0]))
    assert max(t.size) == 64
    # The pixels are the source's: the mean colour survives the shrink.
    src = np.asarray(photo(1).convert("RGB"), dtype=float).mean(axis=(0, 1))
    assert np.abs(np.asarray(t.convert("RGB"), dtype=float).mean(axis=(0, 1)) - src).max() < 8
    # Locations stay on the row: a retry reads the images again.
    assert out["q_file_uri"][0] == rows[0]["q_file_uri"]


def _cfg(**kw):
    return DescribeConfig(tiny_model_dir="unused", max_tokens=50, min_words=4, **kw)


def test_describe_rows_carry_both_images_in_order_and_the_paper_s_prompt(shard):
    rows = [_pair(shard, "00000.jpg", "00001.jpg", 7), _pair(shard, "00002.jpg", "00003.jpg", 8)]
    fetched = FetchPairImages(INPUT, image_size=64)(_batch(rows))
    row = {k: v[0] for k, v in fetched.items()}
    out = make_preprocess(_cfg(template_regex=True), attempt=0)(row)
    parts = out["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[0]["text"].startswith("Source Image") and "Target Image" in parts[2]["text"]
    assert f"under {word_num('7')} words" in parts[4]["text"]
    q, t = out["multimodal_data"]["image"]
    assert q.size == Image.open(io.BytesIO(row["q_image"])).size == (64, 26)
    assert t.size != q.size
    assert "q_image" not in out and out["q_file_uri"] == row["q_file_uri"]
    assert "regex" in out["sampling_params"]["structured_outputs"]
    # A row whose image failed goes through as a one-token text prompt, keeping its reason.
    bad = make_preprocess(_cfg(), attempt=0)({k: v[1] for k, v in fetched.items()})
    assert "multimodal_data" not in bad and bad["sampling_params"]["max_tokens"] == 1
    post = make_postprocess(_cfg(), 0, carry=["pair_id", "fetch_error"])
    res = post({**bad, "generated_text": "Both", "num_generated_tokens": 1})
    assert res["reject_reason"] == "unreadable_image:t" and res["description"] == ""


def test_describe_reply_checks():
    cfg = _cfg()
    assert describe_problem("", 0, cfg) == "empty_description"
    assert describe_problem("Both images show a dog and more", 50, cfg) == "truncated"
    assert describe_problem("Both show dogs.", 5, cfg) == "too_short"
    assert describe_problem("Both images show a dog. However, the source...", 12, cfg) == ""


def test_template_regex_admits_the_template_and_nothing_unprintable():
    rx = re.compile(template_regex(40))
    good = ("Both images show a wooden boat. However, the Source Image is empty, whereas the "
            "Target Image has two people.")
    assert rx.fullmatch(good)
    assert not rx.fullmatch(good.replace("wooden", "wood\x00en"))
    assert not rx.fullmatch(good.replace("a wooden boat", "a " + "very " * 20 + "long boat"))


def test_tar_holds_square_jpegs_at_the_paths_ids_give(shard, tmp_path):
    rows = [{"image_id": i, **shard[n]} for i, n in ((-5, "00000.jpg"), (3, "00001.jpg"),
                                                      (9, "00003.jpg"))]
    result = write_tar(rows, str(tmp_path / "out" / "images" / "00000.tar"), INPUT, 128, 90)
    assert dict(result) == {-5: "", 3: "", 9: "unreadable_image"}
    with tarfile.open(tmp_path / "out" / "images" / "00000.tar") as tar:
        names = tar.getnames()
        assert names == [member_name(-5), member_name(3)]  # sorted by id
        for name in names:
            im = Image.open(tar.extractfile(name))
            assert im.format == "JPEG" and im.size == (128, 128)
    assert member_name(-5) == "fffffffffffffffb.jpg"
    # The annotated path of an id resolves through the trainer's image store.
    store = ImageStore(str(tmp_path / "out"))
    got = store.read_many([path_of(-5, 1), path_of(3, 1)])
    assert all(isinstance(g, bytes) for g in got)
    first = (tmp_path / "out" / "images" / "00000.tar").read_bytes()
    write_tar(rows, str(tmp_path / "out" / "images" / "00000.tar"), INPUT, 128, 90)
    assert (tmp_path / "out" / "images" / "00000.tar").read_bytes() == first  # reruns agree


def test_tar_of_spreads_ids_and_paths_follow_it():
    ids = np.arange(-5000, 5000, 7, dtype=np.int64) * 7919
    tars = tar_of(ids, 8)
    assert set(tars.tolist()) == set(range(8))
    assert np.bincount(tars).min() > len(ids) / 8 * 0.7
    assert path_of(int(ids[0]), 8) == f"images/{tar_name(int(tars[0]))}/{member_name(int(ids[0]))}"


ROW = {"pair_id": 1, "query_id": 10, "target_id": 20, "hard_negatives": [10, 31, 32, 33, 34, 35],
       "spaces": ["clip_image"], "similarities": [0.9], "description": "Both images show.",
       "instructions": ["Make it red.", "A red one.", "Paint it red."]}
MODELS = {"describe": "vlm", "instruct": "llm"}


def test_triplet_record_is_the_released_form_with_provenance_beside():
    rec, reason = triplet_record(ROW, 4, set(), 4, MODELS)
    assert reason == "" and tuple(rec)[:4] == TRIPLET_FIELDS
    assert rec["hns"][0] == rec["q_img"] == path_of(10, 4) and rec["t_img"] == path_of(20, 4)
    assert rec["hns"][1:] == [path_of(h, 4) for h in ROW["hard_negatives"] if h != 10]
    assert rec["q_text"] == ROW["instructions"] and rec["describe_model"] == "vlm"
    json.dumps(rec)


def test_triplet_record_drops_unreadable_negatives_then_rejects():
    rec, _ = triplet_record(ROW, 4, {31}, 4, MODELS)
    assert rec["hard_negative_ids"] == [32, 33, 34, 35] and len(rec["hns"]) == 5
    assert triplet_record(ROW, 4, {31, 32}, 4, MODELS) == (None, "too_few_hard_negatives")
    assert triplet_record(ROW, 4, {20}, 4, MODELS) == (None, "unreadable_image")


def test_gallery_escapes_text_and_embeds_thumbnails(shard, tmp_path):
    rows = [{"image_id": i, **shard[n]} for i, n in ((10, "00000.jpg"), (20, "00001.jpg"),
                                                      (31, "00002.jpg"))]
    write_tar(rows, str(tmp_path / "images" / "00000.tar"), INPUT, 64, 90)
    row = {**ROW, "hard_negatives": [10, 31],
           "instructions": ["<script>alert(1)</script> make it red", "b" * 9, "c" * 9]}
    rec, _ = triplet_record(row, 1, set(), 1, MODELS)
    rec["hns"].append(path_of(99, 1))  # not in the tar: shown as missing, not a crash
    page = gallery_html([rec], ImageStore(str(tmp_path)), "t")
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert page.count("data:image/jpeg;base64,") == 3  # query, target, one negative
    assert "image unreadable" in page
