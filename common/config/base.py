"""Typed configuration machinery: dataclasses <-> plain dicts / YAML, validation, overrides.

One config tree serves the CLI, YAML files, Prefect flow parameters and MLflow params. This module
holds only the generic machinery (no torch, no stage knowledge): building a dataclass from a dict
with type checks, rejecting unknown keys, dotted overrides, flattening and a stable digest.

Every stage dataclass may define ``validate(self)`` that raises ``ConfigError`` via ``check``; it is
called on construction (``__post_init__``) so an invalid value fails at load time with its field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field (dotted path) and the reason."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"config field '{field}': {reason}")


class ConfigBase:
    """Mixin for config sections: runs ``validate`` after construction; ``identity_dict`` gives the
    fields that decide a stage's output.

    Fields named in ``RUNTIME_FIELDS`` change only how a stage runs (threads, batch sizes for
    encoding, checkpoint cadence, input locations), never what it produces, so they are left out
    of stage identities and run digests.
    """

    RUNTIME_FIELDS: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate = getattr(self, "validate", None)
        if validate is not None:
            validate()

    def identity_dict(self) -> dict[str, Any]:
        """The fields that determine the stage's output (for its identity digest)."""
        return {k: v for k, v in to_dict(self).items() if k not in self.RUNTIME_FIELDS}


def check(condition: bool, field: str, reason: str) -> None:
    """Raise ``ConfigError(field, reason)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, reason)


def check_location(value: str, field: str) -> None:
    """Accept a local path or a URI of a filesystem ``common.storage`` resolves (``s3://``,
    ``gs://``, ``hdfs://``, ``file://``, ...); refuse any other scheme by name instead of letting it
    become a folder named ``xyz:`` in the current directory."""
    from ..storage import SCHEMES

    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    check(not scheme or scheme in SCHEMES, field,
          f"{value!r} has the URI scheme {scheme}://, which no filesystem here reads (known: "
          f"{', '.join(s + '://' for s in SCHEMES)})")


DEVICE_SPEC = re.compile(r"auto|cpu|cuda|cuda:\d+")


def check_device(value: str, field: str) -> None:
    """A device setting is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (gptbert.device resolves it)."""
    check(isinstance(value, str) and DEVICE_SPEC.fullmatch(value) is not None, field,
          f"expected one of auto, cpu, cuda, cuda:N, got {value!r}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check (and minimally coerce) ``value`` against the annotation ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(path, "; ".join(errors) or f"expected {tp}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            number = None
            if isinstance(value, str):
                try:
                    number = float(value)  # YAML 1.1 reads "1e-4" as a string
                except ValueError:
                    pass
            if number is None:
                raise ConfigError(path, f"expected a number, got {value!r}")
            value = number
        if not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) dict; unknown keys are errors."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(
            f"{path + '.' if path else ''}{unknown[0]}",
            f"unknown field in {where} (known: {', '.join(sorted(fields))})",
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{path + '.' if path else ''}{name}")
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        if path and not exc.field.startswith(path + "."):
            raise ConfigError(f"{path}.{exc.field}", exc.reason) from None
        raise
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-serialisable dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view (``train.lr``) for MLflow params and CLI overrides."""
    out: dict[str, Any] = {}
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Neither input is modified."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=0.01", "model.gate=false"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(item, "override has an empty field name")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicting overrides")
        node[parts[-1]] = value
    return nested


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-validates."""
    return dataclasses.replace(cfg, **changes)


def digest(obj: Any) -> str:
    """Stable sha256 of a config (or any JSON-able object): canonical JSON, sorted keys."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} when empty); ConfigError if not valid YAML or not a mapping."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(str(p), "is not a file (expected a YAML config file)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(p), f"top level must be a mapping, got {type(data).__name__}")
    return data


def dump_yaml(cfg: Any) -> str:
    """YAML of a config (or a plain dict), keys in declaration order."""
    return yaml.safe_dump(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=False)


__all__ = [
    "ConfigBase",
    "ConfigError",
    "check",
    "deep_merge",
    "digest",
    "dump_yaml",
    "flatten",
    "from_dict",
    "load_yaml",
    "parse_overrides",
    "replace",
    "to_dict",
]
