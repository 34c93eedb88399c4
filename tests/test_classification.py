"""Classification pieces against hand-computed values: KL+CE loss, ECE/top-k, input adapter, data readers,
config validation, teacher task checks, feature matching on a timm student."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdlab.checkpoints import save_checkpoint_atomic
from kdlab.config.loader import resolve_config, validate_config
from kdlab.config.schema import ExperimentConfig, ModelConfig
from kdlab.data.classification import (
    ClassificationDataset,
    collate_classification,
    load_image_sets,
    read_image_folder,
    stratified_split,
)
from kdlab.distill.losses import kd_ce_loss, teacher_probs
from kdlab.distill.teacher import LoadedTeacher
from kdlab.errors import CheckpointError, ConfigError, DataError
from kdlab.evaluate.classification_metrics import (
    ClassificationMetrics,
    expected_calibration_error,
    topk_correct,
)
from kdlab.models.classifier import TimmClassifier
from kdlab.tasks import check_teacher_fits, load_teacher

E = math.e


def cls_config(**model: object) -> ExperimentConfig:
    return validate_config({"task": "classification", "model": {"name": "test_resnet", **model}})


# --------------------------------------------------------------------------------------------- loss
def test_kd_ce_loss_matches_a_hand_computed_value() -> None:
    # T = 2: s/T = [1, 0], t/T = [0, 1], so q = [e, 1]/(e+1), p = [1, e]/(e+1) and
    # KL(p || q) = (p1 - p0) * ln(e) = (e - 1)/(e + 1); CE(s=[2,0], y=0) = ln(1 + e^-2).
    s = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    y = torch.tensor([0, 0])
    kl = (E - 1) / (E + 1)
    ce = math.log(1 + math.exp(-2))
    out = kd_ce_loss(s, teacher_probs(t, 2.0), y, temperature=2.0, alpha=0.25)
    assert out["distill_kl"].item() == pytest.approx(4 * kl, rel=1e-6)  # T² · KL, batch mean
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.25 * 4 * kl + 0.75 * ce, rel=1e-6)


def test_kd_ce_loss_alpha_zero_is_cross_entropy_and_label_smoothing_follows_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    y = torch.tensor([0, 3, 6, 2, 2])
    out = kd_ce_loss(s, teacher_probs(t, 4.0), y, 4.0, alpha=0.0)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    # Smoothing eps: (1 - eps) * CE + eps * mean over classes of -log p; [2, 0] with y = 0 by hand.
    two = kd_ce_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([0]), 1.0, 0.0, 0.1)
    nll = [math.log(1 + math.exp(-2)), 2 + math.log(1 + math.exp(-2))]
    assert two["ce"].item() == pytest.approx(0.9 * nll[0] + 0.1 * sum(nll) / 2, rel=1e-6)


def test_kd_term_scales_with_t_squared_for_fixed_distributions() -> None:
    # Same p and q at T = 1 and T = 3 (logits scaled by T): the KD term differs exactly by T² = 9.
    s, t, y = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([2])
    one = kd_ce_loss(s, teacher_probs(t, 1.0), y, 1.0, 1.0)["loss"]
    three = kd_ce_loss(3 * s, teacher_probs(3 * t, 3.0), y, 3.0, 1.0)["loss"]
    assert three.item() == pytest.approx(9 * one.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------- metrics
def test_topk_correct_by_hand() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.4], [0.9, 0.0, 0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([2, 1])
    assert topk_correct(logits, labels, 1).tolist() == [False, False]
    assert topk_correct(logits, labels, 4).tolist() == [True, False]
    assert topk_correct(logits, labels, 6).tolist() == [True, True]


def test_ece_by_hand() -> None:
    # 15 bins of width 1/15: 0.95 -> bin 14, 0.9 -> 13, 0.62 -> 9, 0.55 -> 8, one sample each:
    # ECE = (|1-0.95| + |0-0.9| + |1-0.62| + |1-0.55|) / 4 = 1.78 / 4.
    conf = torch.tensor([0.95, 0.9, 0.62, 0.55])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.445)
    # Two samples in one bin (0.7 and 0.72 -> bin 10): |mean acc 0.5 - mean conf 0.71| = 0.21.
    assert expected_calibration_error(
        torch.tensor([0.7, 0.72]), torch.tensor([True, False])
    ) == pytest.approx(0.21)
    assert math.isnan(expected_calibration_error(torch.tensor([]), torch.tensor([])))


def test_classification_metrics_accumulate_and_top5_only_above_five_classes() -> None:
    m = ClassificationMetrics(num_classes=3)
    m.update(torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), torch.tensor([0, 2]))
    out = m.compute()
    assert out["top1"] == pytest.approx(0.5) and "top5" not in out
    assert out["loss"] == pytest.approx(
        F.cross_entropy(torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]]), torch.tensor([0, 2])).item(),
        rel=1e-6,
    )
    m10 = ClassificationMetrics(num_classes=10)
    m10.update(torch.arange(10.0).repeat(2, 1), torch.tensor([9, 0]))
    assert m10.compute()["top5"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------- adapter
def test_classifier_normalises_inside_with_its_own_mean_and_std() -> None:
    torch.manual_seed(0)
    model = TimmClassifier(
        cls_config(input_mean=(0.1, 0.2, 0.3), input_std=(0.5, 0.25, 2.0), num_classes=4).model
    ).eval()
    x = torch.rand(2, 3, 16, 16)
    manual = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        assert torch.allclose(model(x), model.net(manual), atol=1e-6)


def test_teacher_input_adapter_feeds_the_teacher_its_own_normalisation(tmp_path: Path) -> None:
    cfg = cls_config(num_classes=4)
    model = TimmClassifier(cfg.model).eval()
    path = tmp_path / "teacher.pth"
    save_checkpoint_atomic(
        {"model_state_dict": model.state_dict(), "config": cfg.model_dump(mode="json")}, path
    )
    loaded = load_teacher(path, input_mean=(0.5, 0.5, 0.5), input_std=(0.25, 0.25, 0.25))
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = model.net((x - 0.5) / 0.25)
    assert torch.allclose(loaded.teacher(x), expected, atol=1e-5)
    # Without the override the teacher keeps the normalisation recorded in its config (ImageNet's).
    default = load_teacher(path)
    mean = torch.tensor(cfg.model.input_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.input_std).view(1, 3, 1, 1)
    assert torch.allclose(default.teacher(x), model.net((x - mean) / std), atol=1e-5)


# --------------------------------------------------------------------------------------------- data
def _png(path: Path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_reader_sorts_classes_and_decodes_everything(tmp_path: Path) -> None:
    for cls, value in (("zebra", 200), ("ant", 10)):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    data = read_image_folder(tmp_path, 8)
    assert data.classes == ["ant", "zebra"]
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(data.images[0].float().mean()) == 10 and int(data.images[-1].float().mean()) == 200


@pytest.mark.parametrize("problem", ["missing", "no_classes", "empty_class", "truncated"])
def test_image_folder_problems_are_one_line_data_errors(tmp_path: Path, problem: str) -> None:
    root = tmp_path / "data"
    if problem != "missing":
        root.mkdir()
    if problem == "empty_class":
        _png(root / "a" / "0.png", 1)
        (root / "b").mkdir()
    if problem == "truncated":
        _png(root / "a" / "0.png", 1, size=64)
        bad = root / "a" / "1.png"
        _png(bad, 2, size=64)
        bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError) as info:
        read_image_folder(root, 8)
    message = str(info.value)
    assert "\n" not in message
    expected = {"missing": "does not exist", "no_classes": "no class subdirectories", "empty_class": "holds no images",
                "truncated": "could not be decoded"}[problem]  # fmt: skip
    assert expected in message


def test_image_folder_with_train_and_val_dirs_is_used_as_given(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", 5)
    cfg = resolve_config("digits_teacher", ["data.classification.source=image_folder",
                                            f"data.classification.root={tmp_path}", "model.num_classes=2"])  # fmt: skip
    train, val = load_image_sets(cfg.data.classification)
    assert len(train.labels) == 8 and len(val.labels) == 4 and train.classes == ["cat", "dog"]


def test_digits_split_is_deterministic_stratified_and_disjoint() -> None:
    cfg = resolve_config("digits_teacher", ["data.classification.image_size=16"]).data.classification
    train, val = load_image_sets(cfg)
    again, _ = load_image_sets(cfg)
    assert len(train.labels) + len(val.labels) == 1797
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert train.images.shape[1:] == (3, 16, 16) and train.images.dtype == torch.uint8
    val_counts = torch.bincount(val.labels, minlength=10).float()
    assert (val_counts / torch.bincount(torch.cat([train.labels, val.labels])).float()).sub(
        0.25
    ).abs().max() < 0.01
    tr, va = stratified_split(np.repeat(np.arange(3), 10), 0.2, seed=7)
    assert set(tr) & set(va) == set() and len(va) == 6


def test_augmentation_depends_only_on_the_sample_seed() -> None:
    cfg = resolve_config("digits_teacher", ["data.classification.image_size=16"]).data.classification
    train, _ = load_image_sets(cfg)
    ds = ClassificationDataset(train, augment=True, random_shift=3, brightness=0.3)
    a, b, c = ds[(5, 123)], ds[(5, 123)], ds[(5, 124)]
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])
    batch = collate_classification([a, c])
    assert batch["images"].shape == (2, 3, 16, 16) and batch["labels"].dtype == torch.int64


# --------------------------------------------------------------------------------------------- config
def test_classification_model_name_typo_names_the_key_and_close_names() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("digits_teacher", ["model.name=resnet1"])
    assert "model.name" in str(info.value) and "'resnet18'" in str(info.value)


def test_segmentation_keeps_roi_unet_and_unknown_keys_are_still_rejected() -> None:
    with pytest.raises(ConfigError, match="task=classification"):
        resolve_config("quickstart_teacher", ["model.name=resnet18"])
    with pytest.raises(ConfigError, match="data.classification.source"):
        resolve_config("digits_teacher", ["data.classification.sorce=digits"])
    assert resolve_config("quickstart_teacher").model.name == "roi_unet"
    assert ModelConfig().name == "roi_unet"


def test_wrong_class_count_is_a_config_error() -> None:
    from kdlab.data.classification import build_classification_datasets

    with pytest.raises(ConfigError, match="model.num_classes=5"):
        build_classification_datasets(resolve_config("digits_teacher", ["model.num_classes=5"]))


def test_a_teacher_of_another_task_is_refused() -> None:
    student = resolve_config("digits_student_distill")
    seg_teacher = LoadedTeacher(teacher=None, path="seg.pth", sha256="", config={"task": "segmentation"})  # type: ignore[arg-type]
    with pytest.raises(
        CheckpointError, match="seg.pth is a segmentation model but this experiment's task is classification"
    ):
        check_teacher_fits(student, seg_teacher)
    old_seg = LoadedTeacher(teacher=None, path="old.pth", sha256="", config={"model": {}})  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="segmentation model"):
        check_teacher_fits(student, old_seg)
    wrong_classes = LoadedTeacher(None, "c.pth", "", {"task": "classification", "model": {"num_classes": 3}})  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="3 classes"):
        check_teacher_fits(student, wrong_classes)


# --------------------------------------------------------------------------------------------- features
def test_feature_pair_on_a_timm_student_trains_student_and_adapter() -> None:
    from kdlab.distill.features import FeatureDistiller
    from kdlab.distill.kd_classification import ClassificationKDTask
    from kdlab.distill.teacher import FrozenTeacher

    torch.manual_seed(0)
    cfg = resolve_config(
        "digits_student_distill",
        ["model.name=test_efficientnet", "distillation.features=[{\"student\": \"net.blocks.1\", \"teacher\": \"net.layer2\"}]"],
    )  # fmt: skip
    student = TimmClassifier(cfg.model)
    teacher = FrozenTeacher(TimmClassifier(cls_config().model))
    distiller = FeatureDistiller(
        student, teacher.model, [(f.student, f.teacher, f.weight) for f in cfg.distillation.features]
    )
    distiller.infer_channels(student, teacher.model, torch.rand(2, 3, 32, 32))
    task = ClassificationKDTask(cfg.distillation, cfg.training.loss, [(teacher, 1.0)], distiller)
    params = list(student.parameters()) + list(distiller.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    before_student = [p.detach().clone() for p in student.parameters()]
    before_adapter = [p.detach().clone() for p in distiller.parameters()]
    batch = {"images": torch.rand(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    losses = task(student, batch)
    assert {"distill_kl", "ce", "distill_feat_0", "distill_features", "loss"} <= set(losses)
    assert losses["distill_feat_0"].item() > 0
    losses["loss"].backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_adapter, distiller.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_student, student.parameters(), strict=True))
    assert all(p.grad is None for p in teacher.parameters())
