"""Frozen dataclass configs: plain-data round trips, named presets and `--set a.b=value` overrides.

Every model and stage owns a `@dataclass(frozen=True)` config. This module converts them to and from plain dicts
(`config.json` in every stage directory) and applies command-line overrides with type checks, failing with the
key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass; the message names it and says what fits."""


def to_dict(cfg: Any) -> dict:
    """A dataclass (nested) as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and convert from JSON / string form) one value against a type annotation."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"config key {key!r} may not be None (expected {getattr(tp, '__name__', tp)})")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key!r} got {value!r}; allowed values: {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        return _coerce_sequence(value, tp, origin, key)
    return _coerce_scalar(value, tp, key)


def _coerce_sequence(value: Any, tp: Any, origin: Any, key: str) -> Any:
    """A list or tuple (or a comma-separated string) checked element by element."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v != ""]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
    args = typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], key) for v in value)
    if origin is tuple and args:
        if len(args) != len(value):
            raise ConfigError(f"config key {key!r} needs {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    elem = args[0] if args else Any
    out = [_coerce(v, elem, key) for v in value]
    return tuple(out) if origin is tuple or tp is tuple else out


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """A bool, int, float or str (from its JSON or command-line string form); other types pass as they are."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float)):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build a (nested) dataclass from plain data; unknown keys and wrong types fail naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {prefix.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; allowed keys here: {_allowed(cls)}")
    hints = _field_types(cls)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_literal(text: str) -> Any:
    """Command-line values: JSON when it parses (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Apply `a.b=value` overrides to a frozen dataclass, returning a new one."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.lr=3e-4)")
        path, raw = item.split("=", 1)
        cfg = _replace_path(cfg, path.strip().split("."), _parse_literal(raw.strip()), path.strip())
    return cfg


def _replace_path(cfg: Any, parts: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"config key {full!r}: {parts[0]!r} is not inside a config section")
    names = {f.name for f in dataclasses.fields(cfg)}
    head = parts[0]
    if head not in names:
        where = ".".join(full.split(".")[: len(full.split(".")) - len(parts)])  # the section we are in
        raise ConfigError(f"unknown config key {full!r}; allowed keys {f'in {where!r}' if where else 'at the top'}: "
                          f"{_allowed(type(cfg))}")
    if len(parts) == 1:
        tp = _field_types(type(cfg))[head]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_optional(tp)[1] is str:
            value = str(value)
        new = _coerce(value, tp, full)
    else:
        new = _replace_path(getattr(cfg, head), parts[1:], value, full)
    return dataclasses.replace(cfg, **{head: new})


def preset(presets: Mapping[str, T], name: str, what: str = "preset") -> T:
    """Look up a named preset, failing with the list of names."""
    if name not in presets:
        raise ConfigError(f"unknown {what} {name!r}; available: {', '.join(sorted(presets))}")
    return presets[name]
