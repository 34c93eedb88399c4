"""The config reference (every key, type, default, description) as a Markdown table.

`python -m kdlab.config.reference` prints the table; `python -m kdlab.config.reference --write`
(run from the repository root) refreshes it in docs/configs.md, between the two GENERATED markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from kdlab.config.keys import _nested_model
from kdlab.config.schema import ExperimentConfig


def _type_name(annotation: typing.Any) -> str:
    text = str(annotation).replace("typing.", "")
    for noise in ("<class '", "'>", "kdlab.config.schema."):
        text = text.replace(noise, "")
    return text.replace(" | ", " or ")


def _constraint(meta: typing.Any) -> str:
    for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
        if getattr(meta, attr, None) is not None:
            return f"{symbol} {getattr(meta, attr)}"
    return str(meta)


def reference_rows(
    model: type[BaseModel] = ExperimentConfig, prefix: str = ""
) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        if typing.get_origin(field.annotation) is list and nested is None:
            item = typing.get_args(field.annotation)[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                rows.append((f"{key}", f"list of {item.__name__}", "[]", field.description or ""))
                rows.extend(reference_rows(item, f"{key}[]."))
                continue
        if nested is not None and field.default is not None:
            rows.extend(reference_rows(nested, key + "."))
            continue
        if nested is not None:
            rows.append((key, f"{nested.__name__} or null", "null", field.description or ""))
            rows.extend(reference_rows(nested, key + "."))
            continue
        if field.is_required():
            shown = "required"
        elif field.default_factory is not None:
            shown = json.dumps(field.default_factory())
        else:
            default = field.default
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
        constraints = [_constraint(m) for m in field.metadata]
        desc = field.description or ""
        if constraints:
            desc = f"{desc} ({', '.join(constraints)})".strip()
        rows.append((key, _type_name(field.annotation), shown, desc))
    return rows


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, desc in reference_rows():
        lines.append(f"| `{key}` | {type_name} | `{default}` | {desc} |".replace("|  |", "| |"))
    return "\n".join(lines)


REFERENCE_PAGE = Path("docs") / "configs.md"  # relative to the repository root
BEGIN_MARKER = "<!-- BEGIN GENERATED: python -m kdlab.config.reference --write -->"
END_MARKER = "<!-- END GENERATED -->"


def with_reference(page_text: str) -> str:
    """`page_text` with the block between the GENERATED markers replaced by the current table.

    Only that block is rewritten, so the prose around it stays hand-written. A page without both markers
    (in this order) is an error: the caller would otherwise lose text or write the table nowhere.
    """
    start = page_text.find(BEGIN_MARKER)
    end = page_text.find(END_MARKER, start + len(BEGIN_MARKER)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise ValueError(f"the page has no {BEGIN_MARKER!r} ... {END_MARKER!r} block")
    head = page_text[: start + len(BEGIN_MARKER)]
    return f"{head}\n{reference_markdown()}\n{page_text[end:]}"


def write_reference(page: Path = REFERENCE_PAGE) -> bool:
    """Refresh the generated table in `page`; returns whether the file changed."""
    old = page.read_text(encoding="utf-8")
    new = with_reference(old)
    if new != old:
        page.write_text(new, encoding="utf-8")
    return new != old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlab.config.reference", description=__doc__)
    parser.add_argument(
        "--write",
        nargs="?",
        const=str(REFERENCE_PAGE),
        metavar="PAGE",
        help=f"refresh the table inside PAGE (default {REFERENCE_PAGE}) instead of printing it",
    )
    args = parser.parse_args(argv)
    if args.write is None:
        print(reference_markdown())
        return 0
    page = Path(args.write)
    try:
        changed = write_reference(page)
    except (OSError, ValueError) as exc:
        print(f"error: {page}: {exc}", file=sys.stderr)
        return 2
    print(f"{page}: {'updated' if changed else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
