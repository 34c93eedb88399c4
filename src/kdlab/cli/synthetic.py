"""`kdlab-synthetic` / `python -m kdlab.cli.synthetic`: generate a synthetic COCO people dataset.

--out DIR --images N --seed S [--height H --width W --min_people A --max_people B]
Writes DIR/images/*.jpg and DIR/annotations.json (last, atomically) and prints the annotations path.
`python -m kdlab.data.synthetic` takes the same flags.
"""

from __future__ import annotations

from kdlab.cli.common import OneLineArgumentParser, run_cli, setup_logging
from kdlab.data.synthetic import add_generator_arguments, generate_from_args
from kdlab.errors import KdlabInputError


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
