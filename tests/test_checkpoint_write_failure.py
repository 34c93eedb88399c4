"""Disk full: a checkpoint write that fails (ENOSPC, or torch's C++ writer failing) raises one
CheckpointWriteError naming the file and the fix; the file it would have replaced is intact and no temp file
is left. End to end, a training run whose save of last.pth fails exits 1 with one `error:` line and no
traceback, keeps the earlier last.pth, and continues from it with `--resume auto`."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab import checkpoints
from kdlab.atomic_io import TMP_MARKER
from kdlab.checkpoints import ENOSPC_FAULT_ENV, save_checkpoint_atomic
from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.errors import CheckpointWriteError, KdlabRunFailure
from tests.helpers import error_lines, tiny_args

ROOT = Path(__file__).resolve().parents[1]


def _payload(value: float, n: int = 16) -> dict:
    return {"model_state_dict": {"w": torch.full((n,), value)}, "epoch": int(value)}


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if TMP_MARKER in p.name]


def _partial_then(exc: BaseException):
    """A torch.save that writes part of the file (as a filling disk does), then raises `exc`."""

    def failing_save(payload, f, *args, **kwargs) -> None:
        Path(f).write_bytes(b"PK\x03\x04 partial checkpoint")
        raise exc

    return failing_save


@pytest.mark.parametrize(
    "exc, reason",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), os.strerror(errno.EDQUOT)),
        # What torch 2.x raises when the disk fills during torch.save(payload, path)
        (
            RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534"),
            "unexpected pos",
        ),
        (
            RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
            "file write failed",
        ),
    ],
    ids=["ENOSPC", "EDQUOT", "torch-unexpected-pos", "torch-file-write-failed"],
)
def test_a_failed_write_raises_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, exc, reason):
    target = tmp_path / "last.pth"
    save_checkpoint_atomic(_payload(1.0), target)
    before = target.read_bytes()
    monkeypatch.setattr(checkpoints.torch, "save", _partial_then(exc))
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint_atomic(_payload(2.0), target, retry="rerun with --resume auto")
    message = str(info.value)
    assert isinstance(info.value, KdlabRunFailure)  # the CLI prints it as one `error:` line, exit 1
    assert "\n" not in message
    assert f"could not write checkpoint {target}: " in message and reason in message
    assert "the previous last.pth is intact" in message
    assert f"Free disk space on {tmp_path} and rerun with --resume auto" in message
    assert target.read_bytes() == before
    assert not _temp_files(tmp_path)


def test_a_failed_fsync_is_a_write_failure_too(tmp_path, monkeypatch):
    """ENOSPC can surface only when the data is flushed (delayed allocation, network file systems)."""
    target = tmp_path / "best_model.pth"
    save_checkpoint_atomic(_payload(1.0), target)
    before = target.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointWriteError, match="best_model.pth: No space left on device; the previous"):
        save_checkpoint_atomic(_payload(2.0), target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert not _temp_files(tmp_path)


def test_a_first_write_that_fails_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(
        checkpoints.torch, "save", _partial_then(OSError(errno.ENOSPC, "No space left on device"))
    )
    with pytest.raises(CheckpointWriteError, match="no untrained_model.pth was written"):
        save_checkpoint_atomic(_payload(0.0), tmp_path / "untrained_model.pth")
    assert list(tmp_path.iterdir()) == []


def test_other_runtime_errors_are_not_disguised_as_write_failures(tmp_path, monkeypatch):
    """A bug inside torch.save (not a failed write) keeps its own exception, for its traceback."""
    monkeypatch.setattr(
        checkpoints.torch, "save", _partial_then(RuntimeError("Cannot serialize a meta tensor"))
    )
    with pytest.raises(RuntimeError, match="meta tensor") as info:
        save_checkpoint_atomic(_payload(0.0), tmp_path / "last.pth")
    assert not isinstance(info.value, CheckpointWriteError)
    assert not _temp_files(tmp_path)


def test_the_real_torch_writer_failing_mid_file(tmp_path):
    """No mock: a file-size limit (RLIMIT_FSIZE, writes past it fail with EFBIG) makes torch's own C++ zip
    writer fail mid-write, as a filling disk does; its message must be recognised as a write failure."""
    target = tmp_path / "last.pth"
    save_checkpoint_atomic(_payload(1.0), target)
    before = target.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointWriteError) as info:
            save_checkpoint_atomic(_payload(2.0, n=100_000), target)  # 400 KB of weights
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert f"could not write checkpoint {target}: the write failed (" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert target.read_bytes() == before
    assert not _temp_files(tmp_path)


# ------------------------------------------------------------------ end to end
# tiny_args with 2 epochs (8 images, batch 4: 2 steps an epoch); a fresh run writes, in order:
# 1 untrained_model.pth; epoch 1: 2 best_model.pth, 3 checkpoint_epoch_0001.pth, 4 last.pth;
# epoch 2: 5 best_model.pth (it improves), 6 checkpoint_epoch_0002.pth, 7 last.pth.
FAIL_AT_SAVE = 7


def test_a_training_run_whose_checkpoint_write_fails_exits_1_with_one_line(tmp_path):
    args = tiny_args(tmp_path, "training.num_vis_images=0", epochs=2)
    run = tmp_path / "runs" / "quickstart_baseline"
    last = run / "checkpoints" / "last.pth"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_advanced.py"), *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, ENOSPC_FAULT_ENV: str(FAIL_AT_SAVE)},
        timeout=600,
    )
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = error_lines(err)
    assert len(errors) == 1, errors
    assert errors[0] == (
        f"error: could not write checkpoint {last}: No space left on device; the previous last.pth is "
        f"intact. Free disk space on {last.parent} and rerun the same command with --resume auto"
    )
    payload = torch.load(last, map_location="cpu", weights_only=True)
    assert payload["epoch"] == 1 and payload["global_step"] == 2  # the last.pth of epoch 1
    assert (run / "checkpoints" / "checkpoint_epoch_0002.pth").is_file()  # written before the failure
    assert not _temp_files(run / "checkpoints")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"

    # Once there is space again, the printed advice continues the run from the intact last.pth.
    assert run_cli(train_main, ["--resume", "auto", *args]) == 0
    payload = torch.load(last, map_location="cpu", weights_only=True)
    assert payload["epoch"] == 2 and payload["global_step"] == 4
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_a_full_disk_that_also_fails_summary_json_still_gives_one_line(tmp_path, monkeypatch, capsys):
    """On a really full disk the final summary.json (status "failed") cannot be written either: that second
    OSError is logged as a warning and must not replace the one-line error with a traceback. In-process; the
    first checkpoint write (untrained_model.pth, before any step) fails."""
    from kdlab.engine.trainer import Trainer

    real_summary = Trainer.write_summary

    def summary_on_a_full_disk(self, status):
        if status == "failed":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.run_dir / "summary.json"))
        return real_summary(self, status)

    monkeypatch.setattr(Trainer, "write_summary", summary_on_a_full_disk)
    monkeypatch.setattr(checkpoints, "_saves_in_process", 0)
    monkeypatch.setenv(ENOSPC_FAULT_ENV, "1")
    capsys.readouterr()
    assert run_cli(train_main, tiny_args(tmp_path, "training.num_vis_images=0", epochs=1)) == 1
    err = capsys.readouterr().err
    errors = error_lines(err)  # no traceback
    ckpt_dir = tmp_path / "runs" / "quickstart_baseline" / "checkpoints"
    assert len(errors) == 1 and errors[0].startswith(
        f"error: could not write checkpoint {ckpt_dir / 'untrained_model.pth'}: No space left on device; "
        "no untrained_model.pth was written."
    ), errors
    assert "summary.json not updated" in err
    assert not _temp_files(ckpt_dir)
