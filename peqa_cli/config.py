"""Typed recipes: YAML files and ``key.sub=value`` overrides loaded into dataclasses.

Every subcommand's recipe is a dataclass (nested dataclasses for sections). Loading walks
the YAML mapping against the dataclass fields, checks each value's type, and collects
*every* problem (unknown key, wrong type, value outside its choices) before raising one
:class:`ConfigError`, so a user fixes a recipe in one pass rather than one error at a time.

Field metadata understood here: ``choices`` (allowed values) and ``help`` (shown by
``--print-config``-style tooling).

Precedence, lowest to highest: dataclass defaults < recipe YAML < ``key=value`` overrides
< explicit CLI flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from peqa_cli.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            trial: list[str] = []
            out = _coerce(value, arg, where, trial)
            if not trial:
                return out
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
            return value
        return _build(tp, value, where, problems)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if (
            isinstance(value, str | int | float)
            and not isinstance(value, bool)
            and arg in (str, int)
        ):
            value = [value]  # a scalar where a list is expected: `tasks=arc_easy`
        if not isinstance(value, list):
            problems.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
            return value
        return [_coerce(v, arg, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            problems.append(f"{where}: expected null, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            problems.append(f"{where}: expected a string, got {value!r}")
            return value
        return str(value)
    return value


def _build(cls: type[T], data: dict, prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            known = ", ".join(sorted(fields))
            problems.append(
                f"unknown key '{where}' (known keys{' in ' + prefix if prefix else ''}: {known})"
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        where = f"{prefix}.{name}" if prefix else name
        before = len(problems)
        value = _coerce(data[name], hints[name], where, problems)
        choices = f.metadata.get("choices")
        wrong_type = len(problems) > before  # one problem per bad key, not two
        if (
            choices is not None
            and not wrong_type
            and value not in choices
            and not isinstance(value, list | dict)
        ):
            problems.append(
                f"{where}: {value!r} is not allowed (choose from {', '.join(map(str, choices))})"
            )
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable on a wrong type that was already reported
        problems.append(f"{prefix or cls.__name__}: {exc}")
        return cls()


def _field_type(cls: type, dotted: str) -> Any:
    """Type of the field a dotted override names, or ``_MISSING`` if there is no such field."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return _MISSING
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return _MISSING
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else tp
    return tp


def parse_overrides(cls: type, overrides: list[str], problems: list[str]) -> dict:
    """``["train.lr=1e-4", "model=/path"]`` -> nested dict. Values are YAML-parsed except where
    the field is a string, so ``model=007`` stays the string ``"007"``."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}' is not of the form key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        tp = _field_type(cls, key)
        value: Any = raw
        if tp is not str:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"override '{item}' conflicts with another override")
                break
        else:
            node[parts[-1]] = value
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a recipe file; a missing file or a YAML syntax error is one clear line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"recipe file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"YAML syntax error{at}: {reason}"], source=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["a recipe must be a mapping of keys to values"], source=str(p))
    return data


def load_config(
    cls: type[T],
    recipe: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    flags: dict | None = None,
) -> T:
    """Build ``cls`` from defaults, an optional YAML recipe, overrides and flags.

    ``flags`` maps dotted keys to values given as CLI options (``None`` = not given).
    Raises :class:`ConfigError` listing every problem; after building, a ``validate()``
    method on the dataclass (if any) contributes its own problems.
    """
    problems: list[str] = []
    data = read_yaml(recipe) if recipe else {}
    data = _merge(data, parse_overrides(cls, overrides or [], problems))
    for key, value in (flags or {}).items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    cfg = _build(cls, data, "", problems)
    if hasattr(cfg, "validate"):
        # A field of the wrong type (already reported) may trip validate(); skip it then.
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            problems.extend(cfg.validate())
    if problems:
        raise ConfigError(problems, source=str(recipe) if recipe else None)
    return cfg


def to_dict(cfg: Any) -> dict:
    """The resolved recipe as plain data (for ``--print-config`` and metadata files)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
