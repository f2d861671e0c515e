"""A corpus built to be hostile: names that are not UTF-8, a FIFO, a sparse tar member of a
gigabyte, compressed tars, random bytes named .tar, a member repeated in a row, null parquet keys
beside real ones, and tars, parquet files and loose images under one uri. Nothing crashes, hangs
or blows up memory; every bad record is a counted reject with its reason; every good image comes
through."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ray.config import IngestConfig, InputConfig, config_from_dict
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import detail_of
from megapairs_ray.io.shards import list_shards, read_shard
from megapairs_ray.stages.ingest import IngestShard

from .helpers import add_member, good_samples, jpeg, tiny_config, write_tar

BAD_NAME = "bad-\udcff\udcfe"  # the bytes b"bad-\xff\xfe": not UTF-8


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def _sparse_tar(path: Path, big_bytes: int) -> Path:
    """A tar whose first member declares ``big_bytes`` of data that is a hole on disk (a few
    kB file, a gigabyte to whoever reads it), then an ordinary sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        info = tarfile.TarInfo("huge.jpg")
        info.size = big_bytes
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(big_bytes + (-big_bytes % tarfile.BLOCKSIZE), os.SEEK_CUR)
        tail = tarfile.TarInfo("huge.txt")
        tail.size = 5
        f.write(tail.tobuf(format=tarfile.GNU_FORMAT) + b"hello".ljust(512, b"\0"))
        for name, data in [("ok.jpg", jpeg(7)), ("ok.txt", b"fine")]:
            t = tarfile.TarInfo(name)
            t.size = len(data)
            f.write(t.tobuf(format=tarfile.GNU_FORMAT))
            f.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        f.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return path


def hostile_corpus(root: Path) -> dict[str, str]:
    """Build it; return {what: the expected reason} for the bad records."""
    good = good_samples(3)
    # 1. A tar with a member name that is not UTF-8, and a member repeated in a row.
    _tar(root / "names.tar", [
        ("a.jpg", good[0]["jpg"]), ("a.txt", b"first"),
        (f"{BAD_NAME}.jpg", jpeg(11)), (f"{BAD_NAME}.txt", b"bad name"),
        ("twice.jpg", jpeg(12)), ("twice.jpg", jpeg(13)), ("twice.txt", b"which one?"),
        ("b.jpg", good[1]["jpg"]), ("b.txt", b"second"),
    ])
    # 2. A shard file whose own name is not UTF-8.
    write_tar(root / f"{BAD_NAME}-shard.tar", good_samples(2, start=20, prefix="n"))
    # 3. A gigabyte member in a few kB of sparse file.
    _sparse_tar(root / "sparse.tar", 1 << 30)
    # 4. Compressed tars, named .tar and .tar.gz.
    plain = write_tar(root / "tmp-plain.tar", good_samples(2, start=30, prefix="z"))
    (root / "gzipped.tar").write_bytes(gzip.compress(plain.read_bytes()))
    (root / "also.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    # 5. Random bytes named .tar.
    (root / "random.tar").write_bytes(os.urandom(3000))
    # 6. Parquet with a null key beside the real key that its positional key would have been.
    pq.write_table(pa.table({"jpg": [jpeg(40), jpeg(41), jpeg(42)],
                             "caption": ["p0", "p1", "p2"],
                             "key": ["000000001", None, "k2"]}), root / "keys.parquet")
    # 7. Loose images beside the shards, one with a name that is not UTF-8, and a FIFO.
    (root / "loose").mkdir()
    (root / "loose" / "plain.jpg").write_bytes(jpeg(50))
    (root / "loose" / "plain.txt").write_text("a loose image")
    (root / "loose" / f"{BAD_NAME}.jpg").write_bytes(jpeg(51))
    (root / "loose" / f"{BAD_NAME}.txt").write_text("loose, bad name")
    os.mkfifo(root / "loose" / "pipe.jpg")
    os.mkfifo(root / "loose" / "plain2.txt")
    (root / "loose" / "plain2.jpg").write_bytes(jpeg(52))
    return {"names.tar undecodable member": "undecodable_name",
            "names.tar repeated member": "duplicate_member",
            "shard name": "undecodable_name (shard)",
            "sparse member": "too_many_bytes",
            "gzipped.tar": "compressed_tar (shard)", "also.tar.gz": "compressed_tar (shard)",
            "random.tar": "not_a_tar (shard)",
            "loose undecodable name": "undecodable_name"}


GOOD_KEYS = {"a", "b", "ok", "000000001", "\x00row-000000001", "k2",
             "loose/plain"}


def test_listing_takes_every_kind_and_skips_what_is_not_a_regular_file(tmp_path):
    hostile_corpus(tmp_path / "in")
    shards = list_shards(InputConfig(uris=[str(tmp_path / "in")]))
    kinds = Counter(s.format for s in shards)
    assert kinds == {"webdataset": 6, "parquet": 1, "folder": 1}
    (folder,) = [s for s in shards if s.format == "folder"]
    assert not any(m.endswith("pipe.jpg") for m in folder.members)  # a FIFO would block
    (bad,) = [s for s in shards if s.problem]
    assert "\\xff\\xfe" in bad.name and "not UTF-8" in bad.problem
    for s in shards:  # every shard travels as Arrow/JSON rows (Ray Data, shards.json)
        pa.Table.from_pylist([s.to_row()])
        assert type(s).from_row(json.loads(json.dumps(s.to_row()))) == s
        assert s.slug


def test_every_bad_record_is_a_counted_reject_with_its_reason(tmp_path):
    hostile_corpus(tmp_path / "in")
    input_cfg = InputConfig(uris=[str(tmp_path / "in")])
    run_dir = str(tmp_path / "run")
    stage = IngestShard(run_dir, input_cfg, IngestConfig(min_side=16, max_bytes=1 << 20))
    for shard in list_shards(input_cfg):
        stage.ingest(shard)
    images = storage.read_parquet_dir(storage.join(run_dir, "images"))
    rejects = storage.read_parquet_dir(layout.rejects_dir(run_dir, "ingest")).to_pylist()
    assert set(images.column("key").to_pylist()) == GOOD_KEYS
    assert len(set(images.column("image_id").to_pylist())) == len(GOOD_KEYS)
    record = Counter(r["reason"] for r in rejects if detail_of(r)["key"] is not None)
    shard_level = Counter(r["reason"] for r in rejects if detail_of(r)["key"] is None)
    # plain2's caption file is a FIFO: never opened, so the image has no caption.
    assert record == {"undecodable_name": 2, "duplicate_member": 1, "too_many_bytes": 1,
                      "missing_caption": 1}
    assert shard_level == {"undecodable_name": 1, "compressed_tar": 2, "not_a_tar": 1}
    assert all(detail_of(r)["message"] for r in rejects)
    huge = next(r for r in rejects if r["reason"] == "too_many_bytes")
    assert detail_of(huge)["key"] == "huge" and "not read" in detail_of(huge)["message"]


# The peak RSS of the measuring process's own address space. Not getrusage's ru_maxrss: Linux
# carries the high-water mark across exec, so a child that subprocess starts (vfork + exec)
# reports the pytest process's peak when that is larger, and the measure stops measuring.
_PEAK_RSS_MIB = ("peak_rss_mib = lambda: next(int(line.split()[1]) // 1024 for line in "
                 "open('/proc/self/status') if line.startswith('VmHWM:'))")


def test_a_gigabyte_member_is_refused_from_its_header_not_read(tmp_path):
    """Peak memory of a process ingesting the sparse shard stays far below the member's size."""
    path = _sparse_tar(tmp_path / "in" / "sparse.tar", 1 << 30)
    code = textwrap.dedent(f"""
        from megapairs_ray.config import IngestConfig, InputConfig
        from megapairs_ray.io.shards import list_shards
        from megapairs_ray.stages.embed_io import read_accepted_images
        from megapairs_ray.stages.ingest import IngestShard
        cfg = InputConfig(uris=[{str(path.parent)!r}])
        {_PEAK_RSS_MIB}
        base = peak_rss_mib()
        (shard,) = list_shards(cfg)
        out = IngestShard({str(tmp_path / "run")!r}, cfg, IngestConfig(min_side=16)).ingest(shard)
        rows = list(read_accepted_images({{k: [v] for k, v in shard.to_row().items()}},
                                         {str(tmp_path / "run")!r}, cfg,
                                         max_member_bytes=IngestConfig().max_bytes))
        print(out["counts"]["images"], sum(len(r["image_id"]) for r in rows),
              peak_rss_mib() - base)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    images, embedded_rows, growth_mib = map(int, result.stdout.split())
    assert images == 1 and embedded_rows == 1  # the good sample after it came through
    # Reading the member would add at least 1,024 MiB over the imports' footprint.
    assert growth_mib < 300, f"peak RSS grew {growth_mib} MiB for a member never read"


def test_folder_ids_do_not_depend_on_the_listing(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("b", "c"):
        (root / f"{name}.jpg").write_bytes(jpeg(ord(name)))
        (root / f"{name}.txt").write_text(name)

    def ids() -> dict[str, int]:
        run = tmp_path / f"run-{len(list(root.iterdir()))}"
        cfg = InputConfig(uris=[str(root)])
        for shard in list_shards(cfg):
            IngestShard(str(run), cfg, IngestConfig(min_side=16)).ingest(shard)
        t = storage.read_parquet_dir(storage.join(str(run), "images"))
        return dict(zip(t.column("key").to_pylist(), t.column("image_id").to_pylist()))

    before = ids()
    (root / "a.jpg").write_bytes(jpeg(1))  # sorts first: positional ids would all shift
    (root / "a.txt").write_text("a")
    after = ids()
    assert after["b"] == before["b"] and after["c"] == before["c"] and "a" in after


def test_readers_never_raise_on_hostile_shards(tmp_path):
    hostile_corpus(tmp_path / "in")
    cfg = InputConfig(uris=[str(tmp_path / "in")])
    for shard in list_shards(cfg):
        for item in read_shard(shard, cfg, max_member_bytes=1 << 20):
            key = getattr(item, "key", None)
            if key is not None:
                key.encode("utf-8")  # every key the readers hand on is valid text


@pytest.mark.ray
@pytest.mark.slow
def test_the_job_finishes_on_the_hostile_corpus(ray_cluster, tmp_path):
    """Ingest and embed through Ray on the whole corpus: both finish, the good images are
    embedded, nothing is written outside the run directory."""
    from megapairs_ray.pipeline.embed import EMBED
    from megapairs_ray.pipeline.engine import run_stage
    from megapairs_ray.pipeline.ingest import INGEST

    hostile_corpus(tmp_path / "in")
    before = sorted(p.name for p in (tmp_path / "in").rglob("*"))
    cfg = config_from_dict(tiny_config(tmp_path / "run", [str(tmp_path / "in")],
                                       ingest={"max_bytes": 1 << 20}))
    ingest = run_stage(INGEST, cfg)
    embed = run_stage(EMBED, cfg)
    assert ingest.counts["images"] == embed.counts["embedded"] == len(GOOD_KEYS)
    assert sum(ingest.rejects.values()) == 5
    assert ingest.counts["shard_problems"] == 4
    assert sorted(p.name for p in (tmp_path / "in").rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "run"]


def test_decoding_a_batch_of_palette_bombs_stays_within_the_budget(tmp_path):
    """Paletted PNGs just under a pixel limit are tiny files that decode to hundreds of MB each;
    a batch of them on a thread pool must not hold them all at once."""
    code = textwrap.dedent(f"""
        import io, sys
        from concurrent.futures import ThreadPoolExecutor
        from PIL import Image
        from megapairs_ray import pixels
        im = Image.new("P", (6000, 6000))
        im.putpalette([i % 256 for i in range(768)])
        buf = io.BytesIO(); im.save(buf, "PNG"); data = buf.getvalue()
        budget = int(sys.argv[1])
        if budget:
            pixels.set_decode_budget(budget)
        out = pixels.decode_cpu([data] * 8, 256, ThreadPoolExecutor(8))
        assert all(not isinstance(o, Exception) for o in out), out
        {_PEAK_RSS_MIB}
        print(len(data), peak_rss_mib())
    """)

    def peak(budget: int) -> tuple[int, int]:
        r = subprocess.run([sys.executable, "-c", code, str(budget)], capture_output=True,
                           text=True, timeout=300, check=True)
        size, mib = map(int, r.stdout.split())
        return size, mib

    size, bounded = peak(400 * 2**20)
    assert size < 200_000  # a few hundred kB on disk
    _, unbounded = peak(64 * 2**30)  # a budget too large to bind: eight at once
    assert bounded < 1200, f"{bounded} MiB with a 400 MiB budget"
    assert unbounded > bounded + 500, (unbounded, bounded)


def test_decode_budget_holds_at_most_its_bytes():
    import threading
    import time

    from megapairs_ray.pixels import DecodeBudget

    budget, held, peak, lock = DecodeBudget(100), [0], [0], threading.Lock()

    def work(n: int) -> None:
        with budget.hold(n):
            with lock:
                held[0] += min(n, 100)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.02)
            with lock:
                held[0] -= min(n, 100)

    threads = [threading.Thread(target=work, args=(n,)) for n in [40, 40, 40, 250, 10] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)  # an over-budget image still runs, alone
    assert 0 < peak[0] <= 100
