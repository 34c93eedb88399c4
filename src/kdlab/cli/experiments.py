"""`run_experiments.py` / `python -m kdlab.cli.experiments` / `kdlab-experiments`: train several experiments
in series, export them to ONNX and compare them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kdlab.cli.common import (
    CONFIG_FLAG_KEYS,
    OneLineArgumentParser,
    print_named_configs,
    run_cli,
    setup_logging,
)

log = logging.getLogger("kdlab.cli.experiments")


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="run_experiments.py",
        description="Run experiments (teachers first; in series, side by side with --parallel/--gpus, or as Slurm "
        "jobs), export each to ONNX, write a comparison report.",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        help="config names or suites (quickstart, people, digits, sequence); required unless --list_configs",
    )
    p.add_argument(
        "--list_configs", action="store_true", help="list the named configs and the suites, and exit"
    )
    p.add_argument("--epochs", type=int, help="override training.epochs (only when given)")
    p.add_argument("--batch_size", type=int, help="override training.batch_size (only when given)")
    p.add_argument(
        "--seed", type=int,
        help="training.seed of every run (one run per config; --seeds runs each config once per seed)",
    )  # fmt: skip
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="training.device of every run (auto: CUDA when available)",
    )
    p.add_argument("--output_dir", help="parent of the run directories and of the report")
    p.add_argument(
        "--teacher_checkpoint", help="teacher for every distillation config (overrides teacher_experiment)"
    )
    p.add_argument(
        "--distillation_temperature",
        type=float,
        help="distillation.temperature of every distillation config (> 0)",
    )
    p.add_argument(
        "--distillation_alpha", type=float, help="distillation.alpha of every distillation config (in [0, 1])"
    )
    p.add_argument(
        "--quantize", choices=["none", "int8"],
        help="export.quantize: also write an onnxruntime INT8 model of each exported run; it becomes "
        "best_model.onnx only if it loses <= export.max_int8_iou_drop of the headline metric",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="set_items", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys of every run, e.g. --set training.lr=3e-4 data.num_workers=2 (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--sweep", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
        help="one run per value (cartesian product of several sweeps), named <config>__<key>-<value>",
    )  # fmt: skip
    p.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED",
        help="run every config once per seed (<config>__seed-<s>); the report gives mean ± std and paired "
        "differences over seeds",
    )  # fmt: skip
    p.add_argument(
        "--seed_teachers", action="store_true",
        help="with --seeds: train the teachers once per seed too (default: one teacher serves every seed)",
    )  # fmt: skip
    p.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="PATH",
        help="continue each run that has checkpoints/last.pth; with PATH, continue the one planned run "
        "from that checkpoint (e.g. checkpoints/checkpoint_epoch_0025.pth)",
    )  # fmt: skip
    p.add_argument(
        "--total_epochs", type=int, help="extend finished runs to this many epochs (implies --resume)"
    )
    p.add_argument("--export_onnx", action="store_true", help="export existing runs (with --skip_training)")
    p.add_argument("--skip_training", action="store_true", help="do not train; export/report existing runs")
    p.add_argument("--fail_fast", action="store_true", help="stop at the first failed experiment")
    p.add_argument("--no_export", action="store_true", help="skip the ONNX export after training")
    p.add_argument(
        "--parallel", type=int, metavar="N",
        help="run N experiments at once (CPU: each child gets its share of the cores; with --gpus: at most N)",
    )  # fmt: skip
    p.add_argument(
        "--threads_per_run", type=int, metavar="T",
        help="CPU threads of each child (default: the cores / --parallel; torch's own choice for one run). "
        "CPU results depend on it: keep it fixed to compare runs across --parallel settings",
    )  # fmt: skip
    p.add_argument(
        "--gpus", metavar="IDS",
        help="'all' or ids like 0,1,2,3: run experiments side by side, each pinned (CUDA_VISIBLE_DEVICES) to "
        "training.devices_per_run GPUs (torchrun when more than 1)",
    )  # fmt: skip
    p.add_argument(
        "--executor", choices=["local", "slurm", "submitit_local"], default="local",
        help="local processes (default), Slurm jobs through submitit (pip install kdlab[slurm]), or "
        "submitit's local executor (the same job path on this machine)",
    )  # fmt: skip
    p.add_argument("--slurm_partition", help="--executor slurm: the partition of every job")
    p.add_argument(
        "--slurm_gpus_per_run", type=int, metavar="G",
        help="--executor slurm: GPUs per job (default training.devices_per_run)",
    )  # fmt: skip
    p.add_argument(
        "--slurm_timeout_min",
        type=int,
        default=24 * 60,
        metavar="MIN",
        help="--executor slurm: job time limit",
    )
    p.add_argument("--slurm_cpus_per_run", type=int, metavar="C", help="--executor slurm: CPUs per job")
    p.add_argument(
        "--verbose", action="store_true", help="log at DEBUG level (more detail from kdlab's own loggers)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from kdlab.errors import ConfigError
    from kdlab.experiments.orchestrate import orchestrate

    if args.list_configs:
        from kdlab.experiments.plan import SUITES

        print_named_configs(SUITES)
        return 0
    if not args.configs:
        raise ConfigError("--configs is required (config names or suites; see --list_configs)")

    if args.total_epochs is not None:
        if args.total_epochs <= 0:
            raise ConfigError("--total_epochs must be > 0")
        if args.epochs is not None:
            raise ConfigError("give either --epochs or --total_epochs, not both")
        args.epochs = args.total_epochs
        args.resume = args.resume or "auto"
    if args.seeds is not None and args.seed is not None:
        raise ConfigError("give either --seed or --seeds, not both")
    apply_suite_defaults(args)
    if args.seed_teachers and not args.seeds:
        raise ConfigError("--seed_teachers needs --seeds")
    flags = {key: getattr(args, flag) for flag, key in CONFIG_FLAG_KEYS.items()}
    if args.teacher_checkpoint:
        flags["distillation.enabled"] = True
    flags_argv: list[str] = []
    for flag in CONFIG_FLAG_KEYS:
        value = getattr(args, flag)
        if value is not None:
            flags_argv += [f"--{flag}", str(value)]
    status, paths = orchestrate(
        configs=args.configs,
        set_items=args.set_items,
        flags=flags,
        flags_argv=flags_argv,
        sweeps=args.sweep,
        seeds=args.seeds,
        seed_teachers=args.seed_teachers,
        output_dir=Path(args.output_dir) if args.output_dir else None,
        resume=args.resume is not None,
        resume_path=args.resume if args.resume not in (None, "auto") else None,
        fail_fast=args.fail_fast,
        skip_training=args.skip_training,
        export=(args.export_onnx or not args.skip_training) and not args.no_export,
        export_requested=args.export_onnx,
        gpus=args.gpus,
        parallel=args.parallel,
        threads_per_run=args.threads_per_run,
        executor=args.executor,
        slurm=slurm_options(args),
    )
    report_md = paths.get("markdown")
    if report_md is not None and report_md.is_file():
        print(report_md.read_text())
    for label, key in (("runs (one row per seed run)", "runs_json"), ("comparison table", "csv")):
        if key in paths:
            print(f"{label}: {paths[key]}")
    return status


def apply_suite_defaults(args: argparse.Namespace) -> None:
    """A suite's own seeds and parallelism (`plan.SUITE_DEFAULTS`) where the command gives none: seeds unless
    --seed or --seeds is given, parallelism unless --parallel, --gpus or a Slurm executor is."""
    from kdlab.experiments.plan import suite_defaults

    defaults = suite_defaults(args.configs)
    if "seeds" in defaults and args.seed is None and args.seeds is None:
        args.seeds = defaults["seeds"]
        log.info("%s: students over seeds %s, the suite's default (--seed N runs one; --seeds chooses)",
                 args.configs[0], " ".join(map(str, args.seeds)))  # fmt: skip
    if "parallel" in defaults and args.parallel is None and args.gpus is None and args.executor == "local":
        args.parallel = defaults["parallel"]
        log.info("%s: %d runs at a time, the suite's default (--parallel N to change)", args.configs[0],
                 args.parallel)  # fmt: skip


def slurm_options(args) -> dict:
    """The --slurm_* flags for the submitit launcher; they are refused without a submitit executor."""
    from kdlab.errors import ConfigError

    given = {name: getattr(args, f"slurm_{name}") for name in ("partition", "gpus_per_run", "cpus_per_run")}
    if args.executor == "local":
        used = [f"--slurm_{k}" for k, v in given.items() if v is not None]
        if used:
            raise ConfigError(f"{', '.join(used)} need --executor slurm (or submitit_local)")
        return {}
    for name in ("gpus_per_run", "cpus_per_run"):
        if given[name] is not None and given[name] < (0 if name == "gpus_per_run" else 1):
            raise ConfigError(f"--slurm_{name} must be >= {0 if name == 'gpus_per_run' else 1}")
    if args.slurm_timeout_min <= 0:
        raise ConfigError("--slurm_timeout_min must be > 0")
    return {**given, "timeout_min": args.slurm_timeout_min}


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
