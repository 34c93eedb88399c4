"""Dotted-key view of the schema: valid keys, field lookup, closest-key suggestions, value coercion."""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Any

from pydantic import BaseModel

from kdlab.config.schema import ExperimentConfig
from kdlab.errors import ConfigError


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation such as `Foo` or `Foo | None`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None


def all_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every valid dotted key, sections included (e.g. 'training', 'training.epochs')."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        nested = _nested_model(field.annotation)
        if nested is not None:
            keys.extend(all_keys(nested, key + "."))
    return keys


def closest_key(key: str, candidates: list[str] | None = None) -> str | None:
    """The valid key most similar to `key` (for 'did you mean' hints)."""
    candidates = candidates if candidates is not None else all_keys()
    leaf_matches = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if leaf_matches:
        return leaf_matches[0]
    # Compare on the last component too, so 'training.epoch' and 'epoch' both find 'training.epochs'.
    tail = key.rsplit(".", 1)[-1]
    by_tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
    tail_matches = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.7)
    return by_tail[tail_matches[0]] if tail_matches else None


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    suggestion = closest_key(key)
    hint = f"; did you mean '{suggestion}'?" if suggestion else "; run with --list_keys to see valid keys"
    origin = f" (in {where})" if where else ""
    return ConfigError(f"config key '{key}' does not exist{origin}{hint}")


def field_annotation(key: str) -> Any:
    """The annotation of the field at a dotted key; raises ConfigError naming the closest key."""
    model: type[BaseModel] | None = ExperimentConfig
    annotation: Any = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise unknown_key_error(key)
        annotation = model.model_fields[part].annotation
        model = _nested_model(annotation) if i < len(parts) - 1 else None
    return annotation


def _is_str_field(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and args[0] is str
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


def _parse_scalar(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        lowered = raw.strip().lower()
        if lowered in {"none", "null"}:
            return None
        if lowered in {"true", "false"}:
            return lowered == "true"
        return raw


def coerce_value(key: str, raw: str) -> Any:
    """Turn a `--set` string into a Python value shaped for the field at `key`.

    Strings stay strings for str fields ('null'/'none' gives None for optional ones); everything else is
    parsed as JSON, and 'a,b' becomes a list, so `--set model.roi_size=80,60` works. Pydantic then checks
    and converts the value to the field's exact type.
    """
    annotation = field_annotation(key)
    if _is_str_field(annotation):
        if raw.strip().lower() in {"null", "none"} and type(None) in typing.get_args(annotation):
            return None
        return raw
    if "," in raw and not raw.strip().startswith(("[", "{", '"')):
        return [_parse_scalar(part) for part in raw.split(",")]
    return _parse_scalar(raw)
