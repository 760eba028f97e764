"""Configuration files: one TOML file per process, parsed into a pydantic model; flags override keys.

Errors name the file and the key (``cloud.toml: strategy.bn: Input should be 'first', ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args

import tomllib
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or flag is invalid; the message names the file and the key."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(model: type[M], path: Path | None, overrides: dict[str, Any]) -> M:
    """`model` from the TOML file at `path` (optional) with `overrides` (flags; None values ignored).

    Override keys may be dotted (``"strategy.bn"``) to reach nested tables.
    """
    data: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))  # (a BOM, as editors write)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it: {err}") from None
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return model.model_validate(_merge(data, nested))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {where}: {first['msg']}") from None


def keys_table(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """Markdown rows `| key | default | meaning |` of every key of a config model, nested tables as
    dotted keys with the defaults the parent gives them (docs/operations.md lists these; a test keeps the
    two in step)."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        default = (
            getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
        )
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(keys_table(annotation, key + ".", default))
            continue
        shown = "(required)" if field.is_required() else f"`{default}`" if default is not None else "-"
        rows.append(f"| `{key}` | {shown} | {(field.description or '').replace('|', '/')} |")
        optional = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if optional:  # an optional table (off when unset): its keys, as set when it is given
            rows.extend(keys_table(optional[0], key + "."))
    return rows
