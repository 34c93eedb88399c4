"""ONNX export: onnxruntime parity with dynamic batch/ROI counts, RoiAlign semantics, the run-level export."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config, validate_config
from kdlab.config.schema import ExportConfig, ModelConfig
from kdlab.data.loaders import build_datasets, build_loader
from kdlab.engine.batches import batch_to_device
from kdlab.errors import CheckpointError, ConfigError
from kdlab.experiments import export_runs
from kdlab.export import graph, measure, pipeline, runtime
from kdlab.export.classification import ClassificationExporter
from kdlab.export.graph import TraceableGroupNorm
from kdlab.export.pipeline import ExportParityError, export_run_to_onnx
from kdlab.export.segmentation import (
    SegmentationExporter,
    export_model_to_onnx,
    export_teacher_onnx,
    onnx_latency_ms,
    onnx_parity,
)
from kdlab.models.builders import build_model
from kdlab.tasks import build_model as build_task_model
from kdlab.tasks import get_task
from tests.helpers import tiny_args

INPUT = (64, 64)
TINY = ModelConfig(encoder="timm-efficientnet-b0", roi_size=(16, 12), mask_size=(32, 24), head_channels=16)


def _random_batchnorm_stats(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so an eval/train mix-up shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


def _rois(batch_indices: list[int], size: tuple[int, int], seed: int) -> torch.Tensor:
    """Random boxes, some partly outside the image, one per entry of `batch_indices`."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    n = len(batch_indices)
    xy1 = torch.rand(n, 2, generator=gen) * torch.tensor([1.2 * w, 1.2 * h]) - torch.tensor(
        [0.1 * w, 0.1 * h]
    )
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([0.8 * w, 0.8 * h]) + 1.0
    index = torch.tensor(batch_indices, dtype=torch.float32).view(n, 1)
    return torch.cat([index, xy1, xy1 + wh], dim=1)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(TINY)
    _random_batchnorm_stats(model, seed=1)
    model.eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_model_to_onnx(model, path, INPUT, opset=17)
    return model, path


@pytest.mark.parametrize(
    "batch_indices",
    [
        [0],  # B=1, N=1
        [0] * 7,  # B=1, N=7
        [2],  # B=3, N=1 (images 0 and 1 without ROIs)
        [0, 2, 2, 1, 0, 2, 2],  # B=3, N=7
        [0, 0, 2, 2],  # B=3, image 1 without ROIs
    ],
)
def test_onnx_matches_pytorch_for_dynamic_batch_and_roi_counts(tiny_export, batch_indices):
    model, path = tiny_export
    num_images = max(batch_indices) + 1
    images = torch.rand(num_images, 3, *INPUT, generator=torch.Generator().manual_seed(len(batch_indices)))
    rois = _rois(batch_indices, INPUT, seed=num_images)
    result = onnx_parity(path, model, [(images, rois)], tolerance=1e-3)
    assert result["ok"], result
    assert result["max_abs_diff"] < 1e-3
    assert result["num_images"] == num_images and result["num_rois"] == len(batch_indices)


@pytest.mark.parametrize("threads", [1, 2])
def test_onnxruntime_sessions_keep_to_the_processs_torch_thread_budget(tiny_export, threads):
    # the runner pins each run to its threads (torch.set_num_threads); onnxruntime's default of one thread per
    # core would spin on the cores of the runs beside it during the export's scoring and timing
    _, path = tiny_export
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        options = runtime.ort_session(path).get_session_options()
    finally:
        torch.set_num_threads(before)
    assert options.intra_op_num_threads == threads
    assert options.inter_op_num_threads == 1


def test_onnx_runs_a_batch_with_no_rois_at_all(tiny_export):
    """N=0 works (torch's GroupNorm symbolic alone would fail on it): the output is [0,3,mask_h,mask_w]."""
    model, path = tiny_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((2, 3, *INPUT), dtype=np.float32)
    (masks,) = session.run(["masks"], {"images": images, "rois": np.zeros((0, 5), np.float32)})
    assert masks.shape == (0, 3, *TINY.mask_size)
    result = onnx_parity(path, model, [(torch.from_numpy(images), torch.zeros(0, 5))], tolerance=1e-3)
    assert result["ok"] and result["num_rois"] == 0


def test_uint8_images_are_scaled_like_the_loader_batches(tiny_export, tiny_run, monkeypatch):
    """A uint8 loader batch reaches onnxruntime and PyTorch as exactly the float images that training and
    validation feed the model (`batch_to_device`), not merely as the same thing on both sides."""
    model, path = tiny_export
    _, val = build_datasets(resolve_config(str(tiny_run / "config.json")))
    loader = build_loader(val, 2, shuffle=False, seed=0, num_workers=0, pin_memory=False)
    raw = next(iter(loader))
    assert raw["images"].dtype == torch.uint8 and raw["rois"].shape[0] > 0
    fed = batch_to_device(raw, torch.device("cpu"), channels_last=False)["images"]  # what the trainer feeds
    assert fed.dtype == torch.float32 and 0.0 <= fed.min() and fed.max() <= 1.0

    onnx_inputs: list[np.ndarray] = []
    torch_inputs: list[torch.Tensor] = []
    real_run = ort.InferenceSession.run

    def recording_run(self, output_names, input_feed, *args, **kwargs):
        onnx_inputs.append(input_feed["images"])
        return real_run(self, output_names, input_feed, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", recording_run)
    hook = model.register_forward_pre_hook(lambda module, args: torch_inputs.append(args[0].clone()))
    try:
        result = onnx_parity(path, model, [(raw["images"], raw["rois"])], tolerance=1e-3)
    finally:
        hook.remove()
    assert result["ok"], result
    assert len(onnx_inputs) == 1 and len(torch_inputs) == 1
    assert onnx_inputs[0].dtype == np.float32 and np.array_equal(onnx_inputs[0], fed.numpy())
    assert torch.equal(torch_inputs[0], fed)


def test_parity_check_fails_when_the_weights_differ(tiny_export):
    """The check can fail: a model changed after export no longer matches the file."""
    model, path = tiny_export
    images, rois = torch.rand(1, 3, *INPUT), _rois([0, 0], INPUT, seed=5)
    changed = build_model(TINY)
    changed.load_state_dict(model.state_dict())
    changed.eval()
    with torch.no_grad():
        changed.head.bg_fg.bias += torch.tensor([1.0, -1.0])
    result = onnx_parity(path, changed, [(images, rois)], tolerance=1e-3)
    assert not result["ok"]
    assert result["max_abs_diff"] > 1e-2


def test_export_leaves_the_model_untouched_and_exports_eval(tmp_path):
    """torch.onnx.export restores the *wrapper's* mode recursively; exporting must not flip the model to train."""
    torch.manual_seed(0)
    model = build_model(TINY)
    _random_batchnorm_stats(model, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.onnx"
    model.train()
    export_model_to_onnx(model, path, INPUT)
    assert all(m.training for m in model.modules())
    model.eval()
    export_model_to_onnx(model, path, INPUT)
    assert not any(m.training for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, TraceableGroupNorm) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = onnx_parity(path, model, [(torch.rand(2, 3, *INPUT), _rois([0, 1], INPUT, seed=7))], 1e-3)
    assert result["ok"], result


@pytest.mark.parametrize("num_rois", [0, 1, 5])
def test_traceable_group_norm_equals_group_norm(num_rois):
    norm = nn.GroupNorm(8, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(num_rois, 16, 16, 12) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(TraceableGroupNorm(norm)(x), norm(x), atol=1e-5, rtol=0)


class _RoiAlignOnly(nn.Module):
    def __init__(self, sampling_ratio: int) -> None:
        super().__init__()
        self.sampling_ratio = sampling_ratio

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return roi_align(features, rois, (16, 12), 1.0, self.sampling_ratio, aligned=True)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_onnx_roi_align_equals_torchvision_aligned(tmp_path, sampling_ratio):
    """The exported RoiAlign (opset 17, half_pixel) equals torchvision's aligned=True, boxes outside included."""
    path = tmp_path / "roi_align.onnx"
    gen = torch.Generator().manual_seed(sampling_ratio)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _RoiAlignOnly(sampling_ratio),
            (torch.randn(2, 5, 40, 48, generator=gen), _rois([0, 1, 1], (40, 48), seed=0)),
            str(path),
            input_names=["features", "rois"],
            output_names=["out"],
            dynamic_axes={"features": {0: "batch"}, "rois": {0: "num_rois"}, "out": {0: "num_rois"}},
            opset_version=17,
            dynamo=False,
        )
    node = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "RoiAlign")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["coordinate_transformation_mode"] == b"half_pixel"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features = torch.randn(3, 5, 40, 48, generator=gen) * 10
    rois = _rois([0, 2, 1, 1, 2, 0] * 5, (40, 48), seed=11)
    rois[:4, 3:] = rois[:4, 1:3] + 0.3  # boxes smaller than a pixel
    rois[4, 1:] = torch.tensor([-30.0, -20.0, -2.0, -1.0])  # entirely outside
    rois[5, 1:] = torch.tensor([40.0, 30.0, 70.0, 60.0])  # partly outside
    (got,) = session.run(["out"], {"features": features.numpy(), "rois": rois.numpy()})
    expected = _RoiAlignOnly(sampling_ratio)(features, rois).numpy()
    assert np.abs(got - expected).max() < 1e-5


def test_opsets_without_half_pixel_roi_align_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="opset >= 16"):
        export_model_to_onnx(build_model(TINY), tmp_path / "m.onnx", INPUT, opset=15)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("onnx_run")
    assert run_cli(train_main, tiny_args(tmp, epochs=1)) == 0
    (run,) = [p.parents[1] for p in (tmp / "runs").glob("*/checkpoints/best_model.pth")]
    return run


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_run_writes_onnx_and_metadata(tiny_run):
    meta = export_run_to_onnx(
        tiny_run, SegmentationExporter(), parity_images=4, latency_runs=1
    )  # tests time nothing: 1 run
    ckpt = tiny_run / "checkpoints"
    onnx_path, json_path = ckpt / "best_model.onnx", ckpt / "best_model.onnx.json"
    assert onnx_path.is_file() and json_path.is_file()
    assert json.loads(json_path.read_text()) == meta
    assert not [p for p in ckpt.iterdir() if ".tmp-" in p.name]

    assert meta["parity_ok"] is True and meta["parity"]["ok"] is True
    assert meta["parity"]["max_abs_diff"] < 1e-3
    assert meta["parity"]["num_images"] == 4 and meta["parity"]["num_rois"] > 0
    assert meta["latency"]["onnx_ms_per_image_median"] > 0
    assert meta["latency"]["torch_ms_per_image_median"] > 0
    assert meta["latency"]["runs"] == 1 and meta["latency"]["batch_images"] == 1
    assert meta["input_size"] == [64, 64] and meta["mask_size"] == [32, 24]
    assert meta["classes"] == ["background", "target", "other"]
    assert meta["opset"] == 18 and meta["encoder"] == "timm-efficientnet-b0"
    assert meta["exporter"] == "torchscript" and meta["precision"] == "fp32"  # tests narrow "auto" (conftest)
    assert meta["normalization"]["input_range"] == [0.0, 1.0]
    assert meta["onnx_mb"] == pytest.approx(onnx_path.stat().st_size / 1e6)
    expected_sha = hashlib.sha256((ckpt / "best_model.pth").read_bytes()).hexdigest()
    assert meta["source_checkpoint_sha256"] == expected_sha
    assert meta["versions"]["onnxruntime"] == ort.__version__

    graph = onnx.load(str(onnx_path)).graph
    inputs = {i.name: _dims(i) for i in graph.input}
    assert inputs == {"images": ["batch", 3, 64, 64], "rois": ["num_rois", 5]}
    assert [(o.name, _dims(o)) for o in graph.output] == [("masks", ["num_rois", 3, 32, 24])]
    assert onnx_latency_ms(onnx_path, torch.rand(1, 3, 64, 64), torch.tensor([[0.0, 4, 4, 40, 60]]), 1) > 0


def test_export_run_parity_failure_still_writes_metadata(tiny_run, tmp_path):
    """tolerance < 0 can never be met: the error is raised after the metadata records parity_ok=false."""
    with pytest.raises(ExportParityError, match="does not match PyTorch"):
        export_run_to_onnx(tiny_run, SegmentationExporter(), parity_images=1, latency_runs=1, tolerance=-1.0)
    meta = json.loads((tiny_run / "checkpoints" / "best_model.onnx.json").read_text())
    assert meta["parity_ok"] is False and meta["parity"]["ok"] is False
    assert meta["parity"]["max_abs_diff"] >= 0


def test_export_run_needs_a_run_directory_and_best_model(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_run_to_onnx(tmp_path / "missing", SegmentationExporter())
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="best_model.pth"):
        export_run_to_onnx(tmp_path / "run", SegmentationExporter())


def _sequence_checkpoint(path: Path) -> Path:
    """A tiny GRU checkpoint (task=sequence: no ONNX exporter, not a segmentation teacher)."""
    cfg = validate_config({"task": "sequence", "model": {"name": "gru", "hidden_size": 4}})
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_state_dict": build_task_model(cfg).state_dict(), "config": cfg.model_dump(mode="json")}
    torch.save(payload, path)
    return path


def test_each_task_has_its_exporter_and_sequence_has_none():
    assert isinstance(get_task("segmentation").exporter(), SegmentationExporter)
    assert isinstance(get_task("classification").exporter(), ClassificationExporter)
    assert get_task("sequence").exporter() is None


def test_a_task_without_exporter_is_a_config_error_and_writes_nothing(tmp_path):
    ckpt = _sequence_checkpoint(tmp_path / "run" / "checkpoints" / "best_model.pth")
    with pytest.raises(ConfigError, match="ONNX export is not implemented for task=sequence"):
        export_run_to_onnx(tmp_path / "run", get_task("sequence").exporter())
    assert [p.name for p in ckpt.parent.iterdir()] == ["best_model.pth"]


def test_export_teacher_refuses_a_model_that_is_not_a_segmentation_teacher(tmp_path):
    ckpt = _sequence_checkpoint(tmp_path / "seq.pth")
    with pytest.raises(ConfigError, match="exports segmentation teachers; .* is a sequence model"):
        export_teacher_onnx(ckpt, tmp_path / "t.onnx", build_task_model)
    assert not (tmp_path / "t.onnx").exists()


# ------------------------------------------------------------------ the dynamo exporter, auto, accuracy
def _export_cfg(run: Path, **changes) -> ExportConfig:
    config = json.loads((run / "config.json").read_text())
    return ExportConfig.model_validate({**config["export"], **changes})


def test_dynamo_export_keeps_dynamic_batch_and_rois_with_parity_and_accuracy(tiny_run):
    """The supported exporter end to end: the file records "dynamo", passes onnx.checker, matches PyTorch to
    1e-4 for B=3 with N=0 and N=5 ROIs, and is scored on the test split like the PyTorch model."""
    meta = export_runs.export_run_to_onnx(
        tiny_run, export_cfg=_export_cfg(tiny_run, exporter="dynamo"), latency_runs=1
    )
    onnx_path = tiny_run / "checkpoints" / "best_model.onnx"
    assert meta["exporter"] == "dynamo" and meta["exporter_fallbacks"] == []
    assert "onnxscript" in meta["exporter_tool"] and meta["opset"] >= 18
    assert meta["parity"]["max_abs_diff"] <= 1e-4
    onnx.checker.check_model(str(onnx_path), full_check=True)
    graph = onnx.load(str(onnx_path)).graph
    assert {i.name: _dims(i) for i in graph.input} == {
        "images": ["batch", 3, 64, 64],
        "rois": ["num_rois", 5],
    }

    model, _, _ = pipeline.load_student(tiny_run / "checkpoints" / "best_model.pth", SegmentationExporter())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    five = torch.tensor(
        [[0, 2, 3, 40, 60], [1, 0, 0, 64, 64], [2, 10, 5, 30, 50], [2, 1, 1, 20, 20], [0, 5, 5, 6, 9.0]]
    )
    for rois in (five, torch.zeros(0, 5)):
        (got,) = session.run(["masks"], {"images": images.numpy(), "rois": rois.numpy()})
        with torch.no_grad():
            expected = model(images, rois)["logits"].numpy()
        assert got.shape == expected.shape == (rois.shape[0], 3, 32, 24)
        if rois.shape[0]:
            assert np.abs(got - expected).max() <= 1e-4

    accuracy = meta["accuracy"]
    # scored on the run's held-out test split (4 images), on mIoU, the headline that selected the checkpoint
    assert accuracy["metric"] == "miou" and accuracy["images"] == 4 and accuracy["split"] == "test"
    assert accuracy["onnx"]["num_rois"] == accuracy["pytorch"]["num_rois"] > 0
    assert abs(accuracy["difference"]) <= 1e-4
    # The PyTorch side is the run's own test pass of the same checkpoint with the same evaluator.
    test_metrics = json.loads((tiny_run / "summary.json").read_text())["test_metrics"]
    assert accuracy["pytorch"]["miou"] == pytest.approx(test_metrics["miou"], abs=1e-6)
    assert "test pass" in accuracy["pytorch_from"]


def test_auto_falls_back_to_torchscript_when_dynamo_raises_and_records_why(tiny_run, monkeypatch):
    real = graph._torch_onnx_export

    def dynamo_breaks(wrapper, exporter, inputs, tmp, opset, method):
        if method == "dynamo":
            raise RuntimeError("simulated torch.export failure\nwith a traceback")
        return real(wrapper, exporter, inputs, tmp, opset, method)

    monkeypatch.setattr(graph, "AUTO_ORDER", ("dynamo", "torchscript"))
    monkeypatch.setattr(graph, "_torch_onnx_export", dynamo_breaks)
    meta = export_run_to_onnx(tiny_run, SegmentationExporter(), parity_images=1, latency_runs=1,
                              export_cfg=_export_cfg(tiny_run, exporter="auto"))  # fmt: skip
    assert meta["exporter"] == "torchscript" and meta["exporter_requested"] == "auto"
    assert meta["exporter_fallbacks"] == [
        {"exporter": "dynamo", "reason": "RuntimeError: simulated torch.export failure"}
    ]
    assert meta["parity_ok"] is True


def test_auto_falls_back_when_the_first_exporter_misses_parity(tiny_run, monkeypatch):
    """A file that loads but disagrees with PyTorch is not shipped when another exporter can do better."""
    real = pipeline.onnx_parity_of
    calls = []

    def first_misses(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        return {**result, "ok": False, "max_abs_diff": 0.5} if len(calls) == 1 else result

    monkeypatch.setattr(graph, "AUTO_ORDER", ("torchscript", "dynamo"))
    monkeypatch.setattr(pipeline, "onnx_parity_of", first_misses)
    meta = export_run_to_onnx(tiny_run, SegmentationExporter(), parity_images=1, latency_runs=1,
                              export_cfg=_export_cfg(tiny_run, exporter="auto"))  # fmt: skip
    assert len(calls) == 2 and meta["exporter"] == "dynamo" and meta["parity_ok"] is True
    assert meta["exporter_fallbacks"][0]["exporter"] == "torchscript"
    assert "parity max abs diff 0.5" in meta["exporter_fallbacks"][0]["reason"]


def test_a_named_exporter_that_fails_is_not_replaced(tiny_run, monkeypatch):
    def always_breaks(*args, **kwargs):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(graph, "_torch_onnx_export", always_breaks)
    with pytest.raises(RuntimeError, match="simulated exporter failure"):
        export_run_to_onnx(tiny_run, SegmentationExporter(), parity_images=1, latency_runs=1,
                           export_cfg=_export_cfg(tiny_run, exporter="torchscript"))  # fmt: skip


# ------------------------------------------------------------------------------------- INT8 in the pipeline
def _has_qdq(path: Path) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def test_int8_within_the_allowed_drop_becomes_best_model_and_fp32_is_kept(tiny_run):
    ckpt = tiny_run / "checkpoints"
    meta = export_runs.export_run_to_onnx(
        tiny_run, export_cfg=_export_cfg(tiny_run, quantize="int8", calibration_images=4, max_int8_iou_drop=1.0),
        latency_runs=1,
    )  # fmt: skip
    int8 = meta["int8"]
    assert (
        int8["accepted"] is True
        and meta["precision"] == "int8"
        and meta["fp32_file"] == "best_model.fp32.onnx"
    )
    assert _has_qdq(ckpt / "best_model.onnx") and not _has_qdq(ckpt / "best_model.fp32.onnx")
    assert not (ckpt / "best_model.int8.onnx").exists()
    assert int8["calibration_images"] == 4 and int8["format"] == "QDQ" and int8["per_channel"] is True
    assert "RoiAlign" in int8["kept_float"] and int8["quantized_ops"]
    assert int8["onnx"]["num_rois"] == meta["accuracy"]["onnx"]["num_rois"] > 0  # scored on the same images
    assert int8["drop"] == pytest.approx(int8["fp32_value"] - int8["int8_value"])
    assert int8["latency"]["int8_over_fp32"] > 0
    # The shipped INT8 file carries the run's config like the FP32 one (kdlab-predict reads it from the file).
    props = {p.key for p in onnx.load(str(ckpt / "best_model.onnx")).metadata_props}
    assert graph.CONFIG_METADATA_KEY in props
    session = ort.InferenceSession(str(ckpt / "best_model.onnx"), providers=["CPUExecutionProvider"])
    (masks,) = session.run(
        ["masks"], {"images": np.zeros((2, 3, 64, 64), np.float32), "rois": np.zeros((0, 5), np.float32)}
    )
    assert masks.shape == (0, 3, 32, 24)

    # A plain re-export replaces both files and leaves no stale INT8/FP32 copy the metadata would not describe.
    meta = export_runs.export_run_to_onnx(tiny_run, export_cfg=_export_cfg(tiny_run), latency_runs=1)
    assert meta["precision"] == "fp32" and "int8" not in meta
    assert not _has_qdq(ckpt / "best_model.onnx") and not (ckpt / "best_model.fp32.onnx").exists()


def test_int8_that_loses_too_much_is_kept_aside_and_best_model_stays_fp32(tiny_run, monkeypatch):
    """The scorer is wrapped so the INT8 file scores 0.2 below its real value: more than the allowed 0.01."""
    real = export_runs.validation_scorer

    def harsher_on_int8(cfg, max_images=None, device=None, show_progress=True):
        score = real(cfg, max_images, device, show_progress)

        def wrapped(model):
            metrics = dict(score(model))
            if isinstance(model, runtime.OnnxRuntimeModel) and "int8" in model.path.name:
                metrics["miou"] -= 0.2  # the accuracy metric: the headline that selects checkpoints
            return metrics

        return wrapped

    monkeypatch.setattr(export_runs, "validation_scorer", harsher_on_int8)
    ckpt = tiny_run / "checkpoints"
    meta = export_runs.export_run_to_onnx(
        tiny_run, export_cfg=_export_cfg(tiny_run, quantize="int8", calibration_images=2), latency_runs=1
    )
    int8 = meta["int8"]
    assert int8["accepted"] is False and meta["precision"] == "fp32"
    assert int8["drop"] == pytest.approx(0.2, abs=0.05) and int8["file"] == "best_model.int8.onnx"
    assert "kept aside as best_model.int8.onnx" in int8["warning"]
    assert not _has_qdq(ckpt / "best_model.onnx") and _has_qdq(ckpt / "best_model.int8.onnx")
    assert not (ckpt / "best_model.fp32.onnx").exists()


def test_runner_quantize_flag_reaches_the_export_config():
    from kdlab.cli.common import CONFIG_FLAG_KEYS
    from kdlab.cli.experiments import build_parser

    assert CONFIG_FLAG_KEYS["quantize"] == "export.quantize"
    assert build_parser().parse_args(["--configs", "x", "--quantize", "int8"]).quantize == "int8"
    cfg = resolve_config("quickstart_distill", flags={"export.quantize": "int8"})
    assert cfg.export.quantize == "int8" and cfg.export.max_int8_iou_drop == 0.01


@pytest.mark.parametrize("task_config", [
    {"task": "classification", "model": {"name": "resnet18"}},
    {"task": "sequence", "model": {"name": "gru"}},
])  # fmt: skip
def test_int8_for_a_task_without_int8_calibration_is_refused_before_anything_runs(task_config):
    with pytest.raises(ConfigError, match="export.quantize.* is not implemented for task="):
        validate_config({**task_config, "export": {"quantize": "int8"}})


def test_the_pytorch_side_of_the_accuracy_check_reuses_the_runs_float32_test_pass(tmp_path):
    """The run's test pass scored best_model.pth on the whole test split with the same evaluator: the export
    takes that as the PyTorch reference instead of a second pass, but only for the whole split, in fp32."""
    summary = {"amp": "off", "test_metrics": {"miou": 0.5, "images": 8}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert export_runs.pytorch_reference(tmp_path, None, "test") == summary["test_metrics"]
    assert export_runs.pytorch_reference(tmp_path, 4, "test") is None  # a subset: not the same images
    assert export_runs.pytorch_reference(tmp_path, None, "val") is None  # scored on val: no such pass
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "amp": "bfloat16"}))
    assert export_runs.pytorch_reference(tmp_path, None, "test") is None  # the scorer never autocasts

    calls: list[str] = []

    def score(model):
        calls.append(type(model).__name__)
        return {"miou": 0.49, "images": 8}

    score.reference = {"miou": 0.5, "images": 8}
    exporter = SimpleNamespace(accuracy_metric="miou")
    original = measure.OnnxRuntimeModel
    measure.OnnxRuntimeModel = lambda path, exp: object()  # no file needed: `score` ignores it
    try:
        result = measure.onnx_accuracy(tmp_path / "x.onnx", nn.Linear(1, 1), exporter, score)
    finally:
        measure.OnnxRuntimeModel = original
    assert calls == ["object"]  # one pass: the ONNX file's; the PyTorch model was not scored again
    assert result["pytorch"]["miou"] == 0.5 and result["difference"] == pytest.approx(-0.01)
    assert "test pass" in result["pytorch_from"]
