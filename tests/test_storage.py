import os
import shutil

import numpy as np
import pytest
import s3fs

from megapairs_ray.io import storage
from megapairs_ray.stages.embed_io import write_embeddings


def test_a_failed_write_to_s3_leaves_nothing(bucket):
    uri = f"s3://{bucket}/run/marker.json"
    with pytest.raises(RuntimeError), storage.open_atomic(uri, "w") as f:
        f.write('{"half": ')
        raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)
    storage.write_json(uri, {"whole": True})
    assert storage.read_json(uri) == {"whole": True}


def test_writes_to_a_missing_bucket_fail_instead_of_creating_it(s3_endpoint):
    with pytest.raises(OSError):
        storage.write_json("s3://no-such-bucket-mp/x.json", {})
    assert not s3fs.S3FileSystem().exists("no-such-bucket-mp")


def test_local_failed_write_leaves_no_file_and_listing_skips_leftovers(tmp_path):
    uri = str(tmp_path / "d" / "a.parquet")
    with pytest.raises(RuntimeError), storage.open_atomic(uri) as f:
        f.write(b"partial")
        raise RuntimeError
    assert not storage.exists(uri)
    (tmp_path / "d" / ".tmp-dead-b.parquet").write_bytes(b"left by a killed writer")
    (tmp_path / "d" / "c.parquet").write_bytes(b"x")
    listed = storage.list_files(str(tmp_path / "d"), ".parquet")
    assert listed == [str(tmp_path / "d" / "c.parquet")]
    assert len(storage.list_files(str(tmp_path / "d"), include_hidden=True)) == 2


def test_a_retried_writer_rewrites_the_same_files(tmp_path):
    n, d = 5, 4
    batch = {"image_id": np.arange(n, dtype=np.int64),
             "shard": np.array(["s1", "s1", "s2", "s2", "s2"], dtype=object),
             "status": np.array(["", "", "", "decode_failed", ""], dtype=object),
             "detail": np.array(["", "", "", "x", ""], dtype=object),
             "has_text": np.array([True, False, True, False, True]),
             **{s: np.ones((n, d), dtype=np.float16) for s in
                ("clip_image", "dino_image", "clip_text")}}
    spaces = (("clip_image", "dino_image"), ("clip_text",))
    first = write_embeddings(batch, str(tmp_path), *spaces)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    again = write_embeddings(batch, str(tmp_path), *spaces)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet")) == files
    assert {k: v.tolist() for k, v in first.items()} == {k: v.tolist() for k, v in again.items()}
    assert first["rows"].tolist() == [2, 3] and first["rejected"].tolist() == [0, 1]
    assert first["texts"].tolist() == [1, 2]


def test_removing_works_where_the_working_directory_was_replaced(tmp_path):
    """A ``ray job submit`` driver runs in the job's unpacked ``working_dir``, which a second
    node on the same machine (one Ray temp dir for both) unpacks again: removed, then rewritten
    at the same path. The driver's ``os.getcwd()`` then fails with ENOENT naming no path, and so
    did every removal of a local folder (the soak's first run failed in index that way)."""
    package, run = tmp_path / "pkg", tmp_path / "run"
    (run / "staging" / "shard=0").mkdir(parents=True)
    (run / "staging" / "shard=0" / "part.parquet").write_bytes(b"rows")
    (run / "marker.json").write_text("{}")
    package.mkdir()
    before = os.getcwd()
    try:
        os.chdir(package)
        shutil.rmtree(package)  # what the second node's runtime-env agent does
        package.mkdir()
        with pytest.raises(FileNotFoundError):
            os.getcwd()
        storage.remove(str(run / "staging"), recursive=True)
        storage.remove(str(run / "marker.json"))
        storage.remove(str(run / "never-written"), recursive=True)  # absent: nothing to do
        with pytest.raises(IsADirectoryError):
            storage.remove(str(run))
    finally:
        os.chdir(before)
    assert sorted(p.name for p in run.iterdir()) == []
