"""`kdlab-average` / `python -m kdlab.average RUN_DIR [--out PATH] [--no_eval]`: average a run's top-k weights.

Averages checkpoints/best_model.pth and every best_model_top*.pth (`training.save_top_k`) into
checkpoints/averaged_model.pth, evaluates it on the validation set (averaged_model.json) and prints its
metrics next to the best model's. Bad input (no run, mismatched checkpoints) is one `error:` line, exit 2.
"""

from __future__ import annotations

import math

from kdlab.cli.common import OneLineArgumentParser, run_cli, setup_logging
from kdlab.experiments.average import AverageResult, average_run


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="kdlab-average",
        description="Average a run's best_model.pth and best_model_top*.pth weights and evaluate the average.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (<output_dir>/<experiment>)")
    p.add_argument("--out", default=None, help="where to write the averaged checkpoint "
                   "(default RUN_DIR/checkpoints/averaged_model.pth; its metrics go to the same name .json)")  # fmt: skip
    p.add_argument("--no_eval", action="store_true", help="only write the averaged weights, do not evaluate")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="evaluation device")
    p.add_argument("--no_progress", action="store_true", help="no progress bar during evaluation")
    return p


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def print_result(result: AverageResult) -> None:
    print(
        f"averaged {len(result.averaged_from)} checkpoints ({', '.join(result.averaged_from)}) -> {result.path}"
    )
    if result.metrics is None:
        return
    names = [result.metric_name] + [k for k in result.metrics if k != result.metric_name]
    width = max(len(n) for n in names)
    print(f"{'metric':{width}s}  {'best_model':>12s}  {'averaged':>12s}")
    for name in names:
        best, avg = _fmt(result.best_metrics.get(name)), _fmt(result.metrics.get(name))
        print(f"{name:{width}s}  {best:>12s}  {avg:>12s}")
    print(f"metrics: {result.metrics_path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    result = average_run(
        args.run_dir, out=args.out, evaluate=not args.no_eval, device=args.device,
        show_progress=not args.no_progress,
    )  # fmt: skip
    print_result(result)
    return 0


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
