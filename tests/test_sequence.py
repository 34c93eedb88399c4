"""Sequence task: synthetic generator, HDF5 reader, GRU model, trajectory KD, dataset extras, tiny suite."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.cli.common import run_cli
from kdlab.cli.experiments import main as experiments_main
from kdlab.cli.train import main as train_main
from kdlab.config.loader import validate_config
from kdlab.config.schema import DistillationConfig, LossConfig, ModelConfig, SequenceDataConfig
from kdlab.data.sequence import (
    SequenceDataset,
    SequenceSplit,
    build_sequence_loader,
    ensure_synthetic_sequences,
    generate_synthetic_sequences,
    read_sequence_hdf5,
    synthetic_parameters,
    write_sequence_hdf5,
)
from kdlab.distill.kd_sequence import SequenceKDTask
from kdlab.distill.losses import trajectory_kd_loss, trajectory_mse_loss
from kdlab.distill.teacher import FrozenTeacher
from kdlab.engine.batches import batch_to_device
from kdlab.errors import CheckpointError, ConfigError, DataError
from kdlab.evaluate.macs import compute_gru_macs
from kdlab.models.sequence import GRUSequenceModel
from kdlab.tasks import get_task
from kdlab.tasks.sequence import SequenceTask
from tests.helpers import error_lines

SMALL = {"train_samples": 24, "val_samples": 12, "test_samples": 6, "seq_len": 10, "input_dim": 6}


def small_params(**change: object) -> dict:
    return synthetic_parameters(SequenceDataConfig(**{**SMALL, **change}), num_classes=4)


def gru(hidden: int = 8, layers: int = 2, classes: int = 4, input_dim: int = 6) -> GRUSequenceModel:
    cfg = ModelConfig(name="gru", hidden_size=hidden, num_layers=layers, num_classes=classes)
    return GRUSequenceModel(cfg, input_dim)


# ------------------------------------------------------------------------------------------ generator
def test_generator_is_deterministic_in_its_parameters():
    a, b = generate_synthetic_sequences(small_params()), generate_synthetic_sequences(small_params())
    assert set(a) == {"train", "val", "test"}
    assert a["train"].data.shape == (24, 10, 6) and a["train"].data.dtype == np.float32
    assert a["train"].labels.dtype == np.int64 and set(a["train"].labels.tolist()) == {0, 1, 2, 3}
    for name in a:
        np.testing.assert_array_equal(a[name].data, b[name].data)
        np.testing.assert_array_equal(a[name].labels, b[name].labels)
    other = generate_synthetic_sequences(small_params(seed=1))
    assert not np.array_equal(a["train"].data, other["train"].data)


def test_generated_file_is_reused_and_other_parameters_are_an_error(tmp_path):
    path = tmp_path / "seq.h5"
    cfg = SequenceDataConfig(**SMALL, path=str(path))
    ensure_synthetic_sequences(cfg, 4)
    mtime = path.stat().st_mtime_ns
    ensure_synthetic_sequences(cfg, 4)  # same parameters: reused, not rewritten
    assert path.stat().st_mtime_ns == mtime
    splits = read_sequence_hdf5(path, num_classes=4, input_dim=6)
    expected = generate_synthetic_sequences(small_params())
    np.testing.assert_array_equal(splits["val"].data, expected["val"].data)
    with pytest.raises(DataError, match=r"train_samples=24 \(config 30\).*delete it"):
        ensure_synthetic_sequences(cfg.model_copy(update={"train_samples": 30}), 4)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file


# ------------------------------------------------------------------------------------------- reader
def _write(path: Path, groups: dict[str, dict[str, np.ndarray]]) -> Path:
    with h5py.File(path, "w") as fh:
        for name, datasets in groups.items():
            group = fh.create_group(name)
            for key, value in datasets.items():
                group.create_dataset(key, data=value)
    return path


def _split(n: int = 5, t: int = 4, d: int = 3) -> dict[str, np.ndarray]:
    return {"data": np.zeros((n, t, d), np.float32), "labels": np.arange(n, dtype=np.int64) % 2}


@pytest.mark.parametrize(
    ("problem", "needle"),
    [
        ("missing_file", "does not exist"),
        ("not_hdf5", "is not an HDF5 file"),
        ("no_val", "has no 'val' group"),
        ("no_labels", "/train has no 'labels' dataset"),
        ("ndim", "/train/data must be 3-D"),
        ("n_mismatch", "data has N=5 sequences but labels has 4"),
        ("label_range", "label 7 outside [0, 2)"),
        ("d_in_between_splits", "different D_in"),
        ("non_finite", "2 non-finite values"),
        ("d_in_config", "data.sequence.input_dim=3"),
    ],
)
def test_hdf5_reader_names_each_problem(tmp_path, problem, needle):
    path = tmp_path / "data.h5"
    train, val = _split(), _split()
    if problem == "not_hdf5":
        path.write_text("not hdf5")
    elif problem != "missing_file":
        if problem == "no_labels":
            del train["labels"]
        if problem == "ndim":
            train["data"] = np.zeros((5, 4), np.float32)
        if problem == "n_mismatch":
            train["labels"] = train["labels"][:4]
        if problem == "label_range":
            val["labels"][2] = 7
        if problem == "d_in_between_splits":
            val["data"] = np.zeros((5, 4, 2), np.float32)
        if problem == "non_finite":
            train["data"][0, 0, 0], train["data"][1, 2, 1] = np.nan, np.inf
        _write(path, {"train": train} if problem == "no_val" else {"train": train, "val": val})
    input_dim = 4 if problem == "d_in_config" else 3
    with pytest.raises(DataError) as info:
        read_sequence_hdf5(path, num_classes=2, input_dim=input_dim)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_hdf5_reader_reads_a_valid_file_with_test_split(tmp_path):
    splits = generate_synthetic_sequences(small_params())
    path = write_sequence_hdf5(tmp_path / "ok.h5", splits)
    back = read_sequence_hdf5(path, num_classes=4, input_dim=6)
    assert set(back) == {"train", "val", "test"}
    np.testing.assert_array_equal(back["test"].labels, splits["test"].labels)


# --------------------------------------------------------------------------------------------- model
def test_gru_outputs_and_trajectory_start_at_the_learnable_initial_state():
    torch.manual_seed(0)
    model = gru()
    with torch.no_grad():
        model.h0.normal_()  # a non-zero h_0: t = 0 must read it for every sample
    inputs = torch.randn(3, 10, 6)
    out = model(inputs)
    assert out["logits"].shape == (3, 4) and out["trajectory"].shape == (3, 11, 4)
    expected_t0 = model.readout(model.h0[-1, 0])
    for b in range(3):
        torch.testing.assert_close(out["trajectory"][b, 0], expected_t0)
    torch.testing.assert_close(out["trajectory"][:, -1], out["logits"])
    states, _ = model.gru(inputs, model.h0.expand(-1, 3, -1).contiguous())
    torch.testing.assert_close(out["trajectory"][:, 1:], model.readout(states))
    out["logits"].sum().backward()
    assert model.h0.grad is not None and model.h0.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------------- losses
def test_trajectory_mse_against_a_hand_value():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])  # [B=1, T+1=3, C=2]
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    # squared differences 1, 4, 4, 9, 0, 4 -> 22 / (1 * 3 * 2)
    assert float(trajectory_mse_loss(student, teacher)) == pytest.approx(22.0 / 6.0)
    logits = torch.tensor([[2.0, 0.0]])
    parts = trajectory_kd_loss(student, logits, teacher, torch.tensor([0]), alpha=0.25)
    ce = float(np.log1p(np.exp(-2.0)))
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(0.25 * 22.0 / 6.0 + 0.75 * ce, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        trajectory_mse_loss(student, teacher[:, :2])


def _batch(n: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"inputs": torch.randn(n, 10, 6, generator=gen), "labels": torch.arange(n) % 4}


def test_alpha_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    student, teacher = gru(hidden=4, layers=1), gru()
    kd = SequenceKDTask(DistillationConfig(alpha=0.0), LossConfig(), [(FrozenTeacher(teacher), 1.0)])
    batch = _batch()
    kd_loss = kd(student, batch)
    plain = SequenceTask(LossConfig())(student, batch)
    torch.testing.assert_close(kd_loss["loss"], plain["loss"])
    assert float(kd_loss["traj_mse"].detach()) > 0 and set(kd_loss) >= {
        "traj_mse",
        "ce",
        "distill_total",
        "alpha",
        "loss",
    }


def test_cached_teacher_trajectory_runs_no_teacher_and_live_teachers_mix_by_weight():
    torch.manual_seed(0)
    student = gru(hidden=4, layers=1)
    batch = _batch()
    cached = torch.randn(5, 11, 4)
    kd = SequenceKDTask(DistillationConfig(alpha=0.6), LossConfig(), [])  # no teacher at all
    losses = kd(student, {**batch, "teacher_trajectory": cached})
    out = student(batch["inputs"])
    expected = trajectory_mse_loss(out["trajectory"], cached)
    torch.testing.assert_close(losses["traj_mse"], expected)
    ce = F.cross_entropy(out["logits"], batch["labels"])
    torch.testing.assert_close(losses["loss"], 0.6 * expected + 0.4 * ce)
    with pytest.raises(ValueError, match="no teacher"):
        kd(student, batch)
    t1, t2 = gru(), gru(hidden=5)
    live = SequenceKDTask(
        DistillationConfig(alpha=1.0), LossConfig(), [(FrozenTeacher(t1), 1.0), (FrozenTeacher(t2), 3.0)]
    )
    with torch.no_grad():
        target = 0.25 * t1(batch["inputs"])["trajectory"] + 0.75 * t2(batch["inputs"])["trajectory"]
    torch.testing.assert_close(live(student, batch)["loss"], trajectory_mse_loss(out["trajectory"], target))


# ---------------------------------------------------------------------------------------- data/batch
def test_extra_arrays_reach_the_batch_in_sample_order_under_shuffling():
    n = 20
    rng = np.random.default_rng(0)
    split = SequenceSplit(rng.normal(size=(n, 4, 3)).astype(np.float32), np.arange(n, dtype=np.int64) % 3)
    trajectory = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((n, 5, 2), np.float32)  # row i = i
    dataset = SequenceDataset(
        split, extra={"teacher_trajectory": trajectory, "teacher_score": torch.arange(n)}
    )
    loader = build_sequence_loader(dataset, 6, shuffle=True, seed=3, num_workers=0, pin_memory=False)
    seen = []
    for batch in loader:
        assert batch["inputs"].shape[1:] == (4, 3) and batch["teacher_trajectory"].shape[1:] == (5, 2)
        index = batch["index"]
        torch.testing.assert_close(batch["teacher_trajectory"][:, 0, 0], index.float())
        torch.testing.assert_close(batch["teacher_score"], index)
        torch.testing.assert_close(batch["inputs"], torch.from_numpy(split.data)[index])
        torch.testing.assert_close(batch["labels"], index % 3)
        seen += index.tolist()
    assert sorted(seen) == list(range(n)) and seen != list(range(n))  # every row once, shuffled
    moved = batch_to_device(batch, torch.device("cpu"), channels_last=True)
    assert "images" not in moved and moved["teacher_score"].dtype == torch.float32
    with pytest.raises(DataError, match="has 3 rows"):
        SequenceDataset(split, extra={"teacher_trajectory": trajectory[:3]})


# -------------------------------------------------------------------------------------- config/spec
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"task": "classification", "model": {"name": "gru"}}, "model.name='gru' needs task=sequence"),
        ({"model": {"name": "resnet18"}}, "does not fit task=sequence"),
        ({"distillation": {"features": [{"student": "gru", "teacher": "gru"}]}},
         "distillation.features is not implemented for task=sequence"),
        ({"export": {"onnx": True}}, "export.onnx is not implemented for task=sequence"),
    ],
)  # fmt: skip
def test_sequence_config_rules_are_one_line_naming_the_key(change, needle):
    base = {"task": "sequence", "model": {"name": "gru"}}
    merged = {**base, **change, "model": {**base["model"], **change.get("model", {})}}
    with pytest.raises(ConfigError) as info:
        validate_config(merged)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_teacher_must_match_classes_and_input_dim():
    cfg = validate_config({"task": "sequence", "model": {"name": "gru", "num_classes": 8}})
    check = get_task("sequence").check_teacher
    good = {"model": {"num_classes": 8}, "data": {"sequence": {"input_dim": 8}}}
    check(cfg, SimpleNamespace(path="t.pth", config=good))
    bad = {"model": {"num_classes": 8}, "data": {"sequence": {"input_dim": 5}}}
    with pytest.raises(
        CheckpointError, match="data.sequence.input_dim=5 but the student's data.sequence.input_dim is 8"
    ):
        check(cfg, SimpleNamespace(path="t.pth", config=bad))


def test_gru_macs_hand_count():
    # per step: 3*2*(3+2) = 30 (layer 0) + 3*2*(2+2) = 24 (layer 1); x4 steps = 216; readout 5*2*2 = 20
    assert compute_gru_macs(hidden_size=2, num_layers=2, input_dim=3, num_classes=2, seq_len=4) == 236


# ---------------------------------------------------------------------------------------- end to end
TINY = [
    "data.sequence.train_samples=48",
    "data.sequence.val_samples=16",
    "data.sequence.seq_len=8",
    "model.hidden_size=8",
    "training.log_every_steps=1",
]


def test_tiny_sequence_suite_trains_distils_and_reports(tmp_path):
    out = tmp_path / "runs"
    args = ["--configs", "sequence", "--epochs", "1", "--batch_size", "16", "--device", "cpu",
            "--output_dir", str(out), "--set", f"data.sequence.path={tmp_path / 'seq.h5'}", *TINY]  # fmt: skip
    assert run_cli(experiments_main, args) == 0
    runs = json.loads((out / "experiment_runs.json").read_text())
    assert [r["name"] for r in runs] == [
        "sequence_teacher",
        "sequence_student_baseline",
        "sequence_student_distill",
    ]
    assert all(r["status"] == "completed" and r["export"] is None for r in runs)
    summary = json.loads((out / "sequence_student_distill" / "summary.json").read_text())
    assert summary["best_metric_name"] == "top1" and summary["task"] == "distillation"
    cache = out / "sequence_student_distill" / "teacher_cache.hdf5"
    assert (
        summary["teacher_cache"]["path"] == str(cache) and summary["teacher_cache"]["samples"]["train"] == 48
    )
    check_cached_trajectories(cache, out / "sequence_teacher" / "checkpoints" / "best_model.pth")
    # A distilled student starts from the baseline's weights, also with a live teacher (built before the
    # student, so its initialisation must not shift the student's).
    live = ["--config", "sequence_student_distill", "--output_dir", str(out), "--epochs", "1", "--device", "cpu",
            "--no_progress", "--set", "name=live", "distillation.cache=null", f"data.sequence.path={tmp_path / 'seq.h5'}",
            *TINY]  # fmt: skip
    assert run_cli(train_main, live) == 0
    start = {n: torch.load(out / n / "checkpoints" / "untrained_model.pth", weights_only=True)["model_state_dict"]
             for n in ("sequence_student_baseline", "sequence_student_distill", "live")}  # fmt: skip
    base = start["sequence_student_baseline"]
    for name in ("sequence_student_distill", "live"):
        assert all(torch.equal(base[k], start[name][k]) for k in base), name
    metrics = list(csv.DictReader((out / "sequence_student_distill" / "logs" / "metrics.csv").open()))
    assert "train_traj_mse" in metrics[0]
    rows = list(csv.DictReader((out / "experiment_comparison.csv").open()))
    assert [r["role"] for r in rows] == ["teacher", "student", "distilled"]
    assert [r["model"] for r in rows] == ["gru-8x2", "gru-8x1", "gru-8x1"]
    assert all(r["top1"] and r["macs_m"] for r in rows)
    # one run each and no per-image test sums: the teacher's lead has no uncertainty, so no % of teacher
    assert (
        rows[1]["pct_of_teacher"] == rows[2]["pct_of_teacher"] == ""
        and "one run each" in rows[2]["teacher_lead_note"]
    )
    assert "| top-1 |" in " ".join((out / "experiment_comparison.md").read_text().split())
    explicit = ["--configs", "sequence_teacher", "--export_onnx", "--skip_training", "--output_dir", str(out)]
    assert run_cli(experiments_main, explicit) == 2


def check_cached_trajectories(cache: Path, teacher_ckpt: Path) -> None:
    """The cache layout for sequences: data [n,T,D_in], labels = the teacher's [n,T+1,D_out] trajectory."""
    import h5py

    from kdlab.tasks import model_from_checkpoint

    teacher, _, _ = model_from_checkpoint(teacher_ckpt, "teacher")
    with h5py.File(cache, "r") as fh:
        assert set(fh) == {"train", "val"} and fh.attrs["task"] == "sequence"
        for split in ("train", "val"):
            data, labels = fh[split]["data"][()], fh[split]["labels"][()]
            n, t, _ = data.shape
            assert labels.shape == (n, t + 1, 8) and fh[split]["class_labels"].shape == (n,)
            with torch.no_grad():
                expected = teacher.eval()(torch.from_numpy(data))["trajectory"].numpy()
            np.testing.assert_allclose(labels, expected, atol=1e-5)


def test_cache_cli_writes_sequence_trajectories_and_a_student_trains_from_them(tmp_path):
    from kdlab.cli.cache import main as cache_main
    from kdlab.data.teacher_cache import CacheInfo

    sets = [f"data.sequence.path={tmp_path / 'seq.h5'}", *TINY]
    teacher_args = ["--config", "sequence_teacher", "--output_dir", str(tmp_path / "runs"), "--epochs", "1",
                    "--device", "cpu", "--no_progress", "--set", *sets]  # fmt: skip
    assert run_cli(train_main, teacher_args) == 0
    ckpt = tmp_path / "runs" / "sequence_teacher" / "checkpoints" / "best_model.pth"
    cache = tmp_path / "traj.hdf5"
    gen = ["generate", "--teacher", str(ckpt), "--config", "sequence_student_distill", "--out", str(cache),
           "--subset_fraction", "0.5", "--max_samples", "20", "--seed", "3", "--no_progress", "--set", *sets]  # fmt: skip
    assert run_cli(cache_main, gen) == 0
    info = CacheInfo(cache)
    assert {s: len(v["indices"]) for s, v in info.splits.items()} == {"train": 20, "val": 8}
    check_cached_trajectories(cache, ckpt)
    ckpt.unlink()  # the student needs the cache alone
    student = ["--config", "sequence_student_distill", "--output_dir", str(tmp_path / "runs"), "--epochs", "1",
               "--device", "cpu", "--no_progress", "--set", *sets, f"distillation.cache.distillation_data_path={cache}"]  # fmt: skip
    assert run_cli(train_main, student) == 0
    summary = json.loads((tmp_path / "runs" / "sequence_student_distill" / "summary.json").read_text())
    assert summary["train_images"] == 20 and summary["teacher_cache"]["samples"] == {"train": 20, "val": 8}


def test_bad_hdf5_source_through_the_cli_is_one_error_line_and_no_run_dir(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    _write(bad, {"train": _split(d=8)})  # no val group
    args = ["--config", "sequence_student_baseline", "--output_dir", str(tmp_path / "runs"), "--epochs", "1",
            "--device", "cpu", "--no_progress", "--set", "data.sequence.source=hdf5", f"data.sequence.path={bad}"]  # fmt: skip
    assert run_cli(train_main, args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "has no 'val' group" in lines[0]
    assert not (tmp_path / "runs").exists()
