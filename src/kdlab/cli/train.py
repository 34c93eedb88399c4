"""`train_advanced.py` / `python -m kdlab.cli.train` / `kdlab-train`: train or evaluate one experiment."""

from __future__ import annotations

import json
import os

from kdlab.cli.common import (
    CONFIG_FLAG_KEYS,
    OneLineArgumentParser,
    print_named_configs,
    run_cli,
    setup_logging,
)


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="train_advanced.py",
        description="Train (or evaluate) one kdlab experiment. Precedence: named config < --set < flags.",
    )
    p.add_argument(
        "--config", help="a named config (see --list_configs), a path to a .py config or a run's config.json"
    )
    p.add_argument("--list_configs", action="store_true", help="list the named configs and exit")
    p.add_argument(
        "--set", dest="set_items", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys, e.g. --set training.lr=3e-4 model.roi_size=80,60 (repeatable)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, help="training.epochs")
    p.add_argument("--batch_size", type=int, help="training.batch_size")
    p.add_argument("--seed", type=int, help="training.seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="training.device")
    p.add_argument("--output_dir", help="where run directories are created (output_dir)")
    p.add_argument("--teacher_checkpoint", help="distil from this teacher checkpoint (turns distillation on)")
    p.add_argument("--distillation_temperature", type=float, help="distillation.temperature (> 0)")
    p.add_argument("--distillation_alpha", type=float, help="distillation.alpha (in [0, 1])")
    p.add_argument(
        "--quantize", choices=["none", "int8"],
        help="export.quantize: with export.onnx, also write an INT8 model (kept only if it loses <= "
        "export.max_int8_iou_drop)",
    )  # fmt: skip
    p.add_argument(
        "--export_onnx", action="store_true",
        help="export.onnx=true, and a failed export is recorded in summary.json (export.ok=false) and logged "
        "instead of failing the run (how run_experiments.py exports each run in the process that trained it)",
    )  # fmt: skip
    p.add_argument(
        "--allow_teacher_change",
        action="store_true",
        help="resume although the teacher file changed since the run started",
    )
    p.add_argument("--resume", help="continue from a checkpoint (<run>/checkpoints/last.pth) or 'auto'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--test_only", action="store_true", help="evaluate best_model.pth (or --resume) on the val set"
    )
    p.add_argument("--no_progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--verbose", action="store_true", help="log at DEBUG level (more detail from kdlab's own loggers)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from kdlab.config.loader import resolve_config, validate_config
    from kdlab.errors import KdlabInputError

    if args.list_configs:
        print_named_configs()
        return 0
    flags = {key: getattr(args, flag) for flag, key in CONFIG_FLAG_KEYS.items()}
    if args.teacher_checkpoint:
        flags["distillation.enabled"] = True
    if args.export_onnx:
        flags["export.onnx"] = True
    if args.config:
        cfg = resolve_config(args.config, args.set_items, flags)
    elif args.resume and args.resume != "auto":
        from kdlab.config.loader import parse_set_items, set_dotted
        from kdlab.experiments.single_run import config_from_checkpoint

        data = config_from_checkpoint(args.resume).model_dump(mode="json")
        for key, value in parse_set_items(args.set_items):
            set_dotted(data, key, value)
        for key, value in flags.items():
            if value is not None:
                set_dotted(data, key, value)
        cfg = validate_config(data, where=f"checkpoint {args.resume}")
    else:
        raise KdlabInputError(
            "--config is required (a name from --list_configs, a .py path or a config.json)"
        )

    from kdlab.engine import distributed
    from kdlab.experiments.single_run import RunRequest, execute

    try:
        result = execute(
            RunRequest(
                cfg,
                resume=args.resume,
                overwrite=args.overwrite,
                test_only=args.test_only,
                show_progress=not args.no_progress,
                allow_teacher_change=args.allow_teacher_change,
                export_in_run=args.export_onnx,
            )
        )
    finally:
        distributed.destroy()
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 prints the result
    if args.test_only:
        print(json.dumps(result, indent=2))
    else:
        metrics = result.get("final_metrics", {})
        best_name = result.get("best_metric_name", "miou")
        secondary = f", miou={metrics.get('miou')}" if "miou" in metrics else ""
        test = result.get("test_metrics")
        if test is not None:  # the selected checkpoint on the held-out test split
            secondary += f", test {best_name}={test.get(best_name)}"
        print(
            f"{cfg.name}: {result['status']}, best {best_name}={result.get('best_metric')} "
            f"(epoch {result.get('best_epoch')}){secondary}, run dir {result.get('run_dir')}"
        )
    return 0


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
