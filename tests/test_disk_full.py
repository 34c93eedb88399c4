"""Disk full outside the checkpoints: summary.json, metrics.csv, a picture, the text log (training_log.txt and
the console), the report and experiment_runs.json. A write that fails for lack of space gives exactly one
`error:` line naming the file and the free space on its file system, no traceback (nor logging's own "---
Logging error ---"), exit 1; what was written before stays readable (no torn line in an appended log), and
the same command with `--resume auto` continues.

The failures are injected with KDLAB_FAULT_ENOSPC_WRITE=PATTERN:N (kdlab.atomic_io): the N-th write of a
file whose name matches PATTERN fails as on a full disk (half the bytes written, then ENOSPC). The
summary.json run is a subprocess (its real stderr and exit code); the others run run_cli in this process (the
runner's child trains in a subprocess), which saves an interpreter start each; every resume runs in this
process. Tiny runs: 8 train / 4 val images, 2 steps an epoch, no test split."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdlab import atomic_io
from kdlab.cli.common import run_cli
from kdlab.cli.experiments import main as experiments_main
from kdlab.cli.train import main as train_main
from tests.helpers import error_lines, tiny_args

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENV = "KDLAB_FAULT_ENOSPC_WRITE"  # kdlab.atomic_io.WRITE_FAULT_ENV
FREE = r"\(\d+(\.\d)? (KiB|MiB|GiB) free on its file system\)"
RESUME = "rerun the same command with --resume auto"
RUN = "quickstart_baseline"


@pytest.fixture(autouse=True)
def fresh_fault_counts(monkeypatch):
    """Write counts start at zero in every test (in-process runs count in this process)."""
    monkeypatch.setattr(atomic_io, "_fault_counts", {}, raising=False)
    monkeypatch.delenv(FAULT_ENV, raising=False)


def _args(tmp: Path, *extra: str, epochs: int = 2) -> list[str]:
    # no test split, pictures or epoch checkpoints before the last epoch: less to compute and write
    return tiny_args(
        tmp, "data.synthetic.test_images=0", "training.num_vis_images=0", "training.save_every=100", *extra,
        epochs=epochs,
    )  # fmt: skip


def _train_subprocess(args: list[str], fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_advanced.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, FAULT_ENV: fault},
        timeout=600,
    )


def _one_error(err: str, code: int) -> str:
    assert code == 1, err[-3000:]
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    errors = error_lines(err)
    assert len(errors) == 1, errors
    return errors[0]


def _assert_disk_full_line(line: str, path: Path, kept: str) -> None:
    head = f"error: could not write {path}: No space left on device "
    assert line.startswith(head), line
    assert re.fullmatch(
        re.escape(head) + FREE + re.escape(f"; {kept}. Free disk space on {path.parent} and {RESUME}"), line
    ), line


def _last_epoch(run: Path) -> int:
    payload = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    return int(payload["epoch"])


def _csv_epochs(run: Path) -> list[int]:
    with (run / "logs" / "metrics.csv").open(newline="") as fh:
        return [int(row["epoch"]) for row in csv.DictReader(fh)]


def _no_temp_files(root: Path) -> None:
    assert not [p for p in root.rglob("*") if atomic_io.TMP_MARKER in p.name]


def _resume(args: list[str]) -> None:
    assert run_cli(train_main, ["--resume", "auto", *args]) == 0


# ------------------------------------------------------------------ the write points themselves (fast)
def test_an_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_io.write_json_atomic(target, {"epoch": 1})
    monkeypatch.setenv(FAULT_ENV, "summary.json:2")
    atomic_io.write_json_atomic(target, {"epoch": 2})  # the 1st write of the process: not the one to fail
    with pytest.raises(atomic_io.FileWriteError) as info:
        atomic_io.write_json_atomic(target, {"epoch": 3})
    message = str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno == 28 and "\n" not in message
    assert re.fullmatch(
        re.escape(f"could not write {target}: No space left on device ")
        + FREE
        + re.escape(
            f"; the previous summary.json is intact. Free disk space on {tmp_path} and run the command again"
        ),
        message,
    ), message
    assert json.loads(target.read_text()) == {"epoch": 2}
    _no_temp_files(tmp_path)


def test_a_real_file_size_limit_is_the_same_one_line_error(tmp_path):
    """No injection: RLIMIT_FSIZE makes the kernel refuse the write part way (EFBIG), as a full disk does
    (ENOSPC). The atomic write keeps the old file; the appended log is cut back to its last whole line."""
    target = tmp_path / "experiment_comparison.md"
    atomic_io.write_text_atomic(target, "old\n")
    log_path = tmp_path / "training_log.txt"
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        atomic_io.append_bytes(fd, b"line one\n" * 100, log_path)  # 900 bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        with pytest.raises(atomic_io.FileWriteError, match=r"^could not write .*md: File too large \("):
            atomic_io.write_text_atomic(target, "x" * 5000)
        with pytest.raises(
            atomic_io.FileWriteError, match="training_log.txt: File too large .*; its earlier"
        ):
            atomic_io.append_bytes(fd, b"a line that does not fit" * 10 + b"\n", log_path)  # 100 bytes fit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
        os.close(fd)
    assert target.read_text() == "old\n"
    assert log_path.read_bytes() == b"line one\n" * 100
    _no_temp_files(tmp_path)


def test_a_console_that_cannot_be_written_is_one_error_line_at_the_end(monkeypatch, capsys):
    """stderr on a full disk: no "--- Logging error ---" traceback; the command ends with one error line."""

    def main(argv):
        from kdlab.cli.common import setup_logging

        setup_logging()
        logging.getLogger("kdlab.test").info("first line")  # the one that fails
        logging.getLogger("kdlab.test").info("second line")  # the console is silent after a failure
        return 0

    monkeypatch.setenv(FAULT_ENV, "stderr:1")
    assert run_cli(main, []) == 1
    err = capsys.readouterr().err
    assert _one_error(err, 1) == (
        "error: could not write stderr: No space left on device. Free disk space and run the command again"
    )
    assert "first line" not in err and "second line" not in err
    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(main, []) == 0  # the next command has its console back
    assert "second line" in capsys.readouterr().err


# ------------------------------------------------------------------ a training run
def test_summary_json_on_a_full_disk(tmp_path):
    """Epoch 1's summary.json fails, after epoch 1's last.pth: the run stops; --resume auto trains epoch 2."""
    args = _args(tmp_path)
    run = tmp_path / "runs" / RUN
    proc = _train_subprocess(args, "summary.json:1")
    line = _one_error(proc.stderr, proc.returncode)
    _assert_disk_full_line(line, run / "summary.json", "no summary.json was written")
    summary = json.loads((run / "summary.json").read_text())  # then written with the outcome
    assert summary["status"] == "failed" and summary["epochs_completed"] == 1
    assert _last_epoch(run) == 1 and _csv_epochs(run) == [1]
    _no_temp_files(run)

    _resume(args)
    assert _last_epoch(run) == 2 and _csv_epochs(run) == [1, 2]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_metrics_csv_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """In this process: epoch 2's metrics.csv fails before epoch 2's last.pth; epoch 1's row stays."""
    args = _args(tmp_path)
    run = tmp_path / "runs" / RUN
    monkeypatch.setenv(FAULT_ENV, "metrics.csv:2")
    code = run_cli(train_main, args)
    line = _one_error(capsys.readouterr().err, code)
    _assert_disk_full_line(line, run / "logs" / "metrics.csv", "the previous metrics.csv is intact")
    assert _csv_epochs(run) == [1] and _last_epoch(run) == 1
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    _no_temp_files(run)

    monkeypatch.delenv(FAULT_ENV)
    _resume(args)
    assert _csv_epochs(run) == [1, 2] and _last_epoch(run) == 2


def test_a_picture_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """In this process: epoch 2's second validation picture fails; epoch 1's pictures stay whole."""
    args = _args(tmp_path, "training.num_vis_images=2")
    run = tmp_path / "runs" / RUN
    monkeypatch.setenv(FAULT_ENV, "val_01.png:2")
    code = run_cli(train_main, args)
    line = _one_error(capsys.readouterr().err, code)
    picture = run / "visualizations" / "epoch_0002" / "val_01.png"
    _assert_disk_full_line(line, picture, "no val_01.png was written")
    for name in ("val_00.png", "val_01.png"):
        with Image.open(run / "visualizations" / "epoch_0001" / name) as image:
            image.load()  # a whole PNG
    assert not picture.exists() and _last_epoch(run) == 1 and _csv_epochs(run) == [1]
    _no_temp_files(run)

    monkeypatch.delenv(FAULT_ENV)
    _resume(args)
    with Image.open(picture) as image:
        image.load()
    assert _last_epoch(run) == 2


def test_the_training_log_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """In this process: the 3rd line of training_log.txt (in epoch 2) fails half written. The handler cuts the
    file back to its 2 whole lines and prints no logging traceback; the trainer stops at its next safe point,
    before epoch 2's metrics.csv row and last.pth."""
    args = _args(tmp_path)
    run = tmp_path / "runs" / RUN
    log_file = run / "logs" / "training_log.txt"
    monkeypatch.setenv(FAULT_ENV, "training_log.txt:3")
    code = run_cli(train_main, args)
    line = _one_error(capsys.readouterr().err, code)
    _assert_disk_full_line(line, log_file, "its earlier lines are intact")
    text = log_file.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2, text
    assert all(re.match(r"\d{4}-\d\d-\d\d ", t) for t in text.splitlines()), text  # no torn line
    assert _last_epoch(run) == 1 and _csv_epochs(run) == [1]

    monkeypatch.delenv(FAULT_ENV)
    _resume(args)
    lines = log_file.read_text().splitlines()
    assert lines[:2] == text.splitlines() and any("epoch 2/2" in t for t in lines[2:])
    assert _last_epoch(run) == 2 and _csv_epochs(run) == [1, 2]


# ------------------------------------------------------------------ the runner
def _suite_args(tmp: Path, out: Path) -> list[str]:
    return [
        "--configs", RUN, "--epochs", "1", "--batch_size", "4", "--output_dir", str(out), "--no_export",
        "--set", f"data.synthetic.root={tmp / 'data'}", "data.synthetic.train_images=8",
        "data.synthetic.val_images=4", "data.synthetic.test_images=0", "data.synthetic.image_size=64,64",
        "data.input_size=64,64", "data.num_workers=0", "model.roi_size=16,12", "model.mask_size=32,24",
        "model.head_channels=16", "training.num_vis_images=0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def suite_whose_record_failed(tmp_path_factory):
    """run_experiments.py (in this process; its child trains for real) whose experiment_runs.json write, when
    the run ends, fails: (workspace, exit code, stderr)."""
    tmp = tmp_path_factory.mktemp("disk_full_suite")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(atomic_io, "_fault_counts", {}, raising=False)
        patch.setenv(FAULT_ENV, "experiment_runs.json:1")
        code = run_cli(experiments_main, _suite_args(tmp, tmp / "out"))
    return tmp, code, err.getvalue()


def _copy_suite(src: Path, dest: Path) -> Path:
    shutil.copytree(src / "out", dest / "out")
    return dest / "out"


def test_experiment_runs_json_on_a_full_disk(suite_whose_record_failed, tmp_path):
    tmp, code, err = suite_whose_record_failed
    records = tmp / "out" / "experiment_runs.json"
    line = _one_error(err, code)
    _assert_disk_full_line(line, records, "no experiment_runs.json was written")
    run = tmp / "out" / RUN
    assert json.loads((run / "summary.json").read_text())["status"] == "completed" and _last_epoch(run) == 1
    _no_temp_files(tmp / "out")

    out = _copy_suite(tmp, tmp_path)
    assert run_cli(experiments_main, [*_suite_args(tmp, out), "--resume", "auto"]) == 0
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [(r["name"], r["status"]) for r in runs] == [(RUN, "exists")]  # found finished, not trained again
    assert (out / "experiment_comparison.md").is_file()


@pytest.mark.parametrize("name", ["experiment_comparison.md", "experiment_comparison.png"])
def test_the_report_on_a_full_disk(suite_whose_record_failed, tmp_path, monkeypatch, capsys, name):
    """`--resume auto` finds the run finished and writes the report; one report file fails (the markdown, or the
    figure drawn by matplotlib), then the same command without the fault writes them all."""
    tmp, _, _ = suite_whose_record_failed
    out = _copy_suite(tmp, tmp_path)
    args = [*_suite_args(tmp, out), "--resume", "auto"]
    monkeypatch.setenv(FAULT_ENV, f"{name}:1")
    code = run_cli(experiments_main, args)
    line = _one_error(capsys.readouterr().err, code)
    _assert_disk_full_line(line, out / name, f"no {name} was written")
    assert not (out / name).exists()
    assert [r["name"] for r in json.loads((out / "experiment_runs.json").read_text())] == [RUN]
    assert (out / "experiment_comparison.csv").is_file()  # written before it
    _no_temp_files(out)

    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(experiments_main, args) == 0
    assert (out / "experiment_comparison.md").read_text().startswith("# Experiment comparison")
    with Image.open(out / "experiment_comparison.png") as image:
        image.load()
