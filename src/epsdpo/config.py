"""Typed configuration: YAML files and ``key=value`` overrides routed to one dataclass per concern.

Each concern (data, model, training, …) owns a dataclass; its fields are documented once, in that dataclass. A
config is read with :func:`load_config`:

- keys may be given flat at the top level (TRL style, ``max_length: 512``) or nested under the section name
  (``data: {max_length: 512}``); each key goes to the one section that owns it (field names are unique across
  sections, which :func:`load_config` checks);
- ``key=value`` overrides (``max_length=256`` or ``data.max_length=256``) are applied after the file; values are
  read with YAML scalar rules (``true``, ``null``, ``3``, ``[a, b]``) and then coerced to the field's type;
- every value is checked against its field's annotation (int, float, bool, str, Path, Optional, Literal, list,
  dict, enum, dataclass); a float must be finite (``nan`` and ``inf`` are refused); an unknown key is an error that
  names it and suggests the closest valid name.

A field annotated with a dataclass (``eval_options: EvalConfig = field(default_factory=EvalConfig)``, or
``EvalConfig | None``) is a *nested config*: it is given as a mapping (``eval_options: {num_prompts: 64}``), built
field by field with the same checks when the config is loaded, and keeps the defaults of the sub-fields it does not
give. An override reaches into it with a dotted path resolved from the left, ``eval_options.num_prompts=32`` or
``train.eval_options.num_prompts=32``, which sets that one sub-field and keeps the rest of what the file gave.

Errors name a key by its path from the section's field: ``'max_length'``, ``'eval_options.num_prompts'``,
``'tags[0]'`` (field names are unique across sections, so this is also the key to write in an override).

:func:`dump_config` writes the resolved sections back as YAML (for the run directory), nested configs as nested
mappings; loading that YAML again gives equal dataclasses. :func:`fields_where` reads what a config's fields declare
in their metadata (e.g. which settings identify a result).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from epsdpo.errors import UserError

__all__ = [
    "ConfigError",
    "coerce_value",
    "config_to_dict",
    "dump_config",
    "fields_where",
    "load_config",
    "parse_override",
    "read_config_source",
]


class ConfigError(UserError, ValueError):
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


def _nested_class(tp: Any) -> type | None:
    """The dataclass of a nested-config annotation (``EvalConfig`` or ``EvalConfig | None``), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [m for m in typing.get_args(tp) if isinstance(m, type) and dataclasses.is_dataclass(m)]
        if len(found) == 1:
            return found[0]
    return None


def _unknown_key(key: str, valid: Collection[str], where: str, path: str | None = None) -> ConfigError:
    """``key`` is not one of ``valid``; the message names it by ``path`` (default: ``key``) and suggests a name."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    name = key if path is None else path
    return ConfigError(f"unknown config key {name!r} ({where}).{hint} Valid keys: {', '.join(sorted(valid))}.")


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

    A dataclass annotation takes a mapping of its fields (each coerced in turn, unspecified ones keep their
    defaults, the dataclass's own ``__post_init__`` checks the result) or an instance of it, taken as it is.
    Raises :class:`ConfigError` naming ``key`` (``key.sub_key`` inside a mapping) when the value does not fit.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        nested = _nested_class(tp)
        if nested is not None and isinstance(value, Mapping):  # its own error (e.g. a typo in a sub-key) is the one
            return coerce_value(value, nested, key)
        candidates = [m for m in members if m is not type(None)]
        if len(candidates) == 1:  # `X | None`: X's own message (e.g. "not a finite number")
            return coerce_value(value, candidates[0], key)
        for member in candidates:
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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a nested config
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: expected a mapping of {tp.__name__} keys, got {value!r}.")
        return _build(tp, value, f"config key {key!r}", prefix=f"{key}.")
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
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):  # nan and inf are never a setting: each option's "off" is a number or null
            raise ConfigError(f"config key {key!r}: {number} is not a finite number; give a number.")
        return number
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
        section, names = _override_target(key, text, sections, owners)
        field, *path = names
        cls = sections[section]
        current = routed[section].get(field, _field_default(cls, field))
        routed[section][field] = _set_path(current, _field_types(cls)[field], path, field, value, text)
    return {name: _build(cls, routed[name], f"section {name!r}") for name, cls in sections.items()}


def _override_target(
    key: str, text: str, sections: Mapping[str, type], owners: Mapping[str, str]
) -> tuple[str, list[str]]:
    """``(section, [field, sub_field, …])`` of an override's dotted key, resolved from the left.

    ``max_length`` and ``data.max_length`` name a section's field; ``eval_options.num_prompts`` and
    ``train.eval_options.num_prompts`` go on into a nested config (checked by :func:`_set_path`).
    """
    first, *rest = key.split(".")
    if rest and first in sections:
        if owners.get(rest[0]) != first:
            raise _unknown_key(rest[0], _field_types(sections[first]), f"in section {first!r}")
        return first, rest
    if first in owners:
        return owners[first], [first, *rest]
    if rest:  # the start of a dotted path is a section or a field holding a nested config
        starts = set(sections) | {
            name for name, section in owners.items() if _nested_class(_field_types(sections[section])[name])
        }
        raise _unknown_key(first, starts, f"section of override {text!r}")
    raise _unknown_key(first, owners, f"override {text!r}")


_ABSENT: Any = object()  # a field given nowhere: it takes its default when the config is built


def _field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of ``cls`` (its factory called), or ``_ABSENT`` for a required field."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _ABSENT


def _set_path(current: Any, tp: Any, path: Sequence[str], key: str, value: Any, text: str) -> Any:
    """The value of config key ``key`` (annotation ``tp``, value so far ``current``) after an override.

    With an empty ``path`` the override's value replaces it; otherwise ``key`` must hold a nested config and the
    override sets its sub-field ``path[0]`` (recursively), keeping the others: a mapping from the file is updated, an
    instance or a default becomes the mapping of its fields, ``None`` or nothing becomes ``{}`` (the defaults).
    """
    if not path:
        return _override_value(value, text, tp, key)
    cls = _nested_class(tp)
    if cls is None:
        raise ConfigError(
            f"override {text!r}: config key {key!r} ({_type_name(tp)}) is not a nested config; "
            f"give its whole value ({key}=VALUE)."
        )
    name, *rest = path
    field_types = _field_types(cls)
    if name not in field_types:
        raise _unknown_key(name, field_types, f"not a field of {cls.__name__}", path=f"{key}.{name}")
    if current is _ABSENT or current is None:
        values: dict[str, Any] = {}
    elif isinstance(current, cls):
        values = {f.name: getattr(current, f.name) for f in dataclasses.fields(cls) if f.init}
    elif isinstance(current, Mapping):
        values = {str(k): v for k, v in current.items()}
    else:
        raise ConfigError(
            f"override {text!r}: config key {key!r} is {current!r}, not a mapping of {cls.__name__} keys; "
            f"give it as a mapping first."
        )
    old = values.get(name, _field_default(cls, name))
    values[name] = _set_path(old, field_types[name], rest, f"{key}.{name}", value, text)
    return values


def _override_value(value: Any, text: str, tp: Any, key: str) -> Any:
    """A CLI value: its YAML reading when that fits the field, else the raw text for a str field (``split=yes``)."""
    try:
        return coerce_value(value, tp, key)
    except ConfigError:
        raw = text.partition("=")[2]
        try:
            return coerce_value(raw, tp, key)
        except ConfigError:
            pass
        raise


def _build(cls: type, values: Mapping[str, Any], what: str, prefix: str = "") -> Any:
    """An instance of ``cls`` from ``values`` coerced to its fields' annotations.

    ``what`` names it in errors (``section 'data'``, ``config key 'eval_options'``); ``prefix`` starts the paths
    of its keys (``'eval_options.'``; empty for a section, whose keys were routed to it by name).
    """
    field_types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key not in field_types:
            raise _unknown_key(key, field_types, f"not a field of {cls.__name__}", path=f"{prefix}{key}")
        kwargs[key] = coerce_value(value, field_types[key], f"{prefix}{key}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{what}: required key(s) {', '.join(map(repr, missing))} not given.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}: {err}") from err


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a nested config: the mapping of its fields
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
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
    """``{section: {field: value}}`` with plain YAML-able values (paths as strings, tuples as lists, nested configs
    as mappings of their fields); only ``init`` fields, those a config file can give."""
    return {name: _plain(cfg) for name, cfg in configs.items()}


def dump_config(configs: Mapping[str, Any], path: str | Path | None = None) -> str:
    """The resolved config as YAML, nested by section; written to ``path`` too when given."""
    text = yaml.safe_dump(config_to_dict(configs), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def fields_where(cls: Any, key: str, *, default: bool = True) -> tuple[str, ...]:
    """The names of the ``init`` fields of a config dataclass (or instance) whose metadata ``key`` is true.

    A field declares it with ``dataclasses.field(metadata={key: True or False})``; a field that does not say takes
    ``default``. Names come in declaration order; a nested config is one field (read its class for its own). E.g.
    the settings that change what an evaluation measures, and those a resumed generation must share::

        output: str = field(default="eval.json", metadata={"identifies": False})
        fields_where(EvalConfig, "identifies")                 # all fields but `output`
        fields_where(GenerateConfig, "resume", default=False)  # only fields with metadata={"resume": True}

    Raises:
        TypeError: ``cls`` is not a dataclass, or a field's metadata value for ``key`` is not a bool (a string
            such as ``"no"`` would read as true).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"fields_where needs a dataclass or an instance of one, got {cls!r}")
    names = []
    for f in dataclasses.fields(cls):
        flag = f.metadata.get(key, default)
        if not isinstance(flag, bool):
            raise TypeError(f"metadata {key!r} of field {f.name!r} must be True or False, got {flag!r}")
        if f.init and flag:
            names.append(f.name)
    return tuple(names)
