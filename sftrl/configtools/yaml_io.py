"""YAML in and out: a strict loader (YAML 1.2 floats, no duplicate keys, bounded size) and an atomic dump."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from sftrl.configtools.errors import ConfigError, _got
from sftrl.configtools.schema import _init_fields, _named_sections


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
    out = {f.name: _to_plain(getattr(obj, f.name)) for f in _init_fields(type(obj))}
    named = _named_sections(type(obj))
    if named is not None:  # named sections are keys of their parent: ``algo: {my-pg: {...}}``
        out |= {name: to_dict(section) for name, section in getattr(obj, named[0]).items()}
    return out


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
