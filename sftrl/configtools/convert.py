"""Building the frozen dataclass tree from plain data (parsed YAML): types, keys, ranges."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

from sftrl.configtools.errors import ConfigError, _got, _join, _Mismatch, short_repr
from sftrl.configtools.schema import (
    _MISSING,
    NamedSections,
    Sections,
    _choices,
    _describe,
    _hints,
    _init_fields,
    _is_dataclass_type,
    _is_union,
    _named_sections,
    _NoneType,
    _section_class,
    type_string,
)

T = TypeVar("T")

# Numbers that YAML 1.2 reads as floats but PyYAML (YAML 1.1) leaves as strings: an
# exponent without a dot or without a sign (1e-3, 1e3, 2.5e3), plus inf / nan spellings.
_FLOAT_TEXT = re.compile(
    r"[-+]?(?:(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
    r"|\.?(?:inf|infinity|nan))",
    re.IGNORECASE,
)


def _close(word: str, options: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to ``tp``; raises :class:`_Mismatch` when its shape is wrong."""
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if _NoneType in args:
                return None
            raise _Mismatch()
        arms = [a for a in args if a is not _NoneType]
        if len(arms) == 1:
            return _convert(arms[0], value, key)
        for arm in arms:
            with contextlib.suppress(_Mismatch, ConfigError):
                return _convert(arm, value, key)
        raise _Mismatch()
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty section (``trainer:`` with everything commented out)
            value = {}
        if not isinstance(value, Mapping):
            raise _Mismatch()
        return _build(tp, value, key)
    if get_origin(tp) is Literal:
        options = get_args(tp)
        for option in options:
            if value == option and type(value) is type(option):
                return option
        hint = ""
        if isinstance(value, str):
            near = _close(value, [o for o in options if isinstance(o, str)])
            hint = f"did you mean {near!r}?" if near else ""
        raise _Mismatch(hint)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            raise _Mismatch(f"write {int(value)} for an int")
        raise _Mismatch()
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            text = value.strip().replace("_", "").lower().replace("infinity", "inf")
            return float(text.replace(".inf", "inf").replace(".nan", "nan"))
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float, datetime.date)):
            raise _Mismatch("quote it in YAML to pass it as a string")
        raise _Mismatch()
    if get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch()
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert_keyed(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch(f"it has {len(value)} items")
        return tuple(
            _convert_keyed(a, v, f"{key}[{i}]")
            for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    hint = " (use tuple[X, ...] for lists)" if get_origin(tp) is list else ""
    raise TypeError(f"config field '{key}' has unsupported type {type_string(tp)}{hint}")


def _convert_keyed(tp: Any, value: Any, key: str, choices: Sequence[str] | None = None) -> Any:
    try:
        result = _convert(tp, value, key)
    except _Mismatch as exc:
        hint = f" — {exc.hint}" if exc.hint else ""
        raise ConfigError(
            f"'{key}' must be {_describe(tp, choices)}, {_got(value)}{hint}", key=key
        ) from None
    if choices is not None and isinstance(result, str) and result not in choices:
        near = _close(result, choices)
        hint = f" — did you mean {near!r}?" if near else ""
        raise ConfigError(f"'{key}' must be {_describe(tp, choices)}, {_got(value)}{hint}", key=key)
    return result


def _leaf_paths(cls: type, prefix: str = "") -> Iterator[str]:
    for f in _init_fields(cls):
        name = _join(prefix, f.name)
        sub = _section_class(_hints(cls)[f.name])
        if sub is not None:
            yield from _leaf_paths(sub, name)
        else:
            yield name


def _unknown_key_error(cls: type, key: Any, where: str) -> ConfigError:
    valid = [f.name for f in _init_fields(cls)]
    scope = f"valid keys under '{where}'" if where else "valid top-level keys"
    if not isinstance(key, str):
        return ConfigError(
            f"unknown key {key!r} ({type(key).__name__}) under '{where or '<top level>'}' — "
            f"{scope}: {', '.join(valid)}",
            key=where or None,
        )
    dotted = _join(where, key)
    suggestions: list[str] = []
    near = _close(key, valid)
    if near is not None:
        suggestions.append(near)
    else:  # the key may belong in a nested section: ``lr`` at top level -> ``trainer.lr``
        nested = [p for p in _leaf_paths(cls) if "." in p and p.rsplit(".", 1)[1] == key]
        suggestions.extend(_join(where, p) for p in nested[:3])
    named = _named_sections(cls)
    names = list(named[1].names()) if named is not None else []
    also = f"; or a section named after an {named[1].kind}: {', '.join(names)}" if named and names else ""
    near = _close(key, names) if not suggestions else None
    if near is not None:  # ``algo.my-pgg.temperature`` -> ``algo.my-pg``
        suggestions.append(near)
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return ConfigError(f"unknown key '{dotted}' — {scope}: {', '.join(valid)}{also}{hint}", key=dotted)


def _build(cls: Any, data: Mapping[Any, Any], where: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in _init_fields(cls)}
    named = _named_sections(cls)
    for key in data:
        if key not in fields and (named is None or key not in named[1].names()):
            raise _unknown_key_error(cls, key, where)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            kwargs[name] = _convert_keyed(hints[name], data[name], key, _choices(f))
        elif f.default is _MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required key '{key}' — it must be {_describe(hints[name], _choices(f))}",
                key=key,
            )
    if named is not None:
        field_name, spec = named
        given = {k: v for k, v in data.items() if k not in fields}
        selected = None
        if spec.selected_by is not None:
            selected = kwargs[spec.selected_by] if spec.selected_by in kwargs else fields[spec.selected_by].default
        kwargs[field_name] = _build_sections(spec, given, selected, where)
    return cls(**kwargs)


def section_schema(spec: NamedSections, name: str, key: str, label: str) -> type | None:
    """``spec.schema(name)``, its ``ConfigError`` keyed ``key`` and prefixed ``label: ``."""
    try:
        return spec.schema(name)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc.message}", key=key) from None


def _build_sections(spec: NamedSections, given: Mapping[str, Any], selected: Any, where: str) -> Sections:
    """The sections ``given`` (name -> plain data) built with their schemas, and the one named
    ``selected`` (if it has settings) from defaults when it is not given."""
    built: dict[str, Any] = {}
    for name, value in given.items():
        key = _join(where, name)
        schema = section_schema(spec, name, key, f"'{key}'")
        if schema is None:
            raise ConfigError(f"'{key}' is invalid: {spec.kind} {name!r} takes no settings section", key=key)
        built[name] = _convert_keyed(schema, value, key)
    if isinstance(selected, str) and selected not in built:
        assert spec.selected_by is not None
        key = _join(where, spec.selected_by)
        schema = section_schema(spec, selected, key, f"'{key}' = {selected!r} is invalid")
        if schema is not None:
            built[selected] = _build(schema, {}, _join(where, selected))
    return Sections(built)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build the frozen dataclass tree ``cls`` from nested plain data (e.g. parsed YAML).

    Missing keys take the dataclass defaults; unknown keys, wrongly typed values and
    non-mappings where a section belongs raise :class:`ConfigError`.  ``where`` is the
    dotted path of ``data`` inside a bigger tree and prefixes every key in error messages.
    ``None`` for ``data`` (or for a section) means an empty mapping.  Any ``validate()``
    method of the classes is NOT called: that is the caller's business.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict() needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        label = f"'{where}'" if where else "the config"
        raise ConfigError(f"{label} must be {_describe(cls)}, {_got(data)}", key=where or None)
    return _build(cls, data, where)





def check_ranges(tree: Any, prefix: str = "") -> None:
    """Every number of a built tree is finite, and within its field's ``valid`` range (a tuple's
    items each, and the tuple holds as many as ``Range.items`` says); None values pass. Raises
    :class:`ConfigError` ``'key' = value is invalid: must be ...`` for the first that is not."""
    def invalid(key: str, value: Any, valid: str) -> ConfigError:
        return ConfigError(f"'{key}' = {short_repr(value)} is invalid: must {valid}", key=key)

    named = _named_sections(type(tree))
    if named is not None:
        for name, section in getattr(tree, named[0]).items():
            check_ranges(section, _join(prefix, name))
    for f in _init_fields(type(tree)):
        key, value, valid = _join(prefix, f.name), getattr(tree, f.name), f.metadata.get("valid")
        if dataclasses.is_dataclass(value):
            check_ranges(value, key)
            continue
        items = list(value) if isinstance(value, tuple) else [value]
        if isinstance(value, tuple) and valid is not None and valid.items is not None:
            want = valid.items
            if (want == "1+" and not value) or (isinstance(want, int) and len(value) != want):
                raise invalid(key, list(value), f"hold {'one or more' if want == '1+' else want} item(s)")
        for i, item in enumerate(items):
            name = f"{key}[{i}]" if isinstance(value, tuple) else key
            if isinstance(item, float) and not math.isfinite(item):
                raise invalid(name, item, "be a finite number")
            if valid is not None and isinstance(item, (int, float)) and not isinstance(item, bool) \
                    and not valid.holds(item):
                raise invalid(name, item, f"be {valid.text()}")
