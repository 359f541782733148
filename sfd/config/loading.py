"""Loading run configs: defaults <- YAML file <- dotted overrides, converted to the schema's types.

Overrides are `dotted.key=value` with YAML-typed values (`student.afs=false`, `sfdv.num_steps_choices=[4,5]`,
`teacher.path=null`). An unknown key is a ConfigError that suggests the key meant. A resolved config dumped with
`dump_yaml` loads back to an equal config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from sfd.config.coercion import coerce, shown
from sfd.config.schema import ConfigError, RunConfig, all_keys, field_types, is_section
from sfd.config.validation import validate
from sfd.safe_yaml import YAMLInputError, load_yaml, read_yaml_file


def _unknown(key: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # a misspelt last part under the right section, or the right name in another section
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            last, [k.rsplit(".", 1)[-1] for k in known], n=3, cutoff=0.75)][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {shown(key)}{hint}")


def _build(cls, data: Mapping, prefix: str = ""):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown(data)}")
    hints = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(dotted, all_keys())
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = coerce(value, tp, dotted)
    return cls(**kwargs)


def from_dict(data: Mapping | None) -> RunConfig:
    """A RunConfig from a nested mapping (fields not given keep their defaults). Not yet validated."""
    return _build(RunConfig, data or {})


def to_dict(cfg) -> dict:
    """The config as a nested dict of plain YAML types."""
    return dataclasses.asdict(cfg)


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'student': {'nfe': 2}} -> {'student.nfe': 2}. Values that are mappings inside a field (solver.opts)
    are flattened too; an empty one stays as {}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_value(data: dict, key: str, value: Any) -> None:
    """Set a dotted `key` in a nested dict (creating sections), checking the key against the schema.

    Keys inside a dict-valued field are free (`solver.opts.max_order`)."""
    parts = key.split(".")
    cls, node = RunConfig, data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if cls is None:  # inside a dict field: free-form keys
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        hints = field_types(cls)
        if part not in hints:
            raise _unknown(key, all_keys())
        tp = hints[part]
        if last:
            if dataclasses.is_dataclass(tp) and not isinstance(value, Mapping):
                raise ConfigError(f"{key} is a section; set one of its fields, e.g. {all_keys(tp, key + '.')[0]}")
            node[part] = value
            return
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif tp is dict:
            cls = None
        else:
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section (in key {key!r})")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a YAML-typed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shown(text)}: expected key=value, e.g. student.nfe=3")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except YAMLInputError as exc:
        raise ConfigError(f"override {key.strip()}: the value is {exc}") from None
    return key.strip(), value


def merge(data: dict, updates: Mapping[str, Any] | Iterable[str] | None) -> dict:
    """A copy of the nested dict `data` with `updates` applied: a mapping of dotted (or nested) keys, or a
    list of `key=value` strings."""
    out = copy.deepcopy(data)
    if updates is None:
        return out
    if isinstance(updates, Mapping):
        items = flatten_updates(updates)
    else:
        items = [parse_override(u) for u in updates]
    for key, value in items:
        set_value(out, key, value)
    return out


def flatten_updates(updates: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested or dotted update mappings as (dotted key, value) pairs; stops at schema leaves, so a dict
    value for `solver.opts` is set whole."""
    items = []
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and is_section(dotted):
            items.extend(flatten_updates(value, f"{dotted}."))
        else:
            items.append((dotted, value))
    return items


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder, not a YAML file; name a config "
                          "file, e.g. experiments/digits_sfd.yaml")
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = read_yaml_file(path)
    except YAMLInputError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    if data is None:  # an empty or comment-only file: taken as all defaults, it would start a full-length run
        raise ConfigError(f"config file {str(path)!r} is empty (no settings); write the config's sections into it, "
                          "e.g. start from a copy of experiments/digits_sfd.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping | Iterable[str] | None = None, *,
                validate_config: bool = True) -> RunConfig:
    """Defaults <- YAML file <- overrides, converted to types and validated."""
    data = read_yaml(path) if path is not None else {}
    cfg = from_dict(merge(data, overrides))
    if validate_config:
        validate(cfg)
    return cfg


def replace(cfg: RunConfig, overrides: Mapping | Iterable[str]) -> RunConfig:
    """A new, validated config with `overrides` applied."""
    cfg2 = from_dict(merge(to_dict(cfg), overrides))
    validate(cfg2)
    return cfg2


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_yaml(cfg: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(dump_yaml(cfg))
    return path
