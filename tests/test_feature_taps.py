"""Feature taps, adapters and the feature-MSE distiller on small B0 (student) / B3 (teacher) models."""

import pytest
import torch
from torch import nn

from kdlab.config.schema import ModelConfig
from kdlab.distill.features import (
    FeatureAdapter,
    FeatureDistiller,
    FeatureTap,
    resolve_module,
    unwrap_model,
)
from kdlab.errors import ConfigError
from kdlab.models.builders import build_model

HEAD_CHANNELS = 16
ROI_SIZE = (16, 12)


def _build(encoder: str) -> nn.Module:
    cfg = ModelConfig(encoder=encoder, roi_size=ROI_SIZE, mask_size=(32, 24), head_channels=HEAD_CHANNELS)
    return build_model(cfg)


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return _build("timm-efficientnet-b0")


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    """A second B0 keeps the gradient tests cheap; the B3 teacher is used where channel counts must differ."""
    torch.manual_seed(1)
    return _build("timm-efficientnet-b0").eval()


@pytest.fixture(scope="module")
def teacher_b3() -> nn.Module:
    torch.manual_seed(2)
    return _build("timm-efficientnet-b3").eval()


@pytest.fixture(autouse=True)
def _zero_grads(student, teacher):
    yield
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=gen)
    rois = torch.tensor([[0, 4, 4, 40, 60], [1, 0, 0, 63, 63], [1, 10, 20, 30, 50]], dtype=torch.float32)
    return images, rois


class _CompiledStandIn(nn.Module):
    """Mimics torch.compile's OptimizedModule, which keeps the real model in `_orig_mod`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._orig_mod(*args)


def test_resolve_module_finds_layers_and_suggests_close_names(student):
    assert resolve_module(student, "unet.encoder") is student.unet.encoder
    assert resolve_module(student, "head.shared") is student.head.shared
    assert resolve_module(student, "unet.decoder") is student.unet.decoder
    assert resolve_module(student, "unet.decoder.blocks.3") is student.unet.decoder.blocks[3]
    assert resolve_module(student, "unet.encoder[-1]") is student.unet.encoder
    with pytest.raises(ConfigError, match="head.shared") as info:
        resolve_module(student, "head.shard")
    assert "head.shard'" in str(info.value)


def test_names_resolve_through_wrappers(student):
    wrapped = _CompiledStandIn(_CompiledStandIn(student))
    assert unwrap_model(wrapped) is student
    assert unwrap_model(student) is student
    assert resolve_module(wrapped, "head.shared") is student.head.shared
    with FeatureTap(wrapped, ["head.shared"]) as tap:
        wrapped(*_batch())
        assert tap.features["head.shared"].shape[0] == 3


def test_tap_records_head_encoder_and_dict_outputs(student):
    images, rois = _batch()
    paths = ["head.shared", "unet.encoder[-1]", "unet.encoder[3]", "head[features]"]
    with FeatureTap(student, paths) as tap:
        out = student(images, rois)
        encoder_maps = student.unet.encoder((images - student.input_mean) / student.input_std)
        assert tap.features["head.shared"].shape == (3, HEAD_CHANNELS, *ROI_SIZE)
        last = tap.features["unet.encoder[-1]"]
        assert last.shape == (2, 320, 2, 2)  # B0's last stage, stride 32
        torch.testing.assert_close(last, encoder_maps[-1])
        torch.testing.assert_close(tap.features["unet.encoder[3]"], encoder_maps[3])
        assert tap.features["head[features]"] is out["features"]
        assert tap.features["head.shared"].requires_grad  # student side keeps the graph
        tap.clear()
        assert tap.features == {}


def test_bad_selector_is_a_config_error(student):
    with FeatureTap(student, ["unet.encoder[99]"]), pytest.raises(ConfigError, match=r"unet.encoder\[99\]"):
        student(*_batch())
    with FeatureTap(student, ["head.shared[0]"]), pytest.raises(ConfigError, match="one tensor"):
        student(*_batch())


def _feature_loss_backward(student, teacher, path: str) -> torch.Tensor:
    images, rois = _batch()
    distiller = FeatureDistiller(student, teacher, [(path, path, 1.0)])
    try:
        distiller.infer_channels(student, teacher, images, rois)
        with torch.inference_mode():
            teacher(images, rois)
        student(images, rois)
        loss, _ = distiller.loss()
        loss.backward()
    finally:
        distiller.close()
    return loss


def test_feature_loss_trains_student_layers_up_to_the_tap_and_never_the_teacher(student, teacher):
    loss = _feature_loss_backward(student, teacher, "head.shared")
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.head.shared.parameters())
    assert student.unet.encoder.conv_stem.weight.grad.abs().sum() > 0
    # Layers after the tap do not take part in the feature loss.
    assert all(p.grad is None for p in student.head.refine.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_decoder_tap_sends_gradient_into_the_encoder(student, teacher):
    _feature_loss_backward(student, teacher, "unet.decoder")
    assert student.unet.encoder.conv_stem.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.head.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_adapter_projects_channels_resizes_and_is_identity_when_shapes_match():
    x = torch.randn(2, 8, 5, 7)
    conv = FeatureAdapter(8, 12)
    assert isinstance(conv.proj, nn.Conv2d) and conv.proj.kernel_size == (1, 1)
    assert conv(x).shape == (2, 12, 5, 7)
    torch.testing.assert_close(conv(x), torch.einsum("oc,nchw->nohw", conv.proj.weight[:, :, 0, 0], x))
    assert conv(x, (10, 14)).shape == (2, 12, 10, 14)
    same = FeatureAdapter(8, 8)
    assert list(same.parameters()) == []
    torch.testing.assert_close(same(x, (5, 7)), x)
    assert same(x, (3, 4)).shape == (2, 8, 3, 4)


def test_distiller_b0_to_b3_weighted_sum_and_keys(student, teacher_b3):
    teacher = teacher_b3
    images, rois = _batch()
    pairs = [("head.shared", "head.shared", 1.0), ("unet.encoder[-1]", "unet.encoder[-1]", 0.5)]
    distiller = FeatureDistiller(student, teacher, pairs)
    try:
        bn = student.unet.encoder.bn1
        stats = bn.running_mean.clone()
        student.train()
        distiller.infer_channels(student, teacher, images, rois)
        assert student.training and not teacher.training  # modes restored
        torch.testing.assert_close(bn.running_mean, stats)  # the dry pass leaves BN statistics alone
        assert isinstance(distiller.adapters[0].proj, nn.Identity)
        assert isinstance(distiller.adapters[1].proj, nn.Conv2d)
        assert distiller.adapters[1].proj.weight.shape == (384, 320, 1, 1)  # B0 320 -> B3 384 channels
        assert len(list(distiller.parameters())) == 1  # only adapters, never the models' parameters

        with torch.inference_mode():
            teacher(images, rois)
        student(images, rois)
        s_head = distiller.student_tap.features["head.shared"].detach().clone()
        t_head = distiller.teacher_tap.features["head.shared"].clone()
        loss, parts = distiller.loss()
        assert sorted(parts) == ["distill_feat_0", "distill_feat_1"]
        assert torch.isfinite(loss) and loss > 0
        torch.testing.assert_close(loss, parts["distill_feat_0"] + 0.5 * parts["distill_feat_1"])
        torch.testing.assert_close(parts["distill_feat_0"], ((s_head - t_head) ** 2).mean())
        loss.backward()
        assert distiller.adapters[1].proj.weight.grad.abs().sum() > 0

        # loss() consumed the features: a skipped teacher forward fails instead of reusing stale ones.
        student(images, rois)
        with pytest.raises(RuntimeError, match="teacher forward"):
            distiller.loss()
    finally:
        distiller.close()
        student.eval()


def test_loss_before_infer_channels_is_an_error(student, teacher):
    distiller = FeatureDistiller(student, teacher, [("head.shared", "head.shared", 1.0)])
    try:
        with pytest.raises(RuntimeError, match="infer_channels"):
            distiller.loss()
    finally:
        distiller.close()


def test_close_removes_hooks(student, teacher):
    images, rois = _batch()
    tap = FeatureTap(student, ["head.shared"])
    with torch.no_grad():
        student(images, rois)
    assert "head.shared" in tap.features
    tap.close()
    with torch.no_grad():
        student(images, rois)
    assert tap.features == {}

    distiller = FeatureDistiller(student, teacher, [("unet.decoder", "unet.decoder", 1.0)])
    distiller.close()
    with torch.no_grad():
        student(images, rois)
        teacher(images, rois)
    assert distiller.student_tap.features == {} and distiller.teacher_tap.features == {}
    assert not student.unet.decoder._forward_hooks and not teacher.unet.decoder._forward_hooks
