"""Typed conversion of config values: a YAML value as the schema's type, or a ConfigError naming the key.

Kept apart from `loading` because `validation` converts solver and loss options with it too, and loading's
`load_config` validates: both sit above this module.
"""
from __future__ import annotations

import re
import types
import typing
from typing import Any

from sfd.config.schema import ConfigError

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
MAX_STRING = 4096  # characters in a string value (the longest are paths: Linux's PATH_MAX)
MAX_LIST = 1000  # items in a list value (the longest, sfdv.num_steps_choices, holds 4)


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for error messages: an error line quotes what it refuses, and a
    megabyte string or a list of a million items would make that line a megabyte too."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def type_name(tp) -> str:
    """A type in words, for error messages: `int | None` -> "an integer or null"."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {type_name(inner)}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce_union(value: Any, tp, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except ConfigError:
            pass
    raise ConfigError(f"{key}: got {shown(value)}; expected {type_name(tp)}")


def _coerce_list(value: Any, tp, key: str) -> list:
    (inner,) = typing.get_args(tp)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: got {shown(value)}; expected {type_name(tp)}")
    return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]


def coerce(value: Any, tp, key: str) -> Any:
    """`value` as type `tp`, or a ConfigError naming `key`."""
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ConfigError(f"{key}: got a string of {len(value):,} characters; at most {MAX_STRING:,}")
    if isinstance(value, (list, tuple)) and len(value) > MAX_LIST:
        raise ConfigError(f"{key}: got a list of {len(value):,} items; at most {MAX_LIST:,}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is list:
        return _coerce_list(value, tp, key)
    if tp is float and isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string; it is plainly a number
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    if not ok:
        raise ConfigError(f"{key}: got {shown(value)}; expected {type_name(tp)}")
    if tp is float:
        return float(value)
    if tp is dict:
        return dict(value)
    return value
