"""The released MegaPairs form (docs/method.md §3), as the trainer reads and the export writes it.

One record per triplet: ``q_img`` (str), ``q_text`` (list of instructions), ``t_img`` (str),
``hns`` (list; ``hns[0]`` is the query image). Image paths are relative to the dataset root.
Images live in tar shards: the path ``images/00003/ab12.jpg`` is the member ``ab12.jpg`` of
``images/00003.tar``, so extracting each tar into a folder of its own name yields plain files at
exactly the annotated paths. ``ImageStore`` reads either layout, local or s3://, and reads tar
members by byte range from an index of the tar's headers — never the whole archive per image.

MMEB's training sets (TIGER-Lab/MMEB-train: ``qry``, ``qry_image_path``, ``pos_text``,
``pos_image_path``, and optionally ``neg_text``/``neg_image_path``) are read into the same form
by ``from_mmeb_train``, as the paper's second stage trains on them beside MegaPairs triplets.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from megapairs_ray.io import storage
from megapairs_ray.reasons import Reason

TRIPLET_FIELDS = ("q_img", "q_text", "t_img", "hns")
MMEB_TRAIN_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
# MMEB marks where a text's image goes with the Phi-3-V token; a CLIP-family retriever embeds the
# image beside the text, so the token is removed and the rest used as given.
IMAGE_PLACEHOLDER = "<|image_1|>"


def without_placeholder(text: str) -> str:
    """An MMEB text as a CLIP-family retriever embeds it: no image placeholder, trimmed."""
    return text.replace(IMAGE_PLACEHOLDER, " ").strip()


def is_mmeb_train(row: Mapping[str, Any]) -> bool:
    # Parquet files of both forms read together share one schema, the other form's columns
    # null: a row is MMEB's when it has a value in one of MMEB's own columns.
    return any(row.get(f) is not None for f in MMEB_TRAIN_FIELDS)


def from_mmeb_train(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """An MMEB-train row as a triplet record, or why it cannot train this project's families.

    The query is its image and its text (placeholder removed); the target is the positive's
    image; a negative image, where the row has one, is the one hard negative. The retriever
    families here embed candidates as images, so a row whose positive is text only
    (classification labels, VQA answers, image-to-text retrieval) and a row whose query has no
    image (text-to-image retrieval) are counted rejects, by reason. The positive's own
    instruction text is not used: candidates are embedded as images alone. As in the MegaPairs
    form, ``hns[0]`` is the query image, so ``keep_query_negative`` means the same for both."""
    for field in MMEB_TRAIN_FIELDS:
        if row.get(field) is None:
            return None, Reason.INVALID_RECORD
    q_img, t_img = str(row["qry_image_path"]).strip(), str(row["pos_image_path"]).strip()
    if not t_img:
        return None, Reason.TEXT_TARGET
    if not q_img:
        return None, Reason.TEXT_QUERY
    neg = str(row.get("neg_image_path") or "").strip()
    return {"q_img": q_img, "q_text": [without_placeholder(str(row["qry"]))], "t_img": t_img,
            "hns": [q_img, neg] if neg else [q_img]}, None


def image_path(shard: str, name: str) -> str:
    """The annotated path of member ``name`` in the tar ``images/{shard}.tar``."""
    return f"images/{shard}/{name}"


def triplet_problem(row: Mapping[str, Any], num_hard_negatives: int,
                    keep_query_negative: bool) -> str | None:
    """Why a record cannot be trained on (a short reason code), or None."""
    for field in TRIPLET_FIELDS:
        if row.get(field) is None:
            return f"missing_{field}"
    if not isinstance(row["q_img"], str) or not row["q_img"].strip():
        return Reason.BAD_Q_IMG
    if not isinstance(row["t_img"], str) or not row["t_img"].strip():
        return Reason.BAD_T_IMG
    texts = _as_list(row["q_text"])
    if texts is None or not any(isinstance(t, str) and t.strip() for t in texts):
        return Reason.NO_INSTRUCTION
    hns = _as_list(row["hns"])
    if hns is None or not all(isinstance(h, str) and h.strip() for h in hns):
        return Reason.BAD_HNS
    # hns[0] is the query itself: kept, it is one of the negatives; dropped, it is not.
    needed = num_hard_negatives if keep_query_negative else num_hard_negatives + 1
    if num_hard_negatives and len(hns) < needed:
        return Reason.TOO_FEW_HARD_NEGATIVES
    if row["t_img"] == row["q_img"]:
        return Reason.TARGET_IS_QUERY
    return None


def _as_list(v: object) -> list[Any] | None:
    if isinstance(v, str):
        return None
    try:
        return list(v)  # type: ignore[call-overload]
    except TypeError:
        return None


class ImageStore:
    """Reads the images annotations point at, from extracted folders or from the tar shards."""

    def __init__(self, root: str, max_open_indexes: int = 256) -> None:
        self.root = root.rstrip("/")
        self._fs, self._root_path = storage.filesystem(self.root)
        self._tar_of_dir: dict[str, str | None] = {}
        self._indexes: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._max_indexes = max_open_indexes

    def _tar_for(self, rel_dir: str) -> str | None:
        if rel_dir not in self._tar_of_dir:
            tar = posixpath.join(self._root_path, rel_dir + ".tar") if rel_dir else None
            self._tar_of_dir[rel_dir] = tar if tar and self._fs.isfile(tar) else None
        return self._tar_of_dir[rel_dir]

    def _index(self, tar: str) -> dict[str, tuple[int, int]]:
        if tar in self._indexes:
            self._indexes.move_to_end(tar)
            return self._indexes[tar]
        index = {}
        with self._fs.open(tar, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    index[m.name] = (m.offset_data, m.size)
        self._indexes[tar] = index
        if len(self._indexes) > self._max_indexes:
            self._indexes.popitem(last=False)
        return index

    def read_many(self, paths: Sequence[str]) -> list[bytes | Exception]:
        """Each path's bytes, or the exception that stopped it; one open per tar touched."""
        out: list[bytes | Exception | None] = [None] * len(paths)
        by_tar: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for i, p in enumerate(paths):
            rel_dir, name = posixpath.split(p.lstrip("/"))
            tar = self._tar_for(rel_dir)
            if tar is None:
                try:
                    out[i] = self._fs.cat_file(posixpath.join(self._root_path, p.lstrip("/")))
                except (OSError, ValueError) as e:
                    out[i] = e
            else:
                by_tar[tar].append((i, name))
        for tar, members in by_tar.items():
            try:
                index = self._index(tar)
                with self._fs.open(tar, "rb") as f:
                    for i, name in sorted(members, key=lambda m: index.get(m[1], (0, 0))[0]):
                        if name not in index:
                            out[i] = FileNotFoundError(f"{name} is not in {tar}")
                            continue
                        offset, size = index[name]
                        f.seek(offset)
                        data = f.read(size)
                        out[i] = data if len(data) == size else EOFError(f"{tar}: {name} cut")
            except (OSError, tarfile.TarError) as e:
                for i, _ in members:
                    out[i] = e
        return out  # type: ignore[return-value]

    def exists_many(self, paths: Sequence[str]) -> list[bool]:
        """Existence without reading image bytes (tar headers only)."""
        out = []
        for p in paths:
            rel_dir, name = posixpath.split(p.lstrip("/"))
            tar = self._tar_for(rel_dir)
            try:
                if tar is None:
                    out.append(self._fs.isfile(posixpath.join(self._root_path, p.lstrip("/"))))
                else:
                    out.append(name in self._index(tar))
            except (OSError, tarfile.TarError):
                out.append(False)
        return out
