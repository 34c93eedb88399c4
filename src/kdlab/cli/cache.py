"""`kdlab-cache` (also `python -m kdlab.distill.cache`): generate a teacher-output cache, or export a teacher to ONNX for one.

generate --teacher CKPT_OR_ONNX --config NAME --out FILE.hdf5 [--subset_fraction F] [--max_samples N]
         [--batch_size B] [--seed S] [--set key=value ...]
export-teacher --teacher CKPT --out TEACHER.onnx
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlab.cli.common import OneLineArgumentParser, run_cli, setup_logging
from kdlab.errors import DataError


def build_parser() -> Any:
    p = OneLineArgumentParser(prog="kdlab-cache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="run a teacher over a config's data and write the cache")
    gen.add_argument(
        "--teacher", required=True, help="teacher checkpoint (.pth) or kdlab ONNX export (.onnx)"
    )
    gen.add_argument(
        "--config", required=True, help="the named config (or .py / config.json) whose data to cache"
    )
    gen.add_argument("--out", required=True, type=Path, help="the cache file to write (.hdf5)")
    gen.add_argument("--subset_fraction", type=float, default=None, help="share of each split (default 1.0)")
    gen.add_argument("--max_samples", type=int, default=None, help="cap per split, after the fraction")
    gen.add_argument("--batch_size", type=int, default=None, help="teacher batch size (default 32)")
    gen.add_argument("--seed", type=int, default=None, help="seed of the subset draw (default 0)")
    gen.add_argument("--no_symmetrize_flips", action="store_true", help="cache the teacher on one view only")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="training.device")
    gen.add_argument(
        "--set", dest="set_items", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override keys of --config, e.g. --set data.num_workers=2 (repeatable)",
    )  # fmt: skip
    gen.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    gen.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    exp = sub.add_parser("export-teacher", help="export a segmentation teacher to ONNX with its aux heads")
    exp.add_argument("--teacher", required=True, help="teacher checkpoint (.pth)")
    exp.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    exp.add_argument(
        "--opset", type=int, default=18, help="ONNX opset (>= 16: RoiAlign with half-pixel offsets)"
    )
    for parser in (gen, exp):
        parser.error = p.error  # type: ignore[method-assign]  # one-line errors for subcommands too
    return p


def main(argv: list[str] | None = None) -> int:
    from kdlab.config.loader import resolve_config
    from kdlab.distill.cache import generate_cache, request_from_config
    from kdlab.engine.device import resolve_device
    from kdlab.errors import ConfigError
    from kdlab.tasks import get_task, task_names, task_of, teacher_loader

    args = build_parser().parse_args(argv)
    setup_logging()
    if args.command == "export-teacher":
        from kdlab.export.segmentation import export_teacher_onnx
        from kdlab.tasks import build_model

        path = export_teacher_onnx(args.teacher, args.out, build_model, args.opset)
        print(f"exported teacher with masks, bg_fg_logits and target_logits to {path}")
        return 0
    flags = {"training.device": args.device} if args.device else {}
    cfg = resolve_config(args.config, args.set_items, flags)
    if args.out.exists() and not args.overwrite:
        raise DataError(
            f"--out {args.out} already exists; pass --overwrite to replace it or choose another path"
        )
    hooks = task_of(cfg).cache
    if hooks is None:
        cached = ", ".join(name for name in task_names() if get_task(name).cache is not None)
        raise ConfigError(f"a teacher cache for task={cfg.task} is not implemented ({cached} have one)")
    request = request_from_config(cfg, args.teacher, args.out, args)
    device = resolve_device(cfg.training.device)
    info = generate_cache(
        cfg, request, hooks.writer, teacher_loader(cfg), device, progress=not args.no_progress
    )
    print(f"wrote {args.out}: {info.describe()}, {info.megabytes_per_1000()}")
    return 0


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
