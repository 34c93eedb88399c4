"""KD losses, schedules and EMA, checked against hand-computed oracles (math.exp / math.log arithmetic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.distill.losses import cwd_loss, feature_mse_loss, kd_kl_loss, mix_teacher_probs, teacher_probs
from kdlab.distill.schedules import Schedule
from kdlab.engine.ema import ModelEMA

# ---------------------------------------------------------------------------------------------- hand helpers


def _softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in xs]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


# Tiny case: N=1, C=3, H=1, W=2. Per pixel (class vectors):
_S_PIX = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]  # student logits at pixel 0 and pixel 1
_T_PIX = [[0.0, 2.0, 1.0], [1.0, -1.0, 0.5]]  # teacher logits


def _to_nchw(pixels: list[list[float]]) -> torch.Tensor:
    """[[c0, c1, c2] per pixel] -> [1, C, 1, P]."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, len(pixels))


# ---------------------------------------------------------------------------------------------- kd_kl_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_kl_hand_value(temperature: float) -> None:
    s, t = _to_nchw(_S_PIX), _to_nchw(_T_PIX)
    expected = (
        temperature**2
        * sum(
            _kl(_softmax(tp, temperature), _softmax(sp, temperature))
            for sp, tp in zip(_S_PIX, _T_PIX, strict=True)
        )
        / 2  # N * pixels = 1 * 2
    )
    loss = kd_kl_loss(s, teacher_probs(t, temperature), temperature)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_temperature_changes_value_as_hand_computed() -> None:
    """T=2 is not T=1 times 4: both the /T inside the softmax and the T² factor matter."""
    s, t = _to_nchw(_S_PIX), _to_nchw(_T_PIX)
    l1 = kd_kl_loss(s, teacher_probs(t, 1.0), 1.0).item()
    l2 = kd_kl_loss(s, teacher_probs(t, 2.0), 2.0).item()
    kl_t2 = sum(_kl(_softmax(tp, 2.0), _softmax(sp, 2.0)) for sp, tp in zip(_S_PIX, _T_PIX, strict=True)) / 2
    assert l2 == pytest.approx(4.0 * kl_t2, rel=1e-5)
    assert l2 != pytest.approx(4.0 * l1, rel=1e-2)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_kl_zero_when_equal(temperature: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4) * 3
    loss = kd_kl_loss(s, teacher_probs(s, temperature), temperature)
    # the KL itself is within 1e-7 of 0 (float32 rounding of log(softmax) vs log_softmax); T² scales it
    assert abs(loss.item()) < 1e-7 * max(1.0, temperature**2)


def test_kd_kl_classifier_shape() -> None:
    s = torch.tensor([_S_PIX[0], _S_PIX[1]])  # [N=2, C=3]
    t = torch.tensor([_T_PIX[0], _T_PIX[1]])
    expected = 4.0 * sum(
        _kl(_softmax(tp, 2.0), _softmax(sp, 2.0)) for sp, tp in zip(_S_PIX, _T_PIX, strict=True)
    )
    expected /= 2  # mean over the 2 ROIs
    assert kd_kl_loss(s, teacher_probs(t, 2.0), 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_per_pixel_normalisation_resolution_invariant() -> None:
    torch.manual_seed(1)
    s = torch.randn(2, 3, 3, 5)
    t = torch.randn(2, 3, 3, 5)
    # every pixel repeated into a 2x2 block -> 2H x 2W
    s_up = s.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    t_up = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    loss = kd_kl_loss(s, teacher_probs(t, 2.0), 2.0)
    loss_up = kd_kl_loss(s_up, teacher_probs(t_up, 2.0), 2.0)
    torch.testing.assert_close(loss_up, loss, rtol=1e-5, atol=1e-7)
    # a single pixel tiled to 4x4 has the loss of that pixel
    s1, t1 = s[:1, :, :1, :1], t[:1, :, :1, :1]
    one = kd_kl_loss(s1, teacher_probs(t1, 2.0), 2.0)
    tiled = kd_kl_loss(s1.expand(1, 3, 4, 4), teacher_probs(t1.expand(1, 3, 4, 4), 2.0), 2.0)
    torch.testing.assert_close(tiled, one, rtol=1e-5, atol=1e-7)


def test_kd_kl_is_mean_of_per_roi_losses() -> None:
    torch.manual_seed(2)
    s = torch.randn(3, 4, 2, 3)
    p = teacher_probs(torch.randn(3, 4, 2, 3), 1.5)
    per_roi = [kd_kl_loss(s[i : i + 1], p[i : i + 1], 1.5) for i in range(3)]
    torch.testing.assert_close(kd_kl_loss(s, p, 1.5), torch.stack(per_roi).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_kl_gradient_closed_form(temperature: float) -> None:
    torch.manual_seed(3)
    s = torch.randn(2, 3, 2, 2, requires_grad=True)
    p = teacher_probs(torch.randn(2, 3, 2, 2), temperature)
    kd_kl_loss(s, p, temperature).backward()
    n_rows = 2 * 2 * 2  # N * H * W
    expected = temperature * (torch.softmax(s.detach() / temperature, dim=1) - p) / n_rows
    assert s.grad is not None
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_kd_kl_zero_teacher_prob_is_finite() -> None:
    s = _to_nchw(_S_PIX).requires_grad_(True)
    p = torch.zeros(1, 3, 1, 2)
    p[0, 1] = 1.0  # one-hot teacher: p_t = 0 for classes 0 and 2
    loss = kd_kl_loss(s, p, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert s.grad is not None and torch.isfinite(s.grad).all()
    expected = -sum(math.log(_softmax(sp)[1]) for sp in _S_PIX) / 2  # KL to a one-hot = -log q[1]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_empty_and_dtype() -> None:
    s = torch.randn(0, 3, 4, 4, requires_grad=True)
    loss = kd_kl_loss(s, torch.zeros(0, 3, 4, 4), 2.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad is not None and s.grad.shape == s.shape

    sb = torch.randn(2, 3, 4, 4).bfloat16()
    pb = teacher_probs(torch.randn(2, 3, 4, 4).bfloat16(), 2.0)
    assert pb.dtype == torch.float32
    assert kd_kl_loss(sb, pb.bfloat16(), 2.0).dtype == torch.float32


def test_kd_kl_shape_mismatch_and_bad_temperature() -> None:
    with pytest.raises(ValueError):
        kd_kl_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3), 1.0)
    with pytest.raises(ValueError):
        kd_kl_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.0)


# ---------------------------------------------------------------------------------------------- teachers


def test_teacher_probs_hand_value() -> None:
    p = teacher_probs(_to_nchw(_T_PIX), 2.0)
    for pix, tp in enumerate(_T_PIX):
        expected = _softmax(tp, 2.0)
        assert p[0, :, 0, pix].tolist() == pytest.approx(expected, rel=1e-6)


def test_mix_teacher_probs_hand_mixture() -> None:
    p1 = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    p2 = torch.tensor([[0.6, 0.4], [0.1, 0.9]])
    mixed = mix_teacher_probs([p1, p2], [1.0, 3.0])
    # (1*p1 + 3*p2) / 4
    expected = [
        [0.25 * 0.2 + 0.75 * 0.6, 0.25 * 0.8 + 0.75 * 0.4],
        [0.25 * 0.5 + 0.75 * 0.1, 0.25 * 0.5 + 0.75 * 0.9],
    ]
    assert mixed.tolist()[0] == pytest.approx(expected[0], abs=1e-7)
    assert mixed.tolist()[1] == pytest.approx(expected[1], abs=1e-7)
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(2))


def test_mix_teacher_probs_sums_to_one_on_maps() -> None:
    torch.manual_seed(4)
    ps = [teacher_probs(torch.randn(2, 3, 4, 4), 2.0) for _ in range(3)]
    mixed = mix_teacher_probs(ps, [0.5, 2.0, 1.0])
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(2, 4, 4))


def test_mix_teacher_probs_rejects_bad_input() -> None:
    p = torch.full((1, 2), 0.5)
    with pytest.raises(ValueError):
        mix_teacher_probs([p, p], [1.0, 0.0])
    with pytest.raises(ValueError):
        mix_teacher_probs([p, p], [1.0])
    with pytest.raises(ValueError):
        mix_teacher_probs([], [])
    with pytest.raises(ValueError):
        mix_teacher_probs([p, torch.full((1, 4), 0.25)], [1.0, 1.0])


# ---------------------------------------------------------------------------------------------- cwd_loss


def test_cwd_hand_value() -> None:
    # N=1, C=2, H=1, W=2: per channel, a distribution over the 2 positions
    s_ch = [[1.0, -1.0], [0.0, 2.0]]  # student: channel -> values at the 2 positions
    t_ch = [[2.0, 0.0], [1.0, 1.5]]
    s = torch.tensor(s_ch).reshape(1, 2, 1, 2)
    t = torch.tensor(t_ch).reshape(1, 2, 1, 2)
    for temperature in (1.0, 2.0):
        kl_sum = sum(
            _kl(_softmax(tc, temperature), _softmax(sc, temperature))
            for sc, tc in zip(s_ch, t_ch, strict=True)
        )
        expected = temperature**2 * kl_sum / 2  # / (N*C) = 2
        assert cwd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_zero_when_equal_and_normalised_by_n_c() -> None:
    torch.manual_seed(5)
    s = torch.randn(2, 3, 4, 5)
    t = torch.randn(2, 3, 4, 5)
    assert abs(cwd_loss(s, s, 4.0).item()) < 1e-6
    base = cwd_loss(s, t, 4.0)
    dup_c = cwd_loss(torch.cat([s, s], dim=1), torch.cat([t, t], dim=1), 4.0)
    dup_n = cwd_loss(torch.cat([s, s, s], dim=0), torch.cat([t, t, t], dim=0), 4.0)
    torch.testing.assert_close(dup_c, base, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dup_n, base, rtol=1e-5, atol=1e-7)


def test_cwd_empty_dtype_and_shape_errors() -> None:
    s = torch.randn(0, 3, 4, 4, requires_grad=True)
    loss = cwd_loss(s, torch.randn(0, 3, 4, 4), 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None
    out = cwd_loss(torch.randn(1, 2, 3, 3).bfloat16(), torch.randn(1, 2, 3, 3).bfloat16(), 2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    with pytest.raises(ValueError):
        cwd_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4), 1.0)
    with pytest.raises(ValueError):
        cwd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 1.0)  # no spatial dim


# ---------------------------------------------------------------------------------------------- feature_mse


def test_feature_mse_value_and_errors() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    t = torch.tensor([[0.0, 2.0], [5.0, 4.0]]).reshape(1, 1, 2, 2)
    assert feature_mse_loss(s, t).item() == pytest.approx((1.0 + 0.0 + 4.0 + 0.0) / 4)
    assert feature_mse_loss(s.bfloat16(), t.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError):
        feature_mse_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    empty = torch.zeros(0, 4, 2, 2, requires_grad=True)
    loss = feature_mse_loss(empty, torch.zeros(0, 4, 2, 2))
    assert loss.item() == 0.0
    loss.backward()


# ---------------------------------------------------------------------------------------------- schedules


def test_schedule_values_and_clamping() -> None:
    const = Schedule("constant", 2.0, 5.0)
    lin = Schedule("linear", 1.0, 3.0)
    cos = Schedule("cosine", 1.0, 0.0)
    assert [const.value(p) for p in (0.0, 0.5, 1.0)] == [2.0, 2.0, 2.0]
    assert [lin.value(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 2.0, 3.0])
    assert [cos.value(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert cos.value(0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    for sched in (const, lin, cos):
        assert sched.value(-0.5) == sched.value(0.0)
        assert sched.value(1.7) == sched.value(1.0)
    with pytest.raises(ValueError):
        Schedule("step", 0.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        lin.value(float("nan"))


# ---------------------------------------------------------------------------------------------- EMA


def _linear(w: list[float], b: float) -> nn.Linear:
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w]))
        lin.bias.fill_(b)
    return lin


def test_ema_one_update_hand_value() -> None:
    model = _linear([1.0, 2.0], 0.5)
    ema = ModelEMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
        model.bias.fill_(1.5)
    ema.update(model)
    ema_lin = ema.module
    assert isinstance(ema_lin, nn.Linear)
    # 0.9 * old + 0.1 * new
    assert ema_lin.weight.tolist()[0] == pytest.approx([0.9 * 1.0 + 0.1 * 3.0, 0.9 * 2.0 + 0.1 * -2.0])
    assert ema_lin.bias.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    assert ema.updates == 1
    # the model itself is untouched
    assert model.weight.tolist()[0] == [3.0, -2.0]


def test_ema_module_is_eval_without_grad_and_independent() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    model.train()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()


def test_ema_integer_buffers_copied_float_buffers_averaged() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.5, warmup=False)
    old_mean = ema.module[1].running_mean.clone()
    model.train()
    for _ in range(3):
        model(torch.randn(8, 2))
    ema.update(model)
    ema_bn, bn = ema.module[1], model[1]
    assert ema_bn.num_batches_tracked.dtype == torch.int64
    assert ema_bn.num_batches_tracked.item() == 3 == bn.num_batches_tracked.item()
    torch.testing.assert_close(ema_bn.running_mean, 0.5 * old_mean + 0.5 * bn.running_mean)


def test_ema_warmup_formula() -> None:
    model = _linear([1.0, 1.0], 0.0)
    ema = ModelEMA(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx((1 + 0) / (10 + 0))  # 0.1 at updates=0
    with torch.no_grad():
        model.bias.fill_(2.0)
    ema.update(model)
    assert ema.module.bias.item() == pytest.approx(0.1 * 0.0 + 0.9 * 2.0)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 100_000
    assert ema.current_decay() == 0.999  # capped at decay
    assert ModelEMA(model, decay=0.9, warmup=False).current_decay() == 0.9


def test_ema_state_dict_round_trip() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, decay=0.8)
    model(torch.randn(4, 2))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    ema.update(model)
    state = ema.state_dict()
    assert state["updates"] == 2 and state["decay"] == 0.8
    other = ModelEMA(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), decay=0.5)
    other.load_state_dict(state)
    assert other.updates == 2 and other.decay == 0.8
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(other.module.state_dict()[key], value)


def test_ema_channels_last_model() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ema = ModelEMA(model, decay=0.75, warmup=False)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last))
    ema.update(model)
    new = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * old[key] + 0.25 * new[key])
        else:
            assert torch.equal(value, new[key])
    assert ema.module[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_ema_created_before_channels_last_conversion() -> None:
    """The trainer converts the model to channels_last after the EMA copy exists: strides then differ."""
    torch.manual_seed(9)
    model = nn.Conv2d(3, 4, 3)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    old = ema.module.weight.detach().clone()
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.weight.add_(torch.randn_like(model.weight))
    assert not ema.module.weight.is_contiguous(memory_format=torch.channels_last)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * old + 0.5 * model.weight.detach())


def test_ema_rejects_other_architecture() -> None:
    ema = ModelEMA(nn.Linear(2, 1))
    with pytest.raises(KeyError):
        ema.update(nn.Sequential(nn.Linear(2, 1)))


# ---------------------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_and_ema_on_cuda() -> None:
    dev = torch.device("cuda")
    s = _to_nchw(_S_PIX).to(dev).requires_grad_(True)
    t = _to_nchw(_T_PIX).to(dev)
    cpu = kd_kl_loss(_to_nchw(_S_PIX), teacher_probs(_to_nchw(_T_PIX), 2.0), 2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = kd_kl_loss(s, teacher_probs(t, 2.0), 2.0) + cwd_loss(s, t, 2.0) + feature_mse_loss(s, t)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    torch.testing.assert_close(kd_kl_loss(s, teacher_probs(t, 2.0), 2.0).cpu(), cpu, rtol=1e-5, atol=1e-6)
    model = _linear([1.0, 2.0], 0.5).to(dev)
    ema = ModelEMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.bias.fill_(1.5)
    ema.update(model)
    assert ema.module.bias.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)


def test_ema_unwraps_ddp(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    except Exception as exc:  # pragma: no cover - environment without gloo
        pytest.skip(f"cannot start a gloo process group: {exc}")
    try:
        model = _linear([1.0, 2.0], 0.5)
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = ModelEMA(ddp, decay=0.9, warmup=False)
        assert isinstance(ema.module, nn.Linear)  # the copy is of the inner module, keys without "module."
        with torch.no_grad():
            model.bias.fill_(1.5)
        ema.update(ddp)
        assert ema.module.bias.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    finally:
        dist.destroy_process_group()
