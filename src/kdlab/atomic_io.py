"""Atomic file writes: write a temp file in the same directory, fsync, rename into place.

A reader (or a crash) therefore sees either the old file or the complete new one, never a torn write.
`atomic_path` is the one implementation (a context manager giving the temp path); `atomic_write`,
`write_text_atomic` and `write_json_atomic` are the short forms. `fsync=False` keeps the rename's
atomicity but skips flushing to disk, for files that are cheap to regenerate and rewritten often.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARKER = ".tmp-"


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True, fsync_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block exits cleanly, fsync it (unless `fsync=False`) and
    rename it to `path`. The temp file never lingers, whether the block succeeds or raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
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
    path: str | Path, write: Callable[[Path], None], fsync_dir: bool = False, *, fsync: bool = True
) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it to `path` (the temp file never lingers)."""
    with atomic_path(path, fsync=fsync, fsync_dir=fsync_dir) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_json_atomic_nosync(path: str | Path, data: Any) -> Path:
    """`write_json_atomic` without the fsync: for status files rewritten every few seconds."""
    return write_text_atomic(path, json.dumps(data, default=str) + "\n", fsync=False)
