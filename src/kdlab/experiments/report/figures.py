"""Report figures (PNG, matplotlib's Agg canvas without pyplot): the headline metric against ONNX latency and
parameters, per run or per config with the std over seeds, and the training curves (validation headline and
train loss per epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kdlab.atomic_io import atomic_write
from kdlab.evaluate.report_layout import ReportLayout
from kdlab.experiments.report.collect import has_result
from kdlab.experiments.report.run_files import RunRecord, number, read_metrics_csv
from kdlab.experiments.seed_stats import t_interval

_ROLE_STYLE: dict[str, tuple[str, str]] = {  # marker, colour
    "teacher": ("^", "tab:red"),
    "student": ("o", "tab:blue"),
    "distilled": ("s", "tab:green"),
}


def _style(role: str | None) -> tuple[str, str]:
    return _ROLE_STYLE.get(role or "", ("D", "tab:gray"))


def plot_points(rows: list[dict[str, Any]], layout: ReportLayout, aggregated: bool) -> list[dict[str, Any]]:
    """What the comparison figure draws: per run, or per config with the std over seeds as error bar."""
    head = layout.headline
    if not aggregated:
        return [
            {"experiment": r["experiment"], "role": r.get("role"), "y": r[head], "yerr": None,
             "onnx_latency_ms": r.get("onnx_latency_ms"), "params_m": r.get("params_m")}
            for r in rows if has_result(r, head)
        ]  # fmt: skip
    return [
        {"experiment": f"{r['experiment']} (n={r['n']})", "role": r.get("role"), "y": r[f"{head}_mean"],
         "yerr": r[f"{head}_std"], "onnx_latency_ms": r.get("onnx_latency_ms_mean"), "params_m": r.get("params_m")}
        for r in rows if r["n"] > 0 and r[f"{head}_mean"] is not None
    ]  # fmt: skip


def comparison_figure(
    points: list[dict[str, Any]], layout: ReportLayout, scored_on: str = "val, best epoch"
) -> Figure:
    """The headline against ONNX latency and parameters; `scored_on` says where the y values come from (e.g.
    "test split, checkpoint chosen on val")."""
    label = layout.headline_label
    fig = _new_figure(12, 5)
    axes = fig.subplots(1, 2)
    panels = (("onnx_latency_ms", "ONNX latency (ms / image, median)"), ("params_m", "parameters (M)"))
    with_bars = any(p["yerr"] is not None for p in points)
    for ax, (x_key, x_label) in zip(axes, panels, strict=True):
        shown = [p for p in points if p.get(x_key) is not None]
        skipped = [p["experiment"] for p in points if p.get(x_key) is None]
        seen_roles: set[str] = set()
        for point in shown:
            marker, colour = _style(point.get("role"))
            role = point.get("role") or "other"
            ax.errorbar(
                point[x_key], point["y"], yerr=point["yerr"], fmt=marker, color=colour, markersize=9, capsize=4,
                zorder=3, label=role if role not in seen_roles else None, markeredgecolor="black",
                markeredgewidth=0.5,
            )  # fmt: skip
            seen_roles.add(role)
            ax.annotate(
                point["experiment"], (point[x_key], point["y"]), textcoords="offset points",
                xytext=(6, 6), fontsize=8,
            )  # fmt: skip
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{label} ({scored_on}" + (", mean ± std over seeds)" if with_bars else ")"))
        ax.set_title(f"{label} vs {x_label.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        if shown:
            ax.legend(loc="lower right", fontsize=8)
            ax.margins(x=0.25, y=0.15)
        else:
            ax.text(0.5, 0.5, "no run has this value", transform=ax.transAxes, ha="center", va="center")
        if skipped:
            ax.text(
                0.01, 0.01, "not shown (no value): " + ", ".join(skipped), transform=ax.transAxes,
                fontsize=7, va="bottom", ha="left", color="dimgray", wrap=True,
            )  # fmt: skip
    fig.suptitle(
        "Experiment comparison (" + ("configs over seeds" if with_bars else "runs with results") + ")"
    )
    fig.tight_layout()
    return fig


def curves_figure(curves_from: list[RunRecord], roles: dict[str, str | None], layout: ReportLayout) -> Figure:
    """Validation headline and train loss per epoch: one line per run, or, for a config run over several
    seeds, its mean per epoch with the std over seeds as error bars."""
    fig = _new_figure(12, 4.5)
    ax_val, ax_loss = fig.subplots(1, 2)
    curves: dict[str, list[tuple[list[tuple[float, float]], list[tuple[float, float]]]]] = {}
    markers: dict[str, str] = {}
    for record in curves_from:
        if record.run_dir is None:
            continue
        rows = read_metrics_csv(record.run_dir / "logs" / "metrics.csv")
        val = [(number(r.get("epoch")), number(r.get(f"val_{layout.headline}"))) for r in rows]
        loss = [(number(r.get("epoch")), number(r.get("train_loss"))) for r in rows]
        val = [(e, v) for e, v in val if e is not None and v is not None]
        loss = [(e, v) for e, v in loss if e is not None and v is not None]
        if not val and not loss:
            continue
        group = record.group_and_seed()[0]
        curves.setdefault(group, []).append((val, loss))  # type: ignore[arg-type]
        markers.setdefault(group, _style(record.role or roles.get(record.name) or roles.get(group))[0])
    drawn = sum(len(c) for c in curves.values())
    for group, runs in curves.items():
        for k, ax in enumerate((ax_val, ax_loss)):
            series = [run[k] for run in runs if run[k]]
            if not series:
                continue
            if len(series) == 1:
                ax.plot(*zip(*series[0], strict=True), marker=markers[group], markersize=4, label=group)
                continue
            by_epoch: dict[float, list[float]] = {}
            for points in series:
                for epoch, value in points:
                    by_epoch.setdefault(epoch, []).append(value)
            epochs = sorted(by_epoch)
            stats_ = [t_interval(by_epoch[e]) for e in epochs]
            ax.errorbar(
                epochs, [s.mean for s in stats_], yerr=[s.std or 0.0 for s in stats_], marker=markers[group],
                markersize=4, capsize=2, label=f"{group} (mean ± std, n={len(series)})",
            )  # fmt: skip
    for ax, title in ((ax_val, f"validation {layout.headline_label}"), (ax_loss, "train loss")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no logs/metrics.csv values", transform=ax.transAxes, ha="center", va="center")
    ax_val.set_ylabel(layout.headline_label)
    ax_loss.set_ylabel("loss")
    fig.suptitle(f"Training curves ({drawn} runs)")
    fig.tight_layout()
    return fig


def _new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas without pyplot: no global state, no GUI backend, safe in any process."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure_atomic(fig: Figure, path: Path) -> None:
    """The figure as a PNG at `path`, written atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
