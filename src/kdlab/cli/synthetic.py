"""`kdlab-synthetic` / `python -m kdlab.cli.synthetic`: generate a synthetic COCO people dataset.

--out DIR --images N --seed S [--height H --width W --min_people A --max_people B]
Writes DIR/images/*.jpg and DIR/annotations.json (last, atomically) and prints the annotations path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kdlab.cli.common import OneLineArgumentParser, run_cli, setup_logging
from kdlab.data.synthetic import generate_synthetic_people
from kdlab.errors import KdlabInputError


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's flags (--out, --images, --seed, --height, --width, --min/max_people)."""
    parser.add_argument("--out", required=True, help="output directory (images/ and annotations.json)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="dataset seed")
    parser.add_argument("--height", type=int, default=256, help="image height in pixels")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels")
    parser.add_argument("--min_people", type=int, default=1, help="fewest figures per image")
    parser.add_argument("--max_people", type=int, default=5, help="most figures per image")


def generate_from_args(args: argparse.Namespace) -> Path:
    """Generate the dataset the parsed flags describe (with a progress bar); return the annotations path."""
    return generate_synthetic_people(
        args.out, args.images, args.seed, (args.height, args.width), args.min_people, args.max_people,
        show_progress=True,
    )  # fmt: skip


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="kdlab-synthetic",
        description="Generate a synthetic COCO people dataset (images/ + annotations.json).",
    )
    add_generator_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        path = generate_from_args(args)
    except (ValueError, OSError) as exc:  # out-of-range sizes/counts, an unwritable --out: bad input
        raise KdlabInputError(str(exc)) from exc
    print(path)
    return 0


def entrypoint() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entrypoint()
