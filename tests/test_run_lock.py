"""One writer per run directory: a second process on a locked run exits 2 naming the holder and touches
nothing; a lock left by a dead process is taken over and logged; a finished run leaves no holder record."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.experiments.run_lock import LOCK_NAME, RunDirBusyError, acquire_run_lock, release_run_lock
from tests.helpers import error_lines, tiny_args, tree_hashes

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; sys.path.insert(0, 'src'); from pathlib import Path; "
    "from kdlab.experiments.run_lock import acquire_run_lock; acquire_run_lock(Path(sys.argv[1])); "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lock")
    assert run_cli(train_main, tiny_args(tmp, "training.num_vis_images=0", epochs=1)) == 0
    return tmp, tmp / "runs" / "quickstart_baseline"


def test_a_finished_run_leaves_an_unheld_lock_without_a_holder(finished_run):
    _, run = finished_run
    assert (run / LOCK_NAME).read_text() == ""
    acquire_run_lock(run)  # free again
    release_run_lock(run)


def test_a_second_process_on_a_locked_run_exits_2_naming_the_holder(finished_run, capsys):
    tmp, run = finished_run
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_hashes(run)
        code = run_cli(
            train_main, ["--resume", str(run / "checkpoints" / "last.pth"), "--epochs", "2", "--no_progress"]
        )
        errors = error_lines(capsys.readouterr().err)
        assert code == 2
        assert len(errors) == 1 and f"pid {holder.pid} on host {socket.gethostname()}" in errors[0], errors
        assert tree_hashes(run) == before  # nothing written: no config.json, no checkpoint
        with pytest.raises(RunDirBusyError):
            acquire_run_lock(run)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_logged(finished_run, caplog):
    _, run = finished_run
    (run / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone-host", "started": 0}))
    with caplog.at_level(logging.WARNING, logger="kdlab.experiments.run_lock"):
        code = run_cli(
            train_main, ["--resume", str(run / "checkpoints" / "last.pth"), "--epochs", "2", "--no_progress"]
        )
    assert code == 0
    assert "took over the stale lock of pid 999999 on host gone-host" in caplog.text
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly at the end
