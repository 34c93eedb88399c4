"""Smoke test of the benchmark suite's code paths at tiny size (no timing is asserted, only shape and sanity)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.__main__ import main


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench.json"
    exported = root / "exported_run" / "checkpoints"  # what an export records, for the accuracy rows
    exported.mkdir(parents=True)
    (exported / "best_model.onnx.json").write_text(json.dumps({
        "exporter": "dynamo", "parity": {"max_abs_diff": 2e-6},
        "accuracy": {"metric": "target_iou", "images": 112, "pytorch": {"target_iou": 0.46}, "onnx": {"target_iou": 0.4601}},
    }))  # fmt: skip
    argv = [
        "--onnx_run", str(root / "exported_run"), str(root / "not_exported"),
        "--suite", "all", "--device", "cpu", "--json", str(out), "--size", "64", "64", "--batch_size", "1",
        "--reps", "1", "--warmup", "0", "--workers", "0", "1", "--data_images", "2", "--rois_per_image", "2",
        "--onnx_runs", "1", "--teacher_encoder", "timm-efficientnet-b0", "--student_encoder", "timm-efficientnet-b0",
        "--no_peak_memory",  # its subprocess is tested below, in-process (a fresh interpreter costs ~15 s)
    ]  # fmt: skip
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the CPU default of one thread is undone afterwards
    return json.loads(Path(out).read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_suite_reports_its_headline_numbers(tiny_result):
    summary = tiny_result["summary"]
    for key in ("kd_over_student_plus_teacher", "cached_kd_over_student", "speedup_vs_naive", "project_images_per_sec", "loader_over_step",
                "fed_over_step_time", "onnx_student_over_teacher"):  # fmt: skip
        assert _positive(summary[key]), (key, summary[key])
    assert "gpu_busy_fraction" not in summary or summary["gpu_busy_fraction"] is None


def test_kd_suite_times_every_case_in_every_rep(tiny_result):
    kd = tiny_result["suites"]["kd"]
    for case in ("student_step", "teacher_step", "kd_step", "cached_kd_step", "naive_step"):
        assert len(kd["times_s"][case]) == 1 and _positive(kd["times_s"][case][0])
    assert kd["kd_over_student_plus_teacher"] == pytest.approx(
        kd["kd_step_ms"] / (kd["student_step_ms"] + kd["teacher_step_ms"])
    )
    assert "excluded" in kd["grad_share_steps"]


def test_data_and_onnx_suites_cover_every_setting(tiny_result):
    data = tiny_result["suites"]["data"]
    assert set(data["loader_images_per_sec"]) == {"0", "1"}
    assert all(_positive(v) for v in data["loader_over_step"].values())
    onnx = tiny_result["suites"]["onnx"]
    assert (
        onnx["size"] == [64, 64] and _positive(onnx["onnx_student_ms"]) and _positive(onnx["onnx_teacher_ms"])
    )
    # One interleaved run times all five graphs; the fast student is the base with quickstart_fast_distill's change.
    assert set(onnx["ms"]) == {"teacher", "student", "student_int8", "fast", "fast_int8"}
    assert all(_positive(onnx[f"{r}_over_teacher"]) for r in ("student", "student_int8", "fast", "fast_int8"))
    assert list(onnx["models"]["fast_changes"]["decoder_channels"]) == [128, 64, 32, 16, 8]
    assert onnx["mb"]["student_int8"] < onnx["mb"]["student"]  # int8 weights
    good, missing = onnx["accuracy"]
    assert good["run"] == "exported_run" and good["onnx"] == 0.4601 and good["pytorch"] == 0.46
    assert "not found" in missing["error"]
    assert tiny_result["machine"]["cpu_count"] >= 1 and tiny_result["settings"]["size"] == [64, 64]


def test_gpu_busy_fraction_is_the_union_of_kernel_intervals_over_the_loop(monkeypatch):
    """The CUDA-only busy fraction, fed fake profiler events: overlapping kernels count once, gaps are idle."""
    import types

    import torch.profiler
    from torch.autograd import DeviceType

    from benchmarks import data as data_suite

    def event(name, device, start, end):
        return types.SimpleNamespace(
            name=name, device_type=device, time_range=types.SimpleNamespace(start=start, end=end)
        )

    events = [
        event("kdlab_fed_loop", DeviceType.CPU, 0, 100),
        event("k1", DeviceType.CUDA, 10, 30),
        event("k2", DeviceType.CUDA, 20, 40),  # overlaps k1: busy 10..40
        event("k3", DeviceType.CUDA, 60, 70),  # busy 60..70
    ]

    class FakeProfile:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(data_suite.torch.cuda, "synchronize", lambda: None)
    assert data_suite.gpu_busy_fraction(lambda: None) == pytest.approx(0.4)


def test_peak_memory_child_reports_max_rss(tiny_result, capsys):
    from benchmarks.kd import _peak_memory_child

    settings = dict(tiny_result["settings"], teacher_encoder="timm-efficientnet-b0", threads=None)
    _peak_memory_child(json.dumps(settings))
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _positive(report["kd_peak_memory_mib"])
    assert report["kd_peak_memory_mib"] >= report["memory_before_steps_mib"] > 0


def test_fast_student_suite_times_candidates_against_the_teacher(tmp_path, capsys):
    """Two small exports at 64x64 (a B0 'teacher' keeps it to seconds): every row has latencies, parameter and
    MAC counts, and the half-width candidate is the lighter one."""
    out = tmp_path / "fast.json"
    argv = [
        "--suite", "fast_student", "--size", "64", "64", "--onnx_runs", "1", "--warmup", "0",
        "--rois_per_image", "1", "--teacher_encoder", "timm-efficientnet-b0", "--candidates", "dec128+head32",
        "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    (size,) = json.loads(out.read_text())["suites"]["fast_student"]["sizes"]
    assert size["size"] == [64, 64] and size["rois"] == 1
    assert set(size["models"]) == {"teacher", "dec128+head32"}
    teacher, fast = size["models"]["teacher"], size["models"]["dec128+head32"]
    for row in (teacher, fast):
        assert all(_positive(row[k]) for k in ("ms", "unet_ms", "over_teacher", "params_m"))
        assert _positive(row["gmacs"]["roi_head"]) and row["gmacs"]["total"] > row["gmacs"]["encoder"]
    assert fast["params_m"] < teacher["params_m"] and fast["gmacs"]["total"] < teacher["gmacs"]["total"]
    assert "| dec128+head32 |" in capsys.readouterr().out


def test_methods_suite_times_every_method_against_plain_kd(tmp_path, capsys):
    """Every case of `benchmarks.methods.CASES` at 64x64 with B0 as the teacher: positive finite ratios over the
    plain KD step, the reference's exactly 1, and the CLI writes the suite to the JSON."""
    from benchmarks.methods import CASES, REFERENCE

    out = tmp_path / "methods.json"
    argv = [
        "--suite", "methods", "--device", "cpu", "--json", str(out), "--size", "64", "64", "--batch_size", "1",
        "--reps", "1", "--warmup", "0", "--rois_per_image", "1", "--teacher_encoder", "timm-efficientnet-b0",
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["suites"]) == {"methods"}
    methods = result["suites"]["methods"]
    assert list(methods["cases"]) == [case for case, _ in CASES] and CASES[0][0] == REFERENCE == "kd"
    for case, _ in CASES:
        assert _positive(methods[f"{case}_over_kd"]), case
        assert _positive(methods[f"{case}_over_kd_per_rep_median"]), case
        assert _positive(methods[f"{case}_step_ms"]) and len(methods["times_s"][case]) == 1
    assert methods["kd_over_kd"] == 1.0 and methods["kd_over_kd_per_rep_median"] == 1.0
    assert "excluded" in methods["grad_share_steps"]
    assert "| mgd (quickstart_mgd) |" in capsys.readouterr().out
