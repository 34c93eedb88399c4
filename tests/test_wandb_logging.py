"""The optional W&B sink of RunLogger: an offline run gets TensorBoard's scalar and image names and the config."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdlab.config.loader import resolve_config
from kdlab.config.schema import WandbConfig
from kdlab.engine.run_logger import RunLogger
from kdlab.engine.wandb_sink import step_metric
from kdlab.errors import KdlabInputError

pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    return wandb_dir


def _tensorboard_tags(logs: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"]), set(acc.Tags()["images"])


def _log_like_a_run(logger: RunLogger) -> None:
    logger.scalars({"metric": 0.2}, 0, prefix="teacher/")
    for step in range(1, 4):
        logger.scalars({"loss": 1.0 / step, "lr": 0.1, "nan_one": float("nan")}, step, prefix="train/")
    logger.scalars({"miou": 0.3, "target_iou": 0.1, "images": 4}, 1, prefix="val/")
    logger.image("val/val_00", np.zeros((8, 8, 3), dtype=np.uint8), 1)
    logger.scalars({"train_loss": 0.5, "lr": 0.1}, 1, prefix="epoch/")


def test_offline_wandb_run_writes_files_and_logs_tensorboards_names(tmp_path, offline_wandb):
    config = resolve_config("quickstart_baseline", ["logging.wandb.mode=offline"], {}).model_dump(mode="json")
    run_dir = tmp_path / "runs" / "exp"
    logger = RunLogger(run_dir, wandb=WandbConfig(mode="offline", project="kdlab-test"), config=config)
    assert logger.wandb is not None
    logged: list[dict] = []
    real_log = logger.wandb.run.log
    logger.wandb.run.log = lambda data, *a, **kw: logged.append(dict(data)) or real_log(data, *a, **kw)
    assert logger.wandb.run.config["training"]["epochs"] == config["training"]["epochs"]
    assert logger.wandb.run.config["logging"]["wandb"]["mode"] == "offline"
    _log_like_a_run(logger)
    logger.close()

    steps = {step_metric(p) for p in ("teacher/", "train/", "val/", "epoch/")}
    wandb_keys = {k for data in logged for k in data} - steps
    tb_scalars, tb_images = _tensorboard_tags(run_dir / "logs")
    assert tb_scalars and "train/nan_one" not in tb_scalars
    assert wandb_keys == tb_scalars | tb_images
    assert tb_images == {"val/val_00"}

    (run_file,) = offline_wandb.glob("wandb/offline-run-*/run-*.wandb")  # the offline run's own files
    # wandb's service process writes the file; on a loaded machine (CI under another job) its last records
    # can land a moment after finish() returns: wait for them, bounded, instead of reading a header only
    deadline = time.monotonic() + 60
    data = run_file.read_bytes()
    while not all(n.encode() in data for n in tb_scalars) and time.monotonic() < deadline:
        time.sleep(0.5)
        data = run_file.read_bytes()
    for name in tb_scalars:
        assert name.encode() in data, name
    assert list(run_file.parent.glob("files/media/images/val/val_00*.png"))
    run_id = (run_dir / "logs" / "wandb_run_id.txt").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "exp"
    cfg = WandbConfig(mode="offline")
    first = RunLogger(run_dir, wandb=cfg)
    first.scalars({"loss": 1.0}, 1, prefix="train/")
    first.close()
    second = RunLogger(run_dir, resume_epoch=1, wandb=cfg)
    second.scalars({"loss": 0.5}, 2, prefix="train/")
    run_id = second.wandb.run.id
    second.close()
    assert run_id == (run_dir / "logs" / "wandb_run_id.txt").read_text().strip()
    assert {p.name for p in offline_wandb.glob("wandb/offline-run-*/run-*.wandb")} == {f"run-{run_id}.wandb"}


def test_no_wandb_section_or_mode_disabled_means_tensorboard_only(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would fail on import: nothing may import it
    for wandb in (None, WandbConfig(mode="disabled")):
        logger = RunLogger(tmp_path / "exp", wandb=wandb)
        assert logger.wandb is None
        logger.scalars({"loss": 1.0}, 1, prefix="train/")
        logger.close()
    assert _tensorboard_tags(tmp_path / "exp" / "logs")[0] == {"train/loss"}


def test_missing_wandb_package_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    import logging

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    handlers = list(logging.getLogger("kdlab").handlers)
    with pytest.raises(KdlabInputError) as exc:
        RunLogger(tmp_path / "exp", wandb=WandbConfig(mode="offline"))
    message = str(exc.value)
    assert "\n" not in message and "pip install kdlab[wandb]" in message
    assert logging.getLogger("kdlab").handlers == handlers  # nothing left open (no training_log handler)


def test_wandb_config_is_checked_like_every_section():
    from kdlab.errors import ConfigError

    cfg = resolve_config("quickstart_baseline", ["logging.wandb.project=p", "logging.wandb.mode=offline"], {})
    assert cfg.logging.wandb == WandbConfig(project="p", entity=None, mode="offline")
    assert resolve_config("quickstart_baseline", [], {}).logging.wandb is None
    assert WandbConfig().mode == "online"
    with pytest.raises(ConfigError, match="mode"):
        resolve_config("quickstart_baseline", ["logging.wandb.mode=sometimes"], {})


def test_a_training_run_logs_to_an_offline_wandb_run(tmp_path, offline_wandb):
    """The trainer hands its config to RunLogger: a real run (1 epoch) writes an offline W&B run beside TB."""
    from kdlab.cli.common import run_cli
    from kdlab.cli.train import main as train_main
    from tests.helpers import tiny_args

    args = tiny_args(tmp_path, "logging.wandb.mode=offline", "logging.wandb.project=kdlab-test", epochs=1)
    assert run_cli(train_main, args) == 0
    logs = tmp_path / "runs" / "quickstart_baseline" / "logs"
    run_id = (logs / "wandb_run_id.txt").read_text().strip()
    runs = list(offline_wandb.rglob(f"*{run_id}*.wandb"))
    assert runs, f"no offline W&B run file for {run_id} under {offline_wandb}"
    content = runs[0].read_bytes()
    for name in (b"train/loss", b"val/miou", b"epoch/lr"):
        assert name in content, name


def test_a_missing_wandb_package_stops_a_run_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from kdlab.cli.common import run_cli
    from kdlab.cli.train import main as train_main
    from tests.helpers import error_lines, tiny_args

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert run_cli(train_main, tiny_args(tmp_path, "logging.wandb.mode=offline", epochs=1)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "pip install kdlab[wandb]" in lines[0]
    assert not (tmp_path / "runs").exists()
