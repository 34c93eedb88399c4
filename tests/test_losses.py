"""Tests of `kdlab.models.losses.segmentation_loss` against hand-computed values on tiny masks."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.models.losses import SegmentationLossWeights, segmentation_loss


def _nll(logits: list[float], label: int) -> float:
    """-log softmax(logits)[label], written out with math.exp / math.log."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def _outputs(logits: list, bg_fg: list, target: list, dtype: torch.dtype = torch.float32) -> dict:
    """Build the three heads from nested lists given as [N][h][w][C] (channels last, easier to read)."""

    def head(x: list) -> torch.Tensor:
        return (
            torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2).contiguous().to(dtype).requires_grad_()
        )

    return {"logits": head(logits), "bg_fg_logits": head(bg_fg), "target_logits": head(target)}


# One ROI, 1x3 pixels, labels (background, target, other).
MASKS_1x3 = torch.tensor([[[0, 1, 2]]])
LOGITS_1x3 = [[[[1.0, 0.0, -1.0], [0.5, 0.0, 0.0], [0.0, 2.0, 1.0]]]]
BG_FG_1x3 = [[[[0.25, -0.25], [1.0, 0.0], [0.0, 0.5]]]]
TARGET_1x3 = [[[[4.0, -3.0], [1.0, 0.0], [0.5, 0.0]]]]


def test_weighted_ce_matches_formula_with_nonuniform_class_weights() -> None:
    weights = SegmentationLossWeights(class_weights=(0.5, 3.0, 1.5))
    out = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3), MASKS_1x3, weights)
    n0 = math.log(math.exp(1.0) + math.exp(0.0) + math.exp(-1.0)) - 1.0
    n1 = math.log(math.exp(0.5) + 1.0 + 1.0) - 0.0
    n2 = math.log(1.0 + math.exp(2.0) + math.exp(1.0)) - 1.0
    expected = (0.5 * n0 + 3.0 * n1 + 1.5 * n2) / (0.5 + 3.0 + 1.5)
    assert out["ce"].item() == pytest.approx(expected, rel=1e-6)
    unweighted = (n0 + n1 + n2) / 3
    assert abs(out["ce"].item() - unweighted) > 1e-3  # the weights really matter in this case


def test_bg_fg_is_unweighted_mean_over_all_pixels() -> None:
    out = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3), MASKS_1x3)
    # labels: pixel 0 background (0), pixels 1 and 2 foreground (1)
    expected = (_nll([0.25, -0.25], 0) + _nll([1.0, 0.0], 1) + _nll([0.0, 0.5], 1)) / 3
    assert out["bg_fg"].item() == pytest.approx(expected, rel=1e-6)


def test_target_ce_only_over_foreground_pixels() -> None:
    out = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3), MASKS_1x3)
    # pixel 1 is the target (label 0), pixel 2 another person (label 1); pixel 0 is background: ignored
    expected = (math.log(math.exp(1.0) + 1.0) - 1.0 + math.log(math.exp(0.5) + 1.0) - 0.0) / 2
    assert out["target"].item() == pytest.approx(expected, rel=1e-6)

    changed_bg = [[[[-50.0, 50.0], [1.0, 0.0], [0.5, 0.0]]]]
    out_bg = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, changed_bg), MASKS_1x3)
    assert out_bg["target"].item() == out["target"].item()

    changed_fg = [[[[4.0, -3.0], [-1.0, 0.0], [0.5, 0.0]]]]
    out_fg = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, changed_fg), MASKS_1x3)
    assert out_fg["target"].item() != pytest.approx(out["target"].item(), rel=1e-3)


def test_target_ce_without_foreground_is_connected_zero() -> None:
    outputs = _outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3)
    out = segmentation_loss(outputs, torch.zeros(1, 1, 3, dtype=torch.int64))
    assert out["target"].item() == 0.0
    assert out["target"].requires_grad
    out["target"].backward()
    assert torch.equal(outputs["target_logits"].grad, torch.zeros(1, 2, 1, 3))


def test_dice_is_mean_of_per_roi_dice() -> None:
    ln3 = math.log(3.0)
    # ROI A: labels (1, 0); p1 = 3/5 at pixel 0, 1/3 at pixel 1. ROI B: labels (0, 0); p1 = 1/3 at both pixels.
    logits = [[[[0.0, ln3, 0.0], [0.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]]
    two = [[[[0.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]
    masks = torch.tensor([[[1, 0]], [[0, 0]]])
    out = segmentation_loss(_outputs(logits, two, two), masks, SegmentationLossWeights(dice_smooth=1.0))
    dice_a = 1 - (2 * 0.6 + 1) / ((0.6 + 1 / 3) + 1 + 1)
    dice_b = 1 - (0 + 1) / ((1 / 3 + 1 / 3) + 0 + 1)
    assert out["dice"].item() == pytest.approx((dice_a + dice_b) / 2, rel=1e-6)
    pooled = 1 - (2 * 0.6 + 1) / ((0.6 + 1 / 3 + 1 / 3 + 1 / 3) + 1 + 1)
    assert abs(out["dice"].item() - pooled) > 1e-3  # per-ROI mean, not one Dice over the whole batch


def test_base_total_combines_terms_with_weights() -> None:
    weights = SegmentationLossWeights(ce=0.7, dice=1.3, bg_fg=0.2, target=2.0)
    out = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3), MASKS_1x3, weights)
    expected = 0.7 * out["ce"] + 1.3 * out["dice"] + 0.2 * out["bg_fg"] + 2.0 * out["target"]
    assert out["base_total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out) == {"ce", "dice", "bg_fg", "target", "base_total"}
    assert all(v.ndim == 0 for v in out.values())


def test_zero_rois_gives_connected_zeros() -> None:
    outputs = {
        "logits": torch.zeros(0, 3, 4, 4, requires_grad=True),
        "bg_fg_logits": torch.zeros(0, 2, 4, 4, requires_grad=True),
        "target_logits": torch.zeros(0, 2, 4, 4, requires_grad=True),
    }
    out = segmentation_loss(outputs, torch.zeros(0, 4, 4, dtype=torch.int64))
    for key, value in out.items():
        assert value.item() == 0.0, key
        assert value.requires_grad, key
        assert value.dtype == torch.float32, key
    out["base_total"].backward()
    for key, tensor in outputs.items():
        assert tensor.grad is not None and tensor.grad.shape == tensor.shape, key


def test_bf16_inputs_give_float32_losses() -> None:
    out = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3, dtype=torch.bfloat16), MASKS_1x3)
    ref = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3), MASKS_1x3)
    for key in out:
        assert out[key].dtype == torch.float32, key
        # these logits are exactly representable in bf16, so the float32 computation gives the same values
        assert out[key].item() == pytest.approx(ref[key].item(), rel=1e-6), key


def test_gradient_flows_to_all_three_heads() -> None:
    outputs = _outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3)
    segmentation_loss(outputs, MASKS_1x3)["base_total"].backward()
    for key, tensor in outputs.items():
        assert tensor.grad is not None and tensor.grad.abs().sum().item() > 0, key
    # background pixel 0 gets no gradient from the target head
    assert torch.equal(outputs["target_logits"].grad[0, :, 0, 0], torch.zeros(2))


def test_shape_mismatch_is_rejected() -> None:
    outputs = _outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3)
    with pytest.raises(ValueError, match="bg_fg_logits"):
        segmentation_loss({**outputs, "bg_fg_logits": torch.zeros(1, 2, 1, 4)}, MASKS_1x3)
    with pytest.raises(ValueError, match="class_weights"):
        SegmentationLossWeights(class_weights=(1.0, 1.0))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loss_has_no_host_sync() -> None:
    outputs = {
        k: v.detach().cuda().requires_grad_() for k, v in _outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3).items()
    }
    masks = MASKS_1x3.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = segmentation_loss(outputs, masks)
        out["base_total"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = segmentation_loss(_outputs(LOGITS_1x3, BG_FG_1x3, TARGET_1x3), MASKS_1x3)
    assert out["base_total"].item() == pytest.approx(cpu["base_total"].item(), rel=1e-5)
