"""DDP with torchrun on CPU (gloo): two processes with batch b equal one process with batch b and two-step
gradient accumulation (same global batch), and a DDP run resumes exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from tests.helpers import tiny_args

ROOT = Path(__file__).resolve().parents[1]


def _args(tmp: Path, out: str, *extra: str) -> list[str]:
    args = tiny_args(tmp, "training.save_every=1", "training.num_vis_images=0", *extra, epochs=2)
    args[args.index("--batch_size") + 1] = "2"
    args[args.index("--output_dir") + 1] = str(tmp / out)
    return args


def _run(command: list[str]) -> None:
    # torchrun gives each worker OMP_NUM_THREADS=1; the single-process reference uses one thread too, because
    # the thread count changes float summation order and so the last bits of every result.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "train_advanced.py"), *args]  # fmt: skip


def _params(path: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    # BatchNorm running statistics are per rank under DDP (rank 0's are kept); compare trained parameters.
    return {k: v for k, v in payload["model_state_dict"].items() if not k.endswith(("running_mean", "running_var",
            "num_batches_tracked"))}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # The single-process reference runs in-process, with one thread like the torchrun workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(train_main, _args(tmp, "single", "training.grad_accum_steps=2")) == 0
    finally:
        torch.set_num_threads(threads)
    _run(_torchrun(_args(tmp, "ddp")))
    return tmp, tmp / "single" / "quickstart_baseline", tmp / "ddp" / "quickstart_baseline"


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    _, single, ddp = runs
    a, b = _params(single / "checkpoints" / "last.pth"), _params(ddp / "checkpoints" / "last.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key
    untrained = _params(single / "checkpoints" / "untrained_model.pth")
    moved = sum(not torch.equal(untrained[k], a[k]) for k in a)
    assert moved > len(a) // 2, "training must have changed the weights for the comparison to mean anything"
    ckpt = torch.load(ddp / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # 8 images, global batch 4, 2 epochs
    summary = (ddp / "summary.json").read_text()
    assert '"world_size": 2' in summary and '"status": "completed"' in summary


def test_ddp_run_resumes_exactly(runs):
    tmp, _, ddp = runs
    copy = tmp / "ddp_resumed" / "quickstart_baseline"
    shutil.copytree(ddp, copy)
    shutil.copy(copy / "checkpoints" / "checkpoint_epoch_0001.pth", copy / "checkpoints" / "last.pth")
    _run(_torchrun(["--resume", str(copy / "checkpoints" / "last.pth"), "--no_progress"]))
    a, b = _params(ddp / "checkpoints" / "last.pth"), _params(copy / "checkpoints" / "last.pth")
    for key in a:
        assert torch.equal(a[key], b[key]), key
