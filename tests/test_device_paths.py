"""Device defects caught without a GPU: the device-sensitive paths run on the `meta` device.

CI has no GPU, and on the CPU every tensor is on the CPU, so a tensor created without `device=` never meets a
device tensor there. On the `meta` device (shapes and dtypes only, no data) mixing a CPU tensor into
`torch.stack`/`torch.cat` or an indexing op raises as it does on CUDA ("Tensor on device cpu is not on the
expected device meta!"). So the models and batches are put on meta and the real code runs: the KD tasks' loss
dicts, the trainer's step and its log reduction, the evaluators' metric sums and what they hand to the
all-reduce, and the ONNX scorer's outputs. Data-dependent reads (`.item()`, `bool(t)`) cannot run on meta; the
code keeps them out of these parts, which is what makes them testable here.
`torch._subclasses.fake_tensor.FakeTensorMode` with fake CUDA tensors is not a substitute: it lets a 0-dim
CPU tensor into `torch.stack`, and its autograd needs a real device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.config.loader import resolve_config
from kdlab.distill.teacher import FrozenTeacher, LoadedTeacher
from kdlab.engine.trainer import Trainer
from kdlab.experiments.kd_setup import build_kd_task
from kdlab.tasks import task_of

META = torch.device("meta")

# Each distilled config with the config of its teacher: the people KD task with the methods it offers (plain
# KL, DIST + KL, logit standardisation, CWD), the classifier and the sequence model. MGD's masks come from a
# torch.Generator on the features' device, and meta has no generator, so MGD is not run here; its masks are
# drawn on the features' device by construction (kdlab.distill.mgd).
KD_CONFIGS = [
    ("quickstart_distill", "quickstart_teacher"),
    ("quickstart_kd_dist", "quickstart_teacher"),
    ("quickstart_kd_ls", "quickstart_teacher"),
    ("quickstart_cwd", "quickstart_teacher"),
    ("digits_student_distill", "digits_teacher"),
    ("sequence_student_distill", "sequence_teacher"),
]


def meta_batch(cfg: Any, batch_size: int = 2) -> dict[str, torch.Tensor]:
    """A batch as `batch_to_device` leaves it, on meta: the task's example inputs plus its targets."""
    inputs = task_of(cfg).example_inputs(cfg)
    if cfg.task == "segmentation":
        h, w = cfg.data.input_size
        images = torch.rand(batch_size, 3, h, w)
        rois = torch.tensor([[i, 1.0, 2.0, w - 3.0, h - 1.0] for i in range(batch_size)])
        masks = torch.randint(0, 3, (batch_size, *cfg.model.mask_size))
        batch = {"images": images, "rois": rois, "masks": masks}
    else:
        key = "images" if cfg.task == "classification" else "inputs"
        x = inputs[0].expand(batch_size, *inputs[0].shape[1:]).clone()
        batch = {key: x, "labels": torch.zeros(batch_size, dtype=torch.long)}
    return {k: v.to(META) for k, v in batch.items()}


def kd_trainer(tmp_path: Path, config: str, teacher_config: str, *extra: str) -> tuple[Trainer, Any]:
    """The run's real parts on meta: student and teacher built as training builds them, the KD task from
    `build_kd_task` (adapters, EMA), the Trainer; returns (trainer, config)."""
    items = [f"data.synthetic.root={tmp_path / 'data'}", "training.ema.enabled=true", *extra]
    cfg = resolve_config(config, items, {})
    tcfg = resolve_config(teacher_config, [f"data.synthetic.root={tmp_path / 'data'}"], {})
    task = task_of(cfg)
    torch.manual_seed(0)
    student, teacher = task.build_model(cfg), task.build_model(tcfg)
    loaded = LoadedTeacher(FrozenTeacher(teacher), "teacher.pth", "0" * 64, tcfg.model_dump(mode="json"))
    kd_task, _, records, ema = build_kd_task(cfg, student, [loaded], META)
    trainer = Trainer(
        cfg, student, kd_task, [meta_batch(cfg)], lambda m, desc="val": ({}, None), tmp_path / "run", META,
        show_progress=False, teacher_records=records, ema=ema,
    )  # fmt: skip
    return trainer, cfg


@pytest.mark.parametrize(("config", "teacher_config"), KD_CONFIGS)
def test_every_kd_loss_term_lives_on_the_models_device(tmp_path, config, teacher_config):
    trainer, cfg = kd_trainer(tmp_path, config, teacher_config, "distillation.grad_share_every=1")
    losses = trainer.forward_backward(meta_batch(cfg), micro_index=0)
    assert {"loss", "alpha"} <= set(losses)
    wrong = {k: str(v.device) for k, v in losses.items() if v.device != META}
    assert not wrong, f"loss terms not on the model's device: {wrong}"


@pytest.mark.parametrize(("config", "teacher_config"), KD_CONFIGS[:1] + KD_CONFIGS[-2:])
def test_a_training_step_and_its_log_reduction_run_on_the_device(tmp_path, config, teacher_config):
    """The steps of `_train_one_epoch` up to the host reads: two micro-batches, the optimizer step's finite
    check, the interval and epoch sums and the stacked means the log interval all-reduces."""
    trainer, cfg = kd_trainer(tmp_path, config, teacher_config)
    window = [trainer.forward_backward(meta_batch(cfg), micro_index=i) for i in range(2)]
    flags = trainer.step_flags(window, torch.zeros((), device=META))
    assert flags.device == META
    trainer.losses.add_step(window, images=2)
    for sums in (trainer.losses.interval, trainer.losses.epoch):
        keys, means = sums.stacked_means()
        assert means.device == META and means.shape == (len(keys),)
        assert {"loss", "alpha"} <= set(keys)


def test_a_loss_term_on_another_device_is_named_at_the_first_step(tmp_path):
    """The trainer checks the task contract once: a term on the CPU beside meta (CUDA) losses is named, instead
    of a stack error at the first log interval."""
    trainer, cfg = kd_trainer(tmp_path, "digits_student_distill", "digits_teacher")
    real = trainer.task

    def task(model, batch):
        losses = real(model, batch)
        losses["step_size"] = torch.tensor(0.5)  # the defect class: created without device=
        return losses

    trainer.task = task
    with pytest.raises(TypeError, match=r"step_size is on cpu, not on meta"):
        trainer.forward_backward(meta_batch(cfg), micro_index=0)


def _people_eval_batches(cfg: Any, with_rois: bool) -> list[dict[str, torch.Tensor]]:
    """Loader batches as collated on the CPU: uint8 images, ROIs and masks (none: a shard without people)."""
    h, w = cfg.data.input_size
    n = 2 if with_rois else 0
    rois = torch.tensor([[i, 1.0, 2.0, w - 3.0, h - 1.0] for i in range(n)]).reshape(n, 5)
    masks = torch.zeros(n, *cfg.model.mask_size, dtype=torch.uint8)
    return [{"images": torch.zeros(2, 3, h, w, dtype=torch.uint8), "rois": rois, "masks": masks}]


@pytest.mark.parametrize("shard", ["rois", "no_rois", "empty"])
def test_segmentation_metric_sums_and_reduction_inputs_are_on_the_device(tmp_path, shard):
    """What a rank hands to the all-reduce lives on the evaluator's device, also when its shard held no ROI or
    no image at all (then the sums never met a device tensor)."""
    from kdlab.evaluate.evaluator import SegmentationEvaluator

    cfg = resolve_config("quickstart_baseline", [f"data.synthetic.root={tmp_path}"], {})
    with META:
        model = task_of(cfg).build_model(cfg)
    loader = [] if shard == "empty" else _people_eval_batches(cfg, with_rois=shard == "rois")
    evaluator = SegmentationEvaluator(loader, META, show_progress=False)
    metrics, images_seen, _ = evaluator.accumulate(model)
    assert images_seen == (0 if shard == "empty" else 2)
    inputs = evaluator.reduction_inputs(metrics, images_seen)
    assert {"confusion", "num_rois", "images"} <= set(inputs)
    wrong = {k: str(v.device) for k, v in inputs.items() if v.device != META}
    assert not wrong, f"all-reduce inputs not on the evaluator's device: {wrong}"


@pytest.mark.parametrize(
    ("config", "key"), [("digits_student_baseline", "images"), ("sequence_student_baseline", "inputs")]
)
def test_classifier_reduction_inputs_are_on_the_device(tmp_path, config, key):
    cfg = resolve_config(config, [f"data.synthetic.root={tmp_path}"], {})
    task = task_of(cfg)
    with META:
        model = task.build_model(cfg)
    x = task.example_inputs(cfg)[0]
    if key == "images":
        x = (x * 255).to(torch.uint8)  # loaders deliver uint8 images
    loader = [{key: x, "labels": torch.zeros(x.shape[0], dtype=torch.long)}]
    evaluator = task.build_evaluator(cfg, loader, META, None, False)
    _, images_seen = evaluator.accumulate(model)
    inputs = evaluator.reduction_inputs(_, images_seen)
    assert images_seen == x.shape[0]
    assert {k: v.device for k, v in inputs.items()} == {"images": META}


@pytest.mark.parametrize("reduce", [True, False])
def test_reduction_follows_reduce_across_ranks(tmp_path, monkeypatch, reduce):
    """Under DDP the evaluator sums its shard's counts over ranks; a pass that rank 0 runs alone (scoring an
    ONNX export after training, while the other ranks have left the process group) makes no collective call,
    which would hang under NCCL."""
    from kdlab.engine import distributed

    cfg = resolve_config("quickstart_baseline", [f"data.synthetic.root={tmp_path}"], {})
    model = task_of(cfg).build_model(cfg)
    evaluator = task_of(cfg).build_evaluator(
        cfg, _people_eval_batches(cfg, True), torch.device("cpu"), None, False
    )
    evaluator.reduce_across_ranks = reduce
    calls: list[tuple[int, ...]] = []

    def all_reduce_sum_(tensor):
        calls.append(tuple(tensor.shape))
        return tensor.mul_(2)  # two ranks that saw the same shard

    monkeypatch.setattr(distributed, "current", lambda: distributed.DistContext(0, 0, 2))
    monkeypatch.setattr(distributed, "all_reduce_sum_", all_reduce_sum_)
    metrics, _ = evaluator(model)
    assert metrics["images"] == (4 if reduce else 2)
    assert metrics["num_rois"] == (4 if reduce else 2)
    assert len(calls) == (5 if reduce else 0)


class _FakeSession:
    """onnxruntime's session as the ONNX scorer calls it: logits of the right shape for each ROI."""

    def __init__(self, mask_size: tuple[int, int]) -> None:
        self.mask_size = mask_size

    def run(self, names, feed):
        import numpy as np

        return [np.zeros((feed["rois"].shape[0], 3, *self.mask_size), dtype=np.float32)]


def test_an_onnx_file_is_scored_by_an_evaluator_on_the_device(tmp_path, monkeypatch):
    """The exported file runs in onnxruntime on the host; its outputs go back to the inputs' device, where the
    evaluator's targets are (on a GPU box the scorer's evaluator runs on CUDA)."""
    from kdlab.evaluate.evaluator import SegmentationEvaluator
    from kdlab.export import runtime

    cfg = resolve_config("quickstart_baseline", [f"data.synthetic.root={tmp_path}"], {})
    monkeypatch.setattr(runtime, "ort_session", lambda path: _FakeSession(tuple(cfg.model.mask_size)))
    # meta tensors hold no data to copy to the host: hand onnxruntime zeros of the same shape
    monkeypatch.setattr(runtime, "host_array", lambda x: torch.zeros(x.shape).numpy())
    onnx_model = runtime.OnnxRuntimeModel(tmp_path / "best_model.onnx", task_of(cfg).exporter())
    evaluator = SegmentationEvaluator(_people_eval_batches(cfg, True), META, show_progress=False)
    metrics, images_seen, _ = evaluator.accumulate(onnx_model, desc="ONNX accuracy")
    assert images_seen == 2
    assert metrics.state_tensors()["confusion"].device == META
