"""DIST, logit standardisation and MGD: hand-computed values (math arithmetic), the zero and invariance
properties each method has, finite gradients at T=0.5 and with 0 ROIs, the config rules, and a tiny
distillation run with all three that resumes bit-identical (MGD generator and masks included)."""

from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch

from kdlab.cli.common import run_cli
from kdlab.cli.train import main as train_main
from kdlab.config.loader import resolve_config
from kdlab.distill.dist import dist_loss, pearson
from kdlab.distill.features import FeatureDistiller
from kdlab.distill.kd_segmentation import SegmentationKDTask
from kdlab.distill.logit_standardization import standardize_logits
from kdlab.distill.losses import kd_kl_loss, teacher_probs
from kdlab.distill.mgd import MGDGenerator, mask_rng, random_keep_mask
from kdlab.errors import ConfigError
from tests.helpers import assert_same_weights, copy_teacher_workspace, error_lines, tiny_args

# ---------------------------------------------------------------------------------------------- hand helpers


def _softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in xs]
    return [e / sum(exps) for e in exps]


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


# N=1, C=3, H=1, W=3: the class logits at each of the 3 pixels.
_S_PIX = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-0.5, 0.3, 1.2]]
_T_PIX = [[0.0, 2.0, 1.0], [1.0, -1.0, 0.5], [0.2, 0.1, 2.0]]


def _to_nchw(pixels: list[list[float]]) -> torch.Tensor:
    """[[c0, c1, c2] per pixel] -> [1, C, 1, P]."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, len(pixels))


def _hand_dist(s_pix, t_pix, temperature, beta, gamma) -> float:
    p_s = [_softmax(x, temperature) for x in s_pix]  # per pixel, over classes
    p_t = [_softmax(x, temperature) for x in t_pix]
    inter = sum(_pearson(a, b) for a, b in zip(p_s, p_t, strict=True)) / len(p_s)
    classes = len(p_s[0])
    intra = sum(_pearson([p[c] for p in p_s], [p[c] for p in p_t]) for c in range(classes)) / classes
    return beta * (1 - inter) + gamma * (1 - intra)


# ---------------------------------------------------------------------------------------------- DIST


@pytest.mark.parametrize(
    ("temperature", "beta", "gamma"), [(1.0, 1.0, 1.0), (2.0, 2.0, 0.5), (0.5, 0.0, 1.0)]
)
def test_dist_hand_value(temperature, beta, gamma):
    loss = dist_loss(_to_nchw(_S_PIX), _to_nchw(_T_PIX), temperature, beta, gamma)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_hand_dist(_S_PIX, _T_PIX, temperature, beta, gamma), rel=1e-5)


def test_dist_means_over_rois_and_pixels():
    """Two ROIs: the mean of their losses (the normalisers are N·P and N·C, not sums)."""
    s2 = [[-1.0, 0.0, 0.4], [0.0, 1.0, -2.0], [0.7, 0.2, 0.1]]
    t2 = [[0.3, 0.3, -0.5], [2.0, 0.0, 1.0], [-1.0, 0.5, 0.0]]
    s = torch.cat([_to_nchw(_S_PIX), _to_nchw(s2)])
    t = torch.cat([_to_nchw(_T_PIX), _to_nchw(t2)])
    expected = (_hand_dist(_S_PIX, _T_PIX, 1.0, 1.0, 1.0) + _hand_dist(s2, t2, 1.0, 1.0, 1.0)) / 2
    assert dist_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_dist_zero_when_equal_and_shift_invariant(temperature):
    torch.manual_seed(0)
    z = torch.randn(3, 3, 8, 6)
    assert abs(dist_loss(z, z, temperature).item()) < 1e-5
    # a logit shift is no change of the probabilities; a different teacher is a positive loss
    assert abs(dist_loss(z + 5.0, z, temperature).item()) < 1e-5
    assert dist_loss(torch.randn(3, 3, 8, 6), z, temperature).item() > 0.1


def test_pearson_is_zero_on_a_constant_side_with_finite_gradient():
    a = torch.ones(4, requires_grad=True)
    r = pearson(a, torch.tensor([1.0, 2.0, 3.0, 4.0]), dim=0)
    assert r.item() == 0.0
    r.backward()
    assert torch.isfinite(a.grad).all()


def test_dist_gradients_finite_at_low_temperature_and_with_no_rois():
    torch.manual_seed(1)
    s = (torch.randn(2, 3, 8, 6) * 6).requires_grad_()
    loss = dist_loss(s, torch.randn(2, 3, 8, 6) * 6, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    empty = torch.randn(0, 3, 8, 6, requires_grad=True)
    loss = dist_loss(empty, torch.randn(0, 3, 8, 6), 0.5)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert empty.grad is not None


def test_dist_rejects_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        dist_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), 1.0)
    with pytest.raises(ValueError, match="mask logits"):
        dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), 0.0)


# ---------------------------------------------------------------------------------------------- logit standardisation


def test_standardize_logits_hand_value_over_the_class_dim():
    # pixel 0: (1, 2, 3): mean 2, population std sqrt(2/3)
    z = _to_nchw([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    out = standardize_logits(z)
    k = 1 / math.sqrt(2 / 3)
    assert out[0, :, 0, 0].tolist() == pytest.approx([-k, 0.0, k], rel=1e-5)
    # pixel 1: (0, 0, 6): mean 2, std sqrt(8)
    s8 = math.sqrt(8)
    assert out[0, :, 0, 1].tolist() == pytest.approx([-2 / s8, -2 / s8, 4 / s8], rel=1e-5)
    two = standardize_logits(torch.tensor([[0.3, 2.0]]))  # 2 classes: always -1, +1
    assert two.tolist()[0] == pytest.approx([-1.0, 1.0], rel=1e-5)
    tie = torch.full((1, 3, 2, 2), 0.7, requires_grad=True)  # all classes equal: 0, and a finite gradient
    out = standardize_logits(tie)
    assert out.abs().max().item() == 0.0
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(tie.grad).all()


def _kd_task(**dist):
    cfg = resolve_config("quickstart_distill", [f"distillation.{k}={v}" for k, v in dist.items()])
    cfg.distillation.grad_share_every = 0
    return SegmentationKDTask(cfg.distillation, cfg.training.loss, [], cached=True)


def _heads(seed: int, n: int = 3, h: int = 4, w: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"logits": torch.randn(n, 3, h, w, generator=g) * 3,
            "bg_fg_logits": torch.randn(n, 2, h, w, generator=g) * 3,
            "target_logits": torch.randn(n, 2, h, w, generator=g) * 3}  # fmt: skip


def test_logit_standardize_switch_standardises_each_kl_over_classes_not_width():
    task = _kd_task(logit_standardize="true")
    student, teacher = _heads(1), _heads(2)
    terms = task.distill_terms(student, [(teacher, 1.0)], {}, 4.0)
    value = terms["distill_final"][0]
    s, t = student["logits"], teacher["logits"]
    by_class = kd_kl_loss(standardize_logits(s), teacher_probs(standardize_logits(t), 4.0), 4.0)
    by_width = kd_kl_loss(
        standardize_logits(s, dim=-1), teacher_probs(standardize_logits(t, dim=-1), 4.0), 4.0
    )
    raw = kd_kl_loss(s, teacher_probs(t, 4.0), 4.0)
    assert value.item() == pytest.approx(by_class.item(), rel=1e-6)
    assert abs(value.item() - by_width.item()) > 1e-3  # the wrong axis is another loss
    assert abs(value.item() - raw.item()) > 1e-3  # the switch does something
    # the 2-class heads keep the plain KL (a standardised pair is always -1, +1)
    for name, key in (("distill_bg_fg", "bg_fg_logits"), ("distill_target", "target_logits")):
        plain = kd_kl_loss(student[key], teacher_probs(teacher[key], 4.0), 4.0)
        assert terms[name][0].item() == pytest.approx(plain.item(), rel=1e-6), name
    off = _kd_task().distill_terms(student, [(teacher, 1.0)], {}, 4.0)
    assert off["distill_final"][0].item() == pytest.approx(raw.item(), rel=1e-6)


def test_logit_standardized_kl_ignores_the_teachers_scale_and_is_zero_when_equal():
    task = _kd_task(logit_standardize="true", bg_fg_weight=0, target_weight=0)
    student = _heads(3)
    teacher_scaled = {k: v * 7.0 + 2.0 for k, v in student.items()}  # sharper and shifted, same shape
    value = task.distill_terms(student, [(teacher_scaled, 1.0)], {}, 2.0)["distill_final"][0]
    assert abs(value.item()) < 1e-5
    plain = _kd_task(bg_fg_weight=0, target_weight=0).distill_terms(student, [(teacher_scaled, 1.0)], {}, 2.0)
    assert plain["distill_final"][0].item() > 0.1


def test_logit_standardized_kl_gradients_finite_at_low_temperature_and_with_no_rois():
    task = _kd_task(logit_standardize="true")
    for n in (3, 0):
        student = {k: v.requires_grad_() for k, v in _heads(4, n=n).items()}
        terms = task.distill_terms(student, [(_heads(5, n=n), 1.0)], {}, 0.5)
        total = sum(w * v for v, w in terms.values())
        total.backward()
        assert torch.isfinite(total)
        for v in student.values():
            assert v.grad is not None and torch.isfinite(v.grad).all()
        if n == 0:
            assert total.item() == 0.0


def test_dist_term_in_the_task_and_the_cache_heads():
    from kdlab.distill.kd_segmentation import required_cache_heads

    task = _kd_task(dist_weight=2.0, final_weight=0, bg_fg_weight=0, target_weight=0)
    student, teacher = _heads(6), _heads(7)
    terms = task.distill_terms(student, [(teacher, 1.0)], {}, 4.0)
    assert set(terms) == {"distill_dist"}
    value, weight = terms["distill_dist"]
    assert weight == 2.0 and value.item() == pytest.approx(
        dist_loss(student["logits"], teacher["logits"], 1.0).item()
    )
    assert required_cache_heads(task.dcfg) == ["logits"]


# ---------------------------------------------------------------------------------------------- MGD


def test_mask_is_seeded_by_seed_step_and_stream_only():
    feature = torch.zeros(4, 8, 50, 50)
    a = random_keep_mask(feature, 0.65, mask_rng(7, 10, 0, feature.device))
    torch.manual_seed(123)  # the global RNG plays no part
    b = random_keep_mask(feature, 0.65, mask_rng(7, 10, 0, feature.device))
    assert a.shape == (4, 1, 50, 50) and torch.equal(a, b)
    for other in (mask_rng(7, 11, 0, feature.device), mask_rng(8, 10, 0, feature.device),
                  mask_rng(7, 10, 1, feature.device)):  # fmt: skip
        assert not torch.equal(a, random_keep_mask(feature, 0.65, other))
    assert 1 - a.mean().item() == pytest.approx(0.65, abs=0.02)  # share of masked positions
    assert random_keep_mask(feature, 0.0, mask_rng(0, 0, 0, feature.device)).min().item() == 1.0
    with pytest.raises(ValueError):
        random_keep_mask(feature, 1.0, mask_rng(0, 0, 0, feature.device))


class _Pair(torch.nn.Module):
    """A 'model' whose only layer is a feature; used as student (4 channels) and teacher (6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.feat = torch.nn.Conv2d(3, channels, 1)

    def forward(self, x, rois=None):
        return self.feat(x)


def _mgd_distiller(ratio: float = 0.5, seed: int = 3):
    torch.manual_seed(0)
    student, teacher = _Pair(4), _Pair(6)
    d = FeatureDistiller(student, teacher, [("feat", "feat", 2.0)], mgd={0: ratio}, seed=seed)
    d.infer_channels(student, teacher, torch.randn(1, 3, 5, 5), torch.zeros(0, 5))
    return student, teacher, d


def test_mgd_hand_value_with_a_constant_generator():
    """Generator conv1 = 0 -> ReLU(0) = 0 -> conv2 gives its bias b: the loss is mean((b - t)^2)·weight."""
    student, teacher, d = _mgd_distiller()
    gen = d.generators["0"].block
    for conv in (gen[0], gen[2]):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        gen[2].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, 0.0]))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        t = teacher(x)
    student(x)
    total, parts = d.loss()
    expected = ((gen[2].bias.view(1, 6, 1, 1) - t) ** 2).mean()
    assert set(parts) == {"distill_mgd_0"}
    assert parts["distill_mgd_0"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.item() == pytest.approx(2.0 * expected.item(), rel=1e-6)


def test_mgd_loss_equals_masked_adapted_generated_mse():
    student, teacher, d = _mgd_distiller(ratio=0.65, seed=11)
    d.step = 42
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    d.adapt()  # as inside the trained module's forward
    total, parts = d.loss()
    adapted = d.adapters[0](s, t.shape[-2:])
    keep = random_keep_mask(adapted, 0.65, mask_rng(11, 42, 0, adapted.device))
    expected = ((d.generators["0"](adapted * keep) - t) ** 2).mean()
    assert 0 < keep.mean().item() < 1
    assert parts["distill_mgd_0"].item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert all(p.grad is not None for p in d.generators.parameters())  # the generator trains
    assert student.feat.weight.grad is not None


def test_mgd_with_no_rois_is_a_connected_zero():
    student, teacher, d = _mgd_distiller()
    x = torch.randn(0, 3, 5, 5)
    with torch.no_grad():
        teacher(x)
    s = student(x)
    total, _ = d.loss()
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert isinstance(MGDGenerator(6), torch.nn.Module) and s.shape[0] == 0


# ---------------------------------------------------------------------------------------------- config rules


@pytest.mark.parametrize(
    ("config", "item", "message"),
    [
        ("digits_student_distill", "distillation.dist_weight=1.0", "dist_weight > 0 needs spatial logits"),
        (
            "sequence_student_distill",
            "distillation.logit_standardize=true",
            "not implemented for task=sequence",
        ),
        ("sequence_student_distill", "distillation.dist_weight=1.0", "not implemented for task=sequence"),
    ],
)
def test_methods_a_task_cannot_use_are_config_errors(config, item, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(config, [item])


def test_bad_mgd_mask_ratio_is_one_error_line(tmp_path, capsys):
    pairs = '[{"student": "head.shared", "teacher": "head.shared", "method": "mgd", "mask_ratio": 1.0}]'
    code = run_cli(
        train_main, tiny_args(tmp_path, f"distillation.features={pairs}", config="quickstart_distill")
    )
    assert code == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "mask_ratio" in errors[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- end to end


def test_dist_logit_standardisation_and_mgd_train_and_resume_bit_identical(trained_teacher_root, tmp_path):
    """All three methods on in one tiny run: their terms are logged, the MGD generator trains and is saved in
    last.pth but not in best_model.pth, and a run resumed after epoch 1 equals the uninterrupted one."""
    _, teacher = copy_teacher_workspace(trained_teacher_root, tmp_path)
    pairs = '[{"student": "unet.decoder.blocks.2", "teacher": "unet.decoder.blocks.2", "method": "mgd"}]'
    args = tiny_args(
        tmp_path, f"distillation.features={pairs}", "distillation.dist_weight=1.0",
        "distillation.logit_standardize=true", "distillation.grad_share_every=0", epochs=2, config="quickstart_distill",
    ) + ["--teacher_checkpoint", str(teacher)]  # fmt: skip
    assert run_cli(train_main, args) == 0
    run = tmp_path / "runs" / "quickstart_distill"
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    for column in ("train_distill_dist", "train_distill_mgd_0", "train_distill_final"):
        assert float(rows[-1][column]) > 0, column
    ckpt = run / "checkpoints"
    last = torch.load(ckpt / "last.pth", map_location="cpu", weights_only=True)
    first = torch.load(ckpt / "checkpoint_epoch_0001.pth", map_location="cpu", weights_only=True)
    generator = [k for k in last["task_state_dict"] if k.startswith("0.generators.")]
    assert generator, sorted(last["task_state_dict"])
    assert any(not torch.equal(last["task_state_dict"][k], first["task_state_dict"][k]) for k in generator)
    best = torch.load(ckpt / "best_model.pth", map_location="cpu", weights_only=True)
    assert "task_state_dict" not in best and not any("generators" in k for k in best["model_state_dict"])

    copy = tmp_path / "resumed" / "quickstart_distill"
    shutil.copytree(run, copy)
    shutil.copy(copy / "checkpoints" / "checkpoint_epoch_0001.pth", copy / "checkpoints" / "last.pth")
    assert run_cli(train_main, ["--resume", str(copy / "checkpoints" / "last.pth"), "--no_progress"]) == 0
    assert_same_weights(ckpt / "last.pth", copy / "checkpoints" / "last.pth")
    resumed = torch.load(copy / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    for key, value in last["task_state_dict"].items():
        assert torch.equal(value, resumed["task_state_dict"][key]), key


def test_logit_standardize_applies_to_classifier_kl():
    from kdlab.distill.kd_classification import ClassificationKDTask

    cfg = resolve_config("digits_student_distill", ["distillation.logit_standardize=true"])
    task = ClassificationKDTask(cfg.distillation, cfg.training.loss, [], cached=True)
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g) * 4
    value = task.distill_terms(s, [(t, 1.0)], {}, 2.0)["distill_kl"][0]
    expected = kd_kl_loss(standardize_logits(s), teacher_probs(standardize_logits(t), 2.0), 2.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(value.item() - kd_kl_loss(s, teacher_probs(t, 2.0), 2.0).item()) > 1e-3


def test_methods_suite_students_share_the_baselines_schedule_and_initial_weights():
    from kdlab.experiments.plan import expand_configs

    names = expand_configs(["quickstart_methods"])
    assert names[:2] == ["quickstart_teacher", "quickstart_baseline"]
    baseline = resolve_config("quickstart_baseline")
    students = [resolve_config(n) for n in names[2:]]
    assert len(students) == 6
    for cfg in students:
        assert cfg.distillation.enabled and cfg.distillation.teacher_experiment == "quickstart_teacher"
        assert cfg.training == baseline.training, cfg.name  # schedule, seed (so initial weights), loss
        assert cfg.model == baseline.model and cfg.data == baseline.data, cfg.name
        assert cfg.distillation.alpha == 0.7, cfg.name
    methods = {(c.distillation.final_weight > 0, c.distillation.logit_standardize, c.distillation.dist_weight > 0,
                c.distillation.cwd_weight > 0, any(f.method == "mgd" for f in c.distillation.features))
               for c in students}  # fmt: skip
    assert len(methods) == 6  # six different methods
