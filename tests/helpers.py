"""Shared helpers for end-to-end tests: tiny CPU run arguments, error-line and weight comparisons."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch


def tiny_args(tmp: Path, *extra: str, epochs: int = 2, config: str = "quickstart_baseline") -> list[str]:
    return [
        "--config", config,
        "--output_dir", str(tmp / "runs"),
        "--epochs", str(epochs),
        "--batch_size", "4",
        "--device", "cpu",
        "--no_progress",
        "--set",
        f"data.synthetic.root={tmp / 'data'}",
        "data.synthetic.train_images=8",
        "data.synthetic.val_images=4",
        "data.synthetic.test_images=4",
        "data.synthetic.image_size=64,64",
        "data.input_size=64,64",
        "data.num_workers=0",
        "model.roi_size=16,12",
        "model.mask_size=32,24",
        "model.head_channels=16",
        "training.save_every=1",
        "training.log_every_steps=1",
        "training.num_vis_images=2",
        "training.deterministic=true",
        *extra,
    ]  # fmt: skip


# The session teacher checkpoint, relative to its workspace (conftest `trained_teacher_root`).
TEACHER_CKPT = Path("runs") / "quickstart_teacher" / "checkpoints" / "best_model.pth"


def copy_teacher_workspace(root: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the session teacher's (conftest `trained_teacher_root`) data and best_model.pth into `dest`, for
    tests that write next to the teacher, move it or edit it; returns (dest, teacher checkpoint)."""
    shutil.copytree(root / "data", dest / "data")
    ckpt = dest / TEACHER_CKPT
    ckpt.parent.mkdir(parents=True)
    shutil.copy2(root / TEACHER_CKPT, ckpt)
    return dest, ckpt


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines of stderr (log lines may precede them); a traceback fails the test."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
