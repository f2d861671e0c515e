"""Image shards: finding them, streaming their records, and fetching single records back.

Three layouts are read, local or on s3:
- webdataset tars (img2dataset's output: ``KEY.jpg`` + ``KEY.txt`` / ``KEY.json`` members);
- parquet with the image bytes in a column (img2dataset's parquet output, or the Hugging Face
  ``Image`` feature's ``struct<bytes, path>``) and a caption column;
- a folder of images with a caption file beside each (``cat.jpg`` + ``cat.txt``).

Every record carries where its bytes live (tar member offset and length, parquet row, file path)
so later stages fetch a handful of images by id without reading their neighbours. Reading never
raises on bad data: a truncated tar, an unreadable file or a missing column ends that shard's
stream with a shard-level problem, and everything read before it is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_ray.config import InputConfig
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import storage
from megapairs_ray.reasons import Reason

ShardFormat = Literal["webdataset", "parquet", "folder"]
FOLDER_SHARD_SIZE = 1000  # images per shard when the input is a plain folder


class InputError(MegapairsError, ValueError):
    """An input that names no shards, or names one twice; the message says which."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input uri that does not exist."""


@dataclass(frozen=True)
class Shard:
    """One unit of ingest work, and of resume."""

    uri: str  # the tar or parquet file; for folders, the folder
    name: str  # path relative to the input root: stable across copies of the corpus
    format: ShardFormat
    members: tuple[str, ...] = ()  # folder shards: the image files, as URIs
    # Set when the shard cannot be read at all (a path that is not UTF-8): ingest records it as
    # the shard's one reject instead of failing the job. uri and name are then printable forms.
    problem: str = ""

    @property
    def slug(self) -> str:
        """A file-name-safe, unique name for this shard's outputs."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_")[-80:]
        digest = hashlib.blake2b(self.name.encode("utf-8", "surrogateescape"),
                                 digest_size=8).hexdigest()
        return f"{stem}-{digest}"

    @property
    def id_source(self) -> str:
        """What image ids are hashed from with each record's key: the shard's name, or for a
        folder the folder itself (its keys are paths under it), so adding a file never changes
        another image's id."""
        return self.name.split("#part-", 1)[0] if self.format == "folder" else self.name

    def to_row(self) -> dict[str, str]:
        # Members as JSON (ASCII-escaped): a folder may hold names that are not UTF-8.
        return {"uri": self.uri, "name": self.name, "format": self.format,
                "members": json.dumps(list(self.members)), "problem": self.problem}

    @staticmethod
    def from_row(row: dict[str, str]) -> Shard:
        return Shard(row["uri"], row["name"], row["format"],  # type: ignore[arg-type]
                     tuple(json.loads(row.get("members") or "[]")), row.get("problem") or "")


@dataclass
class Record:
    """One image (or the attempt at one) read from a shard."""

    key: str
    image: bytes | None
    caption: str | None
    location: dict[str, object] = field(default_factory=dict)
    problem: str | None = None  # a Reason code when the record itself is broken
    detail: str = ""


@dataclass
class ShardProblem:
    """Why a shard's stream ended early (or never started)."""

    reason: str
    detail: str


# --------------------------------------------------------------------------- listing

# Compressed tars: tarfile would read them transparently, but the byte offsets it reports are
# into the decompressed stream, so no image could be fetched back by location.
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
                     b"\x28\xb5\x2f\xfd": "zstd"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def has_undecodable_name(name: str) -> bool:
    """A file or member name whose bytes are not UTF-8 (the OS and tarfile hand it back with
    surrogate escapes; Arrow and JSON consumers refuse it)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def printable(name: str) -> str:
    """A name as valid UTF-8 text: undecodable bytes as ``\\xNN``, so it can be stored and
    shown, and the original bytes read off it."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _split_ext_last(name: str) -> tuple[str, str]:
    """Plain files: the extension is after the last dot (``my.photo.jpg`` -> ``jpg``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or "/" in ext:
        return name, ""
    return stem, ext.lower()


def _split_ext(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    base = posixpath.basename(name)
    head = name[: len(name) - len(base)]
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return head + stem, ext.lower()


def list_shards(cfg: InputConfig) -> list[Shard]:
    """Every shard the input names, sorted, with a name relative to its root."""
    shards: list[Shard] = []
    for uri in cfg.uris:
        shards.extend(_shards_for(uri, cfg))
    if not shards:
        raise InputNotFoundError(f"input.uris matched no shards: {cfg.uris}")
    names = Counter(s.name for s in shards)
    dupes = sorted(n for n, c in names.items() if c > 1)
    if dupes:
        raise InputError(f"input.uris name the same shard more than once: {dupes[:5]}")
    slugs = Counter(s.slug for s in shards)
    clash = sorted(n for n, c in slugs.items() if c > 1)
    if clash:  # 64-bit digests: not expected, but outputs must never overwrite each other
        raise InputError(f"two shards map to the same output name: {clash[:5]}")
    return shards


def _kind(path: str, image_exts: set[str]) -> ShardFormat | None:
    if path.endswith(TAR_SUFFIXES):
        return "webdataset"
    if path.endswith(".parquet"):
        return "parquet"
    return "folder" if _split_ext_last(path)[1] in image_exts else None


def _shards_for(uri: str, cfg: InputConfig) -> list[Shard]:
    fs, path = storage.filesystem(uri)
    if any(ch in path for ch in "*?["):
        root = path.split("*")[0].split("?")[0].split("[")[0]
        root = root if root.endswith("/") else posixpath.dirname(root)
        files = sorted(p for p in fs.glob(path) if _is_regular(fs, p))
    elif fs.isdir(path):
        root = path
        files = sorted(p for p in fs.find(path) if _is_regular(fs, p))
    elif fs.isfile(path):
        root = posixpath.dirname(path)
        files = [path]
    else:
        hint = ""
        if "://" not in uri and not posixpath.isabs(uri):
            hint = (f" (relative to {os.getcwd()}; `ray job submit --working-dir` does not upload "
                    "what .gitignore lists, such as data/: give an absolute path every node can "
                    "read, or s3://)")
        raise InputNotFoundError(f"input uri does not exist: {uri}{hint}")
    root = root.rstrip("/")
    image_exts = {e.lower() for e in cfg.image_extensions}
    kinds = {p: _kind(p, image_exts) for p in files}
    # format: auto takes every kind a uri holds (tars, parquet files and loose images each
    # become their own shards); a named format takes its own kind only.
    wanted = {"webdataset", "parquet", "folder"} if cfg.format == "auto" else {cfg.format}

    def rel(p: str) -> str:
        return posixpath.relpath(p, root) if root else p

    out = [_shard(storage.with_scheme(fs, p), rel(p), kinds[p])  # type: ignore[arg-type]
           for p in files if kinds[p] in ("webdataset", "parquet") and kinds[p] in wanted]
    images = [p for p in files if kinds[p] == "folder"] if "folder" in wanted else []
    for i in range(0, len(images), FOLDER_SHARD_SIZE):
        chunk = images[i : i + FOLDER_SHARD_SIZE]
        name = f"{posixpath.basename(root)}#part-{i // FOLDER_SHARD_SIZE:05d}"
        out.append(Shard(storage.with_scheme(fs, root), name,
                         "folder", tuple(storage.with_scheme(fs, p) for p in chunk)))
    return out


def _shard(uri: str, name: str, fmt: ShardFormat) -> Shard:
    if has_undecodable_name(uri):
        return Shard(printable(uri), printable(name), fmt,
                     problem=f"shard path {printable(uri)!r} is not UTF-8")
    return Shard(uri, name, fmt)


def _is_regular(fs: Any, path: str) -> bool:
    """Regular files only: a FIFO or a device in a folder would block the reader forever."""
    if storage.is_remote(storage.with_scheme(fs, path)):
        return bool(fs.isfile(path))
    return stat.S_ISREG(os.stat(path).st_mode) if os.path.exists(path) else False


# --------------------------------------------------------------------------- reading


def clean_text(value: object) -> str | None:
    """A caption as valid UTF-8 text, or None. Bytes are decoded leniently; lone surrogates
    (which JSON allows and Arrow refuses) are replaced; containers are not captions."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value.encode("utf-8", errors="replace").decode("utf-8")


def _caption_from(ext: str, data: bytes, cfg: InputConfig) -> str | None:
    text = data.decode("utf-8", errors="replace")
    if ext == "json":
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):  # malformed, absurdly deep or huge numbers
            return None
        value = doc.get(cfg.json_caption_field) if isinstance(doc, dict) else None
        return clean_text(value) if isinstance(value, str) else None
    return clean_text(text)


def _record_from_group(key: str, members: dict[str, tuple[bytes, dict[str, object]]],
                       cfg: InputConfig) -> Record:
    image_ext = next((e.lower() for e in cfg.image_extensions if e.lower() in members), None)
    caption = None
    for ext in (e.lower() for e in cfg.caption_extensions):
        if ext in members:
            caption = _caption_from(ext, members[ext][0], cfg)
            if caption is not None:
                break
    if image_ext is None:
        return Record(key, None, caption, problem=Reason.MISSING_IMAGE,
                      detail=f"members: {sorted(members)}")
    data, loc = members[image_ext]
    return Record(key, data, caption, location=loc)


def read_webdataset(shard: Shard, cfg: InputConfig, max_member_bytes: int | None = None,
                    ) -> Iterator[Record | ShardProblem]:
    """Stream a tar once, grouping consecutive members by key, recording byte offsets.

    A member larger than ``max_member_bytes`` is never read (its size is in its header): the
    record becomes a ``too_many_bytes`` reject, so one hostile member cannot exhaust memory."""
    fs, path = storage.filesystem(shard.uri)
    wanted = {e.lower() for e in (*cfg.image_extensions, *cfg.caption_extensions)}
    current: str | None = None
    group: dict[str, tuple[bytes, dict[str, object]]] = {}
    problem: tuple[str, str] | None = None  # a member of the group that made it unusable
    seen: set[str] = set()
    members = 0
    try:
        with fs.open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
            kind = next((k for m, k in _COMPRESSED_MAGIC.items() if head.startswith(m)), None)
            if kind is not None:
                yield ShardProblem(Reason.COMPRESSED_TAR, f"{kind}-compressed: byte offsets into "
                                   "it cannot be fetched back; decompress the shard")
                return
            if not _looks_like_tar(head):
                yield ShardProblem(Reason.NOT_A_TAR, f"no tar header at byte 0 ({head[:8]!r})")
                return
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    members += 1
                    key, ext = _split_ext(info.name)
                    if key != current:
                        if current is not None:
                            yield _finish(current, group, seen, cfg, problem)
                        current, group, problem = key, {}, None
                    if ext not in wanted:
                        continue
                    if has_undecodable_name(info.name):
                        problem = problem or (Reason.UNDECODABLE_NAME,
                                              f"member name {printable(info.name)!r}")
                        continue
                    if ext in group:
                        problem = problem or (Reason.DUPLICATE_MEMBER,
                                              f"{info.name} appears twice in a row")
                        continue
                    if max_member_bytes is not None and info.size > max_member_bytes:
                        problem = problem or (Reason.TOO_MANY_BYTES,
                                              f"member {info.name}: {info.size} bytes > "
                                              f"{max_member_bytes}, not read")
                        continue
                    member = tar.extractfile(info)
                    data = member.read() if member is not None else b""
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name} is cut short")
                    group[ext] = (data, {"offset": info.offset_data, "length": info.size})
                _check_end_of_archive(f, tar)
    except Exception as e:
        # A cut-short or damaged tar (or storage failing mid-read): keep what came before.
        reason = (Reason.TAR_TRUNCATED if isinstance(e, (tarfile.TarError, EOFError))
                  else Reason.SHARD_UNREADABLE)
        if members == 0 and reason == Reason.TAR_TRUNCATED:
            reason = Reason.NOT_A_TAR
        if current is not None:
            # The sample in flight may be missing members that sat past the cut: not trusted.
            yield Record(printable(current), None, None, problem=reason,
                         detail=f"{type(e).__name__}: {e}")
        yield ShardProblem(reason, f"{type(e).__name__}: {e}")
        return
    if current is not None:
        yield _finish(current, group, seen, cfg, problem)


def _looks_like_tar(block: bytes) -> bool:
    """A ustar/gnu magic, or a v7 header whose checksum adds up (an empty tar is all zeros)."""
    if len(block) < tarfile.BLOCKSIZE:
        return len(block.strip(b"\0")) == 0 and len(block) > 0
    if not block.strip(b"\0") or block[257:262] == b"ustar":
        return True
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


def _check_end_of_archive(f: BinaryIO, tar: tarfile.TarFile) -> None:
    """Python's tarfile ends iteration quietly when a file stops at (or inside) a member header,
    which is exactly where a cut-short upload often stops. A whole archive has a zero block
    there; anything else is a truncation. (Compressed tars need no check: their decompressor
    raises on a cut stream.)"""
    if getattr(tar.fileobj, "comptype", "tar") != "tar":
        return
    f.seek(tar.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.strip(b"\0"):
        raise tarfile.ReadError(f"archive stops at byte {tar.offset} without an end-of-archive "
                                "block")


def _finish(key: str, group: dict[str, tuple[bytes, dict[str, object]]], seen: set[str],
            cfg: InputConfig, problem: tuple[str, str] | None = None) -> Record:
    if has_undecodable_name(key):
        return Record(printable(key), None, None, problem=Reason.UNDECODABLE_NAME,
                      detail=f"key {printable(key)!r} is not UTF-8")
    if key in seen:
        return Record(key, None, None, problem=Reason.DUPLICATE_KEY,
                      detail="key appears twice in the shard")
    seen.add(key)
    if problem is not None:
        return Record(key, None, None, problem=problem[0], detail=problem[1])
    return _record_from_group(key, group, cfg)


def _image_column_bytes(column: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):  # Hugging Face Image feature: struct<bytes, path>
        column = pa.chunked_array(
            [c.field("bytes") for c in (column.chunks if hasattr(column, "chunks") else [column])]
        )
    return column.to_pylist()


def _is_bytes_column(t: pa.DataType) -> bool:
    binary = (pa.types.is_binary(t) or pa.types.is_large_binary(t)
              or pa.types.is_fixed_size_binary(t))
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and _is_bytes_column(t.field(idx).type)
    return binary


def read_parquet(shard: Shard, cfg: InputConfig) -> Iterator[Record | ShardProblem]:
    """Stream a parquet file a record batch at a time; the location is the row index."""
    fs, path = storage.filesystem(shard.uri)
    try:
        f = fs.open(path, "rb")
        pf = pq.ParquetFile(f)
    except Exception as e:
        yield ShardProblem(Reason.SHARD_UNREADABLE, f"{type(e).__name__}: {e}")
        return
    with f:
        names = set(pf.schema_arrow.names)
        if cfg.image_column not in names:
            yield ShardProblem(Reason.MISSING_COLUMN,
                               f"no image column {cfg.image_column!r}; columns: {sorted(names)}")
            return
        image_type = pf.schema_arrow.field(cfg.image_column).type
        if not _is_bytes_column(image_type):
            yield ShardProblem(Reason.BAD_COLUMN_TYPE,
                               f"image column {cfg.image_column!r} is {image_type}, not binary "
                               "or struct<bytes: binary, ...>")
            return
        columns = [cfg.image_column]
        has_caption = cfg.caption_column in names
        caption_type = pf.schema_arrow.field(cfg.caption_column).type if has_caption else None
        if caption_type is not None and not any(
                check(caption_type) for check in (pa.types.is_string, pa.types.is_large_string,
                                                  pa.types.is_binary, pa.types.is_large_binary,
                                                  pa.types.is_null)):
            yield ShardProblem(Reason.BAD_COLUMN_TYPE,
                               f"caption column {cfg.caption_column!r} is {caption_type}, not "
                               "text or bytes: name the right one in input.caption_column")
            return
        has_key = cfg.key_column is not None and cfg.key_column in names
        columns += [cfg.caption_column] if has_caption else []
        columns += [cfg.key_column] if has_key else []  # type: ignore[list-item]
        row = 0
        seen: set[str] = set()
        try:
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                images = _image_column_bytes(batch.column(cfg.image_column))
                captions = (batch.column(cfg.caption_column).to_pylist() if has_caption
                            else [None] * len(images))
                keys = (batch.column(cfg.key_column).to_pylist() if has_key  # type: ignore[arg-type]
                        else [None] * len(images))
                for img, cap, key in zip(images, captions, keys):
                    # Without a key column, rows are keyed by position. A null in a key column
                    # gets a positional key no real key can equal (it starts with NUL).
                    if key is None:
                        key = f"\x00row-{row:09d}" if has_key else f"{row:09d}"
                    else:
                        key = clean_text(key) or f"\x00row-{row:09d}"
                    if key in seen:
                        yield Record(key, None, None, problem=Reason.DUPLICATE_KEY,
                                     detail=f"row {row}")
                    else:
                        seen.add(key)
                        yield Record(key, img if img is not None else b"", clean_text(cap),
                                     location={"row": row})
                    row += 1
        except Exception as e:
            yield ShardProblem(Reason.SHARD_UNREADABLE,
                               f"after row {row}: {type(e).__name__}: {e}")


def read_folder(shard: Shard, cfg: InputConfig, max_member_bytes: int | None = None,
                ) -> Iterator[Record | ShardProblem]:
    """Images with a caption file of the same stem beside them (``cat.jpg`` + ``cat.txt``)."""
    fs, root = storage.filesystem(shard.uri)
    root = root.rstrip("/")
    seen: set[str] = set()
    for member_uri in shard.members:
        _, mpath = storage.filesystem(member_uri)
        stem, _ext = _split_ext_last(mpath)
        key = posixpath.relpath(stem, root)
        if has_undecodable_name(key):
            yield Record(printable(key), None, None, problem=Reason.UNDECODABLE_NAME,
                         detail=f"file name {printable(posixpath.basename(mpath))!r} is not UTF-8")
            continue
        if key in seen:  # cat.jpg beside cat.png: one id, so the second is a duplicate
            yield Record(key, None, None, problem=Reason.DUPLICATE_KEY,
                         detail=f"{posixpath.basename(mpath)}: another image has this name")
            continue
        seen.add(key)
        try:
            size = fs.size(mpath)
            if max_member_bytes is not None and size is not None and size > max_member_bytes:
                yield Record(key, None, None, problem=Reason.TOO_MANY_BYTES,
                             detail=f"{size} bytes > {max_member_bytes}, not read")
                continue
            with fs.open(mpath, "rb") as f:
                data = f.read()
            caption = None
            for ext in cfg.caption_extensions:
                cpath = f"{stem}.{ext}"
                if fs.exists(cpath) and _is_regular(fs, cpath):
                    with fs.open(cpath, "rb") as f:
                        caption = _caption_from(ext, f.read(), cfg)
                    if caption is not None:
                        break
        except OSError as e:
            yield Record(key, None, None, problem=Reason.SHARD_UNREADABLE,
                         detail=f"{type(e).__name__}: {e}")
            continue
        yield Record(key, data, caption,
                     location={"file": member_uri, "offset": 0, "length": len(data)})


def read_shard(shard: Shard, cfg: InputConfig, max_member_bytes: int | None = None,
               ) -> Iterator[Record | ShardProblem]:
    """Every record of a shard. ``max_member_bytes``: tar members and folder files larger than
    this are rejected from their size, never read (parquet cells come with their row group)."""
    if shard.problem:
        return iter([ShardProblem(Reason.UNDECODABLE_NAME, shard.problem)])
    if shard.format == "parquet":
        return read_parquet(shard, cfg)
    reader = read_webdataset if shard.format == "webdataset" else read_folder
    return reader(shard, cfg, max_member_bytes)


# --------------------------------------------------------------------------- fetch by location


# The images table's columns that say where an image's bytes live (what ``fetch_bytes`` reads).
LOCATION_COLUMNS = ("format_kind", "file_uri", "offset", "length", "row")


def fetch_bytes(rows: list[dict[str, object]], cfg: InputConfig) -> list[bytes]:
    """Image bytes for rows of the ``images`` table, grouped by the file that holds them.

    Tar members are ranged reads (one GET each on s3); parquet rows read only the row groups
    they sit in; folder images are read whole. Order of the result follows ``rows``.
    """
    out: list[bytes | None] = [None] * len(rows)
    by_file: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_file.setdefault(str(r["file_uri"]), []).append(i)
    for uri, idxs in by_file.items():
        fs, path = storage.filesystem(uri)
        fmt = rows[idxs[0]]["format_kind"]
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                starts, total = [], 0
                for g in range(pf.num_row_groups):
                    starts.append(total)
                    total += pf.metadata.row_group(g).num_rows
                need: dict[int, list[int]] = {}
                for i in idxs:
                    row = int(rows[i]["row"])  # type: ignore[arg-type]
                    g = max(j for j, s in enumerate(starts) if s <= row)
                    need.setdefault(g, []).append(i)
                for g, members in need.items():
                    col = pf.read_row_group(g, columns=[cfg.image_column]).column(0)
                    values = _image_column_bytes(col)
                    for i in members:
                        out[i] = values[int(rows[i]["row"]) - starts[g]]  # type: ignore[arg-type]
        else:
            with fs.open(path, "rb") as f:
                for i in sorted(idxs, key=lambda i: int(rows[i]["offset"])):  # type: ignore[arg-type]
                    f.seek(int(rows[i]["offset"]))  # type: ignore[arg-type]
                    out[i] = f.read(int(rows[i]["length"]))  # type: ignore[arg-type]
    return [b if b is not None else b"" for b in out]


def fetch_bytes_tolerant(rows: list[dict[str, object]], cfg: InputConfig) -> list[bytes]:
    """``fetch_bytes``, but a file that cannot be read costs only its own rows: they come back
    as ``b""`` (the caller's reject), never as an exception for the whole batch."""
    # OSError: a file gone or unreadable; ValueError: pyarrow's ArrowInvalid on a damaged
    # parquet file.
    try:
        return fetch_bytes(rows, cfg)
    except (OSError, ValueError):  # one read per image, to blame the right rows
        out = []
        for row in rows:
            try:
                out.extend(fetch_bytes([row], cfg))
            except (OSError, ValueError):
                out.append(b"")
        return out
