"""The one reject shape: every stage writes what it rejects to ``RUN/rejects/<stage>/`` as rows of
``REJECTS_SCHEMA``, and counts it in its unit's marker as ``reject:<reason>``.

    stage    the stage that rejected it
    unit     the unit it was rejected in (a shard slug, ``<space>/<shard>``, ``try-1``...)
    ids      what was rejected: ``[image_id]`` (ingest, embed, index, gallery), ``[query_id,
             target_id]`` (mine), ``[pair_id]`` (describe, instruct, export); empty for a problem
             of a whole shard
    reason   a short code, the same one the manifest counts
    detail   a JSON object: ``message`` (what went wrong, for a person) and the stage's own
             payload (ingest: the record's ``key``; describe and instruct: the model's answer)

Names are stored printable: a hostile file or member name never stops the write.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from megapairs_ray.io import storage
from megapairs_ray.io.shards import printable
from megapairs_ray.reasons import ALL

REJECTS_SCHEMA = pa.schema([
    ("stage", pa.string()),
    ("unit", pa.string()),
    ("ids", pa.list_(pa.int64())),
    ("reason", pa.string()),
    ("detail", pa.string()),
])
MAX_MESSAGE_CHARS = 500


def reject_row(stage: str, unit: str, ids: Sequence[int], reason: str, message: str,
               **payload: Any) -> dict[str, Any]:
    """One reject, in the one shape; ``reason`` is a code of ``reasons.py``."""
    if reason not in ALL:
        raise ValueError(f"internal error: reject reason {reason!r} ({stage}) is not listed in "
                         "megapairs_ray/reasons.py")
    detail = {"message": printable(str(message)[:MAX_MESSAGE_CHARS]),
              **{k: printable(v) if isinstance(v, str) else v for k, v in payload.items()}}
    return {"stage": stage, "unit": printable(unit), "ids": [int(i) for i in ids],
            "reason": reason, "detail": json.dumps(detail, ensure_ascii=False, default=str)}


def detail_of(row: dict[str, Any]) -> dict[str, Any]:
    """A reject row's detail, parsed."""
    return json.loads(row["detail"])


def rejects_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def write_rejects(uri: str, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (an empty table too: a unit that rejected nothing says so)."""
    storage.write_parquet(uri, rejects_table(rows))


def upgrade_rejects_file(uri: str, stage: str) -> bool:
    """Rewrite a reject table of the shapes written before the one shape (books v1) into it;
    False when it already has it. The old shapes: ingest, embed, index and the gallery wrote
    (image_id, shard, key, stage, reason, detail); mine (query_id, target_id, reason, detail);
    export (pair_id, reason); describe and instruct the model's whole rows with
    ``reject_reason``."""
    table = storage.read_parquet(uri)
    if table.schema.equals(REJECTS_SCHEMA):
        return False
    cols = set(table.column_names)
    name = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
    rows = []
    for r in table.to_pylist():
        if "reject_reason" in cols:  # a synthesis step's row: "try-<n>-part-...".
            reason = r.pop("reject_reason") or ""
            payload = {k: v for k, v in r.items() if k != "pair_id"}
            rows.append(reject_row(stage, "-".join(name.split("-")[:2]), [r["pair_id"]],
                                   reason.split(":")[0], reason, **payload))
        elif "query_id" in cols:
            rows.append(reject_row(stage, name, [r["query_id"], r["target_id"]], r["reason"],
                                   r.get("detail") or ""))
        elif "image_id" in cols:
            ids = [] if r["image_id"] is None else [r["image_id"]]
            rows.append(reject_row(stage, r.get("shard") or name, ids, r["reason"],
                                   r.get("detail") or "", key=r.get("key")))
        elif "pair_id" in cols:
            rows.append(reject_row(stage, name, [r["pair_id"]], r["reason"], r["reason"]))
        else:
            raise ValueError(f"{uri}: a reject table of no known shape (columns "
                             f"{sorted(cols)}): internal error, please report it")
    write_rejects(uri, rows)
    return True
