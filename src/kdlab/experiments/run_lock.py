"""One writer per run directory: an exclusive `fcntl.flock` on `<run>/.lock`, held for the whole run.

The lock belongs to the open file, so the kernel drops it when the holding process ends in any way (exit,
crash, SIGKILL). The file also records the holder (pid, host, start time) for the error a second process
gets. A `.lock` file whose lock is free was left by a process that is gone: it is taken over, and the log
says whose it was. Locks are advisory and local to a host's kernel: on a network file system without
flock support two hosts may not see each other's lock.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from kdlab.errors import KdlabInputError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # resolved run dir -> the open descriptor holding its lock (kept for the process)


class RunDirBusyError(KdlabInputError):
    """Another live process holds the run directory's lock (exit 2, nothing written)."""


def _holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        data = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown process"
    since = holder.get("started")
    when = (
        f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
        if isinstance(since, int | float)
        else ""
    )
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def acquire_run_lock(run_dir: Path) -> None:
    """Hold `<run_dir>/.lock` until this process ends; raise RunDirBusyError if a live process holds it.

    Calling it again for a directory this process already locks is a no-op, unless the lock file was
    replaced (the directory was removed and made again), when the new file is locked."""
    key = run_dir.resolve()
    path = key / LOCK_NAME
    fd = _held.get(key)
    if fd is not None:
        try:
            if os.fstat(fd).st_ino == path.stat().st_ino:
                return
        except FileNotFoundError:
            pass
        os.close(fd)  # our file was removed with the directory: lock the new one
        del _held[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirBusyError(
            f"run directory {key} is in use by {_describe(holder)}; two processes must not write one run: "
            "wait for it to end (or stop it), or use another --output_dir / name"
        ) from None
    previous = _holder(fd)
    if previous.get("pid") is not None:
        log.warning("took over the stale lock of %s in %s: that process is gone", _describe(previous), key)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = fd


def release_run_lock(run_dir: Path) -> None:
    """Drop this process's lock on `run_dir` at the end of a run, clearing the holder record (so the next
    run does not report a stale lock). A process that dies keeps neither the lock nor a clean record."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def run_dir_holder(run_dir: Path) -> str | None:
    """Who holds `<run_dir>/.lock` right now ("pid 12 on host h, since ..."), or None when it is free or absent.

    A probe for the runner: it takes the lock without blocking and drops it at once, so it never keeps it."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_holder(fd))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
