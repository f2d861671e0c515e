"""Ingest: read a shard, gate every record, write the ``images`` table and the rejects.

One call handles one whole shard (the unit of resume). The shard's bytes are streamed once; what
is written is metadata only — id, where the bytes live, size, mode, caption — so later stages
carry ids and fetch bytes only where a model must see them. The images file and a completion
marker are written last: a shard with a marker is finished, one without is redone from scratch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from megapairs_ray.config import IngestConfig, InputConfig, output_settings
from megapairs_ray.ids import image_id
from megapairs_ray.imaging import PLAIN_MODES, Reason, inspect_image
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import Record, Shard, ShardProblem, printable, read_shard
from megapairs_ray.io.stepstate import StepState

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

REJECTS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("shard", pa.string()),
    ("key", pa.string()),
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])


def reject_row(shard: str, key: str | None, stage: str, reason: str, detail: str,
               iid: int | None = None) -> dict[str, Any]:
    """The one reject shape. Names are stored printable (a hostile name never stops the
    write); a shard-level problem has no key."""
    return {"image_id": iid, "shard": printable(shard),
            "key": None if key is None else printable(key), "stage": stage, "reason": reason,
            "detail": printable(detail[:500])}


def ingest_state(run_dir: str, input_cfg: InputConfig, ingest_cfg: IngestConfig) -> StepState:
    """Ingest's books: its output depends on the input and the checks."""
    return StepState(run_dir, "ingest", {**output_settings(input_cfg, prefix="input."),
                                         **output_settings(ingest_cfg, prefix="ingest.")})


class IngestShard:
    """Callable stage: ``{"uri", "name", "format", "members"}`` rows in, summary rows out."""

    def __init__(self, run_dir: str, input_cfg: InputConfig, ingest_cfg: IngestConfig,
                 state: StepState | None = None) -> None:
        self.run_dir = run_dir
        self.input_cfg = input_cfg
        self.cfg = ingest_cfg
        self.state = state or ingest_state(run_dir, input_cfg, ingest_cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        summaries = [self.ingest(Shard.from_row({k: batch[k][i] for k in batch}))
                     for i in range(len(batch["uri"]))]
        return {k: [s[k] for s in summaries] for k in summaries[0]}

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
                problems.append(reject_row(shard.name, None, "ingest", item.reason, item.detail))
                counts["shard_problems"] += 1
                continue
            counts["records"] += 1
            try:
                row, reject = self._gate(shard, item, counts)
            except Exception as e:  # a record no check foresaw: its own reject, not the shard's
                row, reject = None, reject_row(shard.name, item.key, "ingest",
                                               Reason.INVALID_RECORD, f"{type(e).__name__}: {e}")
            if row is not None:
                rows.append(row)
            else:
                rejects.append(reject)  # type: ignore[arg-type]
        by_reason = Counter(r["reason"] for r in rejects)
        counts["images"] = len(rows)
        counts["rejects"] = len(rejects)
        # Rejects first, images second, marker last: the marker vouches for both files.
        storage.write_parquet(layout.rejects_file(self.run_dir, "ingest", shard.slug),
                              pa.Table.from_pylist(rejects + problems, schema=REJECTS_SCHEMA))
        storage.write_parquet(layout.images_file(self.run_dir, shard.slug),
                              pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA))
        self.state.mark_done(shard.slug, counts, shard=shard.name, uri=shard.uri,
                             rejects=dict(by_reason),
                             shard_problems=dict(Counter(p["reason"] for p in problems)))
        return {"shard": shard.slug, "images": len(rows), "rejects": len(rejects)}

    def _gate(self, shard: Shard, rec: Record, counts: Counter[str],
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        iid = image_id(shard.id_source, rec.key)
        if rec.problem is not None:
            return None, reject_row(shard.name, rec.key, "ingest", rec.problem, rec.detail, iid)
        verdict = inspect_image(
            rec.image or b"", max_bytes=self.cfg.max_bytes, max_pixels=self.cfg.max_pixels,
            min_side=self.cfg.min_side, max_aspect_ratio=self.cfg.max_aspect_ratio,
            unusual_modes=self.cfg.unusual_modes, verify_decode=self.cfg.verify_decode,
        )
        if not verdict.ok:
            return None, reject_row(shard.name, rec.key, "ingest", verdict.reason or "",
                                    verdict.detail, iid)
        caption, reason = self.check_caption(rec.caption)
        if reason is not None:
            return None, reject_row(shard.name, rec.key, "ingest", reason,
                                    "no caption" if reason == Reason.MISSING_CAPTION
                                    else "caption is blank", iid)
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
