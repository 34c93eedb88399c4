"""Whether the teacher's lead over a baseline is resolved (one run each): a paired bootstrap over the per-image
test sums both runs leave. "% of teacher" and "gap closed" are shown only where it is: a ratio of two
differences within the noise reads as a result."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.evaluate.report_layout import ReportLayout
from kdlab.experiments.report.run_files import RESULT_STATUSES, RunRecord
from kdlab.experiments.seed_stats import paired_bootstrap

log = logging.getLogger(__name__)

# The file a run's test evaluation leaves for the paired bootstrap: float arrays `intersection` and `union`
# [n_test_images, n_classes], the summed pixel counts per image and class, in the test set's fixed order.
PER_IMAGE_FILE = "logs/test_per_image.npz"
# Headline metrics that are ratios of summed intersections and unions, so that a bootstrap can recompute
# them from per-image sums: metric -> the classes averaged (None: every class with a union, i.e. mIoU).
# Class ids as in kdlab.evaluate.metrics: 0 background, 1 target, 2 other.
SUMMED_HEADLINES: dict[str, tuple[int, ...] | None] = {
    "miou": None, "iou_background": (0,), "iou_target": (1,), "iou_other": (2,),
}  # fmt: skip


def teacher_lead_note(
    teacher: dict[str, Any],
    baseline: dict[str, Any],
    per_image: dict[str, tuple[np.ndarray, np.ndarray]],
    layout: ReportLayout,
) -> str | None:
    """None when the teacher's lead over the baseline (one run each) is real: the 95% interval of a paired
    bootstrap over the test images (both runs scored on the same images) lies above 0. Otherwise the reason,
    for the report's legend. Without per-image sums the lead's uncertainty is unknown: not shown either."""
    head, label = layout.headline, layout.headline_label
    t_name, b_name = teacher["experiment"], baseline["experiment"]
    lead = teacher[head] - baseline[head]
    if lead <= 1e-12:
        return f"the teacher {t_name} does not lead {b_name} on {label} ({lead:+.4f})"
    if head not in SUMMED_HEADLINES or t_name not in per_image or b_name not in per_image:
        return (
            f"one run each and no per-image test sums: the uncertainty of the teacher's lead over {b_name} "
            f"({lead:+.4f} {label}) is unknown (run --seeds, or give the runs a test split)"
        )
    try:
        boot = paired_bootstrap([per_image[t_name]], [per_image[b_name]], classes=SUMMED_HEADLINES[head])
    except ValueError as exc:  # e.g. the two runs were scored on different test sets
        return f"the uncertainty of the teacher's lead over {b_name} cannot be estimated ({exc})"
    if boot.low <= 0:
        return (
            f"the teacher's lead over {b_name} ({lead:+.4f} {label}) is within its 95% bootstrap interval over "
            f"test images [{boot.low:+.4f}, {boot.high:+.4f}]"
        )
    return None


def read_per_image(run_dir: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's per-image test sums (`PER_IMAGE_FILE`) as (intersection, union), or None when absent or
    unreadable (logged)."""
    if run_dir is None:
        return None
    path = run_dir / PER_IMAGE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            inter, union = np.asarray(data["intersection"], float), np.asarray(data["union"], float)
    except (OSError, KeyError, ValueError) as exc:
        log.warning("report: cannot read %s (%s); no bootstrap uses it", path, exc)
        return None
    if inter.ndim != 2 or inter.shape != union.shape:
        log.warning("report: %s holds arrays of shapes %s and %s, not [images, classes]; ignored",
                    path, inter.shape, union.shape)  # fmt: skip
        return None
    return inter, union


def per_image_sums(records: list[RunRecord]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run name -> its per-image test sums, for the runs with a result that left them."""
    out = {}
    for record in records:
        if record.status in RESULT_STATUSES and (sums := read_per_image(record.run_dir)) is not None:
            out[record.name] = sums
    return out
