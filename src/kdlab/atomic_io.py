"""Atomic file writes: write a temp file in the same directory, fsync, rename into place; and the disk-full
handling every write of a run shares.

A reader (or a crash) therefore sees either the old file or the complete new one, never a torn write.
`atomic_path` is the one implementation (a context manager giving the temp path); `atomic_write`,
`write_text_atomic` and `write_json_atomic` are the short forms. `fsync=False` keeps the rename's
atomicity but skips flushing to disk, for files that are cheap to regenerate and rewritten often.
`append_bytes` appends to a log file in one write, cut back to its earlier size when the write fails.

A write that fails for lack of space (ENOSPC, EDQUOT, EFBIG) raises `FileWriteError`: one line naming the
file, the free space on its file system, what is kept and what to do (`write_failure_advice` sets the last
part; the CLI prints it as one `error:` line, exit 1). A failure where raising is not safe (a logging
handler) is kept with `defer_write_failure` and raised at the caller's next safe point.

Fault injection for the tests: `KDLAB_FAULT_ENOSPC_WRITE=PATTERN:N[,PATTERN:N...]` makes the N-th write (in
this process) of a file whose name (or path) matches the glob PATTERN fail as on a full disk: an atomic
write's temp file is cut to half its size, an append writes half its bytes, then OSError(ENOSPC) is raised.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"

WRITE_FAULT_ENV = "KDLAB_FAULT_ENOSPC_WRITE"
# The errors that mean "no room for this write"; any other OSError (permissions, a missing directory) keeps
# its own type and meaning.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
RESUME_ADVICE = "rerun the same command with --resume auto"
_advice: ContextVar[str] = ContextVar("kdlab_write_failure_advice", default="run the command again")


class FileWriteError(OSError):
    """A file could not be written for lack of space; the message is one line (file, free space, what is kept,
    what to do). An OSError (with the original errno), so code that handled the raw error still does."""

    def __init__(
        self, message: str, path: Path | None = None, reason: str = "", errno_: int | None = None
    ) -> None:
        super().__init__(message)
        self.errno = errno_
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


@contextmanager
def write_failure_advice(advice: str) -> Iterator[None]:
    """Inside the block a FileWriteError ends "Free disk space on DIR and <advice>" (e.g. RESUME_ADVICE)."""
    token = _advice.set(advice)
    try:
        yield
    finally:
        _advice.reset(token)


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def write_failure(path: Path | str, exc: OSError, kept: str, *, on_disk: bool = True) -> FileWriteError:
    """The one-line error of a failed write of `path` (`kept` says what survived, e.g. "the previous x is
    intact"), with the free space on its file system (`on_disk=False`: `path` names no file, e.g. "stderr"
    on a pipe)."""
    path = Path(path)
    reason = exc.strerror or str(exc) or type(exc).__name__
    free, where = "", ""
    if on_disk:
        where = f" on {path.parent}"
        try:
            free = f" ({size_text(shutil.disk_usage(path.parent).free)} free on its file system)"
        except OSError:
            pass
    kept = f"; {kept}" if kept else ""
    message = f"could not write {path}: {reason}{free}{kept}. Free disk space{where} and {_advice.get()}"
    return FileWriteError(message, path, reason, exc.errno)


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, FileWriteError) and exc.errno in NO_SPACE_ERRNOS


# ------------------------------------------------------------------ deferred failures (logging handlers)
_deferred: list[FileWriteError] = []
_deferred_lock = threading.Lock()


def defer_write_failure(exc: FileWriteError) -> None:
    """Keep a write failure that could not be raised where it happened (inside a logging handler); the first
    one is raised by `raise_deferred_write_failure` at the next safe point."""
    with _deferred_lock:
        if not _deferred:
            _deferred.append(exc)


def take_deferred_write_failure() -> FileWriteError | None:
    with _deferred_lock:
        return _deferred.pop() if _deferred else None


def raise_deferred_write_failure() -> None:
    exc = take_deferred_write_failure()
    if exc is not None:
        raise exc


# ------------------------------------------------------------------ fault injection
_fault_counts: dict[str, int] = {}


def _fault_due(path: Path | str) -> bool:
    """Whether this write of `path` is one KDLAB_FAULT_ENOSPC_WRITE asks to fail (counts matching writes)."""
    spec = os.environ.get(WRITE_FAULT_ENV)
    if not spec:
        return False
    name, full = Path(path).name, str(path)
    due = False
    for entry in spec.split(","):
        pattern, _, count = entry.strip().rpartition(":")
        if not pattern or not (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(full, pattern)):
            continue
        _fault_counts[entry] = _fault_counts.get(entry, 0) + 1
        due = due or _fault_counts[entry] == int(count)
    return due


def _no_space(path: Path | str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def inject_write_fault(path: Path | str) -> None:
    """Raise OSError(ENOSPC) when KDLAB_FAULT_ENOSPC_WRITE asks this write of `path` to fail (for writers that
    are neither an atomic write nor `append_bytes`, e.g. the console)."""
    if _fault_due(path):
        raise _no_space(path)


# ------------------------------------------------------------------ writes
def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


@contextmanager
def atomic_path(
    path: str | Path, *, fsync: bool = True, fsync_dir: bool = False, wrap_errors: bool = True
) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block exits cleanly, fsync it (unless `fsync=False`) and
    rename it to `path`. The temp file never lingers, whether the block succeeds or raises.

    A write (in the block, the fsync or the rename) that fails for lack of space raises FileWriteError; the
    file at `path` is left as it was. `wrap_errors=False` leaves the OSError as it is (checkpoints word their
    own error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if _fault_due(path):
            if tmp.exists():
                os.truncate(tmp, tmp.stat().st_size // 2)
            raise _no_space(tmp)
        if fsync:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if not wrap_errors or not is_no_space(exc):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise write_failure(path, exc, kept) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(
    path: str | Path,
    write: Callable[[Path], None],
    fsync_dir: bool = False,
    *,
    fsync: bool = True,
    wrap_errors: bool = True,
) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it to `path` (the temp file never lingers)."""
    with atomic_path(path, fsync=fsync, fsync_dir=fsync_dir, wrap_errors=wrap_errors) as tmp:
        write(tmp)
    return Path(path)


def append_bytes(fd: int, data: bytes, path: Path) -> None:
    """Append `data` (whole lines) to the file open as `fd` (O_APPEND; one writer). A write that fails part
    way (the disk filled after a short write) is cut back to the file's earlier size, so no torn last line is
    left; for lack of space it raises FileWriteError naming `path`."""
    size = os.fstat(fd).st_size
    try:
        if _fault_due(path):
            os.write(fd, data[: len(data) // 2])
            raise _no_space(path)
        view = memoryview(data)
        while view:  # a short write is retried: the next one reports why (ENOSPC, EFBIG) or goes on
            written = os.write(fd, view)
            if written <= 0:
                raise _no_space(path)
            view = view[written:]
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        if not is_no_space(exc):
            raise
        raise write_failure(path, exc, "its earlier lines are intact") from exc


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_json_atomic_nosync(path: str | Path, data: Any) -> Path:
    """`write_json_atomic` without the fsync: for status files rewritten every few seconds."""
    return write_text_atomic(path, json.dumps(data, default=str) + "\n", fsync=False)
