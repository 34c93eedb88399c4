"""training.compile (with its eager fallback), teacher layout, and distillation.evaluate_teacher."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from benchmarks.common import BenchSettings, experiment_config
from benchmarks.kd import random_teacher
from kdlab.engine.compile import compile_forward, is_compiled
from kdlab.engine.trainer import Trainer
from kdlab.experiments.kd_setup import build_kd_task
from kdlab.models.builders import build_model
from kdlab.tasks.segmentation import SegmentationTask

TINY = BenchSettings(size=(64, 64), batch_size=1, teacher_encoder="timm-efficientnet-b0")


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 64, 64, generator=gen), torch.tensor([[0.0, 4.0, 4.0, 40.0, 60.0]])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(experiment_config(TINY).model).eval()


def test_compile_that_raises_leaves_the_module_eager(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    model = _model()
    images, rois = _inputs()
    expected = model(images, rois)["logits"]
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.compile"):
        assert compile_forward(model, "student") is False
    assert "torch.compile of the student failed (RuntimeError: no compiler here)" in caplog.text
    assert not is_compiled(model)
    assert torch.equal(model(images, rois)["logits"], expected)


def test_compiled_forward_that_fails_on_first_call_falls_back_once(monkeypatch, caplog):
    calls = []

    def lazily_broken(fn, **kwargs):
        def run(*args, **kw):
            calls.append(1)
            raise torch._dynamo.exc.InternalTorchDynamoError("backend compiler failed")  # a compiler error

        return run

    monkeypatch.setattr(torch, "compile", lazily_broken)
    model = _model()
    images, rois = _inputs()
    expected = model(images, rois)["logits"]
    assert compile_forward(model, "teacher") is True and is_compiled(model)
    with caplog.at_level(logging.WARNING, logger="kdlab.engine.compile"):
        assert torch.equal(model(images, rois)["logits"], expected)
        assert torch.equal(model(images, rois)["logits"], expected)
    assert len(calls) == 1 and caplog.text.count("running it eagerly") == 1
    assert not is_compiled(model)


def test_compiled_module_keeps_its_state_dict_keys_and_copies_run_their_own_weights(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda *a, **k: fn(*a, **k))
    model = _model()
    keys = list(model.state_dict())
    compile_forward(model, "student")
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints stay loadable
    clone = copy.deepcopy(model)  # what ModelEMA and the exporter do
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.5)
    images, rois = _inputs()
    assert not torch.allclose(clone(images, rois)["logits"], model(images, rois)["logits"])


def test_trainer_with_compile_on_trains_when_the_compiler_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("missing")))
    cfg = experiment_config(BenchSettings(**{**TINY.__dict__, "compile": True}))
    assert cfg.training.compile
    model = build_model(cfg.model)
    trainer = Trainer(cfg, model, SegmentationTask(cfg.training.loss), range(4), lambda m, desc="": ({}, None),
                      tmp_path, torch.device("cpu"), show_progress=False)  # fmt: skip
    images, rois = _inputs()
    batch = {"images": images.contiguous(memory_format=torch.channels_last), "rois": rois,
             "masks": torch.randint(0, 3, (1, *cfg.model.mask_size))}  # fmt: skip
    losses = trainer.forward_backward(batch)
    trainer.optimizer_step()
    assert torch.isfinite(losses["loss"]) and trainer.state.global_step == 1


@pytest.mark.parametrize("evaluate_teacher", [True, False])
def test_evaluate_teacher_controls_the_pre_training_teacher_validation(evaluate_teacher):
    cfg = experiment_config(TINY)
    cfg.distillation.evaluate_teacher = evaluate_teacher
    teacher = random_teacher(cfg, "timm-efficientnet-b0")
    task, eval_model, _, _ = build_kd_task(cfg, build_model(cfg.model), [teacher], torch.device("cpu"))
    assert (eval_model is task.teachers[0][0]) if evaluate_teacher else eval_model is None


def test_teacher_weights_follow_the_channels_last_input():
    cfg = experiment_config(TINY)
    teacher = random_teacher(cfg, "timm-efficientnet-b0")
    task, _, _, _ = build_kd_task(cfg, build_model(cfg.model), [teacher], torch.device("cpu"))
    conv = next(
        m for m in task.teachers[0][0].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
