"""Paths that are local folders or s3:// prefixes, through fsspec.

s3 endpoints and credentials come from the usual AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which s3fs and pyarrow both honour, so a run directory on MinIO or a
test server needs no code path of its own.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import io
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, ParamSpec, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

P = ParamSpec("P")
R = TypeVar("R")


def names_its_operation(operation: str, user_named: bool = False,
                        ) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """An ``OSError`` raised inside the decorated function (its first argument a URI) carries
    ``megapairs_operation = (operation, uri, user_named)``: the CLI names the operation and the
    URI in its one line, and tells a file the run itself wrote from one the user named
    (``user_named``: the URI is a location the user gave, as the run directory is when it is
    first checked). The first tag set is kept (the innermost operation), and the error keeps its
    type (callers' ``except FileNotFoundError`` still works); the attribute survives pickling
    into a Ray task's error."""
    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        first = next(iter(inspect.signature(fn).parameters))

        @functools.wraps(fn)
        def tagged(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if not hasattr(e, "megapairs_operation"):
                    uri = args[0] if args else kwargs.get(first)
                    e.megapairs_operation = (  # type: ignore[attr-defined]
                        operation, str(uri), user_named)
                raise
        return tagged
    return wrap


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem holding ``uri`` and the path inside it (no scheme)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return posixpath.join(base, *parts)


def with_scheme(fs: AbstractFileSystem, path: str) -> str:
    """Turn a path the filesystem returned (e.g. from ``glob``) back into a full URI."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


@names_its_operation("copying")
def local_copy(uri: str, cache_dir: str, version: str = "", file: bool = False) -> str:
    """The folder (or with ``file``, the one file) at ``uri`` copied once to ``cache_dir`` on
    this machine, for readers that take local paths only (FAISS's memory map,
    ``from_pretrained``); returns the local path. The copy is keyed by ``uri`` and ``version``
    (what changes when the source is rewritten), so a rebuilt source is never read from a stale
    copy; it is complete or absent (written aside, then renamed), and processes copying at once
    on one node keep the first that finished."""
    key = hashlib.blake2b(f"{uri}\n{version}".encode(), digest_size=10).hexdigest()
    local = os.path.join(cache_dir, key)
    name = uri.rstrip("/").rsplit("/", 1)[-1] if file else ""
    if os.path.exists(os.path.join(local, "_complete")):
        return os.path.join(local, name) if file else local
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{local}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fs, path = filesystem(uri)
    try:
        if file:
            os.makedirs(tmp)
            fs.get(path, os.path.join(tmp, name))
        else:
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a dead source leaves nothing
        raise
    open(os.path.join(tmp, "_complete"), "w").close()
    try:
        os.rename(tmp, local)
    except OSError:  # another process on this node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(local, name) if file else local


@names_its_operation("listing")
def folder_version(uri: str) -> str:
    """Each file's name, size and modification stamp under ``uri``: changes when it is rewritten."""
    fs, path = filesystem(uri)
    files = fs.find(path, detail=True)
    return json.dumps(sorted((k, v.get("size"), str(v.get("LastModified") or v.get("mtime") or ""))
                             for k, v in files.items()))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@names_its_operation("removing")
def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        _remove_local(path, recursive)
    elif fs.exists(path):
        fs.rm(path, recursive=recursive)


def _remove_local(path: str, recursive: bool) -> None:
    """Remove a local file or folder without asking for the working directory.

    fsspec's local ``rm`` compares the path with ``os.getcwd()``, which fails (``ENOENT``,
    naming no path) in a process whose working directory was replaced beneath it. That is the
    driver of a ``ray job submit`` whenever another node shares its machine's Ray temp dir (plain
    ``ray start`` commands on one machine): each node's runtime-env agent unpacks the job's
    ``working_dir`` afresh (``rmtree``, then unzip at the same path) the first time it runs one
    of the job's tasks, under a driver started in the old copy. The index stage's first removal
    then failed the run with ``not found: No such file or directory``."""
    if os.path.isdir(path) and not os.path.islink(path):
        if not recursive:
            raise IsADirectoryError(errno.EISDIR, "a folder: remove it recursively", path)
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@names_its_operation("listing")
def list_files(uri: str, suffix: str = "", include_hidden: bool = False) -> list[str]:
    """Files recursively under ``uri`` ending with ``suffix``, sorted, as URIs. Hidden names
    (``.tmp-*`` left by a writer that died) are skipped unless asked for."""
    fs, path = filesystem(uri)
    return sorted(with_scheme(fs, p) for p in _found(fs, path, suffix, include_hidden))


def _found(fs: AbstractFileSystem, path: str, suffix: str, include_hidden: bool = False,
           ) -> dict[str, dict[str, Any]]:
    """One recursive listing under ``path``: each file ending with ``suffix`` and its details;
    hidden names (``.tmp-*`` left by a writer that died) left out unless asked for."""
    if not fs.exists(path):
        return {}
    return {p: info for p, info in fs.find(path, detail=True).items() if p.endswith(suffix)
            and (include_hidden or not posixpath.basename(p).startswith("."))}


@names_its_operation("listing")
def list_dirs(uri: str) -> list[str]:
    """The names of the folders directly under ``uri`` (one listing)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p["name"].rstrip("/"))
                  for p in fs.ls(path, detail=True) if p["type"] == "directory")


@contextmanager
def open_atomic(uri: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary name and rename on success, so readers never see half a file.

    On object storage the bytes are gathered in memory and sent in one PUT only when the block
    succeeds: a PUT is atomic, and an exception sends nothing (an fsspec file would upload what
    it had on close). No ``makedirs`` there either: s3fs would create a mistyped bucket.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        buf: IO[Any] = io.StringIO() if "b" not in mode else io.BytesIO()
        yield buf
        data = buf.getvalue()
        fs.pipe_file(path, data.encode() if isinstance(data, str) else data)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


@names_its_operation("writing to", user_named=True)
def check_writable(uri: str) -> None:
    """Write and remove a small file under ``uri``: a read-only, full or mistyped location
    fails here, before any work starts, with the storage's own error."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    with open_atomic(probe) as f:
        f.write(b"")
    remove(probe)


@names_its_operation("writing")
def write_json(uri: str, doc: Any) -> None:
    with open_atomic(uri, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True, default=str)


@names_its_operation("reading")
def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


@names_its_operation("writing")
def write_parquet(uri: str, table: pa.Table) -> None:
    with open_atomic(uri, "wb") as f:
        pq.write_table(table, f, compression="zstd")


@names_its_operation("reading")
def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


@names_its_operation("reading")
def read_parquet_dir(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All parquet files under ``uri`` as one table; None when there are none."""
    files = list_files(uri, ".parquet")
    if not files:
        return None
    return pa.concat_tables([read_parquet(f, columns) for f in files], promote_options="default")


@names_its_operation("listing")
def total_size(uri: str, suffix: str = "") -> int:
    """Bytes in the files under ``uri`` ending with ``suffix`` (hidden ones left out), from one
    listing; 0 when there is none."""
    fs, path = filesystem(uri)
    return sum(int(info["size"]) for info in _found(fs, path, suffix).values())
