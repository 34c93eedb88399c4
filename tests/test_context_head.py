"""The context head (receptive field = whole ROI, box coordinates), the context margin and instance cues."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.config.schema import ExperimentConfig, ModelConfig
from kdlab.data.roi_masks import TARGET, build_roi_masks, expand_rois
from kdlab.models.builders import build_model
from kdlab.models.losses import (
    SegmentationLossWeights,
    boundary_band,
    contour_target,
    distance_transform_target,
    segmentation_loss,
)
from kdlab.models.roi_unet import RoiContextHead, RoiHierarchicalHead, box_coordinates


def _without_group_norm(head: torch.nn.Module) -> torch.nn.Module:
    """GroupNorm couples all pixels through its statistics; without it the gradient shows the receptive field."""
    for module in head.modules():
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    return head


def _corner_gradient(head: torch.nn.Module, h: int = 16, w: int = 12) -> float:
    """|d logits[0,:,0,0] / d input[..., h-1, w-1]|: does the top-left output see the far corner?"""
    head = _without_group_norm(head)
    x = torch.randn(1, 5, h, w, requires_grad=True)
    head(x)["logits"][0, :, 0, 0].sum().backward()
    return float(x.grad[0, :, h - 1, w - 1].abs().sum())


def test_context_head_sees_the_whole_roi_and_the_basic_head_does_not():
    torch.manual_seed(0)
    context = RoiContextHead(5, 8, roi_size=(16, 12), mask_size=(16, 12), depth=3)
    basic = RoiHierarchicalHead(5, 8, mask_size=(16, 12))
    assert _corner_gradient(context) > 0
    assert _corner_gradient(basic) == 0.0  # ~7 px of context: the far corner is out of reach


def test_context_head_knows_where_a_pixel_sits_in_the_box():
    """The box-coordinate channels enter both the ROI encoder and the mask-resolution branches."""
    torch.manual_seed(0)
    head = RoiContextHead(5, 8, roi_size=(8, 6), mask_size=(16, 12), depth=2).eval()
    x = torch.ones(1, 5, 8, 6)
    out = head(x)["logits"]
    head.mask_coords.zero_()
    no_mask_coords = head(x)["logits"]
    head.roi_coords.zero_()
    no_coords = head(x)["logits"]
    assert (out - no_mask_coords).abs().amax() > 1e-4
    assert (no_mask_coords - no_coords).abs().amax() > 1e-4


def test_box_coordinates_span_the_box_and_the_margin():
    c = box_coordinates(4, 2)
    assert c.shape == (1, 2, 4, 2)
    torch.testing.assert_close(c[0, 0, 0], torch.tensor([-0.5, 0.5]))  # x at the centres of 2 columns
    torch.testing.assert_close(c[0, 1, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    grown = box_coordinates(4, 2, margin=0.25)  # window = box grown by 25% per side: 1.5x wider
    torch.testing.assert_close(grown, c * 1.5)


def test_expand_rois_grows_each_side_by_the_margin():
    rois = torch.tensor([[1.0, 10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(expand_rois(rois, 0.25), torch.tensor([[1.0, 5.0, 10.0, 35.0, 70.0]]))
    assert expand_rois(rois, 0.0) is rois


def test_masks_with_a_margin_are_built_on_the_enlarged_window():
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    plain = build_roi_masks(masks, box, (8, 8))
    grown = build_roi_masks(masks, box, (8, 8), margin=0.5)  # window 0..40: the person fills the middle half
    assert (plain == TARGET).all()
    assert (grown[0, 2:6, 2:6] == TARGET).all() and (grown[0, :2] == 0).all() and (grown[0, :, 6:] == 0).all()


def test_model_with_a_margin_crops_the_enlarged_window(monkeypatch):
    import kdlab.models.roi_unet as roi_unet

    seen = []
    real = roi_unet.roi_align
    monkeypatch.setattr(
        roi_unet, "roi_align", lambda inp, rois, *a, **k: seen.append(rois) or real(inp, rois, *a, **k)
    )
    cfg = ModelConfig(encoder="timm-efficientnet-b0", roi_size=(16, 12), mask_size=(32, 24), head_channels=8,
                      roi_margin=0.5)  # fmt: skip
    model = build_model(cfg).eval()
    with torch.inference_mode():
        model(torch.rand(1, 3, 64, 64), torch.tensor([[0.0, 20.0, 20.0, 40.0, 40.0]]))
    torch.testing.assert_close(seen[0], torch.tensor([[0.0, 10.0, 10.0, 50.0, 50.0]]))


def test_instance_cue_outputs_exist_only_when_asked_for():
    base = dict(encoder="timm-efficientnet-b0", roi_size=(16, 12), mask_size=(32, 24), head_channels=8)
    rois = torch.tensor([[0.0, 4.0, 4.0, 40.0, 60.0]])
    with torch.inference_mode():
        plain = build_model(ModelConfig(**base)).eval()(torch.rand(1, 3, 64, 64), rois)
        cues = build_model(ModelConfig(**base, instance_cues=True)).eval()(torch.rand(1, 3, 64, 64), rois)
    assert "distance" not in plain and "contour_logits" not in plain
    assert cues["distance"].shape == cues["contour_logits"].shape == (1, 1, 32, 24)


def test_instance_cue_losses_need_the_instance_cue_outputs():
    with pytest.raises(ValueError, match="model.instance_cues=true"):
        ExperimentConfig(training={"loss": {"distance": 0.5}})
    with pytest.raises(ValueError, match="model.head='context'"):
        ExperimentConfig(model={"head": "basic", "instance_cues": True})
    ExperimentConfig(model={"instance_cues": True}, training={"loss": {"distance": 0.5, "contour": 0.5}})


# A 6x6 ROI whose target is the 4x4 square in the middle.
SQUARE = torch.zeros(1, 6, 6, dtype=torch.long)
SQUARE[0, 1:5, 1:5] = 1


def test_distance_transform_counts_erosions_capped_and_normalised():
    d = distance_transform_target(SQUARE == 1, distance_max=4) * 4
    expected = torch.zeros(6, 6)
    expected[1:5, 1:5] = 1.0
    expected[2:4, 2:4] = 2.0
    torch.testing.assert_close(d[0], expected)
    capped = distance_transform_target(SQUARE == 1, distance_max=1)
    torch.testing.assert_close(capped[0], (SQUARE[0] == 1).float())


def test_a_person_cut_by_the_crop_edge_keeps_its_distance_there():
    full = torch.ones(1, 3, 3, dtype=torch.bool)
    torch.testing.assert_close(distance_transform_target(full, 2), torch.ones(1, 3, 3))


def test_contour_is_the_inner_boundary_of_the_target():
    c = contour_target(SQUARE == 1)[0]
    assert c.sum() == 12  # the 4x4 square minus its 2x2 interior
    assert c[1, 1] == 1 and c[2, 2] == 0 and c[0, 0] == 0


def test_boundary_band_marks_pixels_next_to_a_label_change():
    masks = torch.tensor([[[0, 0, 0, 1, 1, 2]]])
    torch.testing.assert_close(boundary_band(masks, 1), torch.tensor([[[0.0, 0, 1, 1, 1, 1]]]))
    torch.testing.assert_close(boundary_band(masks, 2), torch.tensor([[[0.0, 1, 1, 1, 1, 1]]]))


def _two_pixel_outputs(distance: float = 0.0, contour: float = 0.0) -> dict[str, torch.Tensor]:
    z = torch.zeros(1, 2, 1, 2)
    return {
        "logits": torch.log_softmax(torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]]), dim=1),
        "bg_fg_logits": z.clone(), "target_logits": z.clone(),
        "distance": torch.full((1, 1, 1, 2), distance), "contour_logits": torch.full((1, 1, 1, 2), contour),
    }  # fmt: skip


def test_distance_and_contour_terms_match_hand_computed_values():
    masks = torch.tensor([[[0, 1]]])  # background | target; the target pixel is its own boundary
    w = SegmentationLossWeights(distance=1.0, contour=1.0, distance_max=2)
    out = segmentation_loss(_two_pixel_outputs(distance=0.0, contour=1.0), masks, w)
    # sigmoid(0) = 0.5 everywhere; goals 0 and 1/2 -> mean((0.5-0)^2, (0.5-0.5)^2) = 0.125
    assert out["distance"].item() == pytest.approx(0.125)
    # contour goal (0, 1), logits 1: 0.5 * (-log sigmoid(1)) + 0.5 * (-log(1 - sigmoid(1)))
    sig = 1 / (1 + math.exp(-1.0))
    assert out["contour"].item() == pytest.approx(0.5 * -math.log(sig) + 0.5 * -math.log(1 - sig))
    plain = segmentation_loss(_two_pixel_outputs(), masks, SegmentationLossWeights())
    expected_total = plain["base_total"] + out["distance"] + out["contour"]
    assert out["base_total"].item() == pytest.approx(expected_total.item())


def test_boundary_weighting_reweights_the_ce_by_the_band():
    masks = torch.tensor([[[0, 0, 0, 1]]])
    logits = torch.log_softmax(
        torch.tensor([[[[1.0, 2.0, 0.5, 0.0]], [[0.0, 0.0, 0.0, 1.0]], [[0.0] * 4]]]), 1
    )
    z = torch.zeros(1, 2, 1, 4)
    outputs = {"logits": logits, "bg_fg_logits": z, "target_logits": z}
    w = SegmentationLossWeights(class_weights=(1.0, 1.0, 1.0), boundary_weight=3.0, boundary_width=1)
    nll = -logits[0, masks[0, 0], 0, torch.arange(4)]
    pixel_w = torch.tensor([1.0, 1.0, 4.0, 4.0])  # the last two pixels touch the 0 | 1 change
    expected = float((pixel_w * nll).sum() / pixel_w.sum())
    assert segmentation_loss(outputs, masks, w)["ce"].item() == pytest.approx(expected)
    off = segmentation_loss(outputs, masks, SegmentationLossWeights(class_weights=(1.0, 1.0, 1.0)))
    assert off["ce"].item() == pytest.approx(float(nll.mean()))


def test_instance_cue_losses_backpropagate_with_zero_rois():
    model = build_model(ModelConfig(encoder="timm-efficientnet-b0", roi_size=(16, 12), mask_size=(32, 24),
                                    head_channels=8, instance_cues=True))  # fmt: skip
    out = model(torch.rand(1, 3, 64, 64), torch.zeros((0, 5)))
    w = SegmentationLossWeights(distance=1.0, contour=1.0, boundary_weight=2.0)
    losses = segmentation_loss(out, torch.zeros((0, 32, 24), dtype=torch.long), w)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["base_total"].backward()
