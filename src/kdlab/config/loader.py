"""Named configs, config files and overrides, resolved into one validated `ExperimentConfig`.

Precedence (lowest first): schema defaults < base chain of a named config < the named config itself <
`--set key=value` < dedicated CLI flags. A named config is `configs/<name>.py` defining `CONFIG` (a nested
dict of the keys it changes) and optionally `BASE` (the name of the config it derives from) and a docstring
(shown by `--list_configs`). Only files in `configs/` or a path the user passes are ever executed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdlab.config.keys import closest_key, coerce_value, field_annotation, unknown_key_error
from kdlab.config.schema import ExperimentConfig
from kdlab.errors import ConfigError

CONFIGS_ENV = "KDLAB_CONFIGS_DIR"


def configs_dir() -> Path:
    """The directory of named configs: the first of, in this order,

    1. `$KDLAB_CONFIGS_DIR` when it is set (used as given, even if it does not exist);
    2. `./configs` in the current directory when it is a directory (a project using an installed kdlab, or
       a checkout run from its root);
    3. the `configs/` of the source checkout this package is imported from: the nearest directory above the
       package that holds both `configs/` and `pyproject.toml` (there is none for an installed wheel);
    4. otherwise `./configs`, so "no named config" names the place a user would put one.
    """
    env = os.environ.get(CONFIGS_ENV)
    if env:
        return Path(env)
    cwd_configs = Path.cwd() / "configs"
    if cwd_configs.is_dir():
        return cwd_configs
    checkout = _source_checkout_configs()
    return checkout if checkout is not None else cwd_configs


def _source_checkout_configs() -> Path | None:
    """`configs/` of the nearest directory above this package that also holds a `pyproject.toml`."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "configs").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "configs"
    return None


def list_named_configs() -> dict[str, str]:
    """Name -> first docstring line of every named config."""
    out: dict[str, str] = {}
    for path in sorted(configs_dir().glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = _exec_config_file(path)
        doc = (module.get("__doc__") or "").strip().splitlines()
        out[path.stem] = doc[0] if doc else ""
    return out


def _exec_config_file(path: Path) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location(f"kdlab_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's Python file: report it as bad input, with the cause
        raise ConfigError(f"config file {path} failed to load: {type(exc).__name__}: {exc}") from exc
    return vars(module)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` laid over `base`, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _config_dict_from_py(path: Path, chain: tuple[str, ...]) -> dict[str, Any]:
    module = _exec_config_file(path)
    if "CONFIG" not in module or not isinstance(module["CONFIG"], dict):
        raise ConfigError(f"config file {path} must define CONFIG = {{...}} (a dict)")
    data: dict[str, Any] = module["CONFIG"]
    base = module.get("BASE")
    if base:
        if base in chain:
            raise ConfigError(
                f"config '{base}' derives from itself through {' -> '.join(chain + (path.stem, base))}"
            )
        data = deep_merge(named_config_dict(base, chain + (path.stem,)), data)
    data = dict(data)
    data.setdefault("name", path.stem)
    return data


def named_config_dict(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged (base chain + own) dict of a named config; unknown names suggest the closest."""
    path = configs_dir() / f"{name}.py"
    if not path.is_file():
        import difflib

        names = list(list_named_configs())
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; see --list_configs"
        raise ConfigError(f"no named config '{name}' in {configs_dir()}{hint}")
    data = _config_dict_from_py(path, chain)
    if chain:  # a base config must not rename the derived one
        data.pop("name", None)
    return data


def load_config_source(spec: str) -> tuple[dict[str, Any], str]:
    """`spec` is a config name, a path to a .py config or a path to a .json (e.g. a run's config.json)."""
    path = Path(spec)
    if spec.endswith(".json"):
        if not path.is_file():
            raise ConfigError(f"config file {spec} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {spec} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {spec} must hold a JSON object")
        return data, f"config file {spec}"
    if spec.endswith(".py"):
        if not path.is_file():
            raise ConfigError(f"config file {spec} does not exist")
        return _config_dict_from_py(path, ()), f"config file {spec}"
    return named_config_dict(spec), f"config '{spec}'"


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_set_items(items: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=1", ...]` -> `[("a.b", 1), ...]`, each key checked against the schema."""
    parsed: list[tuple[str, Any]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}' (e.g. --set training.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        field_annotation(key)  # raises with the closest valid key
        parsed.append((key, coerce_value(key, raw)))
    return parsed


def _format_loc(loc: tuple[Any, ...]) -> str:
    """('model', 'roi_size', 0) -> 'model.roi_size' (element indices dropped, they only add noise)."""
    return ".".join(str(p) for p in loc if not isinstance(p, int))


def validate_config(data: dict[str, Any], where: str = "config") -> ExperimentConfig:
    """Validate a nested dict; the first problem becomes one readable ConfigError line."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = _format_loc(first["loc"])
        more = (
            f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1
            else ""
        )
        if first["type"] == "extra_forbidden":
            err = unknown_key_error(key, where)
            raise ConfigError(f"{err}{more}") from None
        msg = first["msg"].removeprefix("Value error, ")
        if not key:  # a rule across several keys
            raise ConfigError(f"invalid config (in {where}): {msg}{more}") from None
        value = first.get("input")
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        raise ConfigError(f"config value {key}={shown} is invalid (in {where}): {msg}{more}") from None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def resolve_config(
    spec: str,
    set_items: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Resolve named/file config < `--set` items < dedicated flags (dotted key -> value, None = not given)."""
    data, where = load_config_source(spec)
    for key, value in parse_set_items(set_items or []):
        set_dotted(data, key, value)
    for key, value in (flags or {}).items():
        if value is not None:
            field_annotation(key)
            set_dotted(data, key, value)
    return validate_config(data, where)


__all__ = [
    "closest_key",
    "configs_dir",
    "deep_merge",
    "list_named_configs",
    "load_config_source",
    "named_config_dict",
    "parse_set_items",
    "resolve_config",
    "set_dotted",
    "validate_config",
]
