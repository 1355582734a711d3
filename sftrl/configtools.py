"""Generic machinery for a typed, frozen dataclass config tree loaded from YAML.

The schema itself (``sftrl/config.py``) is a tree of ``@dataclass(frozen=True)`` classes.
This module knows nothing about that schema; it only relies on these conventions:

* every field is declared with :func:`doc_field`, which records a one-line ``doc`` (and
  optionally ``choices`` for a plain ``str`` field) in the field's metadata;
* a nested section is a field whose type is another such dataclass, with a
  ``default_factory``;
* leaf types are ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None`` /
  ``Optional[X]`` and ``tuple[X, ...]`` (or fixed ``tuple[X, Y]``) of those;
* string annotations (``from __future__ import annotations``) are fine: they are resolved
  with :func:`typing.get_type_hints`, so the schema classes must live at module level.

Typical use::

    cfg = load_config(Config, "configs/base.yaml", ["trainer.lr=1e-3"])
    dump_yaml(cfg, run_dir / "config.yaml")

Every user-facing problem is a :class:`ConfigError` whose one-line message names the dotted
key, the offending value and what would have been valid.  Problems in the schema itself (an
unsupported field type, a missing doc) are programming errors and raise :class:`TypeError`;
:func:`check_schema` finds all of them at once and belongs in the schema's own tests.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "ConfigError",
    "FieldInfo",
    "Range",
    "apply_overrides",
    "check_ranges",
    "check_schema",
    "config_reference_markdown",
    "doc_field",
    "dump_yaml",
    "from_dict",
    "iter_fields",
    "load_config",
    "load_yaml_file",
    "parse_override",
    "to_dict",
    "type_string",
]

T = TypeVar("T")

_NoneType = type(None)
_MISSING: Any = dataclasses.MISSING
_MAX_REPR = 80


# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A user-facing configuration problem, with a one-line message.

    ``key`` is the dotted key the problem is about (``None`` when it is about a whole file
    or an override's syntax); :func:`load_config` uses it to say whether the value came
    from the file or from an override.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        message = " ".join(message.splitlines())
        super().__init__(message)
        self.message = message
        self.key = key

    def with_context(self, context: str) -> ConfigError:
        """A copy whose message starts with ``context: `` (e.g. the file it came from)."""
        return ConfigError(f"{context}: {self.message}", key=self.key)


class _Mismatch(Exception):
    """The value's shape does not fit the type; the nearest keyed caller words the error."""

    def __init__(self, hint: str = "") -> None:
        super().__init__(hint)
        self.hint = hint


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a line's worth (``null`` for None): what error messages quote."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return text


def _got(value: Any) -> str:
    if value is None:
        return "got null"
    return f"got {short_repr(value)} ({type(value).__name__})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _quote_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


# --------------------------------------------------------------------------- schema helpers


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a setting may take: ``low`` (or above it, ``low_open``) up to ``high`` (or
    below it, ``high_open``), either end open-ended when None; ``note`` follows the range in
    messages (``"(0: sync mode)"``). On a ``tuple`` setting it applies to every item, and
    ``items`` is how many it must hold (an int, or ``"1+"`` for one or more)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    items: int | str | None = None

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``between 1 and 16384`` (int ends), ``in [0, 1)`` (and the note)."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            whole = isinstance(low, int) and isinstance(high, int) and not (self.low_open or self.high_open)
            span = (f"between {_number(low)} and {_number(high)}" if whole else
                    f"in {'(' if self.low_open else '['}{_number(low)}, {_number(high)}{')' if self.high_open else ']'}")
        elif low is not None:
            span = f"{'>' if self.low_open else '>='} {_number(low)}"
        elif high is not None:
            span = f"{'<' if self.high_open else '<='} {_number(high)}"
        else:
            span = "any number"
        return f"{span} {self.note}".strip()

    def describe(self) -> str:
        """:meth:`text`, with how many items a tuple holds."""
        if self.items is None:
            return self.text()
        count = "one or more" if self.items == "1+" else str(self.items)
        return f"{count} item(s), each {self.text()}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def doc_field(
    default: Any = _MISSING,
    doc: str = "",
    *,
    default_factory: Any = None,
    choices: Sequence[str] | None = None,
    valid: Range | None = None,
) -> Any:
    """A dataclass field carrying a one-line ``doc`` (and optional ``choices`` and ``valid``
    range) in metadata.

    Leaf: ``lr: float = doc_field(1e-3, "Adam learning rate.", valid=Range(0, low_open=True))``.
    Section: ``trainer: Trainer = doc_field(doc="Trainer settings.", default_factory=Trainer)``.
    ``choices`` restricts a ``str`` field to the given values; prefer ``Literal[...]``.
    ``valid`` is checked by :func:`check_ranges` (and shown in the reference).
    """
    if not doc or not doc.strip():
        raise TypeError("doc_field() needs a non-empty one-line doc")
    if default is not _MISSING and default_factory is not None:
        raise TypeError("doc_field() takes a default or a default_factory, not both")
    metadata: dict[str, Any] = {"doc": " ".join(doc.split())}
    if valid is not None:
        metadata["valid"] = valid
    if choices is not None:
        if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
            raise TypeError("doc_field(choices=...) must be a sequence of strings")
        metadata["choices"] = tuple(choices)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as exc:
        raise TypeError(
            f"cannot resolve the type annotations of config class {cls.__qualname__}: {exc} "
            "(schema classes must be defined at module level)"
        ) from exc


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section field (``Sec`` or ``Sec | None``), else ``None``."""
    if _is_dataclass_type(tp):
        return tp
    if _is_union(tp):
        arms = [a for a in get_args(tp) if a is not _NoneType]
        if len(arms) == 1 and _is_dataclass_type(arms[0]):
            return arms[0]
    return None


def _init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _choices(f: dataclasses.Field[Any]) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


def type_string(tp: Any, choices: Sequence[str] | None = None) -> str:
    """A readable type: ``int``, ``'a' | 'b'``, ``int | None``, ``tuple[int, ...]``."""
    if choices is not None and tp is str:
        return " | ".join(repr(c) for c in choices)
    if tp is _NoneType:
        return "None"
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if _is_union(tp):
        args = get_args(tp)
        parts = [type_string(a, choices) for a in args if a is not _NoneType]
        if _NoneType in args:
            parts.append("None")
        return " | ".join(parts)
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_string(args[0])}, ...]"
        return f"tuple[{', '.join(type_string(a) for a in args)}]"
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp)


def _describe(tp: Any, choices: Sequence[str] | None = None) -> str:
    """What a valid value looks like, in words, for error messages."""
    if choices is not None and tp is str:
        return f"one of {_quote_list(choices)}"
    if tp is bool:
        return "a bool (true or false)"
    if tp is int:
        return "an int"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if get_origin(tp) is Literal:
        return f"one of {_quote_list(get_args(tp))}"
    if _is_union(tp):
        args = get_args(tp)
        parts = [_describe(a, choices) for a in args if a is not _NoneType]
        if _NoneType in args:
            parts.append("null")
        return " or ".join(parts)
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_string(args[0])}"
        return f"a list of {len(args)} items ({', '.join(type_string(a) for a in args)})"
    if _is_dataclass_type(tp):
        keys = ", ".join(f.name for f in _init_fields(tp))
        return f"a mapping (a section with keys {keys})"
    return type_string(tp)


# --------------------------------------------------------------------------- building

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
    hint = f"; did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return ConfigError(f"unknown key '{dotted}' — {scope}: {', '.join(valid)}{hint}", key=dotted)


def _build(cls: Any, data: Mapping[Any, Any], where: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in _init_fields(cls)}
    for key in data:
        if key not in fields:
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
    return cls(**kwargs)


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


# --------------------------------------------------------------------------- YAML loading


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable; the base constructor reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?\.[0-9_]+[eE][-+]?[0-9]+)$"
    ),
    list("-+0123456789."),
)


def _yaml_problem(exc: yaml.YAMLError) -> tuple[str, str]:
    """(``' at line L, column C'`` or ``''``, short problem text) of a PyYAML error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return where, problem
    return "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# A config is a few hundred values a few levels deep. YAML aliases can make a few hundred bytes
# stand for billions of values (each alias repeats what its anchor names), and brackets can nest
# past Python's recursion limit: both are refused before anything walks or prints the value.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


def _check_yaml_size(data: Any) -> None:
    """Raise ``yaml.YAMLError`` when ``data``, with every alias expanded, holds more than
    ``MAX_YAML_VALUES`` values or nests deeper than ``MAX_YAML_DEPTH`` (counted without expanding:
    a shared node's size is computed once)."""
    sizes: dict[int, int] = {}

    def size(value: Any, depth: int) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        if depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"it nests deeper than {MAX_YAML_DEPTH} levels")
        if id(value) not in sizes:
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            total = 1 + sum(size(child, depth + 1) for child in children)
            if total > MAX_YAML_VALUES:
                raise yaml.YAMLError(f"it holds more than {MAX_YAML_VALUES:,} values once its aliases are expanded")
            sizes[id(value)] = total
        return sizes[id(value)]

    size(data, 0)


def _load_yaml_text(text: str) -> Any:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise yaml.YAMLError(f"it nests deeper than Python can read (keep it under {MAX_YAML_DEPTH} levels)") from None
    _check_yaml_size(data)
    return data


def load_yaml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; an empty file gives ``{}``.

    A missing/unreadable file, a YAML syntax error (reported with line and column), a
    duplicate key or a top level that is not a mapping raise :class:`ConfigError`.
    ``1e-3`` is read as a float (YAML 1.2), unlike plain ``yaml.safe_load``.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file '{name}' not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{name}' is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{name}' is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{name}': {exc.strerror}") from None
    try:
        data = _load_yaml_text(text)
    except yaml.YAMLError as exc:
        where, problem = _yaml_problem(exc)
        raise ConfigError(f"invalid YAML in config file '{name}'{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{name}' must hold a mapping of keys at the top level, {_got(data)}"
        )
    return data


# --------------------------------------------------------------------------- overrides

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
        if part not in names:
            raise _unknown_key_error(current, part, where).with_context(f"override {short_repr(text)}")
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


# --------------------------------------------------------------------------- ranges


def check_ranges(tree: Any, prefix: str = "") -> None:
    """Every number of a built tree is finite, and within its field's ``valid`` range (a tuple's
    items each, and the tuple holds as many as ``Range.items`` says); None values pass. Raises
    :class:`ConfigError` ``'key' = value is invalid: must be ...`` for the first that is not."""
    def invalid(key: str, value: Any, valid: str) -> ConfigError:
        return ConfigError(f"'{key}' = {short_repr(value)} is invalid: must {valid}", key=key)

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


# --------------------------------------------------------------------------- dumping


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), ready for YAML."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict() needs a dataclass instance, got {type(obj).__name__}")
    return {f.name: _to_plain(getattr(obj, f.name)) for f in _init_fields(type(obj))}


def flat_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``to_dict``'s nested dict as ``{"dotted.key": leaf value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _Dumper(yaml.SafeDumper):
    """Writes lists of scalars inline (``hidden: [64, 64]``), everything else as blocks."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(obj: Any, path: str | os.PathLike[str], *, header: str | None = None) -> None:
    """Write a config dataclass (or plain mapping) to ``path`` as YAML, atomically.

    The text goes to a temporary file in the same directory, which then replaces ``path``,
    so readers never see a half-written file.  ``header`` lines become ``#`` comments.
    """
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else _to_plain(obj)
    text = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    from sftrl.files import write_text_atomic

    write_text_atomic(path, text)


# --------------------------------------------------------------------------- reference docs


class FieldInfo(NamedTuple):
    """One leaf config field, as listed in the README reference."""

    name: str  # dotted key, e.g. "trainer.lr"
    type: str  # readable type, e.g. "float", "'a' | 'b'", "int | None"
    default: str  # YAML-ish default, e.g. "0.001", "true", "null", "[64, 64]", "required"
    doc: str


def _default_repr(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default_repr(v) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "(section)"
    return repr(value)


def _field_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not _MISSING:
        return _default_repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _default_repr(f.default_factory())
    return "required"


def iter_fields(cls: type, prefix: str = "") -> Iterator[FieldInfo]:
    """Every leaf field of the tree, depth first, in declaration order.

    An optional section (``Sec | None``) is listed itself (it can be set to null) and
    then its own fields.
    """
    hints = _hints(cls)
    for f in _init_fields(cls):
        name = _join(prefix, f.name)
        tp = hints[f.name]
        section = _section_class(tp)
        doc = f.metadata.get("doc", "")
        valid = f.metadata.get("valid")
        if valid is not None:
            doc = f"{doc} Valid: {valid.describe()}."
        if section is None or section is not tp:
            yield FieldInfo(name, type_string(tp, _choices(f)), _field_default(f), doc)
        if section is not None:
            yield from iter_fields(section, name)


def _section_docs(cls: type, prefix: str = "") -> dict[str, str]:
    docs: dict[str, str] = {}
    hints = _hints(cls)
    for f in _init_fields(cls):
        section = _section_class(hints[f.name])
        if section is not None:
            name = _join(prefix, f.name)
            docs[name] = f.metadata.get("doc", "")
            docs.update(_section_docs(section, name))
    return docs


def _md_code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def config_reference_markdown(cls: type, *, heading_level: int = 3) -> str:
    """Markdown reference of every leaf key: one ``| key | type | default | description |``
    table per section, headed by the section's dotted name and doc."""
    groups: dict[str, list[FieldInfo]] = {}
    for info in iter_fields(cls):
        groups.setdefault(info.name.rpartition(".")[0], []).append(info)
    docs = _section_docs(cls)
    hashes = "#" * heading_level
    out: list[str] = []
    for section, infos in groups.items():
        out.append(f"{hashes} {_md_code(section) if section else 'Top level'}")
        out.append("")
        if docs.get(section):
            out.extend([docs[section], ""])
        out.append("| key | type | default | description |")
        out.append("| --- | --- | --- | --- |")
        for info in infos:
            doc = " ".join(info.doc.split()).replace("|", "\\|")
            out.append(
                f"| {_md_code(info.name)} | {_md_code(info.type)} | "
                f"{_md_code(info.default)} | {doc} |"
            )
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- schema check


def _type_problems(tp: Any, where: str) -> list[str]:
    if tp in (int, float, bool, str) or _is_dataclass_type(tp):
        return []
    if get_origin(tp) is Literal:
        bad = [a for a in get_args(tp) if not isinstance(a, (str, int, bool))]
        return [f"{where}: Literal values must be str/int/bool, got {bad!r}"] if bad else []
    if _is_union(tp):
        return [p for a in get_args(tp) if a is not _NoneType for p in _type_problems(a, where)]
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if not args or args == ((),):
            return [f"{where}: bare tuple; write tuple[X, ...]"]
        args = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        return [p for a in args for p in _type_problems(a, f"{where}[]")]
    hint = "; use tuple[X, ...] for lists" if get_origin(tp) is list or tp is list else ""
    return [f"{where}: unsupported type {type_string(tp)}{hint}"]


def _schema_problems(cls: type, prefix: str) -> list[str]:
    label = prefix or cls.__qualname__
    if not _is_dataclass_type(cls):
        return [f"{label}: {cls!r} is not a dataclass"]
    problems: list[str] = []
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        problems.append(f"{label}: {cls.__qualname__} is not frozen (use @dataclass(frozen=True))")
    try:
        hints = _hints(cls)
    except TypeError as exc:
        return [*problems, f"{label}: {exc}"]
    for f in _init_fields(cls):
        name = _join(prefix, f.name)
        tp = hints[f.name]
        if not f.metadata.get("doc"):
            problems.append(f"{name}: no doc (declare it with doc_field)")
        type_problems = _type_problems(tp, name)
        problems.extend(type_problems)
        choices = _choices(f)
        if choices is not None and str not in (tp, *get_args(tp)):
            problems.append(f"{name}: choices= only applies to str fields")
        section = _section_class(tp)
        if section is tp and f.default_factory is dataclasses.MISSING and f.default is _MISSING:
            problems.append(f"{name}: a section needs default_factory={section.__qualname__}")
        if section is not None:
            problems.extend(_schema_problems(section, name))
        elif not type_problems and (f.default is not _MISSING or f.default_factory is not dataclasses.MISSING):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            try:
                _convert_keyed(tp, _to_plain(default), name, choices)
            except ConfigError as exc:
                problems.append(f"{name}: default does not fit the type ({exc})")
            valid = f.metadata.get("valid")
            items = default if isinstance(default, tuple) else (default,)
            if valid is not None and not all(x is None or valid.holds(x) for x in items):
                problems.append(f"{name}: default {default!r} is outside its valid range ({valid.describe()})")
    return problems


def check_schema(cls: type) -> None:
    """Raise :class:`TypeError` listing every problem in a schema tree: non-frozen or
    non-dataclass sections, fields without a doc, unsupported types, sections without a
    default_factory and defaults that do not fit their declared type."""
    problems = _schema_problems(cls, "")
    if problems:
        raise TypeError("config schema problems:\n  " + "\n  ".join(problems))
