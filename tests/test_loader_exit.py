"""A process whose loader workers are still alive when the interpreter exits must exit, not hang.

Loader workers ignore SIGTERM (`worker_ignores_sigterm`: a group-wide SIGTERM is the main process's to handle).
Python's multiprocessing stops daemonic children at exit with SIGTERM and then joins them with no timeout, so
a loader still referenced at exit (a module global, or a traceback kept by an exiting SystemExit) would wait
forever for workers that ignore the signal; in a test run this left `train_advanced.py` processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from kdlab.data import loaders

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, key):  # an index, or (index, seed) from build_loader's sampler
            return key

    dataset = Items()
    persistent = loaders.build_loader(dataset, 2, True, 0, 1, False, collate_fn=lambda items: items)
    next(iter(persistent))  # persistent workers: the loader keeps its iterator, and so its worker, alive
    oneshot = loaders.WorkerLoader(dataset, batch_size=2, num_workers=1)
    batches = iter(oneshot)  # a one-pass iterator kept by a global (predict's and the cache's loaders)
    next(batches)
    print("loaded", flush=True)
    sys.exit(143)
    """
)


def test_process_with_live_loader_workers_exits() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(
            f"the process did not exit within 60 s of sys.exit (live loader workers); stderr: {err[-1500:]}"
        )
    assert "loaded" in out, err[-2000:]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-2000:]
