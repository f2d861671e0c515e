"""A small learnable triplet set in the released MegaPairs form, for smoke-testing training
(``megapairs train-toy-data``; the tests and ``configs/train-tiny.yaml`` use it).

Query: a shape in one colour; instruction: "make it <colour>"; target: the same shape in that
colour. Hard negatives: the query itself (``hns[0]``), the same shape in other colours, and other
shapes in the asked colour — so the instruction and the image are both needed to rank the target
first. Images go into webdataset-style tars the annotated paths point into.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (235, 215, 40), "purple": (140, 50, 170), "orange": (245, 140, 20)}
SHAPES = ("square", "circle", "triangle", "bar")


def shape_image(shape: str, colour: str, size: int = 64) -> bytes:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    fill = COLOURS[colour]
    m = size // 6
    if shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=fill)
    elif shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=fill)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    else:
        d.rectangle([m, size // 2 - m, size - m, size // 2 + m], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_triplet_set(root: Path, n_hard_negatives: int = 4, extracted: bool = False,
                      ) -> list[dict[str, Any]]:
    """Write the images and return every (shape, colour -> other colour) triplet; with
    ``extracted`` the images are plain files instead of tar shards."""
    root.mkdir(parents=True, exist_ok=True)
    names = {(s, c): f"{s}-{c}.jpg" for s in SHAPES for c in COLOURS}
    shard_of = {key: f"{i % 2:05d}" for i, key in enumerate(sorted(names))}
    path = {key: f"images/{shard_of[key]}/{names[key]}" for key in names}
    if extracted:
        for key, p in path.items():
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            (root / p).write_bytes(shape_image(*key))
    else:
        (root / "images").mkdir(exist_ok=True)
        for shard in sorted(set(shard_of.values())):
            with tarfile.open(root / "images" / f"{shard}.tar", "w") as tar:
                for key in sorted(names):
                    if shard_of[key] == shard:
                        _add(tar, names[key], shape_image(*key))
    records = []
    colours = list(COLOURS)
    for s in SHAPES:
        for c in colours:
            for c2 in colours:
                if c2 == c:
                    continue
                others = [path[(s, o)] for o in colours if o not in (c, c2)]
                others += [path[(o, c2)] for o in SHAPES if o != s]
                records.append({
                    "q_img": path[(s, c)],
                    "q_text": [f"make it {c2}", f"the same {s} but {c2}",
                               f"a {c2} version of this"],
                    "t_img": path[(s, c2)],
                    "hns": [path[(s, c)], *others[: max(n_hard_negatives, 1) + 2]],
                })
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]], extra_lines: Sequence[str] = (),
                ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_toy_dataset(out: Path, repeats: int = 4) -> Path:
    """Images plus ``train.jsonl`` (every triplet ``repeats`` times, so one pass over the data
    is many steps); returns the annotations' path."""
    records = write_triplet_set(out)
    return write_jsonl(out / "train.jsonl", records * repeats)
