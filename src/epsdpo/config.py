"""Typed configuration: YAML files and ``key=value`` overrides routed to one dataclass per concern.

Each concern (data, model, training, …) owns a dataclass; its fields are documented once, in that dataclass. A
config is read with :func:`load_config`:

- keys may be given flat at the top level (TRL style, ``max_length: 512``) or nested under the section name
  (``data: {max_length: 512}``); each key goes to the one section that owns it (field names are unique across
  sections, which :func:`load_config` checks);
- ``key=value`` overrides (``max_length=256`` or ``data.max_length=256``) are applied after the file; values are
  read with YAML scalar rules (``true``, ``null``, ``3``, ``[a, b]``) and then coerced to the field's type;
- every value is checked against its field's annotation (int, float, bool, str, Path, Optional, Literal, list,
  dict); an unknown key is an error that names it and suggests the closest valid name.

:func:`dump_config` writes the resolved sections back as YAML (for the run directory); loading that YAML again gives
equal dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "ConfigError",
    "coerce_value",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "read_config_source",
]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names the key and says what to do."""


def read_config_source(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """The raw mapping of a config: a YAML file's top level, a copy of a mapping, or ``{}`` for ``None``."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give the path of a YAML file.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}); fix the file's syntax.") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, not {type(raw).__name__}.")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` and read the value with YAML scalar rules (``'3'`` → 3, ``'null'`` → None)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. max_length=512).")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML (e.g. an unbalanced bracket): take the text as it is
    return key, parsed


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _owners(sections: Mapping[str, type]) -> dict[str, str]:
    """field name -> the section owning it; asserts every name is owned once and no field is named like a section."""
    owners: dict[str, str] = {}
    for section, cls in sections.items():
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"config section {section!r} must be a dataclass, got {cls!r}")
        for name in _field_types(cls):
            if name in owners:
                raise TypeError(f"config field {name!r} is defined by both {owners[name]!r} and {section!r}")
            if name in sections:
                raise TypeError(f"config field {name!r} of {section!r} has the name of a section")
            owners[name] = section
    return owners


def _unknown_key(key: str, valid: Collection[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} ({where}).{hint} Valid keys: {', '.join(sorted(valid))}.")


def _route(
    raw: Mapping[str, Any], sections: Mapping[str, type], owners: Mapping[str, str], ignore: Collection[str]
) -> dict[str, dict[str, Any]]:
    """Split a raw mapping into ``{section: {field: value}}``; flat and nested keys may be mixed."""
    routed: dict[str, dict[str, Any]] = {name: {} for name in sections}
    valid = set(owners) | set(sections)
    for key, value in raw.items():
        key = str(key)
        if key in sections and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                sub_key = str(sub_key)
                if owners.get(sub_key) != key:
                    raise _unknown_key(sub_key, _field_types(sections[key]), f"in section {key!r}")
                _put(routed[key], sub_key, sub_value)
        elif key in owners:
            _put(routed[owners[key]], key, value)
        elif key not in ignore:
            raise _unknown_key(key, valid, "at the top level")
    return routed


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if key in target:
        raise ConfigError(f"config key {key!r} is given twice (flat and under its section); keep one.")
    target[key] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where YAML is lossy (``'1e-5'`` → 1e-5 for a float).

    Raises :class:`ConfigError` naming ``key`` when the value does not fit.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce_value(value, member, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r}: {value!r} is not a {_type_name(tp)}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}.{hint}")
    if origin in (list, Sequence, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}.")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce_value(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}.")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {coerce_value(k, key_tp, key): coerce_value(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):  # an enumeration with capabilities (e.g. LossType)
        return _coerce_enum(value, tp, key)
    return _coerce_scalar(value, tp, key)


def _coerce_enum(value: Any, tp: type[enum.Enum], key: str) -> enum.Enum:
    if isinstance(value, tp):
        return value
    choices = [m.value for m in tp]
    if value in choices:
        return tp(value)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, choices))}.{hint}")


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    bad = ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):  # bool is an int subclass: never let True pass as 1
        raise bad
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float):  # e.g. `split: 2023`
            return str(value)
        raise bad
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def load_config(
    source: str | Path | Mapping[str, Any] | None,
    overrides: Sequence[str] = (),
    sections: Mapping[str, type] | None = None,
    *,
    ignore_keys: Collection[str] = (),
) -> dict[str, Any]:
    """Read a config into one dataclass instance per section.

    Args:
        source: a YAML file, a mapping with the same content, or ``None`` (defaults only).
        overrides: ``key=value`` or ``section.key=value`` strings, applied after ``source``.
        sections: section name -> dataclass; field names must be unique across sections.
        ignore_keys: top-level keys owned by stages that are not loaded here (accepted and not routed).

    Returns:
        ``{section: instance}``. Values are coerced to the annotated field types; an unknown key, a badly typed
        value or a missing required field raises :class:`ConfigError` naming it.
    """
    if not sections:
        raise TypeError("load_config needs at least one section, e.g. sections={'data': DataConfig}")
    owners = _owners(sections)
    routed = _route(read_config_source(source), sections, owners, ignore_keys)
    for text in overrides:
        key, value = parse_override(text)
        section, dot, name = key.rpartition(".")
        if dot and section not in sections:
            raise _unknown_key(section, sections, f"section of override {text!r}")
        if dot and owners.get(name) != section:
            raise _unknown_key(name, _field_types(sections[section]), f"in section {section!r}")
        if not dot and name not in owners:
            raise _unknown_key(name, owners, f"override {text!r}")
        routed[owners[name]][name] = _override_value(value, text, name, _field_types(sections[owners[name]]))
    return {name: _build(cls, routed[name], name) for name, cls in sections.items()}


def _override_value(value: Any, text: str, name: str, field_types: Mapping[str, Any]) -> Any:
    """A CLI value: its YAML reading when that fits the field, else the raw text for a str field (``split=yes``)."""
    try:
        return coerce_value(value, field_types[name], name)
    except ConfigError:
        raw = text.partition("=")[2]
        try:
            return coerce_value(raw, field_types[name], name)
        except ConfigError:
            pass
        raise


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    field_types = _field_types(cls)
    kwargs = {key: coerce_value(value, field_types[key], key) for key, value in values.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"section {section!r}: required key(s) {', '.join(map(repr, missing))} not given.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"section {section!r}: {err}") from err


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_to_dict(configs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` with plain YAML-able values (paths as strings, tuples as lists)."""
    return {
        name: {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
        for name, cfg in configs.items()
    }


def dump_config(configs: Mapping[str, Any], path: str | Path | None = None) -> str:
    """The resolved config as YAML, nested by section; written to ``path`` too when given."""
    text = yaml.safe_dump(config_to_dict(configs), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
