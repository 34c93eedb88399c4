"""experiment_runs.json, the record of every run in an output directory, shared by every runner that writes it.

Every write is a read-modify-write under an exclusive `fcntl.flock` on the sibling `experiment_runs.json.lock`,
ending in an atomic replace: records written by other invocations since this one started (one after another
or at the same time) are merged, never overwritten with a stale copy. A record is keyed by its run name (its
directory under the output dir); a newer record of a run replaces the older one (`recorded_at`, the time the
runner recorded it). The file stays a JSON list of records; keys this version does not know are kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdlab.atomic_io import RESUME_ADVICE, write_failure_advice, write_json_atomic

log = logging.getLogger(__name__)

RUNS_FILE = "experiment_runs.json"
RECORDED_AT = "recorded_at"  # time.time() when the runner recorded the run's outcome
Record = dict[str, Any]


def lock_path_of(path: Path) -> Path:
    """The lock file beside the record file (the record file itself is replaced, so it cannot hold a lock)."""
    return path.with_name(path.name + ".lock")


@contextmanager
def records_locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of the record file `path` for the block (waiting for another writer to finish).

    The lock belongs to the open file: the kernel drops it when the holder ends in any way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path_of(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.debug("waiting for another writer of %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def parse_records(text: str) -> list[Record]:
    """The records of the file's text; ValueError when it is not a JSON list of objects with a "name"."""
    data = json.loads(text)
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) for r in data
    ):
        raise ValueError("not a JSON list of run records (objects with a name)")
    return data


def read_records(path: Path) -> list[Record]:
    """The records in `path` ([] when it is absent or unreadable; logged) — for readers, never for a rewrite."""
    if not path.is_file():
        return []
    try:
        return parse_records(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return []


def _records_for_update(path: Path) -> list[Record]:
    """The records to merge into (under the lock). An unreadable file is moved aside, not overwritten."""
    if not path.is_file():
        return []
    try:
        return parse_records(path.read_text())
    except (OSError, ValueError) as exc:
        kept = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(path, kept)
        log.warning("%s is unreadable (%s): moved to %s, and a new record started", path, exc, kept)
        return []


def _newer(old: Record | None, new: Record) -> Record:
    """The record a run keeps: the newer one; an older incoming record (another runner recorded the run since)
    loses. A run found finished on disk ("exists": --resume, --skip_training) keeps its training record and
    gains the export result and the directory it was found in: the old record's `run_dir` may be relative to
    another working directory, or the output directory may have moved, and the report reads the run from it."""
    if old is None:
        return new
    if (old.get(RECORDED_AT) or 0.0) > (new.get(RECORDED_AT) or 0.0):
        return old
    if new.get("status") == "exists" and old.get("status") == "completed":
        export = new.get("export") if new.get("export") is not None else old.get("export")
        found_in = {"run_dir": new["run_dir"]} if new.get("run_dir") else {}
        return {**old, **found_in, "export": export}
    return new


def merge_records(existing: list[Record], incoming: list[Record]) -> list[Record]:
    """`existing` with `incoming` merged in, keyed by run name (`_newer` decides between two of one run).

    Records never move; a new record goes just before the next record of `incoming` already in the list (at
    the end when there is none), so one invocation's records keep its order however its runs finish."""
    merged = [dict(r) for r in existing]
    latest: dict[str, Record] = {}
    for record in incoming:
        latest[record["name"]] = record  # a repeated name: the last one
    names = list(latest)
    for k, name in enumerate(names):
        position = next((i for i, r in enumerate(merged) if r["name"] == name), None)
        if position is not None:
            merged[position] = _newer(merged[position], latest[name])
            continue
        later = set(names[k + 1 :])
        before = next((i for i, r in enumerate(merged) if r["name"] in later), len(merged))
        merged.insert(before, dict(latest[name]))
    return merged


def record_runs(path: Path, incoming: list[Record]) -> list[Record]:
    """Merge `incoming` into the record file `path` under its lock and replace the file atomically; returns
    every record the file now holds. A record without `recorded_at` is stamped now.

    A full disk raises atomic_io.FileWriteError (one line: the file, the free space, rerun with --resume auto)
    and leaves the file as it was: a finished run missing from it is found on disk (summary.json) then."""
    now = time.time()
    stamped = [r if r.get(RECORDED_AT) is not None else {**r, RECORDED_AT: now} for r in incoming]
    with records_locked(path), write_failure_advice(RESUME_ADVICE):
        merged = merge_records(_records_for_update(path), stamped)
        write_json_atomic(path, merged)
    return merged
