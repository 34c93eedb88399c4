"""INT8 static quantization (kdlab.export.quantize): dynamic shapes survive, outputs stay close to FP32, the
kept-float ops really run in float, weights are per-channel, calibration reads what it should, bad input and
failures leave no file behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from kdlab.config.loader import resolve_config
from kdlab.config.schema import ModelConfig
from kdlab.errors import CheckpointError, ConfigError
from kdlab.export import quantize as q
from kdlab.export.classification import ClassificationExporter
from kdlab.export.runtime import ort_feed, ort_session
from kdlab.export.segmentation import SegmentationExporter, export_model_to_onnx
from kdlab.models.builders import build_model
from tests.helpers import tiny_args

INPUT = (64, 64)
TINY = ModelConfig(encoder="timm-efficientnet-b0", roi_size=(16, 12), mask_size=(32, 24), head_channels=16)
EXPORTER = SegmentationExporter()
# Kept float by the defaults and never fused by onnxruntime (an Add/Concat/Resize between two quantized
# convs is); the per-ROI Adds must be, or onnxruntime crashes on N = 0.
STRICTLY_FLOAT = ("RoiAlign", "Softmax", "LogSoftmax", "Sigmoid", "Mul", q.PER_ROI_ADD)


def _random_batchnorm_stats(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so the graph's activations have realistic, varied ranges."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)


def _batch(num_images: int, rois_per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (as the loader gives them) and `rois_per_image` boxes inside each image."""
    gen = torch.Generator().manual_seed(seed)
    h, w = INPUT
    images = torch.randint(0, 256, (num_images, 3, h, w), dtype=torch.uint8, generator=gen)
    n = num_images * rois_per_image
    xy1 = torch.rand(n, 2, generator=gen) * torch.tensor([0.5 * w, 0.5 * h])
    wh = (0.3 + 0.4 * torch.rand(n, 2, generator=gen)) * torch.tensor([w / 2, h / 2])
    index = torch.arange(num_images).repeat_interleave(rois_per_image).float().view(n, 1)
    return images, torch.cat([index, xy1, xy1 + wh], dim=1)


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """A random-init tiny B0 exported to FP32 and quantized with the defaults on 4 calibration images."""
    torch.manual_seed(0)
    model = build_model(TINY)
    _random_batchnorm_stats(model, seed=1)
    tmp = tmp_path_factory.mktemp("int8")
    fp32 = tmp / "model.onnx"
    export_model_to_onnx(model.eval(), fp32, INPUT, opset=17)
    calibration = [_batch(2, 2, seed=10), _batch(2, 3, seed=11)]
    info = q.quantize_int8(fp32, tmp / "model.int8.onnx", calibration, EXPORTER)
    return fp32, tmp / "model.int8.onnx", info


@pytest.mark.parametrize(("num_images", "rois_per_image"), [(2, 0), (2, 1), (1, 3), (2, 2)])
def test_int8_runs_with_dynamic_batch_and_roi_count(int8_export, num_images, rois_per_image):
    _, int8, _ = int8_export
    batch = _batch(num_images, rois_per_image, seed=20)
    (masks,) = ort_session(int8).run(["masks"], ort_feed(EXPORTER, batch))
    assert masks.shape == (num_images * rois_per_image, 3, *TINY.mask_size)
    assert np.isfinite(masks).all()


def test_int8_outputs_agree_with_fp32(int8_export):
    """Measured on this tiny random-init model: argmax agreement 0.975, mean |dp| 0.005."""
    fp32, int8, _ = int8_export
    feed = ort_feed(EXPORTER, _batch(2, 3, seed=30))
    (ref,) = ort_session(fp32).run(["masks"], feed)
    (got,) = ort_session(int8).run(["masks"], feed)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    prob_diff = float(np.abs(np.exp(ref) - np.exp(got)).mean())
    assert agreement > 0.9, agreement
    assert prob_diff < 0.05, prob_diff


def test_int8_is_smaller_and_described(int8_export):
    fp32, int8, info = int8_export
    assert info["format"] == "QDQ" and info["per_channel"] is True
    assert info["weight_type"] == "qint8" and info["activation_type"] == q.DEFAULT_ACTIVATION_TYPE
    assert info["calibrate_method"] == "minmax" and info["calibration_images"] == 4
    assert info["quantized_ops"]["Conv"] > 50
    assert set(info["kept_float"]) == {*q.DEFAULT_KEEP_FLOAT, q.PER_ROI_ADD}
    assert info["kept_float"]["RoiAlign"]["count"] == 2
    assert all(entry["reason"] for entry in info["kept_float"].values())
    # Every node of these stays float (of Add/Concat/Resize onnxruntime may fuse some).
    for key in STRICTLY_FLOAT:
        assert info["kept_float"][key]["float"] == info["kept_float"][key]["count"] > 0, key
    assert info["file_mb"] < 0.5 * info["fp32_file_mb"]
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size


def test_kept_float_ops_do_not_run_in_int8(int8_export):
    """onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into an int8 kernel; a kept-float op must
    never sit in such a group (its output may still be quantized as the next conv's input)."""
    _, int8, _ = int8_export
    model = onnx.load(str(int8))
    producers, consumers = q._producers(model.graph), q._consumers(model.graph)
    kept = [n for n in q.float_nodes_of(model, q.DEFAULT_KEEP_FLOAT) if n.op_type in STRICTLY_FLOAT]
    kept += [n for n in q.per_roi_nodes(model.graph) if n.op_type == "Add"]
    assert {n.op_type for n in kept} == set(STRICTLY_FLOAT) - {q.PER_ROI_ADD} | {"Add"}
    for node in kept:
        assert not q._runs_in_int8(node, producers, consumers), node.name


def test_weights_are_per_channel_int8(int8_export):
    _, int8, _ = int8_export
    model = onnx.load(str(int8))
    inits = {i.name: i for i in model.graph.initializer}
    per_channel = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        weight = inits[node.input[0]]
        if weight.data_type != onnx.TensorProto.INT8 or len(weight.dims) != 4:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        axis = [a for a in node.attribute if a.name == "axis"]
        assert axis and axis[0].i == 0, node.name
        assert scale.ndim == 1 and scale.shape[0] == weight.dims[0], node.name
        per_channel += 1
    assert per_channel > 50


def test_squeeze_excitation_pattern_is_found_and_kept_float(tmp_path, int8_export):
    """The pattern is read off the graph (not node names): one gate per MBConv block of B0 (16 blocks)."""
    fp32, _, _ = int8_export
    se = q.squeeze_excitation_nodes(onnx.load(str(fp32)).graph)
    assert sum(n.op_type == "ReduceMean" for n in se) == 16
    keep = {**q.DEFAULT_KEEP_FLOAT, q.SQUEEZE_EXCITATION: "measured"}
    out = tmp_path / "se.int8.onnx"
    info = q.quantize_int8(fp32, out, [_batch(1, 2, seed=40)], EXPORTER, keep_float=keep)
    assert info["kept_float"][q.SQUEEZE_EXCITATION]["count"] == 16
    model = onnx.load(str(out))
    producers, consumers = q._producers(model.graph), q._consumers(model.graph)
    for node in q.squeeze_excitation_nodes(model.graph):
        assert not q._runs_in_int8(node, producers, consumers), node.name


def test_calibration_reader_yields_every_batch_then_none():
    batches = [_batch(2, 1, seed=1), _batch(3, 2, seed=2)]
    reader = q.BatchCalibrationReader(batches, EXPORTER)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    assert sum(f["images"].shape[0] for f in feeds) == 5
    assert [f["rois"].shape[0] for f in feeds] == [2, 6]
    assert feeds[0]["images"].dtype == np.float32 and feeds[0]["images"].max() <= 1.0
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is not None


def test_calibration_batches_are_the_first_training_images_unaugmented(tmp_path):
    args = tiny_args(tmp_path)
    set_items = args[args.index("--set") + 1 :]
    cfg = resolve_config("quickstart_baseline", set_items, {"training.batch_size": 4})
    first = q.calibration_batches(cfg, EXPORTER, 6)
    again = q.calibration_batches(cfg, EXPORTER, 6)
    assert sum(b[0].shape[0] for b in first) == 6
    assert [b[0].shape[0] for b in first] == [4, 2]
    for (a_img, a_rois), (b_img, b_rois) in zip(first, again, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_rois, b_rois)  # no random augmentation
    reader = q.BatchCalibrationReader(first, EXPORTER)
    assert sum(reader.get_next()["images"].shape[0] for _ in range(len(first))) == 6
    assert reader.get_next() is None
    with pytest.raises(ConfigError, match="segmentation"):
        q.calibration_batches(cfg, ClassificationExporter(), 6)


def test_missing_fp32_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        q.quantize_int8(tmp_path / "nope.onnx", tmp_path / "out.onnx", [_batch(1, 1, 0)], EXPORTER)
    assert not (tmp_path / "out.onnx").exists()


def test_bad_choices_are_config_errors(int8_export, tmp_path):
    fp32, _, _ = int8_export
    with pytest.raises(ConfigError, match="calibrate_method"):
        q.quantize_int8(fp32, tmp_path / "o.onnx", [_batch(1, 1, 0)], EXPORTER, calibrate_method="entropy")
    with pytest.raises(ConfigError, match="calibration"):
        q.quantize_int8(fp32, tmp_path / "o.onnx", [], EXPORTER)


def test_failed_quantization_leaves_no_partial_file(int8_export, tmp_path, monkeypatch):
    fp32, _, _ = int8_export
    out = tmp_path / "best_model.int8.onnx"

    def half_written(model_input, model_output, *args, **kwargs):
        Path(model_output).write_bytes(b"partial")
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(q, "quantize_static", half_written)
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        q.quantize_int8(fp32, out, [_batch(1, 1, 0)], EXPORTER)
    assert list(tmp_path.iterdir()) == []
