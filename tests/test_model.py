"""Model shapes, the hierarchical head's probabilities, parameter counts and local encoder weights."""

import pytest
import torch

from kdlab.config.schema import ModelConfig
from kdlab.errors import CheckpointError, ConfigError
from kdlab.models.builders import build_model
from kdlab.models.roi_unet import RoiHierarchicalHead, count_parameters


def _small(encoder: str = "timm-efficientnet-b0") -> ModelConfig:
    return ModelConfig(encoder=encoder, roi_size=(16, 12), mask_size=(32, 24), head_channels=16)


@pytest.mark.parametrize(
    ("encoder", "millions"), [("timm-efficientnet-b3", 13.16), ("timm-efficientnet-b0", 6.25)]
)
def test_unet_parameter_counts_match_the_seed(encoder, millions):
    model = build_model(ModelConfig(encoder=encoder))
    assert round(count_parameters(model.unet) / 1e6, 2) == millions


def test_output_shapes_and_roi_batch_indices():
    torch.manual_seed(0)
    model = build_model(_small()).eval()
    images = torch.rand(2, 3, 64, 64)
    rois = torch.tensor([[0, 4, 4, 40, 60], [1, 0, 0, 63, 63], [1, 10, 20, 30, 50]], dtype=torch.float32)
    with torch.inference_mode():
        out = model(images, rois)
    assert out["logits"].shape == (3, 3, 32, 24)
    assert out["bg_fg_logits"].shape == (3, 2, 32, 24)
    assert out["target_logits"].shape == (3, 2, 32, 24)
    # ROI 0 sees image 0 only: changing image 1 must not change ROI 0's output, but must change ROI 1's.
    images2 = images.clone()
    images2[1] = torch.rand(3, 64, 64)
    with torch.inference_mode():
        out2 = model(images2, rois)
    torch.testing.assert_close(out["logits"][0], out2["logits"][0])
    assert not torch.allclose(out["logits"][1], out2["logits"][1])


def test_unet_runs_once_per_image_not_per_roi():
    model = build_model(_small()).eval()
    calls = []
    model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    rois = torch.tensor([[0, 0, 0, 30, 30]] * 7 + [[1, 5, 5, 50, 50]] * 5, dtype=torch.float32)
    with torch.inference_mode():
        model(torch.rand(2, 3, 64, 64), rois)
    assert calls == [2]


def test_combined_logits_are_the_hierarchical_probabilities():
    head = RoiHierarchicalHead(in_channels=5, head_channels=8, mask_size=(6, 4))
    out = head(torch.randn(3, 5, 6, 4))
    p = out["logits"].softmax(1)
    p_fg = out["bg_fg_logits"].softmax(1)
    p_t = out["target_logits"].softmax(1)
    torch.testing.assert_close(p[:, 0], p_fg[:, 0])
    torch.testing.assert_close(p[:, 1], p_fg[:, 1] * p_t[:, 0])
    torch.testing.assert_close(p[:, 2], p_fg[:, 1] * p_t[:, 1])


def test_zero_rois_give_empty_outputs_that_backpropagate():
    model = build_model(_small())
    out = model(torch.rand(1, 3, 64, 64), torch.zeros((0, 5)))
    assert out["logits"].shape == (0, 3, 32, 24)
    (out["logits"].sum() * 0).backward()


def test_unknown_encoder_is_a_config_error_with_suggestions():
    with pytest.raises(ConfigError, match="timm-efficientnet-b0"):
        build_model(ModelConfig(encoder="timm-eficientnet-b0"))


def test_encoder_weights_load_from_a_local_file(tmp_path):
    source = build_model(_small())
    path = tmp_path / "encoder.pth"
    torch.save(source.unet.encoder.state_dict(), path)
    loaded = build_model(_small().model_copy(update={"encoder_weights": str(path)}))
    for key, value in source.unet.encoder.state_dict().items():
        torch.testing.assert_close(loaded.unet.encoder.state_dict()[key], value)


def test_encoder_weights_missing_or_mismatched_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model(_small().model_copy(update={"encoder_weights": str(tmp_path / "nope.pth")}))
    other = build_model(_small("timm-efficientnet-b3"))
    path = tmp_path / "b3.pth"
    torch.save(other.unet.encoder.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not match"):
        build_model(_small().model_copy(update={"encoder_weights": str(path)}))


def test_roi_coordinates_stay_float32_under_bf16_autocast(monkeypatch):
    import kdlab.models.roi_unet as roi_unet

    seen = []
    real = roi_unet.roi_align

    def spy(inp, rois, *args, **kwargs):
        seen.append(rois.dtype)
        return real(inp, rois, *args, **kwargs)

    monkeypatch.setattr(roi_unet, "roi_align", spy)
    model = build_model(_small()).eval()
    rois = torch.tensor([[0, 3.3, 4.7, 40.1, 60.9]], dtype=torch.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 3, 64, 64), rois)
    assert seen and all(d == torch.float32 for d in seen)
    assert torch.isfinite(out["logits"]).all()
