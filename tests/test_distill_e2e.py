"""Distillation end to end on tiny CPU runs: teacher handling, logged terms, checkpoints, resume, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config
from kdlab.distill.kd_segmentation import SegmentationKDTask
from kdlab.distill.teacher import FrozenTeacher
from kdlab.models.builders import build_model
from kdlab.tasks import load_teacher
from kdlab.tasks.segmentation import SegmentationTask
from tests.helpers import assert_same_weights, copy_teacher_workspace, error_lines, tiny_args, tree_hashes


@pytest.fixture(scope="module")
def teacher_ckpt(trained_teacher_root, tmp_path_factory) -> Path:
    """This module's copy of the session teacher (one test moves the file away for a while)."""
    _, ckpt = copy_teacher_workspace(trained_teacher_root, tmp_path_factory.mktemp("teacher"))
    return ckpt


def distill_args(tmp: Path, teacher: Path, *extra: str, epochs: int = 2) -> list[str]:
    return tiny_args(
        tmp, "distillation.grad_share_every=1", *extra, epochs=epochs, config="quickstart_distill"
    ) + ["--teacher_checkpoint", str(teacher)]


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, teacher_ckpt):
    tmp = tmp_path_factory.mktemp("distill")
    assert run_cli(train_main, distill_args(tmp, teacher_ckpt)) == 0
    return tmp, tmp / "runs" / "quickstart_distill"


def test_teacher_metrics_come_before_epoch_one(distilled_run):
    _, run = distilled_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "distillation"
    assert 0.0 <= summary["teacher_metrics"]["target_iou"] <= 1.0
    assert len(summary["teachers"][0]["sha256"]) == 64
    log = (run / "logs" / "training_log.txt").read_text()
    assert log.index("teacher: miou") < log.index("epoch 1/2")  # the monitored metric


def test_every_distillation_term_is_logged(distilled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = distilled_run
    acc = EventAccumulator(str(run / "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("distill_final", "distill_bg_fg", "distill_target", "distill_total", "base_total", "total",
                 "temperature", "alpha", "gradshare_base_total", "gradshare_distill_final"):  # fmt: skip
        assert f"train/{name}" in tags, name
    assert "teacher/target_iou" in tags
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    shares = [float(rows[-1][c]) for c in rows[-1] if c.startswith("train_gradshare_")]
    assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-4)
    assert float(rows[-1]["train_alpha"]) == pytest.approx(0.7)


def test_best_model_is_the_student_alone_and_tests_without_teacher(distilled_run, teacher_ckpt, tmp_path):
    tmp, run = distilled_run
    best = torch.load(run / "checkpoints" / "best_model.pth", map_location="cpu", weights_only=True)
    student_keys = set(build_model(resolve_config("quickstart_distill").model).state_dict())
    assert set(best["model_state_dict"]) == student_keys
    last = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert not any("teacher" in k for k in last["model_state_dict"])
    # The teacher file is gone: evaluating the student must still work.
    hidden = tmp_path / "teacher_moved.pth"
    shutil.move(teacher_ckpt, hidden)
    try:
        args = tiny_args(tmp, "--test_only", "--resume", str(run / "checkpoints" / "best_model.pth"),
                         config="quickstart_baseline")  # fmt: skip
        assert run_cli(train_main, args) == 0
    finally:
        shutil.move(hidden, teacher_ckpt)


def test_resuming_a_distillation_run_equals_an_uninterrupted_one(distilled_run):
    tmp, run = distilled_run
    copy = tmp / "resumed" / "quickstart_distill"
    shutil.copytree(run, copy)
    shutil.copy(copy / "checkpoints" / "checkpoint_epoch_0001.pth", copy / "checkpoints" / "last.pth")
    assert run_cli(train_main, ["--resume", str(copy / "checkpoints" / "last.pth"), "--no_progress"]) == 0
    assert_same_weights(run / "checkpoints" / "last.pth", copy / "checkpoints" / "last.pth")


def test_a_changed_teacher_file_is_refused_on_resume(distilled_run, teacher_ckpt, tmp_path, capsys):
    tmp, run = distilled_run
    copy = tmp / "changed" / "quickstart_distill"
    shutil.copytree(run, copy)
    changed = tmp_path / "teacher.pth"
    payload = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    payload["metrics"] = {"edited": 1.0}
    torch.save(payload, changed)
    resume = ["--resume", str(copy / "checkpoints" / "last.pth"), "--teacher_checkpoint", str(changed),
              "--epochs", "3", "--no_progress"]  # fmt: skip
    before = tree_hashes(copy)
    assert run_cli(train_main, resume) == 2
    assert "--allow_teacher_change" in error_lines(capsys.readouterr().err)[0]
    assert tree_hashes(copy) == before
    assert run_cli(train_main, [*resume, "--allow_teacher_change"]) == 0


@pytest.mark.parametrize("kind", ["wrong_architecture", "random_bytes", "missing"])
def test_bad_teacher_checkpoints_are_one_error_line(teacher_ckpt, tmp_path, capsys, kind):
    bad = tmp_path / "bad.pth"
    if kind == "wrong_architecture":
        payload = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
        payload["config"]["model"]["encoder"] = "timm-efficientnet-b0"  # weights are B3
        torch.save(payload, bad)
    elif kind == "random_bytes":
        bad.write_bytes(bytes(range(256)) * 64)
    assert run_cli(train_main, distill_args(tmp_path, bad)) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(bad) in errors[0]
    if kind == "wrong_architecture":
        assert "missing" in errors[0] and "unexpected" in errors[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", [("--distillation_alpha", "1.5"), ("--distillation_temperature", "0")])
def test_out_of_range_alpha_and_temperature_fail(teacher_ckpt, tmp_path, capsys, flag):
    assert run_cli(train_main, [*distill_args(tmp_path, teacher_ckpt), *flag]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and ("alpha" in errors[0] or "temperature" in errors[0])


def test_flags_take_precedence_over_set(teacher_ckpt):
    cfg = resolve_config(
        "quickstart_distill",
        ["distillation.alpha=0.2"],
        {"distillation.alpha": 0.9, "distillation.temperature": 2.0},
    )
    assert cfg.distillation.alpha == 0.9 and cfg.distillation.temperature == 2.0


# ---------------------------------------------------------------- in-process checks of the task and teacher
def _tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "images": torch.rand(2, 3, 64, 64, generator=gen),
        "rois": torch.tensor([[0, 2, 2, 40, 60], [1, 10, 5, 60, 50], [1, 0, 0, 30, 30]], dtype=torch.float32),
        "masks": torch.randint(0, 3, (3, 32, 24), generator=gen),
    }


def _student_and_cfg():
    cfg = resolve_config(
        "quickstart_distill",
        ["model.roi_size=16,12", "model.mask_size=32,24", "model.head_channels=16", "distillation.grad_share_every=0",
         "distillation.teacher_checkpoint=unused.pth"],
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def test_teacher_stays_frozen_in_eval_with_unchanged_bn_statistics():
    student, cfg = _student_and_cfg()
    teacher = FrozenTeacher(build_model(cfg.model))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = SegmentationKDTask(cfg.distillation, cfg.training.loss, [(teacher, 1.0)])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()
    teacher.train()  # a trainer calling .train() on everything must not flip the teacher
    for step in range(3):
        losses = task(student, _tiny_batch(step))
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not teacher.training and not teacher.model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running stats included


def test_alpha_zero_gives_exactly_the_base_loss_gradient():
    student, cfg = _student_and_cfg()
    cfg.distillation.alpha = 0.0
    teacher = FrozenTeacher(build_model(cfg.model))
    batch = _tiny_batch()

    def grads(task) -> list[torch.Tensor]:
        student.zero_grad()
        torch.manual_seed(1)  # the encoder's stochastic depth draws from the global RNG
        task(student, batch)["loss"].backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    kd = grads(SegmentationKDTask(cfg.distillation, cfg.training.loss, [(teacher, 1.0)]))
    base = grads(SegmentationTask(cfg.training.loss))
    assert len(kd) == len(base)
    for a, b in zip(kd, base, strict=True):
        assert torch.equal(a, b)


def test_distillation_equals_zero_when_student_is_the_teacher(teacher_ckpt):
    loaded = load_teacher(teacher_ckpt)
    student = loaded.teacher.model  # the same weights on the student side
    cfg = resolve_config("quickstart_distill", ["distillation.teacher_checkpoint=unused.pth"])
    cfg.distillation.grad_share_every = 0
    task = SegmentationKDTask(cfg.distillation, cfg.training.loss, [(loaded.teacher, 1.0)])
    batch = _tiny_batch()
    batch["masks"] = torch.randint(0, 3, (3, 32, 24))  # the tiny teacher's mask size
    with torch.no_grad():
        losses = task(student, batch)
    for name in ("distill_final", "distill_bg_fg", "distill_target"):
        assert losses[name].abs().item() < 1e-5, name


def test_feature_distillation_trains_adapters_and_resumes(teacher_ckpt, tmp_path):
    pairs = '[{"student": "head.shared", "teacher": "head.shared", "weight": 1.0}, ' \
            '{"student": "unet.encoder[-1]", "teacher": "unet.encoder[-1]", "weight": 0.5}]'  # fmt: skip
    args = distill_args(
        tmp_path, teacher_ckpt, f"distillation.features={pairs}", "distillation.cwd_weight=0.5"
    )
    assert run_cli(train_main, args) == 0
    run = tmp_path / "runs" / "quickstart_distill"
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    for column in (
        "train_distill_feat_0",
        "train_distill_feat_1",
        "train_distill_features",
        "train_distill_cwd",
    ):
        assert float(rows[-1][column]) > 0, column
    last = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    first = torch.load(
        run / "checkpoints" / "checkpoint_epoch_0001.pth", map_location="cpu", weights_only=True
    )
    adapter_keys = [k for k in last["task_state_dict"] if "weight" in k]
    assert adapter_keys, "the B0->B3 encoder pair needs a 1x1 conv adapter"
    assert any(not torch.equal(last["task_state_dict"][k], first["task_state_dict"][k]) for k in adapter_keys)
    best = torch.load(run / "checkpoints" / "best_model.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("adapters") for k in best["model_state_dict"])


def test_self_distillation_with_ema_and_schedules(tmp_path):
    args = tiny_args(
        tmp_path, "distillation.enabled=true", "distillation.self_distillation=true", "distillation.teacher_checkpoint=null",
        "distillation.teacher_experiment=null",
        "training.ema.enabled=true",
        "training.ema.evaluate=true", "training.ema.decay=0.5", "distillation.temperature_schedule.kind=linear",
        "distillation.temperature_schedule.end=1.0", "distillation.alpha_schedule.kind=cosine",
        "distillation.alpha_schedule.end=0.1", epochs=2, config="quickstart_distill",
    )  # fmt: skip
    assert run_cli(train_main, args) == 0
    run = tmp_path / "runs" / "quickstart_distill"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_metrics"] is None and summary["teachers"] == []
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    temps = [float(r["train_temperature"]) for r in rows]
    alphas = [float(r["train_alpha"]) for r in rows]
    assert 1.0 < temps[1] < temps[0] < 4.0  # epoch means of a linear 4 -> 1 schedule
    assert 0.1 < alphas[1] < alphas[0] < 0.7
    last = torch.load(run / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    best = torch.load(run / "checkpoints" / "best_model.pth", map_location="cpu", weights_only=True)
    ema_weights = last["ema_state_dict"]["module"]
    assert any(not torch.equal(ema_weights[k], last["model_state_dict"][k]) for k in ema_weights)
    # best_model.pth holds the EMA weights that were evaluated in the winning epoch, whichever epoch won:
    # the epoch checkpoint written right after that validation holds the same EMA, and raw weights that
    # differ from it (so equal-to-EMA is not the same as equal-to-the-trained-weights).
    assert summary["best_epoch"] in (1, 2) and best["epoch"] == summary["best_epoch"]
    won = torch.load(run / "checkpoints" / f"checkpoint_epoch_{summary['best_epoch']:04d}.pth",
                     map_location="cpu", weights_only=True)  # fmt: skip
    won_ema = won["ema_state_dict"]["module"]
    assert best["model_state_dict"].keys() == won_ema.keys()
    for key, value in best["model_state_dict"].items():
        assert torch.equal(value, won_ema[key]), key
    assert any(not torch.equal(won_ema[k], won["model_state_dict"][k]) for k in won_ema)


def test_multi_teacher_target_is_the_weighted_probability_mixture():
    from kdlab.distill.losses import kd_kl_loss, mix_teacher_probs, teacher_probs

    student, cfg = _student_and_cfg()
    torch.manual_seed(5)
    t1, t2 = FrozenTeacher(build_model(cfg.model)), FrozenTeacher(build_model(cfg.model))
    task = SegmentationKDTask(cfg.distillation, cfg.training.loss, [(t1, 1.0), (t2, 3.0)])
    batch = _tiny_batch()
    student.eval()
    with torch.no_grad():
        losses = task(student, batch)
        out_s = student(batch["images"], batch["rois"])
        temperature = cfg.distillation.temperature
        mixed = mix_teacher_probs(
            [teacher_probs(t(batch["images"], batch["rois"])["logits"], temperature) for t in (t1, t2)],
            [1.0, 3.0],
        )
        expected = kd_kl_loss(out_s["logits"], mixed, temperature)
        single = SegmentationKDTask(cfg.distillation, cfg.training.loss, [(t1, 1.0)])(student, batch)[
            "distill_final"
        ]
    torch.testing.assert_close(losses["distill_final"], expected)
    assert not torch.allclose(losses["distill_final"], single)
