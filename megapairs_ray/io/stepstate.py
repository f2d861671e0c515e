"""The books every batch stage keeps, kept one way: settings fingerprints, finished units, and
the run lock.

- **Settings.** A stage's output depends on some config fields (all of them unless a field is
  marked a resource, see ``config.RESOURCE``) and on the output of the stages it reads. Both go
  into ``RUN/_state/<stage>.json`` with a fingerprint. When a stage starts with other settings
  than its stored output was made with, that output is removed before any new work and the
  changed fields are named: outputs made under two settings are never mixed. Stages downstream
  carry the upstream fingerprint, so they follow on their next run.
- **Units.** A stage's work is done in units (a shard, a space, a part of a try). A unit's
  marker, ``RUN/_state/<stage>/<unit>.json``, is written last, after everything the unit wrote,
  and carries the fingerprint and the unit's counts. Finished units are found with one listing
  (one request on s3, not one per unit); counts are summed by Ray tasks when there are many.
- **Versions.** The state document records the version of the books' shape (``BOOKS``). A run
  directory written with an older shape is brought up to date, once, by the stage engine before
  the stage runs (``pipeline/engine.py`` ``upgrade_books``); a newer one is refused.
- **The lock.** One driver at a time per run directory: ``RUN/_state/lock.json`` is created
  exclusively (an ``If-None-Match`` PUT on s3) and kept alive by a heartbeat. A second driver
  refuses with a message naming the holder. A holder that died (its process is gone from this
  host, or its heartbeat is older than the lease) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage

log = logging.getLogger(__name__)

# The shape of the books and of the reject tables: 1 (no field) had a reject table per stage
# and reject reasons beside the counts; 2 has one reject shape and ``reject:<reason>`` counts.
BOOKS = 2

# Marker files read by the driver's threads up to this many; beyond, by Ray tasks in chunks.
_LOCAL_READ_MAX = 2000
_CHUNK = 1000


class StageInputError(MegapairsError, RuntimeError):
    """A stage's input is not there yet: the stage it reads has not run or not finished."""


class RunLockedError(MegapairsError, RuntimeError):
    """Another driver holds the run directory."""


def fingerprint(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names whose values differ between two state documents (settings and upstream)."""
    out = []
    for part in ("settings", "upstream"):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(key if part == "settings" else f"{key} (its output)")
    return out


@dataclass
class StepState:
    """The books of one stage of one run directory."""

    run_dir: str
    stage: str
    settings: dict[str, Any]
    upstream: dict[str, str] = field(default_factory=dict)

    @property
    def doc(self) -> dict[str, Any]:
        return {"stage": self.stage, "settings": self.settings, "upstream": self.upstream}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.doc)

    def reconcile(self, outputs: Sequence[str]) -> list[str]:
        """Make the stored output agree with these settings before any work: if it was made
        with other settings (or by a version that kept no books), remove it and its markers.
        Returns the fields that changed (empty when nothing had to go)."""
        uri = layout.state_file(self.run_dir, self.stage)
        current = {**self.doc, "fingerprint": self.fingerprint, "books": BOOKS}
        old = storage.read_json(uri) if storage.exists(uri) else None
        if old is not None and old.get("fingerprint") == self.fingerprint:
            return []
        changed = changed_fields(old, current) if old is not None else []
        if old is not None:
            log.warning("%s: settings changed since its output was made (%s): recomputing it",
                        self.stage, ", ".join(changed))
        # Markers first: a crash midway leaves no marker vouching for removed output.
        storage.remove(layout.markers_dir(self.run_dir, self.stage), recursive=True)
        for out in outputs:
            storage.remove(out, recursive=True)
        storage.write_json(uri, current)
        return changed

    # ------------------------------------------------------------------------- units

    def done_units(self) -> set[str]:
        """Units with a marker: one listing."""
        return done_units(self.run_dir, self.stage)

    def mark_done(self, unit: str, counts: dict[str, Any] | Counter[str],
                  **extra: Any) -> None:
        """Write a unit's marker: call it after everything the unit wrote."""
        storage.write_json(layout.marker(self.run_dir, self.stage, unit),
                           {"fingerprint": self.fingerprint, "counts": dict(counts), **extra})

    def unmark(self, unit: str) -> None:
        storage.remove(layout.marker(self.run_dir, self.stage, unit))

    def read_markers(self, units: Sequence[str]) -> list[dict[str, Any]]:
        """The markers of ``units``, in order; each one is checked against these settings."""
        docs = read_json_many([layout.marker(self.run_dir, self.stage, u) for u in units])
        for unit, doc in zip(units, docs):
            if doc.get("fingerprint") != self.fingerprint:
                raise StageInputError(
                    f"{self.stage}: the marker of {unit} was written under other settings; "
                    f"rerun `megapairs {self.stage}`")
        return docs

    def require_finished(self, units: Sequence[str]) -> None:
        """For a stage reading this one's output: it must be there, made with these settings,
        every unit finished."""
        uri = layout.state_file(self.run_dir, self.stage)
        if not storage.exists(uri):
            raise StageInputError(f"{self.stage} has not run on {self.run_dir}: run "
                                  f"`megapairs {self.stage}` first")
        stored = storage.read_json(uri)
        if stored.get("fingerprint") != self.fingerprint:
            raise StageInputError(
                f"{self.stage}'s output was made with other settings than this config's "
                f"({', '.join(changed_fields(stored, self.doc)) or 'unknown'}): rerun "
                f"`megapairs {self.stage}` with this config first")
        missing = sorted(set(units) - self.done_units())
        if missing:
            raise StageInputError(f"{len(missing)} of {len(units)} unit(s) of {self.stage} are "
                                  f"not finished (e.g. {missing[:3]}): run `megapairs "
                                  f"{self.stage}` first")

    def sum_counts(self, units: Sequence[str]) -> Counter[str]:
        total: Counter[str] = Counter()
        for doc in self.read_markers(units):
            total.update(doc["counts"])
        return total


def done_units(run_dir: str, stage: str) -> set[str]:
    """The units of ``stage`` with a marker in ``run_dir``: one listing."""
    return {u.rsplit("/", 1)[-1].removesuffix(".json")
            for u in storage.list_files(layout.markers_dir(run_dir, stage), ".json")}


def stored_fingerprint(run_dir: str, stage: str) -> str:
    """The fingerprint of a stage's stored output, for the stages that read it."""
    uri = layout.state_file(run_dir, stage)
    if not storage.exists(uri):
        raise StageInputError(f"{run_dir} has no {stage} output yet: run `megapairs {stage}` "
                              "first")
    return str(storage.read_json(uri)["fingerprint"])


def _read_chunk(uris: list[str]) -> list[Any]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(storage.read_json, uris))


def read_json_many(uris: Sequence[str]) -> list[Any]:
    """Small JSON documents, in order: the driver's threads read a few; Ray tasks read many,
    a chunk each, so a stage of 100,000 shards does not queue 100,000 requests on one host."""
    uris = list(uris)
    if len(uris) <= _LOCAL_READ_MAX:
        return _read_chunk(uris)
    import ray

    task = ray.remote(num_cpus=0.1)(_read_chunk)
    chunks = [uris[i:i + _CHUNK] for i in range(0, len(uris), _CHUNK)]
    return [doc for part in ray.get([task.remote(c) for c in chunks]) for doc in part]


# ---------------------------------------------------------------------------------- the lock

LOCK_LEASE_S = 120.0
LOCK_HEARTBEAT_S = 20.0


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` only if it does not exist; False when it does."""
    fs, path = storage.filesystem(uri)
    if storage.is_remote(uri):
        bucket, _, key = path.partition("/")
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as e:  # s3fs maps 412 Precondition Failed to an OSError-like error
            if "PreconditionFailed" in repr(e) or "412" in repr(e) or \
                    isinstance(e, FileExistsError):
                return False
            raise
        return True
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _holder_is_gone(doc: dict[str, Any], lease_s: float) -> str | None:
    """Why the recorded holder no longer holds the run (None while it does)."""
    if doc.get("host") == socket.gethostname():
        started = _process_started(int(doc.get("pid", -1)))
        if started is None or abs(started - float(doc.get("pid_started", 0))) > 1.0:
            return f"its process {doc.get('pid')} is gone"
    age = time.time() - float(doc.get("heartbeat", 0))
    if age > lease_s:
        return f"no heartbeat for {age:.0f}s"
    return None


@contextmanager
def run_lock(run_dir: str, lease_s: float = LOCK_LEASE_S,
             heartbeat_s: float = LOCK_HEARTBEAT_S) -> Iterator[None]:
    """Hold ``run_dir`` for one driver while the block runs (see the module's docstring)."""
    uri = layout.lock_file(run_dir)
    me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
          "pid_started": _process_started(os.getpid()),
          "command": " ".join(os.path.basename(a) if i == 0 else a
                              for i, a in enumerate(sys.argv[:4])),
          "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def body() -> bytes:
        return json.dumps({**me, "heartbeat": time.time()}, indent=2).encode()

    for _ in range(3):
        if _create_exclusive(uri, body()):
            break
        try:
            held = storage.read_json(uri)
        except FileNotFoundError:
            continue  # released between our two requests: try again
        gone = _holder_is_gone(held, lease_s)
        if gone is None:
            age = time.time() - float(held.get("heartbeat", 0))
            raise RunLockedError(
                f"{run_dir} is in use by another driver (pid {held.get('pid')} on "
                f"{held.get('host')}, `{held.get('command')}`, since {held.get('since')}, last "
                f"heartbeat {age:.0f}s ago); wait for it to finish, or if it is gone, remove "
                f"{uri} (it lapses {lease_s:.0f}s after its last heartbeat)")
        log.warning("taking over the run lock of %s: %s", run_dir, gone)
        if storage.read_json(uri) == held:  # not already taken over by someone else
            storage.remove(uri)
    else:
        raise RunLockedError(f"could not take the run lock {uri}: another driver keeps "
                             "taking it")

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_s):
            try:
                if storage.read_json(uri).get("owner") != me["owner"]:
                    log.error("the run lock %s was taken over by another driver", uri)
                    return
                storage.write_json(uri, json.loads(body()))
            except Exception as e:  # a storage hiccup must not kill the run; the lease allows it
                log.warning("run lock heartbeat failed: %s", e)

    thread = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            if storage.read_json(uri).get("owner") == me["owner"]:
                storage.remove(uri)
        except FileNotFoundError:
            pass


class NewerBooksError(MegapairsError, RuntimeError):
    """A run directory written by a newer version of the project."""


def books_version(run_dir: str, stage: str) -> int | None:
    """The books' shape of a stage's stored output (None: it has none yet)."""
    uri = layout.state_file(run_dir, stage)
    if not storage.exists(uri):
        return None
    version = int(storage.read_json(uri).get("books", 1))
    if version > BOOKS:
        raise NewerBooksError(f"{uri}: written by a newer megapairs-ray (books v{version}, this "
                              f"one reads up to v{BOOKS}); upgrade megapairs-ray to run it")
    return version


def rewrite_markers(run_dir: str, stage: str,
                    change: Callable[[str, dict[str, Any]], dict[str, Any]]) -> int:
    """Rewrite every marker of ``stage`` through ``change(unit, doc)``, then record the current
    books' version; returns how many markers there were."""
    units = sorted(done_units(run_dir, stage))
    docs = read_json_many([layout.marker(run_dir, stage, u) for u in units])
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda ud: storage.write_json(layout.marker(run_dir, stage, ud[0]),
                                                    change(*ud)), zip(units, docs)))
    uri = layout.state_file(run_dir, stage)
    storage.write_json(uri, {**storage.read_json(uri), "books": BOOKS})
    return len(units)
