"""Ingest: read a shard, gate every record, write the ``images`` table and the rejects.

One call handles one whole shard (the unit of resume). The shard's bytes are streamed once; what
is written is metadata only — id, where the bytes live, size, mode, caption — so later stages
carry ids and fetch bytes only where a model must see them. The images file is written last and
the shard's counts returned: the pipeline writes its marker after it (a shard with a marker is
finished, one without is redone from scratch).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from megapairs_ray.config import IngestConfig, InputConfig
from megapairs_ray.ids import image_id
from megapairs_ray.imaging import PLAIN_MODES, inspect_image
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.io.shards import Record, Shard, ShardProblem, read_shard
from megapairs_ray.reasons import Reason

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("shard", pa.string()),
    ("key", pa.string()),
    ("format_kind", pa.string()),  # webdataset | parquet | folder: how to fetch the bytes back
    ("file_uri", pa.string()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
    ("row", pa.int64()),
    ("format", pa.string()),
    ("mode", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption", pa.string()),
])

class IngestShard:
    """Callable stage: ``{"uri", "name", "format", "members"}`` rows in, summary rows out."""

    def __init__(self, run_dir: str, input_cfg: InputConfig, ingest_cfg: IngestConfig) -> None:
        self.run_dir = run_dir
        self.input_cfg = input_cfg
        self.cfg = ingest_cfg

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Every shard of ``batch``; a summary row each, its counts as JSON."""
        summaries = [self.ingest(Shard.from_row({k: batch[k][i] for k in batch}))
                     for i in range(len(batch["uri"]))]
        return {k: [json.dumps(s[k]) if k == "counts" else s[k] for s in summaries]
                for k in summaries[0]}

    def check_caption(self, caption: str | None) -> tuple[str | None, str | None]:
        """(caption to keep, reject reason or None)."""
        if caption is None:
            return None, Reason.MISSING_CAPTION if self.cfg.require_caption else None
        caption = " ".join(caption.split())
        if not caption:
            return None, Reason.EMPTY_CAPTION if self.cfg.require_caption else None
        return caption[: self.cfg.max_caption_chars], None

    def ingest(self, shard: Shard) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        problems: list[dict[str, Any]] = []  # shard-level: key None, counted apart from records
        counts: Counter[str] = Counter()
        for item in read_shard(shard, self.input_cfg, max_member_bytes=self.cfg.max_bytes):
            if isinstance(item, ShardProblem):
                problems.append(self._reject(shard, None, None, item.reason, item.detail))
                counts["shard_problems"] += 1
                continue
            counts["records"] += 1
            try:
                row, reject = self._gate(shard, item, counts)
            except Exception as e:  # a record no check foresaw: its own reject, not the shard's
                row, reject = None, self._reject(shard, item.key, None, Reason.INVALID_RECORD,
                                                 f"{type(e).__name__}: {e}")
            if row is not None:
                rows.append(row)
            else:
                rejects.append(reject)  # type: ignore[arg-type]
        by_reason = Counter(r["reason"] for r in rejects)
        counts["images"] = len(rows)
        counts["rejects"] = len(rejects)
        counts.update({f"reject:{r}": n for r, n in by_reason.items()})
        counts.update(f"shard_problem:{p['reason']}" for p in problems)
        # Rejects first, images second; the caller's marker, last, vouches for both files.
        write_rejects(layout.rejects_file(self.run_dir, "ingest", shard.slug), rejects + problems)
        storage.write_parquet(layout.images_file(self.run_dir, shard.slug),
                              pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
        return {"shard": shard.slug, "name": shard.name, "uri": shard.uri,
                "counts": dict(counts)}

    @staticmethod
    def _reject(shard: Shard, key: str | None, iid: int | None, reason: str,
                message: str) -> dict[str, Any]:
        return reject_row("ingest", shard.slug, [] if iid is None else [iid], reason, message,
                          shard=shard.name, key=key)

    def _gate(self, shard: Shard, rec: Record, counts: Counter[str],
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        iid = image_id(shard.id_source, rec.key)
        if rec.problem is not None:
            return None, self._reject(shard, rec.key, iid, rec.problem, rec.detail)
        verdict = inspect_image(
            rec.image or b"", max_bytes=self.cfg.max_bytes, max_pixels=self.cfg.max_pixels,
            min_side=self.cfg.min_side, max_aspect_ratio=self.cfg.max_aspect_ratio,
            unusual_modes=self.cfg.unusual_modes, verify_decode=self.cfg.verify_decode,
        )
        if not verdict.ok:
            return None, self._reject(shard, rec.key, iid, verdict.reason or "", verdict.detail)
        caption, reason = self.check_caption(rec.caption)
        if reason is not None:
            return None, self._reject(shard, rec.key, iid, reason,
                                      "no caption" if reason == Reason.MISSING_CAPTION
                                      else "caption is blank")
        info = verdict.info
        assert info is not None
        if info.mode not in PLAIN_MODES:
            counts[f"converted_from_{info.mode}"] += 1
        loc = rec.location
        return {
            "image_id": iid, "shard": shard.name, "key": rec.key,
            "format_kind": shard.format,
            "file_uri": str(loc.get("file", shard.uri)),
            "offset": loc.get("offset"), "length": loc.get("length"), "row": loc.get("row"),
            "format": info.format, "mode": info.mode, "width": info.width,
            "height": info.height, "caption": caption,
        }, None
