"""Print the config reference (every key, type, default, description) as a Markdown table.

`python -m kdlab.config.reference` regenerates the table in the README.
"""

from __future__ import annotations

import json
import typing

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


if __name__ == "__main__":
    print(reference_markdown())
