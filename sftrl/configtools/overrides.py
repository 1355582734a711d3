"""Dotted ``key.sub=value`` overrides, and ``load_config``: file + overrides -> checked tree."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from sftrl.configtools.convert import _unknown_key_error, from_dict, section_schema
from sftrl.configtools.errors import ConfigError, _got, short_repr
from sftrl.configtools.schema import (
    NamedSections,
    _choices,
    _hints,
    _init_fields,
    _named_sections,
    _section_class,
    type_string,
)
from sftrl.configtools.yaml_io import _load_yaml_text, _yaml_problem, load_yaml_file

T = TypeVar("T")

_OVERRIDE_FORM = "expected the form key.sub=value, e.g. trainer.lr=1e-3"


def override_key(text: str) -> str:
    """The dotted key an override ``a.b.c=value`` sets (``"a.b.c"``)."""
    return ".".join(part.strip() for part in text.partition("=")[0].split("."))


def parse_override(text: str) -> tuple[list[str], object]:
    """Parse ``a.b.c=value`` into ``(['a', 'b', 'c'], value)``.

    The value is read as YAML (``3`` -> int, ``1e-3`` -> float, ``true`` -> bool,
    ``[1, 2]`` -> list, ``null`` or nothing -> None, ``'3'`` -> str).
    """
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"malformed override {short_repr(text)}: no '=' — {_OVERRIDE_FORM}")
    parts = [p.strip() for p in key.split(".")]
    if not key.strip():
        raise ConfigError(f"malformed override {short_repr(text)}: empty key — {_OVERRIDE_FORM}")
    if not all(parts):
        raise ConfigError(
            f"malformed override {short_repr(text)}: empty part in key {key.strip()!r} — {_OVERRIDE_FORM}"
        )
    try:
        value = _load_yaml_text(raw)
    except yaml.YAMLError as exc:
        _, problem = _yaml_problem(exc)
        raise ConfigError(
            f"malformed override {short_repr(text)}: value {short_repr(raw)} is not valid YAML ({problem}); "
            "quote it to pass a string",
            key=".".join(parts),
        ) from None
    return parts, value


def _check_override_path(cls: type, path: Sequence[str], text: str) -> type | None:
    """Check ``path`` names a field of ``cls``; return the section class it names, if any."""
    current: type = cls
    for i, part in enumerate(path):
        where = ".".join(path[:i])
        names = [f.name for f in _init_fields(current)]
        named = _named_sections(current)
        section: type | None
        if part not in names and named is not None and part in named[1].names():
            section = _named_section(named[1], part, ".".join(path[: i + 1]), text)
        elif part not in names:
            raise _unknown_key_error(current, part, where).with_context(f"override {short_repr(text)}")
        else:
            section = _section_class(_hints(current)[part])
        if i == len(path) - 1:
            return section
        if section is None:
            dotted = ".".join(path[: i + 1])
            f = next(f for f in _init_fields(current) if f.name == part)
            raise ConfigError(
                f"override {short_repr(text)}: '{dotted}' is a "
                f"{type_string(_hints(current)[part], _choices(f))} setting, not a section, "
                f"so '{'.'.join(path)}' does not exist",
                key=dotted,
            )
        current = section
    return None


def _named_section(spec: NamedSections, name: str, key: str, text: str) -> type:
    """The settings class of the named section ``key`` (``algo.my-pg``) an override sets."""
    schema = section_schema(spec, name, key, f"override {short_repr(text)}: '{key}'")
    if schema is None:
        raise ConfigError(f"override {short_repr(text)}: '{key}' is invalid: {spec.kind} {name!r} takes no "
                          "settings section", key=key)
    return schema


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        old = base.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            base[key] = _deep_merge(dict(old), value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type) -> dict[str, Any]:
    """A new nested dict: ``data`` with each ``key.sub=value`` override applied in order.

    Keys are checked against the schema ``cls`` (unknown key -> :class:`ConfigError` with a
    suggestion); values are only type-checked later by :func:`from_dict`.  A mapping value
    for a section (``trainer={lr: 0.1}``) is merged into it.  ``data`` is not modified.
    """
    if isinstance(overrides, str):
        raise TypeError("apply_overrides() takes a sequence of overrides, not one string")
    result: dict[str, Any] = copy.deepcopy(dict(data)) if data is not None else {}
    for text in overrides:
        path, value = parse_override(text)
        section = _check_override_path(cls, path, text)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                dotted = ".".join(path[: i + 1])
                raise ConfigError(
                    f"override {short_repr(text)}: cannot set '{'.'.join(path)}' because '{dotted}' "
                    f"is not a mapping, {_got(child)}",
                    key=dotted,
                )
            child = dict(child)
            node[part] = child
            node = child
        last = path[-1]
        if (
            section is not None
            and isinstance(value, Mapping)
            and isinstance(node.get(last), Mapping)
        ):
            node[last] = _deep_merge(dict(node[last]), value)
        else:
            node[last] = value
    return result


def _override_for(key: str | None, overrides: Sequence[str]) -> str | None:
    """The last override that set ``key`` or a key above/below it, if any."""
    if key is None:
        return None
    for text in reversed(overrides):
        with contextlib.suppress(ConfigError):
            dotted = ".".join(parse_override(text)[0])
            if key == dotted or key.startswith((dotted + ".", dotted + "[")):
                return text
    return None


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    check: Callable[[T], object] | None = None,
) -> T:
    """YAML file (optional) + overrides -> built ``cls`` tree, then ``check(tree)`` (cross-field
    rules raising ``ConfigError``); every error names its source.

    An error is prefixed with ``override '...'`` when an override set its key, or when it is a
    cross-field error that goes away without that override (``algo.name=sft`` for the file's
    ``algo.critic_regulariser: B``); otherwise with ``config file '...'``. ``validate()``
    methods are not called (``check`` may).
    """
    try:
        built = from_dict(cls, apply_overrides(load_yaml_file(path) if path is not None else {}, overrides, cls))
        if check is not None:
            check(built)
        return built
    except ConfigError as exc:
        source = _override_for(exc.key, overrides)
        if source is None and check is not None and exc.key is not None:
            culprits = [o for o in overrides if not _fails_without(cls, path, overrides, o, check, exc.key)]
            source = culprits[-1] if culprits else None
        if source is not None:
            raise exc.with_context(f"override {short_repr(source)}") from None
        if path is not None:
            raise exc.with_context(f"config file '{os.fspath(path)}'") from None
        raise


def _fails_without(cls: type[T], path, overrides: Sequence[str], dropped: str, check: Callable[[T], object],
                   key: str) -> bool:
    """Whether the config without the override ``dropped`` still fails a check on ``key``."""
    try:
        check(from_dict(cls, apply_overrides(load_yaml_file(path) if path is not None else {},
                                             [o for o in overrides if o != dropped], cls)))
    except ConfigError as err:
        return err.key == key
    return False
