"""`python -m benchmarks --suite kd|data|onnx|all|fast_student|methods|gpu --device cpu|cuda --json PATH` (see
docs/performance.md).

`all` is kd, data and onnx; `fast_student` (a dozen ONNX exports, minutes) and `methods` (each distillation
method's KD step over the plain KD step's) run only when named. `gpu` is the GPU acceptance check
(benchmarks/gpu.py): pass/fail items, `--out DIR`, exit code 0 only when every item passed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchSettings, defaults_for, machine_info, quiet_logs

SUITES = ("kd", "data", "onnx")
EXTRA_SUITES = ("fast_student", "methods", "gpu")  # not part of "all"


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--suite", choices=(*SUITES, *EXTRA_SUITES, "all"), default="all")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the results here (gpu: default <out>/gpu_acceptance.json)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="gpu: the working directory (default: a fresh temp dir)"
    )
    p.add_argument("--items", nargs="+", metavar="ITEM", help="gpu: run only these items (default: all)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--teacher_encoder")
    p.add_argument("--student_encoder")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--reps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--workers", type=int, nargs="+", help="data-loader worker counts to measure")
    p.add_argument("--rois_per_image", type=int)
    p.add_argument("--data_images", type=int, help="synthetic images for the data suite")
    p.add_argument("--onnx_runs", type=int)
    p.add_argument("--onnx_sizes", type=_size, nargs="*", help="extra ONNX resolutions, e.g. 640x640")
    p.add_argument("--base_config", help="named config the models' sizes come from (e.g. people_b0_from_b3)")
    p.add_argument("--fast_config", help="onnx: the fast student's config (e.g. people_fast_from_b3)")
    p.add_argument(
        "--onnx_run", dest="onnx_run_dirs", nargs="+", action="extend", default=[], metavar="RUN_DIR",
        help="onnx: also report these exported runs' ONNX / PyTorch / INT8 target IoU (best_model.onnx.json)",
    )  # fmt: skip
    p.add_argument("--candidates", nargs="+", help="fast_student: the candidates to time (default: all)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no_naive", action="store_true", help="skip the naive reference loop")
    p.add_argument("--no_peak_memory", action="store_true", help="skip the CPU max-RSS subprocess")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    s = defaults_for(args.device)
    for name in ("batch_size", "teacher_encoder", "student_encoder", "amp", "channels_last", "compile", "reps",
                 "warmup", "rois_per_image", "data_images", "onnx_runs", "threads", "base_config",
                 "fast_config"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    if args.size:
        s.size = (args.size[0], args.size[1])
    if args.workers:
        s.workers = tuple(args.workers)
    if args.onnx_sizes is not None:
        s.onnx_sizes = tuple(args.onnx_sizes)
    if args.onnx_run_dirs:
        s.onnx_run_dirs = tuple(args.onnx_run_dirs)
    if args.candidates:
        s.extra["fast_student_candidates"] = list(args.candidates)
    s.naive = not args.no_naive
    s.peak_memory = not args.no_peak_memory
    return s


def run(s: BenchSettings, suites: tuple[str, ...]) -> dict[str, Any]:
    """Run the suites in one process; returns the JSON-ready result."""
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, suites, device)
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests) keep their setting


def _run(s: BenchSettings, suites: tuple[str, ...], device: torch.device) -> dict[str, Any]:
    result: dict[str, Any] = {"settings": s.to_json(), "machine": machine_info(device), "suites": {}}
    started = time.perf_counter()
    with quiet_logs():
        if "kd" in suites:
            from benchmarks.kd import run_kd_suite

            result["suites"]["kd"] = run_kd_suite(s)
        if "data" in suites:
            from benchmarks.data import run_data_suite

            step = result["suites"].get("kd", {}).get("project_images_per_sec")
            result["suites"]["data"] = run_data_suite(s, step)
        if "onnx" in suites:
            from benchmarks.onnx_suite import run_onnx_suite

            result["suites"]["onnx"] = run_onnx_suite(s)
        if "fast_student" in suites:
            from benchmarks.fast_student import run_fast_student_suite

            result["suites"]["fast_student"] = run_fast_student_suite(s)
        if "methods" in suites:
            from benchmarks.methods import run_methods_suite

            result["suites"]["methods"] = run_methods_suite(s)
    result["seconds"] = time.perf_counter() - started
    result["summary"] = summary(result)
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, flat."""
    kd = result["suites"].get("kd", {})
    data = result["suites"].get("data", {})
    onnx = result["suites"].get("onnx", {})
    keys = {
        "kd_over_student_plus_teacher": kd.get("kd_over_student_plus_teacher"),
        "kd_over_student_plus_teacher_per_rep_median": kd.get("kd_over_student_plus_teacher_per_rep_median"),
        "kd_over_student_plus_teacher_cpu_time": kd.get("kd_over_student_plus_teacher_cpu_time"),
        "cached_kd_over_student": kd.get("cached_kd_over_student"),
        "speedup_vs_naive": kd.get("speedup_vs_naive"),
        "project_images_per_sec": kd.get("project_images_per_sec"),
        "kd_peak_memory_mib": kd.get("kd_peak_memory_mib"),
        "loader_over_step": data.get("loader_over_step_best"),
        "fed_over_step_time": data.get("fed_over_step_time"),
        "gpu_busy_fraction": data.get("gpu_busy_fraction"),
        "onnx_student_over_teacher": onnx.get("onnx_student_over_teacher"),
    }
    return {k: v for k, v in keys.items() if k in _present(result, k)}


def _present(result: dict[str, Any], key: str) -> set[str]:
    suites = result["suites"]
    owner = {"loader_over_step": "data", "fed_over_step_time": "data", "gpu_busy_fraction": "data",
             "onnx_student_over_teacher": "onnx"}.get(key, "kd")  # fmt: skip
    return {key} if owner in suites else set()


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 100 else f"{value:.0f}{unit}"
    return f"{value}{unit}"


def table(result: dict[str, Any]) -> str:
    """A Markdown table of what ran: measurement, value, goal."""
    s, suites = result["settings"], result["suites"]
    rows: list[tuple[str, str, str]] = []
    kd = suites.get("kd")
    if kd:
        rows += [
            ("(a) student training step", _fmt(kd["student_step_ms"], " ms"), ""),
            ("(b) teacher inference step", _fmt(kd["teacher_step_ms"], " ms"), ""),
            ("(c) online KD step (grad-share steps excluded)", _fmt(kd["kd_step_ms"], " ms"), ""),
            (
                "kd_over_student_plus_teacher = c / (a + b)",
                _fmt(kd["kd_over_student_plus_teacher"]),
                "<= 1.05",
            ),
            ("  per-rep median of c / (a + b)", _fmt(kd["kd_over_student_plus_teacher_per_rep_median"]), ""),
            (
                "  from CPU time instead of wall time",
                _fmt(kd.get("kd_over_student_plus_teacher_cpu_time")),
                "",
            ),
            ("(d) KD step from cached teacher outputs", _fmt(kd["cached_kd_step_ms"], " ms"), ""),
            ("cached_kd_over_student = d / a", _fmt(kd["cached_kd_over_student"]), "<= 1.10"),
            ("  per-rep median of d / a", _fmt(kd["cached_kd_over_student_per_rep_median"]), ""),
            ("project loop images/s", _fmt(kd["project_images_per_sec"]), ""),
        ]
        if "speedup_vs_naive" in kd:
            rows += [
                ("naive loop images/s", _fmt(kd["naive_images_per_sec"]), ""),
                ("speedup_vs_naive", _fmt(kd["speedup_vs_naive"]), ">= 3 (H100, 640², B16)"),
            ]
        if kd.get("kd_peak_memory_mib") is not None:
            rows.append(
                (
                    f"KD step peak memory ({kd['kd_peak_memory_kind']})",
                    _fmt(kd["kd_peak_memory_mib"], " MiB"),
                    "",
                )
            )
    data = suites.get("data")
    if data:
        for n, ips in data["loader_images_per_sec"].items():
            rows.append((f"loader images/s, {n} workers", _fmt(ips), ""))
        rows += [
            ("KD step images/s (consumption)", _fmt(data["step_images_per_sec"]), ""),
            (
                f"loader_over_step (best: {data['best_workers']} workers)",
                _fmt(data["loader_over_step_best"]),
                "> 1",
            ),
            (
                f"fed loop / step alone time ({data['fed_loop_workers']} workers)",
                _fmt(data["fed_over_step_time"]),
                "~1",
            ),
        ]
        if "gpu_busy_fraction" in data:
            rows.append(("GPU busy fraction (fed loop)", _fmt(data["gpu_busy_fraction"]), ">= 0.9"))
    onnx = suites.get("onnx")
    if onnx:
        for r in [onnx, *onnx.get("other_sizes", [])]:
            size = "×".join(str(v) for v in r["size"])
            rows.append(
                (f"ONNX teacher latency, {size}, {r['rois']} ROIs", _fmt(r["ms"]["teacher"], " ms"), "")
            )
            for role, goal in (
                ("student", ""),
                ("student_int8", ""),
                ("fast", "<= 0.5"),
                ("fast_int8", "<= 0.5"),
            ):
                rows.append((f"{role} / teacher, {size}", _fmt(r[f"{role}_over_teacher"]), goal))
        for acc in onnx.get("accuracy", []):
            if "error" in acc:
                rows.append((f"accuracy of {acc['run']}", acc["error"], ""))
                continue
            rows.append((f"{acc['run']}: {acc['metric']} PyTorch / ONNX / INT8 ({acc['images']} val images)",
                         f"{_fmt(acc['pytorch'])} / {_fmt(acc['onnx'])} / {_fmt(acc['int8'])}", "ONNX = PyTorch"))  # fmt: skip
    methods = suites.get("methods")
    if "fast_student" in suites and not (kd or data or onnx or methods):
        from benchmarks.fast_student import fast_student_table

        return _machine_line(result) + "\n\n" + fast_student_table(suites["fast_student"])
    m = result["machine"]
    head = (
        f"device {s['device']} ({m.get('gpu') or m['processor']}, {m['cpu_count']} CPUs), "
        f"{s['size'][0]}×{s['size'][1]}, batch {s['batch_size']}, {s['rois_per_image']} ROIs/image, "
        f"{s['teacher_encoder']} → {s['student_encoder']}, amp {(kd or methods or s)['amp']}, "
        f"channels_last {s['channels_last']}, compile {s['compile']}, {s['reps']} reps after {s['warmup']} warm-up"
    )
    lines = [head]
    if rows or not methods:
        lines += ["", "| measurement | value | goal |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if methods:
        from benchmarks.methods import methods_table

        lines += ["", "Distillation methods: KD training step over the plain KD step (one interleaved run)", "",
                  methods_table(methods)]  # fmt: skip
    if "fast_student" in suites:
        from benchmarks.fast_student import fast_student_table

        lines += ["", fast_student_table(suites["fast_student"])]
    return "\n".join(lines)


def _machine_line(result: dict[str, Any]) -> str:
    """The fast-student suite's header: the machine and how many ROIs and runs each model got."""
    m, fast = result["machine"], result["suites"]["fast_student"]["sizes"][0]
    return (
        f"device cpu ({m['processor']}, {m['cpu_count']} CPUs, load {m.get('load_average')}), onnxruntime "
        f"{fast['ort_threads']} thread(s), 1 image, {fast['rois']} ROIs, {fast['runs']} interleaved runs per model"
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.suite == "gpu":
        from benchmarks.gpu import run_acceptance

        return run_acceptance(args.device, args.out, args.json, args.items)
    s = settings_from_args(args)
    suites = SUITES if args.suite == "all" else (args.suite,)
    result = run(s, suites)
    print(table(result))
    print(f"\n{result['seconds']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
