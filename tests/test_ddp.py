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
from tests.helpers import TEACHER_CKPT, tiny_args

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


def test_feature_adapters_train_inside_the_ddp_module_like_one_process(trained_teacher_root, tmp_path):
    """Feature adapters live in the module DDP wraps (StudentWithAdapters): their gradients are averaged by
    DDP's own all-reduce, so two processes train the same adapters (and student) as one process with two-step
    accumulation. An adapter left outside DDP would train on rank 0's half of the batch only."""
    shutil.copytree(trained_teacher_root / "data", tmp_path / "data")
    teacher = trained_teacher_root / TEACHER_CKPT
    pairs = '[{"student": "unet.encoder[-1]", "teacher": "unet.encoder[-1]", "weight": 0.5}]'

    def args(out: str, *extra: str) -> list[str]:
        a = tiny_args(tmp_path, "training.save_every=1", "training.num_vis_images=0", "distillation.grad_share_every=0",
                      f"distillation.features={pairs}", *extra, epochs=2, config="quickstart_distill")  # fmt: skip
        a[a.index("--batch_size") + 1] = "2"
        a[a.index("--output_dir") + 1] = str(tmp_path / out)
        return [*a, "--teacher_checkpoint", str(teacher)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_cli(train_main, args("single", "training.grad_accum_steps=2")) == 0
    finally:
        torch.set_num_threads(threads)
    _run(_torchrun(args("ddp")))
    single, ddp = (tmp_path / out / "quickstart_distill" / "checkpoints" for out in ("single", "ddp"))
    a, b = (torch.load(d / "last.pth", map_location="cpu", weights_only=True) for d in (single, ddp))
    adapters = [k for k in a["task_state_dict"] if k.endswith("weight")]
    assert adapters, "the B0 -> B3 encoder pair needs a 1x1 conv adapter"
    first = torch.load(ddp / "checkpoint_epoch_0001.pth", map_location="cpu", weights_only=True)
    assert any(not torch.equal(b["task_state_dict"][k], first["task_state_dict"][k]) for k in adapters)
    for key in adapters:
        assert torch.allclose(a["task_state_dict"][key], b["task_state_dict"][key], rtol=1e-5, atol=1e-7), key
    student_a, student_b = _params(single / "last.pth"), _params(ddp / "last.pth")
    for key in student_a:
        assert torch.allclose(student_a[key], student_b[key], rtol=1e-5, atol=1e-7), key
