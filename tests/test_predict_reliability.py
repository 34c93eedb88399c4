"""A SIGTERM to the whole process group (Slurm pre-emption, `kill -- -PGID`) while `kdlab-predict` or
`kdlab-cache generate` decodes images in DataLoader workers: the workers ignore it, the main process stops
the graceful way (exit 143, its one `error:` line, no worker-crash traceback) and no output is half-written
(what was there before stays as it was)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import TEACHER_CKPT, tree_hashes

ROOT = Path(__file__).resolve().parents[1]

# Runs a CLI with its image dataset slowed down, so that the signal lands while a worker is loading: each
# item touches `marker` (in the worker, which inherits the patch through fork), then sleeps. The main process
# blocks SIGTERM until its first batch has arrived, so the workers always meet the signal first: without
# the fix a worker dies of it and the main process fails with "DataLoader worker ... killed by signal"
# every time, not only when the two race that way.
DRIVER = """
import signal, sys, time
from pathlib import Path

TERM = {signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, TERM)  # before any thread exists: every later thread inherits it

marker, which, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
if which == "predict":
    import kdlab.predict.run as main_side
    from kdlab.cli.predict import main
    from kdlab.predict.run import LetterboxedJobs as Loaded
else:
    import kdlab.data.loaders as main_side
    from kdlab.cli.cache import main
    from kdlab.distill.cache_segmentation import _LetterboxedImages as Loaded
from kdlab.cli.common import run_cli

load, check = Loaded.__getitem__, main_side.raise_if_data_error

def slow_load(self, index):  # in a loader worker
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERM)
    marker.touch()
    time.sleep(1.0)
    return load(self, index)

def check_then_unblock(batch):  # in the main process, on each batch
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERM)
    return check(batch)

Loaded.__getitem__ = slow_load
main_side.raise_if_data_error = check_then_unblock
raise SystemExit(run_cli(main, argv))
"""

TINY = [
    "data.synthetic.train_images=8", "data.synthetic.val_images=4", "data.synthetic.test_images=4",
    "data.synthetic.image_size=64,64", "data.input_size=64,64", "model.roi_size=16,12",
    "model.mask_size=32,24", "model.head_channels=16",
]  # fmt: skip


def _terminate_group_mid_run(tmp: Path, which: str, argv: list[str]) -> tuple[int, str]:
    """Start the CLI in its own session, SIGTERM its whole process group once a worker loads images."""
    marker = tmp / "loading"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(marker), which, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert marker.exists(), f"no image was loaded: {proc.communicate(timeout=60)[1][-2000:]}"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _assert_graceful_stop(code: int, err: str) -> None:
    assert code == 143, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: terminated (SIGTERM)"], err[-2000:]


def test_predict_workers_leave_a_group_sigterm_to_the_main_process(trained_teacher_root, tmp_path):
    val = next((trained_teacher_root / "data").glob("val_*"))
    out = tmp_path / "preds"
    out.mkdir()
    (out / "predictions.json").write_text("[]\n")  # an earlier run's output: kept as it was
    before = tree_hashes(out)
    argv = [
        "--model", str(trained_teacher_root / TEACHER_CKPT), "--device", "cpu", "--images", str(val / "images"),
        "--coco", str(val / "annotations.json"), "--output", str(out), "--batch_size", "1",
        "--num_workers", "1", "--no_progress",
    ]  # fmt: skip
    _assert_graceful_stop(*_terminate_group_mid_run(tmp_path, "predict", argv))
    assert tree_hashes(out) == before
    assert not list(tmp_path.glob(".kdlab-predict-*"))  # the staging folder is gone


def test_cache_generator_workers_leave_a_group_sigterm_to_the_main_process(trained_teacher_root, tmp_path):
    out = tmp_path / "caches" / "teacher.hdf5"
    out.parent.mkdir()
    out.write_bytes(b"an earlier cache")  # replaced only by a complete new file, so kept as it was
    before = tree_hashes(out.parent)
    argv = [
        "generate", "--teacher", str(trained_teacher_root / TEACHER_CKPT), "--config", "quickstart_distill",
        "--out", str(out), "--overwrite", "--no_progress", "--batch_size", "1", "--device", "cpu",
        "--set", f"data.synthetic.root={trained_teacher_root / 'data'}", *TINY, "data.num_workers=1",
    ]  # fmt: skip
    _assert_graceful_stop(*_terminate_group_mid_run(tmp_path, "cache", argv))
    assert tree_hashes(out.parent) == before  # no temp file left beside it either
