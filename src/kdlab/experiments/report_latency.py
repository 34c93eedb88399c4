"""One interleaved latency measurement of every exported file in a report.

Each export times its own file once, at its own moment, under whatever else the machine was doing: two runs
of one architecture read 15 and 25 ms in one quickstart. For the table and the figure the runner therefore
times all the report's `best_model.onnx` files again in one process, in turns (a, b, c, a, b, c, ...), on the
same image, threads and warm-up, and reports each file's median (`kdlab.export.measure.interleaved_onnx_latency`).
Files traced at different input sizes are timed in separate groups, each on an image of its own size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kdlab.atomic_io import write_json_atomic
from kdlab.config.schema import ExperimentConfig
from kdlab.tasks import task_of

log = logging.getLogger(__name__)

REPORT_LATENCY_FILE = "report_latency.json"
REPORT_LATENCY_RUNS = 20  # timed runs of each file, after the pipeline's warm-up runs


def measure_report_latency(
    runs: list[tuple[str, Path]], out_dir: Path, timed_runs: int = REPORT_LATENCY_RUNS
) -> dict[str, float]:
    """run name -> median onnxruntime ms per image of its `checkpoints/best_model.onnx`, every file timed in one
    interleaved loop per input size; written to `<out_dir>/report_latency.json`. Runs without an exported file
    (or config) are left out; a group that cannot be timed is logged and left out, never raised."""
    from kdlab.export import measure

    groups: dict[tuple[Any, ...], list[tuple[str, Path, ExperimentConfig]]] = {}
    for name, run_dir in runs:
        onnx = Path(run_dir) / "checkpoints" / "best_model.onnx"
        config = Path(run_dir) / "config.json"
        if not onnx.is_file() or not config.is_file():
            continue
        try:
            cfg = ExperimentConfig.model_validate_json(config.read_text())
        except ValueError as exc:
            log.warning("report latency: %s: unreadable config.json (%s); left out", name, exc)
            continue
        exporter = task_of(cfg).exporter()
        if exporter is None:
            continue
        key = (type(exporter).__name__, tuple(exporter.input_size(cfg)))
        groups.setdefault(key, []).append((name, onnx, cfg))
    result: dict[str, float] = {}
    records = []
    for (_, size), members in groups.items():
        exporter = task_of(members[0][2]).exporter()
        try:
            batches = exporter.validation_batches(members[0][2], max(1, exporter.min_parity_images))
            batch = exporter.latency_batch(batches)
            ms = measure.interleaved_onnx_latency(
                {name: path for name, path, _ in members}, exporter, batch, timed_runs
            )
        except Exception as exc:  # noqa: BLE001 - the report falls back to each export's own figure
            log.warning("report latency: timing %s failed (%s); their export-time figures are used",
                        ", ".join(n for n, _, _ in members), exc)  # fmt: skip
            continue
        result.update(ms)
        records.append({"input_size": list(size), "runs": sorted(ms), **exporter.counts(batch)})
    if result:
        write_json_atomic(out_dir / REPORT_LATENCY_FILE, {
            "ms_per_image_median": result, "timed_runs": timed_runs, "warmup_runs": measure.WARMUP_RUNS,
            "interleaved": True, "torch_threads": torch.get_num_threads(), "groups": records,
            "engine": "onnxruntime CPUExecutionProvider",
        })  # fmt: skip
        log.info("report latency: %d exported files timed in one interleaved run", len(result))
    return result
