"""The comparison report: rows from fabricated run directories (no training), MACs, and the written files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.config.schema import ExperimentConfig, ModelConfig
from kdlab.evaluate import macs
from kdlab.evaluate.macs import compute_macs
from kdlab.evaluate.report_layout import SEGMENTATION_LAYOUT, with_headline
from kdlab.experiments import report
from kdlab.experiments.report import RunRecord, collect_rows, write_report
from kdlab.experiments.report.layouts import row_columns

# The fabricated runs select their checkpoints by target IoU (training.monitor): the report follows it.
COLUMNS = row_columns(with_headline(SEGMENTATION_LAYOUT, "target_iou"))

B0 = "timm-efficientnet-b0"
B3 = "timm-efficientnet-b3"
TINY_MODEL = {"roi_size": (16, 12), "mask_size": (32, 24), "head_channels": 16}


def tiny_config(
    name: str, encoder: str, teacher_checkpoint: Path | None = None, monitor: str | None = "target_iou"
) -> dict[str, Any]:
    distillation: dict[str, Any] = {}
    if teacher_checkpoint is not None:
        distillation = {"enabled": True, "teacher_checkpoint": str(teacher_checkpoint)}
    cfg = ExperimentConfig(
        name=name,
        model={"encoder": encoder, **TINY_MODEL},
        data={"input_size": (64, 64)},
        distillation=distillation,
        training={"monitor": monitor},
    )
    return cfg.model_dump(mode="json")


def fabricate_run(
    root: Path,
    name: str,
    encoder: str,
    val_ious: list[float],
    teacher_checkpoint: Path | None = None,
    params_total: int = 6_250_000,
    onnx_meta: dict[str, Any] | None = None,
    with_summary_best_epoch: bool = True,
    monitor: str | None = "target_iou",
    test: dict[str, float] | None = None,
    per_image: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """A run directory as the trainer leaves it: config.json, summary.json, logs/metrics.csv (+ ONNX metadata)."""
    run_dir = root / name
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "config.json").write_text(json.dumps(tiny_config(name, encoder, teacher_checkpoint, monitor)))
    best = max(range(len(val_ious)), key=lambda i: val_ious[i])
    columns = ["epoch", "step", "train_loss", "lr", "val_target_iou", "val_miou", "val_iou_background"]
    columns += ["val_iou_target", "val_iou_other", "val_boundary_f1"]
    with (run_dir / "logs" / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for i, iou in enumerate(val_ious):
            writer.writerow(
                {
                    "epoch": i + 1, "step": 10 * (i + 1), "train_loss": 2.0 / (i + 1), "lr": 1e-3,
                    "val_target_iou": iou, "val_miou": iou - 0.1, "val_iou_background": 0.9,
                    "val_iou_target": iou - 0.05, "val_iou_other": 0.3 + i / 100, "val_boundary_f1": iou / 2,
                }
            )  # fmt: skip
    last = val_ious[-1]
    summary = {
        "experiment": name,
        "status": "completed",
        "best_metric": val_ious[best],
        "final_metrics": {"target_iou": last, "miou": last - 0.1, "iou_background": 0.9,
                          "iou_target": last - 0.05, "iou_other": None, "boundary_f1": last / 2},
        "params": {"total": params_total, "unet": params_total - 1000},
        "timings": {"train_seconds": 90.0 * len(val_ious), "images_seen": 100},
    }  # fmt: skip
    if with_summary_best_epoch:
        summary["best_epoch"] = best + 1
    if test is not None:
        summary["test_metrics"] = test
        summary["test"] = {"images": 50, "checkpoint": "checkpoints/best_model.pth", "epoch": best + 1}
    if per_image is not None:
        np.savez(run_dir / "logs" / "test_per_image.npz", intersection=per_image[0], union=per_image[1])
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if onnx_meta is not None:
        (run_dir / "checkpoints" / "best_model.onnx.json").write_text(json.dumps(onnx_meta))
    return run_dir


@pytest.fixture()
def trio(tmp_path: Path) -> list[RunRecord]:
    """Teacher (B3, 0.8), baseline (B0, 0.5) and distilled (B0, 0.65, teacher = the teacher's best_model.pth)."""
    runs = tmp_path / "runs"
    teacher = fabricate_run(runs, "teacher_b3", B3, [0.6, 0.7, 0.8], params_total=13_500_000)
    baseline = fabricate_run(
        runs, "baseline_b0", B0, [0.4, 0.5, 0.45], onnx_meta={"onnx_ms_per_image_median": 4.2}
    )
    distilled = fabricate_run(
        runs, "distilled_b0", B0, [0.5, 0.65, 0.6],
        teacher_checkpoint=teacher / "checkpoints" / "best_model.pth",
        onnx_meta={"latency": {"onnx_ms_per_image_median": 4.0}, "onnx_mb": 24.5},
    )  # fmt: skip
    return [
        RunRecord("teacher_b3", teacher, "completed"),
        RunRecord("baseline_b0", baseline, "completed"),
        RunRecord("distilled_b0", distilled, "completed"),
    ]


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["experiment"]: r for r in rows}


def test_trio_roles_pct_of_teacher_and_gap_closed(trio: list[RunRecord]) -> None:
    rows = collect_rows(trio)
    assert [list(r) for r in rows] == [list(COLUMNS)] * 3
    named = by_name(rows)
    assert named["teacher_b3"]["role"] == "teacher"  # inferred: the distilled config names its checkpoint
    assert named["baseline_b0"]["role"] == "student"
    assert named["distilled_b0"]["role"] == "distilled"
    assert named["teacher_b3"]["pct_of_teacher"] == pytest.approx(100.0)
    # One run each, and target IoU (a mean over ROIs) has no per-image sums to bootstrap: the teacher's lead
    # (0.8 vs 0.5) has no uncertainty estimate, so neither ratio is shown; the legend says why.
    for name in ("baseline_b0", "distilled_b0"):
        assert named[name]["pct_of_teacher"] is None and named[name]["gap_closed"] is None
        assert "uncertainty of the teacher's lead over baseline_b0" in named[name]["teacher_lead_note"]
    assert named["teacher_b3"]["gap_closed"] is None and named["teacher_b3"]["teacher_lead_note"] is None
    assert named["baseline_b0"]["gap_closed"] is None
    assert named["teacher_b3"]["encoder"] == B3
    assert named["teacher_b3"]["params_m"] == pytest.approx(13.5)
    assert named["teacher_b3"]["train_time_min"] == pytest.approx(4.5)  # 270 s
    assert named["baseline_b0"]["onnx_latency_ms"] == pytest.approx(4.2)
    assert named["distilled_b0"]["onnx_latency_ms"] == pytest.approx(4.0)  # nested metadata key
    assert named["distilled_b0"]["onnx_mb"] == pytest.approx(24.5)
    assert named["teacher_b3"]["onnx_latency_ms"] is None  # no best_model.onnx.json
    assert named["teacher_b3"]["macs_g"] > named["baseline_b0"]["macs_g"] > 0


def test_explicit_roles_override_inference(trio: list[RunRecord]) -> None:
    trio[1].role = "teacher"  # say the runner calls the baseline a teacher: it is the bar then
    named = by_name(collect_rows(trio))
    assert named["baseline_b0"]["role"] == "teacher"
    assert named["teacher_b3"]["role"] == "teacher"  # still inferred from the distilled config
    # The distilled run's own teacher (named in its config) stays its reference; no 'student' baseline left,
    # so the teacher's lead cannot be measured: neither ratio is shown.
    assert named["distilled_b0"]["pct_of_teacher"] is None
    assert named["distilled_b0"]["gap_closed"] is None
    assert "no baseline" in named["distilled_b0"]["teacher_lead_note"]


def test_best_epoch_row_is_used(tmp_path: Path) -> None:
    run = fabricate_run(tmp_path, "solo", B0, [0.3, 0.7, 0.5])
    row = collect_rows([RunRecord("solo", run, "completed")])[0]
    assert row["best_epoch"] == 2
    assert row["target_iou"] == pytest.approx(0.7)  # epoch 2, not the final 0.5
    assert row["miou"] == pytest.approx(0.6)
    assert row["iou_target"] == pytest.approx(0.65)
    assert row["iou_other"] == pytest.approx(0.31)
    assert row["boundary_f1"] == pytest.approx(0.35)
    assert row["role"] == "student"
    assert row["pct_of_teacher"] is None and row["gap_closed"] is None  # no teacher in the list


def test_best_epoch_found_from_csv_without_summary_best_epoch(tmp_path: Path) -> None:
    run = fabricate_run(tmp_path, "solo", B0, [0.3, 0.7, 0.5], with_summary_best_epoch=False)
    row = collect_rows([RunRecord("solo", run, "completed")])[0]
    assert (row["best_epoch"], row["target_iou"]) == (2, pytest.approx(0.7))


def test_final_metrics_when_metrics_csv_is_missing(tmp_path: Path) -> None:
    run = fabricate_run(tmp_path, "solo", B0, [0.3, 0.7, 0.5])
    (run / "logs" / "metrics.csv").unlink()
    row = collect_rows([RunRecord("solo", run, "completed")])[0]
    assert row["target_iou"] == pytest.approx(0.5)  # summary final_metrics
    assert row["iou_other"] is None  # null in the summary
    assert row["best_epoch"] == 2


def test_failed_runs_get_rows_and_do_not_break_the_comparison(trio: list[RunRecord], tmp_path: Path) -> None:
    crashed_dir = tmp_path / "runs" / "crashed_b0"
    crashed_dir.mkdir()  # created, then failed before writing anything
    records = [
        RunRecord("never_started", None, "failed", exit_code=2),
        *trio,
        RunRecord("crashed_b0", crashed_dir, "failed", exit_code=1),
    ]
    rows = collect_rows(records)
    named = by_name(rows)
    assert [r["experiment"] for r in rows] == [r.name for r in records]
    for name in ("never_started", "crashed_b0"):
        row = named[name]
        assert row["status"] == "failed"
        assert all(row[k] is None for k in COLUMNS if k not in ("experiment", "status", "role"))
    assert named["distilled_b0"]["teacher_lead_note"] == named["baseline_b0"]["teacher_lead_note"] is not None


def test_a_failed_teacher_is_no_reference(trio: list[RunRecord]) -> None:
    trio[0].status = "failed"  # its files are on disk, but the run did not finish
    named = by_name(collect_rows(trio))
    assert named["teacher_b3"]["status"] == "failed"
    assert named["teacher_b3"]["role"] == "teacher"
    assert named["distilled_b0"]["pct_of_teacher"] is None
    assert named["distilled_b0"]["gap_closed"] is None


def test_gap_closed_is_none_when_teacher_equals_baseline(tmp_path: Path) -> None:
    teacher = fabricate_run(tmp_path, "t", B3, [0.5])
    base = fabricate_run(tmp_path, "b", B0, [0.5])
    dist = fabricate_run(
        tmp_path, "d", B0, [0.6], teacher_checkpoint=teacher / "checkpoints" / "best_model.pth"
    )
    records = [RunRecord(n, d, "completed") for n, d in (("t", teacher), ("b", base), ("d", dist))]
    assert by_name(collect_rows(records))["d"]["gap_closed"] is None


def test_compute_macs_grows_with_encoder_and_input() -> None:
    cfg_b0 = ModelConfig(encoder=B0, **TINY_MODEL)
    cfg_b3 = ModelConfig(encoder=B3, **TINY_MODEL)
    b0_64 = compute_macs(cfg_b0, (64, 64))
    assert compute_macs(cfg_b3, (64, 64)) > b0_64 > 0
    ratio = compute_macs(cfg_b0, (128, 128)) / b0_64
    assert 3.5 < ratio < 4.5  # about proportional to pixels
    assert compute_macs(cfg_b0, (64, 64), rois_per_image=4) > b0_64  # the head runs once per ROI


def test_compute_macs_meta_count_equals_a_cpu_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast shape-only (meta device) count is the count of a real CPU forward; the fallback works."""
    macs.clear_macs_cache()
    cfg = ModelConfig(encoder=B0, **TINY_MODEL)
    meta = compute_macs(cfg, (64, 32), rois_per_image=2)
    macs.clear_macs_cache()
    real_count = macs._count_flops
    devices: list[str] = []

    def meta_fails(model: Any, h: int, w: int, n: int, device: torch.device) -> int:
        devices.append(device.type)
        if device.type == "meta":
            raise NotImplementedError("no meta kernel")
        return real_count(model, h, w, n, device)

    monkeypatch.setattr(macs, "_count_flops", meta_fails)
    assert compute_macs(cfg, (64, 32), rois_per_image=2) == meta
    assert devices == ["meta", "cpu"]


def test_compute_macs_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    macs.clear_macs_cache()
    builds: list[str] = []
    real_build = macs.build_model

    def counting_build(cfg: ModelConfig) -> Any:
        builds.append(cfg.encoder)
        return real_build(cfg)

    monkeypatch.setattr(macs, "build_model", counting_build)
    cfg = ModelConfig(encoder=B0, **TINY_MODEL)
    first = compute_macs(cfg, (64, 96))
    second = compute_macs(ModelConfig(encoder=B0, **TINY_MODEL), (64, 96))  # an equal config, a new object
    assert first == second
    assert builds == [B0]  # the model was built (and counted) once: the second call was served from the cache
    # encoder_weights do not change the architecture: still cached
    assert compute_macs(cfg.model_copy(update={"encoder_weights": "/nonexistent.pth"}), (64, 96)) == first
    assert builds == [B0]


def test_write_report_files(trio: list[RunRecord], tmp_path: Path) -> None:
    records = [*trio, RunRecord("never_started", None, "failed", exit_code=2)]
    rows = collect_rows(records)
    out = tmp_path / "report"
    paths = write_report(rows, out, curves_from=records)
    names = {p.name for p in paths.values()}
    assert names == {
        "experiment_comparison.csv",
        "experiment_comparison.md",
        "experiment_comparison.json",
        "experiment_comparison_runs.csv",
        "experiment_comparison.png",
        "training_curves.png",
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left behind
    with paths["csv"].open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header == list(COLUMNS)
    assert [line[0] for line in body] == [r.name for r in records]
    assert body[2][header.index("gap_closed")] == ""  # one run each, no per-image sums: not shown
    assert "uncertainty of the teacher's lead" in body[2][header.index("teacher_lead_note")]
    assert body[3][header.index("target_iou")] == ""
    md = paths["markdown"].read_text()
    for record in records:
        assert record.name in md
    assert "—" in md
    assert "0.8000" in md and "100.0" in md  # 4 decimals for IoUs, 1 for percentages
    assert "% of teacher and gap closed read —" in md and "baseline_b0, distilled_b0: one run each" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(records)
    assert len({len(line) for line in table}) == 1  # padded: aligned in a terminal
    for key in ("comparison_png", "curves_png"):
        with Image.open(paths[key]) as image:
            image.verify()
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_write_report_with_nothing_to_plot(tmp_path: Path) -> None:
    rows = collect_rows([RunRecord("never_started", None, "failed")])
    paths = write_report(rows, tmp_path, curves_from=[])
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert "never_started" in paths["markdown"].read_text()


def test_gap_closed_is_none_when_the_teacher_is_worse_than_the_baseline(tmp_path: Path) -> None:
    # Seen on the quickstart: teacher 0.4114 < baseline 0.4205 > distilled 0.4094 gave a "gap closed" of 1.22.
    teacher = fabricate_run(tmp_path, "t", B3, [0.4114])
    base = fabricate_run(tmp_path, "b", B0, [0.4205])
    dist = fabricate_run(
        tmp_path, "d", B0, [0.4094], teacher_checkpoint=teacher / "checkpoints" / "best_model.pth"
    )
    records = [RunRecord(n, d, "completed") for n, d in (("t", teacher), ("b", base), ("d", dist))]
    assert by_name(collect_rows(records))["d"]["gap_closed"] is None


# ------------------------------------------------------------------------------------ seeds (aggregation)
T_975_2, T_975_1 = 4.302653, 12.706205  # Student t quantiles t(0.975, df) for df = 2 and 1


@pytest.fixture()
def three_seeds(tmp_path: Path) -> list[RunRecord]:
    """One teacher (0.9) and, over seeds 42/1/2, a baseline (0.5, 0.6, 0.7) and a distilled student
    (0.56, 0.68, 0.75): paired differences 0.06, 0.08, 0.05."""
    runs = tmp_path / "runs"
    teacher = fabricate_run(runs, "teacher", B3, [0.9])
    records = [RunRecord("teacher", teacher, "completed")]
    for seed, base, dist in ((42, 0.5, 0.56), (1, 0.6, 0.68), (2, 0.7, 0.75)):
        b = fabricate_run(runs, f"base__seed-{seed}", B0, [base])
        d = fabricate_run(
            runs,
            f"dist__seed-{seed}",
            B0,
            [dist],
            teacher_checkpoint=teacher / "checkpoints" / "best_model.pth",
        )
        records += [RunRecord(b.name, b, "completed"), RunRecord(d.name, d, "completed")]
    return records


def test_three_seeds_aggregate_to_mean_std_paired_interval_and_verdict(three_seeds: list[RunRecord]) -> None:
    rows = collect_rows(three_seeds)
    table = {r["experiment"]: r for r in report.aggregate_rows(rows, three_seeds)}
    assert list(table) == ["teacher", "base", "dist"]
    base, dist, teacher = table["base"], table["dist"], table["teacher"]
    assert (teacher["n"], base["n"], dist["n"]) == (1, 3, 3)
    assert base["target_iou_mean"] == pytest.approx(0.6)
    assert base["target_iou_std"] == pytest.approx(0.1)  # ddof=1
    assert dist["target_iou_mean"] == pytest.approx((0.56 + 0.68 + 0.75) / 3)
    assert teacher["target_iou_std"] is None  # one run: no spread
    diffs = [0.06, 0.08, 0.05]
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = T_975_2 * sd / 3**0.5
    assert dist["baseline"] == "base" and dist["delta_n"] == 3
    assert dist["delta_mean"] == pytest.approx(mean)
    assert dist["delta_std"] == pytest.approx(sd)
    assert (dist["delta_low"], dist["delta_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert dist["verdict"] == "gain"  # mean - half = 0.0313 > 0
    # gap closed = mean paired Δ / (0.9 - 0.6); the margin 0.3 beats the baseline's half-width
    # 4.302653 * 0.1 / sqrt(3) = 0.2484. Its interval is Fieller's, which carries the baseline mean's
    # uncertainty (issue 27): wider than the Δ interval / 0.3 = [0.085, 0.338] (tests/test_seed_stats.py).
    assert dist["gap_closed"] == pytest.approx(mean / 0.3)
    assert dist["gap_closed_low"] == pytest.approx(0.0876035, abs=1e-6)
    assert dist["gap_closed_high"] == pytest.approx(1.0374720, abs=1e-6)
    assert base["verdict"] is None and base["gap_closed"] is None
    assert dist["pct_of_teacher"] == pytest.approx(100 * dist["target_iou_mean"] / 0.9)


def _retarget(record: RunRecord, value: float) -> None:
    """Rewrite a fabricated run's single validation value."""
    path = record.run_dir / "logs" / "metrics.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[1].split(",")
    cells[header.index("val_target_iou")] = str(value)
    path.write_text("\n".join([lines[0], ",".join(cells)]) + "\n")


def test_verdicts_hurts_and_inconclusive(three_seeds: list[RunRecord]) -> None:
    named = {r.name: r for r in three_seeds}
    for seed, value in ((42, 0.45), (1, 0.57), (2, 0.66)):  # diffs -0.05, -0.03, -0.04: CI below 0
        _retarget(named[f"dist__seed-{seed}"], value)
    table = {r["experiment"]: r for r in report.aggregate_rows(collect_rows(three_seeds), three_seeds)}
    assert table["dist"]["delta_high"] < 0 and table["dist"]["verdict"] == "hurts"
    for seed, value in ((42, 0.6), (1, 0.55), (2, 0.72)):  # diffs 0.1, -0.05, 0.02: CI spans 0
        _retarget(named[f"dist__seed-{seed}"], value)
    table = {r["experiment"]: r for r in report.aggregate_rows(collect_rows(three_seeds), three_seeds)}
    assert table["dist"]["delta_low"] < 0 < table["dist"]["delta_high"]
    assert table["dist"]["verdict"] == "inconclusive"  # the interval reaches beyond ±0.005


def test_gap_closed_is_missing_when_the_teacher_is_within_the_baseline_interval(
    three_seeds: list[RunRecord],
) -> None:
    _retarget(three_seeds[0], 0.8)  # margin 0.2 < the baseline's half-width 0.2484
    table = {r["experiment"]: r for r in report.aggregate_rows(collect_rows(three_seeds), three_seeds)}
    assert table["dist"]["gap_closed"] is None and table["dist"]["verdict"] == "gain"


def test_a_failed_seed_is_listed_and_left_out_of_the_means(
    three_seeds: list[RunRecord], tmp_path: Path
) -> None:
    failed = next(r for r in three_seeds if r.name == "dist__seed-2")
    failed.status = "failed"
    rows = collect_rows(three_seeds)
    table = {r["experiment"]: r for r in report.aggregate_rows(rows, three_seeds)}
    dist = table["dist"]
    assert dist["n"] == 2 and "seed 2 failed" in dist["status"]
    assert dist["target_iou_mean"] == pytest.approx((0.56 + 0.68) / 2)
    diffs = [0.06, 0.08]  # seed 2 has no pair
    sd = abs(diffs[0] - diffs[1]) / 2**0.5
    assert dist["delta_n"] == 2 and dist["delta_mean"] == pytest.approx(0.07)
    assert dist["delta_low"] == pytest.approx(0.07 - T_975_1 * sd / 2**0.5)
    assert dist["verdict"] == "inconclusive"  # 0.07 ± 0.127
    paths = write_report(rows, tmp_path / "report", three_seeds)
    md = paths["markdown"].read_text()
    dist_line = next(line for line in md.splitlines() if line.startswith("| dist "))
    assert "seed 2 failed" in dist_line and "| 2 |" in dist_line.replace(" ", "").replace("|2|", "| 2 |")
    runs = list(csv.DictReader(paths["runs_csv"].open()))
    assert {(r["experiment"], r["status"]) for r in runs} >= {
        ("dist__seed-2", "failed"),
        ("dist__seed-1", "completed"),
    }
    assert [r["seed"] for r in runs if r["config"] == "dist"] == ["42", "1", "2"]


def test_the_seed_report_files_hold_one_row_per_config(three_seeds: list[RunRecord], tmp_path: Path) -> None:
    import pandas as pd

    paths = write_report(collect_rows(three_seeds), tmp_path / "report", three_seeds)
    frame = pd.read_json(paths["json"])
    assert list(frame["experiment"]) == ["teacher", "base", "dist"]
    assert frame.set_index("experiment").loc["base", "target_iou_std"] == pytest.approx(0.1)
    table = pd.read_csv(paths["csv"])
    assert list(table["n"]) == [1, 3, 3] and list(table["verdict"].fillna("")) == ["", "", "gain"]
    md = paths["markdown"].read_text()
    assert "0.6000 ± 0.1000" in md  # the baseline's target IoU, mean ± std
    assert "Student t" in md and "gain" in md
    assert "[+0.0" in md  # the paired interval, signed
    assert len(pd.read_csv(paths["runs_csv"])) == 7
    # the verdicts in words close the report (the runner prints it, so they are its last lines)
    last = md.rstrip().splitlines()[-1]
    assert last.startswith("- **dist** vs base, 3 paired seeds (1, 2, 42): Δ +0.0633, 95% CI [+0.0")
    assert last.endswith("**gain** (the whole interval lies above 0).")
    assert (
        "Verdicts (target IoU, val, best epoch, paired by seed):" in md
    )  # this fixture: val only, target IoU


def test_a_single_seed_report_is_the_per_run_table(trio: list[RunRecord], tmp_path: Path) -> None:
    paths = write_report(collect_rows(trio), tmp_path / "report", trio)
    assert paths["csv"].read_text().splitlines()[0] == ",".join(COLUMNS)
    assert "Student t" not in paths["markdown"].read_text()


def test_a_first_seed_that_failed_before_writing_its_config_keeps_the_config_distilled(
    three_seeds: list[RunRecord],
) -> None:
    index = next(i for i, r in enumerate(three_seeds) if r.name == "dist__seed-42")
    three_seeds[index] = RunRecord("dist__seed-42", None, "failed", exit_code=2)
    table = {r["experiment"]: r for r in report.aggregate_rows(collect_rows(three_seeds), three_seeds)}
    dist = table["dist"]
    assert dist["role"] == "distilled" and dist["n"] == 2 and "seed 42 failed" in dist["status"]
    assert dist["delta_n"] == 2 and dist["delta_mean"] == pytest.approx((0.08 + 0.05) / 2)


# ------------------------------------------------------------------------------------ layouts (per task)
def test_each_layout_is_recognised_from_its_rows_and_can_be_rendered() -> None:
    from kdlab.experiments.report.layouts import report_layouts, row_columns
    from kdlab.experiments.report.tables import _MD_FORMAT

    layouts = report_layouts()
    assert len({lay.columns for lay in layouts}) == len(layouts) == 3
    for layout in layouts:
        keys = row_columns(layout)
        assert report.layout_for_rows([dict.fromkeys(keys)]) is layout
        assert set(layout.columns) <= set(keys) and {"params_m", "onnx_latency_ms"} <= set(keys)  # figures
        assert layout.headline in layout.metric_columns and layout.arch_column in layout.columns
        assert all(c in _MD_FORMAT for c in layout.columns), layout.columns
    assert report.layout_for_rows([]).columns == SEGMENTATION_LAYOUT.columns


def test_a_run_without_a_task_is_segmentation_and_an_unknown_task_is_named() -> None:
    from kdlab.errors import ConfigError
    from kdlab.experiments.report.layouts import layout_for_task, run_task

    assert run_task(None) == run_task({"model": {}}) == "segmentation"
    assert run_task({"task": "sequence"}) == "sequence"
    assert report.layout_for_configs([None, {"model": {}}]).columns == SEGMENTATION_LAYOUT.columns
    assert report.layout_for_configs([{"task": "sequence"}, None]) is layout_for_task("sequence")
    assert (
        report.layout_for_configs([{"task": "sequence"}, {"task": "classification"}]).columns
        == SEGMENTATION_LAYOUT.columns
    )
    with pytest.raises(ConfigError, match="task=regression is not a known task"):
        layout_for_task("regression")


def _int8_meta(onnx_iou: float, int8_iou: float, accepted: bool) -> dict[str, Any]:
    """best_model.onnx.json as the export writes it with export.quantize=int8 (the keys the report reads)."""
    return {
        "latency": {"onnx_ms_per_image_median": 4.0},
        "accuracy": {"metric": "target_iou", "onnx": {"target_iou": onnx_iou}, "pytorch": {"target_iou": onnx_iou}},
        "int8": {"onnx": {"target_iou": int8_iou}, "latency": {"int8_over_fp32": 0.6},
                 "drop": onnx_iou - int8_iou, "max_drop": 0.01, "accepted": accepted},
    }  # fmt: skip


def test_onnx_and_int8_scores_reach_the_table_and_int8_columns_appear_only_with_int8(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shipped = fabricate_run(runs, "shipped", B0, [0.5, 0.6], onnx_meta=_int8_meta(0.6, 0.595, True))
    kept_aside = fabricate_run(runs, "aside", B0, [0.5, 0.6], onnx_meta=_int8_meta(0.6, 0.55, False))
    plain = fabricate_run(
        runs, "plain", B0, [0.5, 0.6], onnx_meta={"accuracy": {"onnx": {"target_iou": 0.61}}}
    )
    records = [
        RunRecord(n, d, "completed")
        for n, d in (("shipped", shipped), ("aside", kept_aside), ("plain", plain))
    ]
    named = by_name(collect_rows(records))
    assert named["shipped"]["onnx_target_iou"] == pytest.approx(0.6)
    assert named["shipped"]["int8_target_iou"] == pytest.approx(0.595)
    assert named["shipped"]["int8_latency_ratio"] == pytest.approx(0.6)
    assert named["shipped"]["int8_shipped"] == "yes"
    assert named["aside"]["int8_shipped"] == "no: −0.0500 > 0.01"
    assert (
        named["plain"]["onnx_target_iou"] == pytest.approx(0.61) and named["plain"]["int8_target_iou"] is None
    )

    md = (write_report(collect_rows(records), tmp_path / "with", records)["markdown"]).read_text()
    assert "ONNX target IoU" in md and "INT8 target IoU" in md and "INT8 shipped" in md
    assert "no: −0.0500 > 0.01" in md
    md_plain = write_report(collect_rows(records[2:]), tmp_path / "without", records[2:])[
        "markdown"
    ].read_text()
    assert "ONNX target IoU" in md_plain and "0.6100" in md_plain and "INT8" not in md_plain


# ------------------------------------------------------------------ test split, headline, trustworthy ratios
def _sums(miou: float, noise: float, seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (intersection, union) [n, 3] whose summed IoU is exactly `miou` for every class; `noise` is
    the per-image spread of the IoU (zero-mean per class, so the sums are unchanged)."""
    rng = np.random.default_rng(seed)
    union = np.full((n, 3), 100.0)
    jitter = rng.normal(0.0, noise * 100.0, (n, 3))
    inter = union * miou + jitter - jitter.mean(axis=0)
    return inter, union


def _test_trio(tmp_path: Path, teacher: float, base: float, dist: float, noise: float) -> list[RunRecord]:
    """Teacher/baseline/distilled selected by mIoU (the default) with a test split and per-image test sums."""
    runs = tmp_path / "runs"

    def run(name: str, enc: str, value: float, seed: int, teacher_dir: Path | None = None) -> Path:
        return fabricate_run(
            runs, name, enc, [0.9, 0.95], monitor=None, per_image=_sums(value, noise, seed),
            test={"miou": value, "target_iou": value + 0.05, "iou_other": 0.2},
            teacher_checkpoint=teacher_dir / "checkpoints" / "best_model.pth" if teacher_dir else None,
        )  # fmt: skip

    t = run("t", B3, teacher, 0)
    b = run("b", B0, base, 1)
    d = run("d", B0, dist, 2, teacher_dir=t)
    return [RunRecord(n, p, "completed") for n, p in (("t", t), ("b", b), ("d", d))]


def test_rows_report_the_test_score_of_the_checkpoint_selected_on_val_headed_by_miou(tmp_path: Path) -> None:
    records = _test_trio(tmp_path, 0.8, 0.5, 0.65, noise=0.02)
    named = by_name(collect_rows(records))
    d = named["d"]
    # validation peaked at 0.95 (epoch 2); the table shows the test score, not the validation number
    assert (d["miou"], d["target_iou"], d["split"], d["best_epoch"]) == (0.65, pytest.approx(0.70), "test", 2)
    assert "onnx_miou" in d and "onnx_target_iou" not in d  # the ONNX score column follows the headline
    # the lead 0.3 is far outside the per-image bootstrap's interval: both ratios on mIoU are shown
    assert d["teacher_lead_note"] is None
    assert d["pct_of_teacher"] == pytest.approx(100 * 0.65 / 0.8)
    assert d["gap_closed"] == pytest.approx((0.65 - 0.5) / (0.8 - 0.5))
    md = write_report(collect_rows(records), tmp_path / "report", records)["markdown"].read_text()
    assert "score on the held-out test split" in md and "Without a test split" not in md
    from kdlab.experiments.report.write import scored_on

    rows = collect_rows(records)
    assert scored_on(rows) == "test split, checkpoint chosen on val"
    rows[0]["split"] = "val"
    assert scored_on(rows).startswith("test split; val best epoch")


def test_ratios_are_hidden_when_the_teachers_lead_is_within_the_test_image_noise(tmp_path: Path) -> None:
    records = _test_trio(tmp_path, 0.52, 0.50, 0.51, noise=0.3)
    named = by_name(collect_rows(records))
    for name in ("b", "d"):
        assert named[name]["pct_of_teacher"] is None and named[name]["gap_closed"] is None
        assert "within its 95% bootstrap interval over test images" in named[name]["teacher_lead_note"]
    md = write_report(collect_rows(records), tmp_path / "report", records)["markdown"].read_text()
    assert "b, d: the teacher's lead over b (+0.0200 mIoU) is within" in md


def test_a_run_without_test_split_is_named_in_the_intro(tmp_path: Path) -> None:
    records = _test_trio(tmp_path, 0.8, 0.5, 0.65, noise=0.02)
    summary_path = records[1].run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["test_metrics"]
    summary_path.write_text(json.dumps(summary))
    rows = collect_rows(records)
    assert by_name(rows)["b"]["split"] == "val" and by_name(rows)["b"]["miou"] == pytest.approx(0.85)
    md = write_report(rows, tmp_path / "report", records)["markdown"].read_text()
    assert "Without a test split (b), the best epoch is chosen on the same validation set" in md


def test_runs_that_select_by_different_metrics_get_the_tasks_headline(tmp_path: Path) -> None:
    a = fabricate_run(tmp_path, "a", B0, [0.5], monitor="target_iou")
    b = fabricate_run(tmp_path, "b", B0, [0.6], monitor="iou_other")
    rows = collect_rows([RunRecord("a", a, "completed"), RunRecord("b", b, "completed")])
    assert "onnx_miou" in rows[0]  # mixed monitors: the task's own headline
    c = fabricate_run(tmp_path, "c", B0, [0.5], monitor="ece")  # lower is better: cannot head "% of teacher"
    assert "onnx_miou" in collect_rows([RunRecord("c", c, "completed")])[0]


def test_pct_of_teacher_is_hidden_over_seeds_when_the_teacher_is_within_the_baseline_interval(
    three_seeds: list[RunRecord],
) -> None:
    table = {r["experiment"]: r for r in report.aggregate_rows(collect_rows(three_seeds), three_seeds)}
    assert table["base"]["pct_of_teacher"] == pytest.approx(100 * 0.6 / 0.9)  # margin 0.3 > 0.2484
    _retarget(three_seeds[0], 0.8)  # margin 0.2 < the baseline's half-width 0.2484
    table = {r["experiment"]: r for r in report.aggregate_rows(collect_rows(three_seeds), three_seeds)}
    for name in ("base", "dist"):
        assert table[name]["pct_of_teacher"] is None
        assert (
            "+0.2000 target IoU) is within its 95% uncertainty over seeds (±0.2484"
            in (table[name]["teacher_lead_note"])
        )
    assert table["teacher"]["pct_of_teacher"] == pytest.approx(100.0)


def test_the_equivalence_margin_comes_from_the_runs_report_config(
    three_seeds: list[RunRecord], tmp_path: Path
) -> None:
    named = {r.name: r for r in three_seeds}
    for seed, value in ((42, 0.501), (1, 0.602), (2, 0.699)):  # diffs 0.001, 0.002, -0.001: CI ±0.0038
        _retarget(named[f"dist__seed-{seed}"], value)
    rows = collect_rows(three_seeds)
    csv_text = write_report(rows, tmp_path / "a", three_seeds)["csv"].read_text()
    assert "equivalent within ±0.005" in csv_text  # the default margin holds the interval
    for record in three_seeds:
        config_path = record.run_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["report"] = {"equivalence_margin": 0.002}
        config_path.write_text(json.dumps(config))
    md = write_report(rows, tmp_path / "b", three_seeds)["markdown"].read_text()
    assert "| inconclusive" in md and "equivalent within ±0.002 when" in md


def test_the_teacher_is_found_after_the_output_directory_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner writes teacher paths relative to the cwd under the config's output_dir
    (experiments/<teacher>/checkpoints/best_model.pth). Moved to another folder and reported from elsewhere,
    the distilled run's teacher is still its teacher (role, % of teacher), not a 'student'."""
    moved = tmp_path / "archive" / "2026-12"
    teacher = fabricate_run(moved, "teacher_b3", B3, [0.6, 0.7, 0.8], params_total=13_500_000)
    baseline = fabricate_run(moved, "baseline_b0", B0, [0.4, 0.5, 0.45])
    distilled = fabricate_run(moved, "distilled_b0", B0, [0.5, 0.65, 0.6])
    config = tiny_config("distilled_b0", B0, Path("experiments/teacher_b3/checkpoints/best_model.pth"))
    assert config["output_dir"] == "experiments"
    (distilled / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)  # where `experiments/` is not
    records = [RunRecord("teacher_b3", teacher, "completed"), RunRecord("baseline_b0", baseline, "completed"),
               RunRecord("distilled_b0", distilled, "completed")]  # fmt: skip
    named = by_name(collect_rows(records))
    assert named["teacher_b3"]["role"] == "teacher"
    assert named["teacher_b3"]["pct_of_teacher"] == pytest.approx(100.0)
    # a path outside output_dir is not re-rooted: nothing matches, and the run stays a student
    config["distillation"]["teacher_checkpoint"] = "elsewhere/teacher_b3/checkpoints/best_model.pth"
    (distilled / "config.json").write_text(json.dumps(config))
    assert by_name(collect_rows(records))["teacher_b3"]["role"] == "student"
