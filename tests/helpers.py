"""Builders of small real inputs for tests: images in every awkward mode, shards, configs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_CLIP = {"model": "mp-tiny-clip", "pretrained": None}
TINY_EMBED: dict[str, Any] = {
    # The paper's three spaces, with tiny random encoders: what the plumbing tests need.
    "spaces": [
        {"name": "clip_image", "encoder": {"kind": "open_clip_image", **TINY_CLIP}},
        {"name": "dino_image", "encoder": {
            "kind": "transformers_image", "model": "mp-tiny-dinov2", "pretrained": False,
            "image_size": 56,
            "config_overrides": {"hidden_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "intermediate_size": 64,
                                 "patch_size": 14, "image_size": 56}}},
        {"name": "clip_text", "encoder": {"kind": "open_clip_text", **TINY_CLIP}},
    ],
    "device": "cpu", "precision": "fp32", "decode": "cpu", "batch_size": 16,
    "decode_threads": 1, "num_cpus": 0.5, "reader_num_cpus": 0.25, "writer_num_cpus": 0.25,
    "writer_batch_rows": 24,
}


def tiny_config(run_dir: str | Path, uris: list[str], **sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "profile": "test", "run_dir": str(run_dir),
        "input": {"uris": uris},
        "ingest": {"min_side": 16, "num_cpus": 0.25},
        "embed": dict(TINY_EMBED),
    }
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v}
    return doc


def encode(im: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A smooth random RGB picture (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def jpeg(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=90)


def awkward_images() -> dict[str, bytes]:
    """One image per mode the pipeline must convert (or reject on request)."""
    base = photo(99)
    rgba = base.convert("RGBA")
    alpha = np.array(rgba)
    alpha[:, : alpha.shape[1] // 2, 3] = 0  # left half transparent
    rgba = Image.fromarray(alpha)
    i16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "cmyk": encode(base.convert("CMYK"), "JPEG"),
        "rgba": encode(rgba, "PNG"),
        "palette": encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "gray16": encode(i16, "PNG"),
        "gray": encode(base.convert("L"), "JPEG"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Broken inputs and the reject reason each must produce."""
    good = jpeg(1, (128, 96))
    corrupt = bytearray(good)
    for i in range(150, 190):  # inside the quantisation / Huffman tables
        corrupt[i] = 0xFF if i % 2 else 0x00
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG")  # 144 Mpx, tiny file
    return {
        "zero": (b"", "empty_bytes"),
        "text": (b"this is not an image at all, just text\n" * 4, "not_an_image"),
        "truncated": (good[: len(good) // 2], "corrupt_image"),
        "corrupt": (bytes(corrupt), "corrupt_image"),
        "bomb": (bomb, "too_many_pixels"),
        "tiny": (jpeg(2, (8, 8)), "too_small"),
        "sliver": (jpeg(3, (400, 20)), "extreme_aspect_ratio"),
    }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """``samples``: {"__key__": b"k", "jpg": ..., "txt": ...} — webdataset's sample form."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            key = s["__key__"].decode()
            for ext, data in s.items():
                if ext != "__key__":
                    add_member(tar, f"{key}.{ext}", data)
    return path


def good_samples(n: int, start: int = 0, prefix: str = "") -> list[dict[str, bytes]]:
    return [{"__key__": f"{prefix}{i:05d}".encode(), "jpg": jpeg(i),
             "txt": f"picture number {i}".encode(),
             "json": json.dumps({"caption": f"json caption {i}"}).encode()}
            for i in range(start, start + n)]


def tar_locations(path: Path) -> dict[str, dict[str, Any]]:
    """Member name -> the images table's location columns for it."""
    with tarfile.open(path) as tar:
        return {m.name: {"format_kind": "webdataset", "file_uri": str(path),
                         "offset": m.offset_data, "length": m.size, "row": None}
                for m in tar.getmembers()}


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium(args: list[str], profile_dir: Path, timeout: float = 120) -> str:
    """Run headless Chromium (Debian's, installed by scripts/setup.sh); its stdout."""
    import subprocess

    proc = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}",
                           *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def write_json(path: Path, data: object) -> None:
    """A benchmark annotation file, with its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def pair_rejects(path: Path | str) -> list[dict[str, Any]]:
    """A synthesis or export step's rejects (the one shape, ``io/rejects.py``) as rows keyed by
    pair: ``pair_id``, ``reject_reason`` (the step's full reason) and the step's payload."""
    from megapairs_ray.io.rejects import REJECTS_SCHEMA, detail_of
    from megapairs_ray.io.storage import exists, read_parquet_dir

    table = read_parquet_dir(str(path)) if exists(str(path)) else None
    if table is None:
        return []
    assert table.schema.equals(REJECTS_SCHEMA), table.schema
    out = []
    for r in table.to_pylist():
        detail = detail_of(r)
        [pair_id] = r["ids"]
        out.append({**detail, "pair_id": pair_id, "reason": r["reason"],
                    "reject_reason": detail.pop("message")})
    return out


def stop_local_cluster(root: Path, gcs_port: int) -> None:
    """SIGKILL a cluster started here with ``ray start`` under temp dirs in ``root`` (never
    ``ray stop``, which stops every Ray on the machine): the processes naming ``root``, and the
    head's Ray client server, which names only the GCS address."""
    import shutil
    import subprocess

    subprocess.run(["pkill", "-9", "-f", str(root)], check=False)
    subprocess.run(["pkill", "-9", "-f", f"ray.util.client.server --address=[^ ]+:{gcs_port} "],
                   check=False)
    shutil.rmtree(root, ignore_errors=True)
