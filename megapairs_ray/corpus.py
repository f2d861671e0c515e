"""The bundled default corpus: real public-domain images with captions, as webdataset shards.

Built from Debian's OpenClipArt packages (``openclipart-png`` + ``openclipart-svg``): the PNG is
the image, the SVG twin's Dublin Core title and description are the caption. Images are
composited on white and resized like img2dataset does (longest side <= ``max_side``), stored as
JPEG — with every tenth kept as an RGBA PNG so the pipeline's mode handling is exercised — in
img2dataset's layout: ``KEY.jpg|png``, ``KEY.txt`` (caption), ``KEY.json`` (metadata).
Nothing is committed: ``megapairs corpus build`` makes it on the machine that runs the demo.
"""

from __future__ import annotations

import html
import io
import json
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

OPENCLIPART = Path("/usr/share/openclipart")
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESCRIPTION = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_MAX_SOURCE_BYTES = 4 * 1024**2  # a few OpenClipArt PNGs are hundreds of megapixels


def svg_caption(svg: Path) -> str | None:
    """Title (and a short description) from an OpenClipArt SVG's metadata."""
    head = svg.read_text(errors="replace")[:20000]
    title = _TITLE.search(head)
    if not title:
        return None
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", title.group(1))).split())
    desc = _DESCRIPTION.search(head)
    if desc:
        d = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", desc.group(1))).split())
        if d and d.lower() != text.lower() and len(d) < 200:
            text = f"{text}. {d}"
    return text or None


def candidates(root: Path = OPENCLIPART) -> Iterator[tuple[Path, str]]:
    """(png, caption) pairs in a stable order."""
    for png in sorted((root / "png").rglob("*.png")):
        svg = root / "svg" / png.relative_to(root / "png").with_suffix(".svg")
        if not svg.exists() or png.stat().st_size > _MAX_SOURCE_BYTES:
            continue
        caption = svg_caption(svg)
        if caption:
            yield png, caption


def _encode(png: Path, max_side: int, as_png: bool) -> tuple[bytes, str, int, int]:
    with Image.open(png) as im:
        im = im.convert("RGBA")
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        if as_png:
            im.save(buf, "PNG", optimize=False)
            return buf.getvalue(), "png", im.width, im.height
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        Image.alpha_composite(white, im).convert("RGB").save(buf, "JPEG", quality=90)
        return buf.getvalue(), "jpg", im.width, im.height


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


LABELS_FILE = "labels.json"


def build_corpus(out: Path, n_images: int = 1000, shard_size: int = 100, max_side: int = 384,
                 root: Path = OPENCLIPART) -> dict[str, int]:
    """Write ``n_images`` images into ``out/shard-NNNNN.tar``, and ``out/labels.json`` (each
    key's top-level OpenClipArt category: a label no encoder or miner sees, for measuring
    retrieval against chance); idempotent for the same args."""
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise FileNotFoundError(
            f"{root} not found: install Debian's openclipart-png and openclipart-svg packages")
    stamp = out / "corpus.json"
    want = {"n_images": n_images, "shard_size": shard_size, "max_side": max_side}
    labels = out / LABELS_FILE
    built = stamp.exists() and {k: json.loads(stamp.read_text()).get(k) for k in want} == want
    if built and labels.exists():
        return json.loads(stamp.read_text())
    pool = list(candidates(root))
    if len(pool) < n_images:
        raise ValueError(f"only {len(pool)} captioned images available, {n_images} requested")
    step = len(pool) / n_images  # spread the sample over every category
    chosen = [pool[int(i * step)] for i in range(n_images)]
    out.mkdir(parents=True, exist_ok=True)
    labels.write_text(json.dumps({f"{i:09d}": png.relative_to(root).parts[1]
                                  for i, (png, _) in enumerate(chosen)}))
    if built:
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    for s in range(0, n_images, shard_size):
        shard = out / f"shard-{s // shard_size:05d}.tar"
        tmp = shard.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i, (png, caption) in enumerate(chosen[s : s + shard_size], start=s):
                key = f"{i:09d}"
                data, ext, w, h = _encode(png, max_side, as_png=(i % 10 == 9))
                meta = {"key": key, "caption": caption, "width": w, "height": h,
                        "source": str(png.relative_to(root))}
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        tmp.replace(shard)
    summary = {**want, "shards": -(-n_images // shard_size),
               "seconds": round(time.perf_counter() - t0, 1)}
    stamp.write_text(json.dumps(summary, indent=2))
    return summary
