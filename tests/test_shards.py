import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from megapairs_ray.config import InputConfig
from megapairs_ray.ids import image_id
from megapairs_ray.io.shards import (
    Record,
    ShardProblem,
    fetch_bytes,
    list_shards,
    read_shard,
)
from tests.helpers import good_samples, jpeg, write_tar


def _records(shard, cfg):
    items = list(read_shard(shard, cfg))
    return ([i for i in items if isinstance(i, Record)],
            [i for i in items if isinstance(i, ShardProblem)])


def test_webdataset_written_by_the_webdataset_library(tmp_path):
    path = tmp_path / "corpus" / "a-000.tar"
    path.parent.mkdir()
    samples = good_samples(5)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write({"__key__": s["__key__"].decode(), "jpg": s["jpg"], "txt": s["txt"]})
    cfg = InputConfig(uris=[str(tmp_path / "corpus")])
    [shard] = list_shards(cfg)
    assert shard.format == "webdataset" and shard.name == "a-000.tar"
    recs, problems = _records(shard, cfg)
    assert not problems
    assert [r.key for r in recs] == [s["__key__"].decode() for s in samples]
    assert [r.image for r in recs] == [s["jpg"] for s in samples]
    assert recs[2].caption == "picture number 2"


def test_locations_fetch_back_the_same_bytes(tmp_path):
    write_tar(tmp_path / "s.tar", good_samples(6))
    cfg = InputConfig(uris=[str(tmp_path)])
    [shard] = list_shards(cfg)
    recs, _ = _records(shard, cfg)
    rows = [{"file_uri": shard.uri, "format_kind": "webdataset", **r.location}
            for r in reversed(recs)]
    assert fetch_bytes(rows, cfg) == [r.image for r in reversed(recs)]


def test_json_caption_is_used_when_there_is_no_txt(tmp_path):
    samples = good_samples(2)
    for s in samples:
        del s["txt"]
    write_tar(tmp_path / "s.tar", samples)
    cfg = InputConfig(uris=[str(tmp_path)])
    recs, _ = _records(list_shards(cfg)[0], cfg)
    assert recs[0].caption == "json caption 0"


@pytest.mark.parametrize("cut", ["inside-data", "inside-header", "at-member-boundary"])
def test_truncated_tar_keeps_what_came_before(tmp_path, cut):
    path = write_tar(tmp_path / "s.tar", good_samples(10))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        header = [m.offset for m in tar.getmembers()][16]  # 6th sample's second member
    end = {"inside-data": header + 512 + 7, "inside-header": header + 100,
           "at-member-boundary": header}[cut]
    path.write_bytes(data[:end])
    cfg = InputConfig(uris=[str(tmp_path)])
    recs, problems = _records(list_shards(cfg)[0], cfg)
    assert [p.reason for p in problems] == ["tar_truncated"]
    whole = [r for r in recs if r.problem is None]
    assert len(whole) == 5
    assert all(r.image and r.caption for r in whole)
    # The sample cut in half is reported, not silently dropped.
    assert [r.problem for r in recs if r.problem] == ["tar_truncated"]


def test_missing_image_and_duplicate_key(tmp_path):
    samples = good_samples(3)
    samples.append({"__key__": b"00001", "jpg": jpeg(50), "txt": b"again"})
    samples.append({"__key__": b"orphan", "txt": b"caption without image"})
    write_tar(tmp_path / "s.tar", samples)
    cfg = InputConfig(uris=[str(tmp_path)])
    recs, _ = _records(list_shards(cfg)[0], cfg)
    problems = {r.key: r.problem for r in recs if r.problem}
    assert problems == {"00001": "duplicate_key", "orphan": "missing_image"}


def test_parquet_with_bytes_and_with_hf_image_struct(tmp_path):
    imgs = [jpeg(i) for i in range(4)]
    pq.write_table(pa.table({"jpg": imgs, "caption": ["a", "b", None, "d"],
                             "key": ["k0", "k1", "k2", "k3"]}), tmp_path / "p1.parquet",
                   row_group_size=2)
    struct = pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(imgs)])
    pq.write_table(pa.table({"image": struct, "text": ["w", "x", "y", "z"]}),
                   tmp_path / "p2.parquet")
    cfg1 = InputConfig(uris=[str(tmp_path / "p1.parquet")])
    recs, problems = _records(list_shards(cfg1)[0], cfg1)
    assert not problems
    assert [r.key for r in recs] == ["k0", "k1", "k2", "k3"]
    assert recs[2].caption is None and recs[3].image == imgs[3]
    rows = [{"file_uri": str(tmp_path / "p1.parquet"), "format_kind": "parquet", **r.location}
            for r in recs[::-1]]
    assert fetch_bytes(rows, cfg1) == imgs[::-1]  # across row groups, any order

    cfg2 = InputConfig(uris=[str(tmp_path / "p2.parquet")], image_column="image",
                       caption_column="text", key_column=None)
    recs, _ = _records(list_shards(cfg2)[0], cfg2)
    assert [r.image for r in recs] == imgs
    assert [r.key for r in recs] == ["000000000", "000000001", "000000002", "000000003"]


def test_parquet_missing_column_and_corrupt_file(tmp_path):
    pq.write_table(pa.table({"other": [1, 2]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = InputConfig(uris=[str(tmp_path)])
    shards = list_shards(cfg)
    assert [s.name for s in shards] == ["a.parquet", "b.parquet"]
    _, p_a = _records(shards[0], cfg)
    _, p_b = _records(shards[1], cfg)
    assert [p.reason for p in p_a] == ["missing_column"]
    assert [p.reason for p in p_b] == ["shard_unreadable"]


def test_folder_of_images_with_caption_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"im{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "imgs" / "im0.txt").write_text("first")
    (tmp_path / "imgs" / "im1.json").write_text(json.dumps({"caption": "second"}))
    cfg = InputConfig(uris=[str(tmp_path / "imgs")], format="folder")
    [shard] = list_shards(cfg)
    recs, _ = _records(shard, cfg)
    assert {r.key: r.caption for r in recs} == {"im0": "first", "im1": "second", "im2": None}
    rows = [{"file_uri": r.location["file"], "format_kind": "folder", **r.location} for r in recs]
    assert fetch_bytes(rows, cfg) == [r.image for r in recs]


def test_ids_are_stable_across_copies_of_the_corpus(tmp_path):
    for root in ("here", "there/deeper"):
        write_tar(tmp_path / root / "sub" / "s.tar", good_samples(2))
    a = list_shards(InputConfig(uris=[str(tmp_path / "here")]))[0]
    b = list_shards(InputConfig(uris=[str(tmp_path / "there" / "deeper")]))[0]
    assert a.name == b.name == "sub/s.tar" and a.uri != b.uri
    assert image_id(a.name, "00000") == image_id(b.name, "00000")
    assert image_id(a.name, "00000") != image_id(a.name, "00001")
    assert image_id("sub/s.tar", "00000") == image_id("sub/s.tar", "00000")


def test_listing_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(InputConfig(uris=[str(tmp_path / "missing")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="matched no shards"):
        list_shards(InputConfig(uris=[str(tmp_path / "empty")], format="webdataset"))
    write_tar(tmp_path / "d" / "s.tar", good_samples(1))
    with pytest.raises(ValueError, match="more than once"):
        list_shards(InputConfig(uris=[str(tmp_path / "d"), str(tmp_path / "d" / "s.tar")]))


def test_glob_uris(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"part-{i}.tar", good_samples(1))
    (tmp_path / "notes.txt").write_text("x")
    shards = list_shards(InputConfig(uris=[str(tmp_path / "part-*.tar")]))
    assert [s.name for s in shards] == ["part-0.tar", "part-1.tar", "part-2.tar"]


def test_hostile_captions_never_break_a_shard(tmp_path):
    samples = good_samples(3)
    samples[0]["json"] = b"[" * 100_000  # RecursionError in json.loads
    del samples[0]["txt"]
    samples[1]["json"] = b'{"caption": "lone \\ud800 surrogate"}'
    del samples[1]["txt"]
    samples[2]["txt"] = b"bad utf-8 \xff\xfe here"
    write_tar(tmp_path / "s.tar", samples)
    cfg = InputConfig(uris=[str(tmp_path)])
    recs, problems = _records(list_shards(cfg)[0], cfg)
    assert not problems and len(recs) == 3
    assert recs[0].caption is None
    assert recs[1].caption == "lone ? surrogate"
    assert recs[1].caption.encode("utf-8")  # valid UTF-8 now: Arrow will take it
    assert recs[2].caption.startswith("bad utf-8 ")


def test_parquet_column_types(tmp_path):
    pq.write_table(pa.table({"jpg": ["not", "bytes"], "caption": ["a", "b"]}),
                   tmp_path / "strings.parquet")
    pq.write_table(pa.table({"jpg": [jpeg(1)], "caption": [b"bytes caption"]}),
                   tmp_path / "bincap.parquet")
    cfg = InputConfig(uris=[str(tmp_path / "strings.parquet")])
    _, problems = _records(list_shards(cfg)[0], cfg)
    assert [p.reason for p in problems] == ["bad_column_type"]
    cfg = InputConfig(uris=[str(tmp_path / "bincap.parquet")])
    recs, _ = _records(list_shards(cfg)[0], cfg)
    assert recs[0].caption == "bytes caption"
    # Numbers are no captions: the wrong column named, not text to index.
    pq.write_table(pa.table({"jpg": [jpeg(1)], "caption": [17]}), tmp_path / "intcap.parquet")
    cfg = InputConfig(uris=[str(tmp_path / "intcap.parquet")])
    recs, problems = _records(list_shards(cfg)[0], cfg)
    assert recs == [] and [p.reason for p in problems] == ["bad_column_type"]
    assert "input.caption_column" in problems[0].detail


def test_folder_names_with_dots_and_clashing_stems(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "my.photo.jpg").write_bytes(jpeg(1))
    (tmp_path / "f" / "my.photo.txt").write_text("dotted")
    (tmp_path / "f" / "cat.jpg").write_bytes(jpeg(2))
    (tmp_path / "f" / "cat.png").write_bytes(jpeg(3))
    cfg = InputConfig(uris=[str(tmp_path / "f")], format="folder")
    recs, _ = _records(list_shards(cfg)[0], cfg)
    by_key = {r.key: r for r in recs}
    assert by_key["my.photo"].caption == "dotted" and by_key["my.photo"].problem is None
    assert [r.problem for r in recs if r.key == "cat"].count("duplicate_key") == 1
    assert len(recs) == 3  # nothing listed is lost: accepted or a counted duplicate
