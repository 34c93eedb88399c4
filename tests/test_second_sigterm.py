"""A second SIGTERM during a training step stops the run at once, and that is an interruption like the first:
exit 143, one `error:` line with the resume command, summary.json `interrupted`, the last complete last.pth
intact, and `--resume auto` from it ends bit-identical to an uninterrupted run.

The terminated run is a real training process. To put both signals inside one optimizer step on any machine,
however loaded, the process is started through a small wrapper that holds step 3 open: it marks the step's
start (the test sends the first SIGTERM), marks when the trainer has seen that signal (the test sends the
second) and then keeps the step busy, as a long step on a GPU would be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from tests.helpers import assert_same_weights, error_lines, tiny_args

ROOT = Path(__file__).resolve().parents[1]
STEP = 3  # the optimizer step the two signals land in (4 steps per epoch, 2 epochs)

# Runs the real CLI; only step STEP's first micro-batch waits for the signals before it is computed.
WRAPPER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kdlab.cli.common import run_cli
    from kdlab.cli.train import main
    from kdlab.engine.trainer import Trainer

    markers, step = Path(sys.argv[1]), int(sys.argv[2])
    real = Trainer.forward_backward

    def held(self, batch, sync_grads=True, micro_index=None):
        if self.state.global_step == step - 1 and micro_index == 0:
            (markers / "step_started").touch()
            deadline = time.monotonic() + 120
            while not self._stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            (markers / "first_signal_seen").touch()
            while time.monotonic() < deadline:  # a long step: the second signal lands here
                time.sleep(0.05)
        return real(self, batch, sync_grads=sync_grads, micro_index=micro_index)

    Trainer.forward_backward = held
    raise SystemExit(run_cli(main, sys.argv[3:]))
    """
)


def _args(tmp: Path, out: str) -> list[str]:
    args = tiny_args(
        tmp,
        "training.checkpoint_every_steps=1",
        "training.num_vis_images=0",
        "training.save_every=100",
        "model.decoder_channels=32,16,16,8,8",
        epochs=2,
    )
    args[args.index("--batch_size") + 1] = "2"  # 8 train images: 4 optimizer steps per epoch
    args[args.index("--output_dir") + 1] = str(tmp / out)
    return args


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the training process ended early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def test_a_second_sigterm_mid_step_is_an_interruption_and_resumes_bit_identical(tmp_path):
    ref_args = _args(tmp_path, "reference")
    assert run_cli(train_main, ref_args) == 0
    ref_run = tmp_path / "reference" / "quickstart_baseline"

    args = _args(tmp_path, "twice")
    run = tmp_path / "twice" / "quickstart_baseline"
    markers = tmp_path / "markers"
    markers.mkdir()
    wrapper = tmp_path / "train_held.py"
    wrapper.write_text(WRAPPER)
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), str(markers), str(STEP), *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    try:
        _wait_for(markers / "step_started", proc)
        proc.send_signal(signal.SIGTERM)
        _wait_for(markers / "first_signal_seen", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 143, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["global_step"] == STEP - 1  # the interrupted step was never taken
    errors = error_lines(err)
    assert len(errors) == 1, err[-2000:]
    assert (
        f"stopped at once by a second SIGTERM after step {STEP - 1} (epoch 0 + {STEP - 1} batches)"
        in errors[0]
    )
    last = run / "checkpoints" / "last.pth"
    assert f"{last} (step {STEP - 1}) stands; resume with: " in errors[0], errors
    assert errors[0].endswith(f"--resume {last}"), errors

    # The last complete last.pth (after step STEP - 1) stands, and nothing half-written is left beside it.
    payload = torch.load(last, map_location="cpu", weights_only=True)
    assert payload["global_step"] == STEP - 1 and payload["batches_done"] == STEP - 1
    assert not list((run / "checkpoints").glob(".*tmp-*"))

    assert run_cli(train_main, ["--resume", "auto", *args]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_weights(ref_run / "checkpoints" / "last.pth", last)
    assert_same_weights(ref_run / "checkpoints" / "best_model.pth", run / "checkpoints" / "best_model.pth")
    ref = torch.load(ref_run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    got = torch.load(last, map_location="cpu", weights_only=True)
    assert got["global_step"] == ref["global_step"] == 8
    for a, b in zip(
        ref["optimizer_state_dict"]["state"].values(),
        got["optimizer_state_dict"]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
