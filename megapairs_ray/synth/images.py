"""Fetching a pair's images by id and shrinking them for a model or for the export.

Rows carry locations (file, byte range or parquet row), never bytes, until here. A batch's
images are read grouped by the file that holds them (``fetch_bytes``: ranged reads of tar
members, the row groups of parquet rows), decoded once and re-encoded at the size the consumer
needs. A failure is a reason on the row, not an exception: one unreadable image must not stop
the job.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from megapairs_ray.config import InputConfig
from megapairs_ray.imaging import decode_rgb
from megapairs_ray.io.shards import LOCATION_COLUMNS, fetch_bytes_tolerant
from megapairs_ray.reasons import Reason

MISSING_IMAGE = Reason.MISSING_IMAGE  # the id is in no images table
UNREADABLE_IMAGE = Reason.UNREADABLE_IMAGE  # its bytes could not be read or decoded


def shrink_jpeg(data: bytes, longest_side: int, quality: int = 90) -> bytes:
    """Re-encode so the longer side is at most ``longest_side`` (aspect kept)."""
    pixels = decode_rgb(data, min_short_side=None)
    im = Image.fromarray(pixels)
    im.thumbnail((longest_side, longest_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def square_jpeg(data: bytes, size: int, quality: int = 90) -> bytes:
    """Resize to ``size`` x ``size``, as the released MegaPairs images are."""
    pixels = decode_rgb(data, min_short_side=size)
    im = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _location(row: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    if row.get(prefix + "file_uri") is None:
        return None
    return {k: row.get(prefix + k) for k in LOCATION_COLUMNS}


def fetch_resized(rows: list[dict[str, Any]], prefixes: tuple[str, ...], cfg: InputConfig,
                  convert: Any) -> list[dict[str, Any]]:
    """For each row and each location prefix (``q_``, ``t_``), the converted image bytes under
    ``<prefix>image`` and ``fetch_error`` ("" or the first reason, with the role)."""
    wanted: list[tuple[int, str, dict[str, Any]]] = []
    errors = [""] * len(rows)
    for i, row in enumerate(rows):
        for p in prefixes:
            loc = _location(row, p)
            if loc is None:
                errors[i] = errors[i] or f"{MISSING_IMAGE}:{p.rstrip('_')}"
            else:
                wanted.append((i, p, loc))
    raw = fetch_bytes_tolerant([loc for _, _, loc in wanted], cfg)
    out = [dict(row) for row in rows]  # locations stay: a retry reads the images again
    for o in out:
        for p in prefixes:
            o[p + "image"] = b""
    for (i, p, _), data in zip(wanted, raw):
        try:
            if not data:
                raise ValueError("no bytes")
            out[i][p + "image"] = convert(data)
        except Exception:  # any decode failure is this row's reject, not a crash
            errors[i] = errors[i] or f"{UNREADABLE_IMAGE}:{p.rstrip('_')}"
    for o, e in zip(out, errors):
        o["fetch_error"] = e
    return out
