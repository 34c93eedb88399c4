"""Comparison report of several experiment runs: one table (pandas DataFrame -> CSV, Markdown, JSON) and two
figures (PNG). When configs ran over several seeds (`--seeds`), the table has one row per config (mean ± std
over seeds, the paired difference of a distilled config from its baseline with a Student-t interval and a
verdict; see `aggregate_rows` and `seed_stats`), and the per-run rows go to experiment_comparison_runs.csv.

Roles (teacher / student / distilled) come from the runner or are inferred from the configs, and give
"% of teacher" and "gap closed" = (distilled - baseline) / (teacher - baseline) on the headline metric.
Everything that differs per task (columns, headline, architecture name, MAC count) is the task's
`kdlab.evaluate.report_layout.ReportLayout` and MAC counter; the report never compares task names.

Modules: run_files (one run directory read), layouts (which layout and columns), teacher_lead (is the
teacher's lead resolved), collect (run directories -> rows, roles), aggregate (over seeds), tables
(CSV/JSON/Markdown and the text), figures (PNG), provenance (what differs between runs), write (the files of
a report).
"""

from kdlab.evaluate.report_layout import SEGMENTATION_LAYOUT, ReportLayout
from kdlab.experiments.report.aggregate import aggregate_rows, aggregated_columns, is_multi_seed
from kdlab.experiments.report.collect import ROLES, collect_rows
from kdlab.experiments.report.layouts import layout_for_configs, layout_for_rows
from kdlab.experiments.report.run_files import RESULT_STATUSES, RunRecord, read_metrics_csv, split_seed
from kdlab.experiments.report.tables import (
    MISSING,
    aggregated_markdown,
    frame_to_csv,
    frame_to_json,
    runs_markdown,
    table_frame,
)
from kdlab.experiments.report.write import write_report

COLUMNS: tuple[str, ...] = SEGMENTATION_LAYOUT.columns  # the columns of a segmentation table

__all__ = [
    "COLUMNS",
    "MISSING",
    "RESULT_STATUSES",
    "ROLES",
    "ReportLayout",
    "RunRecord",
    "aggregate_rows",
    "aggregated_columns",
    "aggregated_markdown",
    "collect_rows",
    "frame_to_csv",
    "frame_to_json",
    "is_multi_seed",
    "layout_for_configs",
    "layout_for_rows",
    "read_metrics_csv",
    "runs_markdown",
    "split_seed",
    "table_frame",
    "write_report",
]
