"""Session-wide fixtures: one tiny trained teacher for every end-to-end test that distils from one."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from tests.helpers import TEACHER_CKPT, tiny_args


@pytest.fixture(scope="session")
def trained_teacher_root(tmp_path_factory) -> Path:
    """A workspace holding `data/` (the tiny synthetic set) and a 1-epoch `quickstart_teacher` run.

    Trained once per session (each module used to train its own). Read-only: a module that writes next to
    the teacher, moves it or edits it works on a copy (`tests.helpers.copy_teacher_workspace`)."""
    tmp = tmp_path_factory.mktemp("session_teacher")
    args = tiny_args(tmp, "training.num_vis_images=0", epochs=1, config="quickstart_teacher")
    assert run_cli(train_main, args) == 0
    assert (tmp / TEACHER_CKPT).is_file()
    return tmp


@pytest.fixture(scope="session", autouse=True)
def one_latency_run_per_export():
    """ONNX exports made inside tests (the runner's export step, the digits suite, ...) time 1 run with no
    warm-up instead of 3 + 20 of each of onnxruntime and PyTorch: tests check that latency is measured and
    recorded, never how fast it is (that is the benchmarks' job). A caller passing latency_runs still wins.
    "auto" exports use TorchScript only (see below)."""
    import functools

    from kdlab.export import graph, measure, pipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "WARMUP_RUNS", 0)
        # export.exporter=auto means dynamo, then TorchScript; dynamo takes ~25 s per export on these CPUs, so
        # tests that only need some ONNX file get TorchScript (2 s). The dynamo path has its own tests, which
        # ask for it by name (tests/test_onnx_export.py).
        patch.setattr(graph, "AUTO_ORDER", ("torchscript",))
        patch.setattr(
            pipeline,
            "export_run_to_onnx",
            functools.partial(pipeline.export_run_to_onnx, latency_runs=1),
        )
        yield
