"""The report's files: experiment_comparison.{csv,md,json,png}, experiment_comparison_runs.csv and
training_curves.png, each written atomically."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kdlab.atomic_io import RESUME_ADVICE, write_failure_advice, write_text_atomic
from kdlab.experiments.report.aggregate import (
    aggregate_rows,
    aggregated_columns,
    grouping_note,
    is_multi_seed,
    separate_unseeded,
)
from kdlab.experiments.report.figures import comparison_figure, curves_figure, plot_points, save_figure_atomic
from kdlab.experiments.report.layouts import csv_columns, layout_for_rows
from kdlab.experiments.report.provenance import provenance_note
from kdlab.experiments.report.run_files import RESULT_STATUSES, RunRecord, read_config, split_seed
from kdlab.experiments.report.tables import (
    aggregated_markdown,
    frame_to_csv,
    frame_to_json,
    intro,
    lead_legend,
    runs_markdown,
    seed_method,
    table_frame,
    verdict_summary,
)
from kdlab.experiments.report.teacher_lead import per_image_sums
from kdlab.experiments.seed_stats import EQUIVALENCE_MARGIN

log = logging.getLogger(__name__)


def scored_on(rows: list[dict[str, Any]]) -> str:
    """Where the figure's values come from: the test split (checkpoint chosen on val), the validation set
    (best epoch), or both when some runs have no test split."""
    splits = {r.get("split") for r in rows if r.get("status") in RESULT_STATUSES and r.get("split")}
    if splits == {"test"}:
        return "test split, checkpoint chosen on val"
    if "test" in splits:
        return "test split; val best epoch where a run has none"
    return "val, best epoch"


def equivalence_margin(records: list[RunRecord]) -> float:
    """The ±margin of the "equivalent" verdict: the runs' `report.equivalence_margin` (config.json); when
    runs disagree, the largest (the most cautious claim of equivalence), with a warning."""
    margins = set()
    for record in records:
        config = read_config(record.run_dir)
        value = (
            (config or {}).get("report", {}).get("equivalence_margin") if isinstance(config, dict) else None
        )
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            margins.add(float(value))
    if not margins:
        return EQUIVALENCE_MARGIN
    if len(margins) > 1:
        log.warning("report: the runs set different report.equivalence_margin values (%s); using the largest",
                    ", ".join(f"{m:g}" for m in sorted(margins)))  # fmt: skip
    return max(margins)


def write_report(rows: list[dict[str, Any]], out_dir: Path, curves_from: list[RunRecord]) -> dict[str, Path]:
    """Write experiment_comparison.{csv,md,json,png}, experiment_comparison_runs.csv and training_curves.png
    into `out_dir` (each atomically) from the per-run `rows` of `collect_rows(curves_from)`.

    A full disk raises atomic_io.FileWriteError (one line: the file, the free space, rerun with --resume auto,
    which writes the whole report again without training the finished runs); the files already there stay.

    When some config ran over several seeds the table has one row per config (`aggregate_rows`) and the
    per-run rows (with their seed) go to experiment_comparison_runs.csv; otherwise both hold the per-run rows.
    Returns the paths by kind: "csv", "markdown", "json", "runs_csv", "comparison_png", "curves_png".
    """
    with write_failure_advice(RESUME_ADVICE):
        return _write_report(rows, Path(out_dir), curves_from)


def _write_report(rows: list[dict[str, Any]], out_dir: Path, curves_from: list[RunRecord]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "experiment_comparison.csv",
        "markdown": out_dir / "experiment_comparison.md",
        "json": out_dir / "experiment_comparison.json",
        "runs_csv": out_dir / "experiment_comparison_runs.csv",
        "comparison_png": out_dir / "experiment_comparison.png",
        "curves_png": out_dir / "training_curves.png",
    }
    layout = layout_for_rows(rows)
    curves_from = separate_unseeded(curves_from)  # a run without a seed is not pooled with seed runs
    aggregated = is_multi_seed(curves_from)
    by_name = {r.name: r for r in curves_from}
    seeded = [
        {**row, "config": g, "seed": s}
        for row in rows
        for g, s in [by_name[row["experiment"]].group_and_seed() if row["experiment"] in by_name
                     else split_seed(row["experiment"])]
    ]  # fmt: skip
    per_run = csv_columns(layout)
    runs_frame = table_frame(seeded, (*per_run[:1], "config", "seed", *per_run[1:]))
    write_text_atomic(paths["runs_csv"], frame_to_csv(runs_frame))
    completed = sum(1 for r in rows if r.get("status") in RESULT_STATUSES)
    val_only = [
        r["experiment"] for r in rows if r.get("status") in RESULT_STATUSES and r.get("split") == "val"
    ]
    text = ["# Experiment comparison", "", intro(layout, len(rows), completed, val_only)]
    note = provenance_note(curves_from)
    if note:
        text += ["", note]
    margin = equivalence_margin(curves_from)
    if aggregated:
        table = aggregate_rows(
            rows, curves_from, layout, equivalence_margin=margin, per_image=per_image_sums(curves_from)
        )
        frame = table_frame(table, aggregated_columns(layout))
        text += ["", seed_method(layout, margin)]
        grouped = grouping_note(curves_from)
        if grouped:
            text += ["", grouped]
        body = aggregated_markdown(frame, layout)
    else:
        table = rows
        frame = table_frame(rows, csv_columns(layout))
        body = runs_markdown(frame, layout)
    legend = lead_legend(table)
    if legend:
        body += "\n\n" + legend
    verdicts = verdict_summary(table, layout, scored_on(rows)) if aggregated else None
    if verdicts:
        body += "\n\n" + verdicts
    write_text_atomic(paths["csv"], frame_to_csv(frame))
    write_text_atomic(paths["json"], frame_to_json(frame))
    write_text_atomic(paths["markdown"], "\n".join([*text, "", body]) + "\n")
    save_figure_atomic(
        comparison_figure(plot_points(table, layout, aggregated), layout, scored_on(rows)),
        paths["comparison_png"],
    )
    roles = {r["experiment"]: r.get("role") for r in rows}
    roles.update({r["experiment"]: r.get("role") for r in table})
    save_figure_atomic(curves_figure(curves_from, roles, layout), paths["curves_png"])
    log.info("report: wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
