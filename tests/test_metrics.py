"""Tests of `kdlab.evaluate.metrics` against hand-computed values on tiny label maps."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.evaluate.metrics import (
    CLASS_NAMES,
    SegmentationMetrics,
    boundary_f1,
    confusion_matrix,
    iou_from_confusion,
    mask_boundary,
    per_roi_iou,
)

EXPECTED_KEYS = {
    "target_iou",
    "miou",
    "iou_background",
    "iou_target",
    "iou_other",
    "boundary_f1",
    "pixel_accuracy",
    "num_rois",
}


def _same(a: dict[str, float], b: dict[str, float]) -> None:
    """Assert two metric dicts are equal, NaN equal to NaN."""
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_confusion_matrix_rows_are_ground_truth() -> None:
    pred = torch.tensor([[[0, 1], [1, 1]]])
    target = torch.tensor([[[0, 1], [2, 2]]])
    cm = confusion_matrix(pred, target)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 2, 0]]


def test_iou_from_confusion_with_absent_class() -> None:
    cm = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    iou = iou_from_confusion(cm)
    assert iou.dtype == torch.float64
    assert iou[0].item() == pytest.approx(3 / (3 + 1 + 2))
    assert iou[1].item() == pytest.approx(4 / (4 + 2 + 1))
    assert math.isnan(iou[2].item())


def test_per_roi_iou_with_empty_union() -> None:
    pred = torch.tensor([[[1, 1, 0]], [[0, 2, 0]], [[1, 0, 0]]])
    target = torch.tensor([[[1, 0, 0]], [[0, 0, 2]], [[0, 1, 0]]])
    assert per_roi_iou(pred, target, cls=1).tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert per_roi_iou(pred, target, cls=2).tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_mask_boundary_uses_8_neighbours_and_image_border() -> None:
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    ring = torch.ones(4, 4, dtype=torch.bool)
    ring[1:3, 1:3] = False
    assert torch.equal(mask_boundary(full)[0], ring)

    # 5x5 mask with a hole at (1, 1): (2, 2) has all 4-neighbours inside but its diagonal neighbour is out
    holed = torch.ones(1, 5, 5, dtype=torch.bool)
    holed[0, 1, 1] = False
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1],
            [1, 0, 1, 0, 1],
            [1, 1, 1, 0, 1],
            [1, 0, 0, 0, 1],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask_boundary(holed)[0], expected)
    assert mask_boundary(torch.zeros(0, 3, 3, dtype=torch.bool)).shape == (0, 3, 3)


def _square(top: int, left: int, size: int, h: int = 5, w: int = 7) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[top : top + size, left : left + size] = True
    return m


def test_boundary_f1_square_vs_shifted_square() -> None:
    # gt: 3x3 square at rows 1-3, cols 1-3 (boundary = its 8-pixel ring).
    # ROI 0: the same square shifted right by 2 (cols 3-5). ROI 1: a single pixel at (1, 1) (its own boundary).
    gt = torch.stack([_square(1, 1, 3), _square(1, 1, 3)])
    pred = torch.stack([_square(1, 3, 3), _square(1, 1, 1)])
    # tolerance 0: ROI 0 rings share column 3 (3 pixels) -> P = R = 3/8, F1 = 3/8.
    #              ROI 1: P = 1/1, R = 1/8 -> F1 = 2 * 1/8 / (9/8) = 2/9.
    assert boundary_f1(pred, gt, tolerance=0).tolist() == pytest.approx([3 / 8, 2 / 9])
    # tolerance 1: ROI 0 pred ring pixels in cols 3-4 (5 of 8) are within 1 of gt's col 3; symmetric -> 5/8.
    #              ROI 1: P = 1, R = 3/8 ((1,1), (1,2), (2,1)) -> F1 = 2 * 3/8 / (11/8) = 6/11.
    assert boundary_f1(pred, gt, tolerance=1).tolist() == pytest.approx([5 / 8, 6 / 11])


def test_boundary_f1_edge_cases() -> None:
    empty = torch.zeros(5, 7, dtype=torch.bool)
    far = _square(0, 5, 2)  # cols 5-6, more than 1 pixel from the gt square's ring (cols 1-3)
    gt = torch.stack([empty, _square(1, 1, 3), empty, _square(1, 1, 3)])
    pred = torch.stack([empty, empty, _square(1, 1, 3), far])
    assert boundary_f1(pred, gt, tolerance=1).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert boundary_f1(pred[:0], gt[:0]).shape == (0,)


def test_accumulator_hand_computed_case() -> None:
    # ROI 0: gt (0, 1, 1, 2), pred (0, 1, 0, 2). ROI 1: gt (0, 0, 0, 0), pred (0, 0, 0, 2).
    target = torch.tensor([[[0, 1, 1, 2]], [[0, 0, 0, 0]]])
    pred = torch.tensor([[[0, 1, 0, 2]], [[0, 0, 0, 2]]])
    metrics = SegmentationMetrics(boundary_tolerance=0)
    metrics.update(pred, target)
    out = metrics.compute()
    assert set(out) == EXPECTED_KEYS
    assert out["num_rois"] == 2 and isinstance(out["num_rois"], int)
    # per-ROI class-1 IoU: ROI 0 -> 1/2, ROI 1 -> empty union -> 1
    assert out["target_iou"] == pytest.approx((0.5 + 1.0) / 2)
    # confusion: gt0 -> pred0 x4, pred2 x1; gt1 -> pred1 x1, pred0 x1; gt2 -> pred2 x1
    iou_bg = 4 / (4 + 1 + 1)
    iou_target = 1 / (1 + 1)
    iou_other = 1 / (1 + 1)
    assert out["iou_background"] == pytest.approx(iou_bg)
    assert out["iou_target"] == pytest.approx(iou_target)
    assert out["iou_other"] == pytest.approx(iou_other)
    assert out["miou"] == pytest.approx((iou_bg + iou_target + iou_other) / 3)
    assert out["pixel_accuracy"] == pytest.approx(6 / 8)
    # class-1 boundaries on a 1x4 strip: every mask pixel touches the outside. ROI 0: pred {1}, gt {1, 2}
    # -> P = 1, R = 1/2, F1 = 2/3; ROI 1: both empty -> 1.
    assert out["boundary_f1"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_miou_ignores_absent_class() -> None:
    target = torch.tensor([[[0, 1, 1, 0]]])
    pred = torch.tensor([[[0, 1, 0, 0]]])
    metrics = SegmentationMetrics()
    metrics.update(pred, target)
    out = metrics.compute()
    assert math.isnan(out["iou_other"])
    assert out["iou_background"] == pytest.approx(2 / 3)
    assert out["iou_target"] == pytest.approx(1 / 2)
    assert out["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_two_updates_equal_one_update_on_concatenation() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (7, 9, 11), generator=gen)
    target = torch.randint(0, 3, (7, 9, 11), generator=gen)
    split = SegmentationMetrics()
    split.update(pred[:3], target[:3])
    split.update(pred[3:], target[3:])
    whole = SegmentationMetrics()
    whole.update(pred, target)
    _same(split.compute(), whole.compute())
    first_only = SegmentationMetrics()
    first_only.update(pred[:3], target[:3])
    assert first_only.compute()["num_rois"] == 3 and whole.compute()["num_rois"] == 7


def test_logits_input_equals_argmax_input() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 6, 5, generator=gen)
    target = torch.randint(0, 3, (4, 6, 5), generator=gen)
    from_logits = SegmentationMetrics()
    from_logits.update(logits, target)
    from_pred = SegmentationMetrics()
    from_pred.update(logits.argmax(dim=1), target)
    _same(from_logits.compute(), from_pred.compute())
    shuffled = SegmentationMetrics()
    shuffled.update(logits.roll(1, dims=1).argmax(dim=1), target)
    assert shuffled.compute()["pixel_accuracy"] != from_pred.compute()["pixel_accuracy"]


def test_zero_rois() -> None:
    metrics = SegmentationMetrics()
    metrics.update(torch.zeros(0, 3, 4, 4), torch.zeros(0, 4, 4, dtype=torch.int64))
    out = metrics.compute()
    assert set(out) == EXPECTED_KEYS
    assert out["num_rois"] == 0
    assert all(math.isnan(v) for k, v in out.items() if k != "num_rois")


def test_reset_and_state_roundtrip() -> None:
    gen = torch.Generator().manual_seed(2)
    pred = torch.randint(0, 3, (6, 5, 5), generator=gen)
    target = torch.randint(0, 3, (6, 5, 5), generator=gen)
    a, b, whole = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    whole.update(pred, target)
    # what an all-reduce SUM would do: add the states of two workers
    merged_state = {k: a.state_tensors()[k] + b.state_tensors()[k] for k in a.state_tensors()}
    merged = SegmentationMetrics()
    merged.load_state_tensors(merged_state)
    _same(merged.compute(), whole.compute())
    whole.reset()
    assert whole.compute()["num_rois"] == 0
    with pytest.raises(ValueError):
        merged.load_state_tensors({"confusion": torch.zeros(3, 3, dtype=torch.int64)})


def test_class_names() -> None:
    assert CLASS_NAMES == ("background", "target", "other")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_has_no_host_sync() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 8, 8, generator=gen)
    target = torch.randint(0, 3, (4, 8, 8), generator=gen)
    on_gpu = SegmentationMetrics(device="cuda")
    logits_gpu, target_gpu = logits.cuda(), target.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu.update(logits_gpu, target_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.is_cuda for t in on_gpu.state_tensors().values())
    on_cpu = SegmentationMetrics()
    on_cpu.update(logits, target)
    _same(on_gpu.compute(), on_cpu.compute())


def test_reported_metric_names_are_what_compute_returns():
    from kdlab.evaluate.metrics import REPORTED_METRICS

    metrics = SegmentationMetrics()
    metrics.update(torch.tensor([[[0, 1], [2, 1]]]), torch.tensor([[[0, 1], [1, 2]]]))
    assert set(REPORTED_METRICS) <= set(metrics.compute())
