import json
import tarfile
from collections import Counter

from megapairs_ray.config import IngestConfig, InputConfig
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import REJECTS_SCHEMA, detail_of
from megapairs_ray.io.shards import fetch_bytes, list_shards
from megapairs_ray.stages.ingest import IngestShard
from tests.helpers import awkward_images, bad_images, good_samples, write_tar


def messy_shard(path):
    """Good samples, every bad image, awkward modes, caption problems, then a cut-off end."""
    samples = good_samples(4)
    for name, (data, _) in bad_images().items():
        ext = "png" if name == "bomb" else "jpg"
        samples.append({"__key__": f"bad-{name}".encode(), ext: data, "txt": b"caption"})
    for name, data in awkward_images().items():
        ext = "png" if data.startswith(b"\x89PNG") else "jpg"
        samples.append({"__key__": f"mode-{name}".encode(), ext: data, "txt": b"caption"})
    samples.append({"__key__": b"no-caption", "jpg": good_samples(1, 90)[0]["jpg"]})
    samples.append({"__key__": b"blank-caption", "jpg": good_samples(1, 91)[0]["jpg"],
                    "txt": b"  \n\t "})
    samples += good_samples(2, start=100)
    write_tar(path, samples)
    with tarfile.open(path) as tar:
        last_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    data = path.read_bytes()
    path.write_bytes(data[: last_jpg.offset_data + 100])  # the last sample is cut in half
    return samples


def test_every_record_is_accepted_or_rejected_with_a_reason(tmp_path):
    messy_shard(tmp_path / "in" / "messy.tar")
    input_cfg = InputConfig(uris=[str(tmp_path / "in")])
    run_dir = str(tmp_path / "run")
    [shard] = list_shards(input_cfg)
    stage = IngestShard(run_dir, input_cfg, IngestConfig(min_side=16))
    summary = stage({k: [v] for k, v in shard.to_row().items()})
    assert summary["shard"] == [shard.slug]
    marker = {"counts": json.loads(summary["counts"][0])}  # what the pipeline's marker holds

    images = storage.read_parquet(layout.images_file(run_dir, shard.slug))
    rejects = storage.read_parquet(layout.rejects_file(run_dir, "ingest", shard.slug))

    reasons = Counter(rejects.column("reason").to_pylist())
    expected = Counter(reason for _, reason in bad_images().values())
    expected.update({"missing_caption": 1, "empty_caption": 1, "tar_truncated": 2})
    assert reasons == expected  # the cut sample + the shard-level problem
    accepted = set(images.column("key").to_pylist())
    assert accepted == {"00000", "00001", "00002", "00003", "00100",
                        "mode-cmyk", "mode-rgba", "mode-palette", "mode-gray16", "mode-gray"}
    assert marker["counts"]["images"] == len(accepted)
    # Record rejects and shard-level problems are counted apart: the cut sample is a record
    # reject, the cut itself the shard's problem (one row in the table without a key).
    assert marker["counts"]["rejects"] == rejects.num_rows - 1
    assert {k: n for k, n in marker["counts"].items() if k.startswith("shard_problem:")} == {
        "shard_problem:tar_truncated": 1}
    assert {k[7:]: n for k, n in marker["counts"].items() if k.startswith("reject:")} == dict(
        reasons - Counter({"tar_truncated": 1}))
    # The one reject shape: a record's id and key; the shard's own problem has neither.
    assert rejects.schema.equals(REJECTS_SCHEMA)
    cut = [r for r in rejects.to_pylist() if r["reason"] == "tar_truncated"]
    assert [detail_of(r)["key"] for r in cut][1] is None and cut[1]["ids"] == []
    assert len(cut[0]["ids"]) == 1 and {r["stage"] for r in cut} == {"ingest"}
    assert marker["counts"]["converted_from_CMYK"] == 1
    assert all(detail_of(r)["message"] for r in rejects.to_pylist())

    # Every accepted row points at its bytes: fetched back, they are the bytes written.
    rows = images.to_pylist()
    fetched = fetch_bytes(rows, input_cfg)
    originals = {s["__key__"].decode(): next(v for k, v in s.items() if k in ("jpg", "png"))
                 for s in messy_shard(tmp_path / "again.tar")}
    assert fetched == [originals[r["key"]] for r in rows]
    assert len(set(images.column("image_id").to_pylist())) == len(rows)


def test_reject_mode_and_optional_captions(tmp_path):
    messy_shard(tmp_path / "in" / "messy.tar")
    input_cfg = InputConfig(uris=[str(tmp_path / "in")])
    [shard] = list_shards(input_cfg)
    cfg = IngestConfig(min_side=16, unusual_modes="reject", require_caption=False)
    IngestShard(str(tmp_path / "run"), input_cfg, cfg).ingest(shard)
    rejects = storage.read_parquet(layout.rejects_file(str(tmp_path / "run"), "ingest",
                                                       shard.slug))
    reasons = Counter(rejects.column("reason").to_pylist())
    assert reasons["unusual_mode"] == 4  # CMYK, RGBA, palette, 16-bit; plain grey is fine
    assert "missing_caption" not in reasons and "empty_caption" not in reasons
    images = storage.read_parquet(layout.images_file(str(tmp_path / "run"), shard.slug))
    caps = dict(zip(images.column("key").to_pylist(), images.column("caption").to_pylist()))
    assert caps["no-caption"] is None and caps["blank-caption"] is None
