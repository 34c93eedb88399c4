"""atomic_io: a write either lands whole under its name or leaves the old file and no temp file behind."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from kdlab import atomic_io
from kdlab.atomic_io import atomic_path, atomic_write, write_json_atomic, write_text_atomic


def _fsync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(atomic_io.os, "fsync", lambda fd: calls.append(fd) or real(fd))
    return calls


def test_atomic_path_renames_the_temp_file_into_place(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.txt.tmp-")
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_fsync_by_default_and_not_when_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fsync_calls(monkeypatch)
    write_text_atomic(tmp_path / "a.txt", "a")
    assert len(calls) == 1
    write_text_atomic(tmp_path / "b.txt", "b", fsync=False)
    assert len(calls) == 1
    atomic_write(tmp_path / "c.txt", lambda tmp: tmp.write_text("c"), fsync_dir=True)
    assert len(calls) == 3  # the file and its directory
    assert (tmp_path / "b.txt").read_text() == "b" and (tmp_path / "c.txt").read_text() == "c"


def test_write_json_atomic_writes_indented_json(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'


def test_run_logger_rewrites_metrics_csv_atomically_with_growing_columns(tmp_path: Path) -> None:
    from kdlab.engine.run_logger import RunLogger

    logger = RunLogger(tmp_path)
    try:
        logger.epoch_row({"epoch": 1, "loss": 0.5})
        logger.epoch_row({"epoch": 2, "loss": 0.25, "target_iou": 0.125})
    finally:
        logger.close()
    with (tmp_path / "logs" / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows == [
        {"epoch": "1", "loss": "0.5", "target_iou": ""},
        {"epoch": "2", "loss": "0.25", "target_iou": "0.125"},
    ]
    assert not [p for p in (tmp_path / "logs").iterdir() if ".tmp" in p.name]
