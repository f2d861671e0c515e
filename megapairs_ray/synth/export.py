"""The export's plain parts: triplet records in the released MegaPairs form, and image tars.

Every image a triplet names is written once, as a ``size`` x ``size`` JPEG, into the tar its id
hashes to: the id alone gives its path (``images/00007/<id as 16 hex digits>.jpg``, member of
``images/00007.tar``), so triplet records and tars are written independently and in parallel.
Records keep the four released fields first; provenance (ids, spaces, similarities, the
description, the models) sits beside them under other names.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from megapairs_ray.config import InputConfig
from megapairs_ray.io import storage
from megapairs_ray.io.triplets import TRIPLET_FIELDS, image_path
from megapairs_ray.reasons import Reason
from megapairs_ray.synth.images import fetch_resized, square_jpeg

UNREADABLE = Reason.UNREADABLE_IMAGE
TOO_FEW_NEGATIVES = Reason.TOO_FEW_HARD_NEGATIVES
REJECT_MESSAGES = {
    UNREADABLE: "its query or target image could not be read for the image tars",
    TOO_FEW_NEGATIVES: "fewer readable hard negatives than export.min_hard_negatives",
}


def tar_of(image_ids: np.ndarray, num_tars: int) -> np.ndarray:
    """Which tar holds each image. Ids are already uniform hashes, so a modulus spreads them."""
    return (np.asarray(image_ids, dtype=np.int64).view(np.uint64) % np.uint64(num_tars)).astype(
        np.int64)


def tar_name(tar: int) -> str:
    return f"{tar:05d}"


def member_name(image_id: int) -> str:
    return f"{image_id & 0xFFFFFFFFFFFFFFFF:016x}.jpg"


def path_of(image_id: int, num_tars: int) -> str:
    tar = int(tar_of(np.array([image_id]), num_tars)[0])
    return image_path(tar_name(tar), member_name(image_id))


def write_tar(rows: list[dict[str, Any]], tar_uri: str, input_cfg: InputConfig, size: int,
              quality: int) -> list[tuple[int, str]]:
    """Write one tar of the rows' images (``image_id`` plus location columns); returns
    ``(image_id, "" or reason)`` per row. Members are sorted by id, so a rerun writes the same
    bytes."""
    located = [{"image_id": r["image_id"], **{"x_" + k: r.get(k) for k in
                                               ("format_kind", "file_uri", "offset", "length",
                                                "row")}} for r in rows]
    fetched = fetch_resized(located, ("x_",), input_cfg,
                            partial(square_jpeg, size=size, quality=quality))
    result: list[tuple[int, str]] = []
    with storage.open_atomic(tar_uri, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for r in sorted(fetched, key=lambda r: int(r["image_id"])):
            if r["fetch_error"]:
                result.append((int(r["image_id"]), r["fetch_error"].split(":")[0]))
                continue
            data = r["x_image"]
            info = tarfile.TarInfo(member_name(int(r["image_id"])))
            info.size, info.mode = len(data), 0o644  # mtime 0: reruns write the same bytes
            tar.addfile(info, io.BytesIO(data))
            result.append((int(r["image_id"]), ""))
    return result


def triplet_record(row: dict[str, Any], num_tars: int, failed: set[int], min_negatives: int,
                   models: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
    """(record, "") or (None, reason) for one instructed pair."""
    q, t = int(row["query_id"]), int(row["target_id"])
    if q in failed or t in failed:
        return None, UNREADABLE
    # Mining lists the query first (the released hns[0]); here it is added back once.
    negatives = [int(h) for h in row["hard_negatives"] if int(h) != q and int(h) not in failed]
    if len(negatives) < min_negatives:
        return None, TOO_FEW_NEGATIVES
    record = {
        "q_img": path_of(q, num_tars),
        "q_text": list(row["instructions"]),
        "t_img": path_of(t, num_tars),
        "hns": [path_of(q, num_tars)] + [path_of(h, num_tars) for h in negatives],
        # Provenance, beside the released fields.
        "pair_id": int(row["pair_id"]), "query_id": q, "target_id": t,
        "hard_negative_ids": negatives,
        "spaces": list(row["spaces"]), "similarities": [float(s) for s in row["similarities"]],
        "description": str(row["description"]),
        "describe_model": models["describe"], "instruct_model": models["instruct"],
    }
    assert tuple(record)[:4] == TRIPLET_FIELDS
    return record, ""


def ids_of_batch(batch: dict[str, Sequence[Any]]) -> dict[str, np.ndarray]:
    """Every image id a batch of instructed pairs names (with repeats)."""
    ids: list[int] = []
    for q, t, hns in zip(batch["query_id"], batch["target_id"], batch["hard_negatives"]):
        ids.append(int(q))
        ids.append(int(t))
        ids.extend(int(h) for h in hns)
    return {"image_id": np.array(ids, dtype=np.int64)}
