"""Declaring a config field (``doc_field``, ``Range``) and reading a schema's types."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from sftrl.configtools.errors import _quote_list

_NoneType = type(None)
_MISSING: Any = dataclasses.MISSING


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


@dataclasses.dataclass(frozen=True)
class NamedSections:
    """Declares that the keys of a section that are not its fields name sub-sections whose
    schema is looked up by name when the config is read: ``algo.my-pg.temperature`` is field
    ``temperature`` of the settings class of algorithm ``my-pg``. The field so declared (typed
    :class:`Sections`) holds them; it is not itself a key in YAML.

    ``names()`` lists the names that may have a section; ``schema(name)`` is the settings class
    of a name (None: it takes none), and raises ``ConfigError`` (a one-line reason) for a name it
    does not know or cannot load. The section named by the sibling field ``selected_by`` is
    always built, from defaults when absent, so the resolved config shows every value the run
    uses (and an unknown name there is an error of that field).
    """

    kind: str  # what a name names, in messages: "algorithm"
    names: Callable[[], Sequence[str]]
    schema: Callable[[str], type | None]
    selected_by: str | None = None


class Sections(Mapping[str, Any]):
    """The value of a :class:`NamedSections` field: an immutable name -> section mapping
    (each section a frozen dataclass), hashable and picklable like the rest of the tree."""

    def __init__(self, sections: Mapping[str, Any] | None = None) -> None:
        self._sections = dict(sections or {})

    def __getitem__(self, name: str) -> Any:
        return self._sections[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    def __len__(self) -> int:
        return len(self._sections)

    def __hash__(self) -> int:
        return hash(tuple(self._sections.items()))

    def __repr__(self) -> str:
        return f"Sections({self._sections!r})"


def doc_field(
    default: Any = _MISSING,
    doc: str = "",
    *,
    default_factory: Any = None,
    choices: Sequence[str] | None = None,
    valid: Range | None = None,
    sections: NamedSections | None = None,
) -> Any:
    """A dataclass field carrying a one-line ``doc`` (and optional ``choices`` and ``valid``
    range) in metadata.

    Leaf: ``lr: float = doc_field(1e-3, "Adam learning rate.", valid=Range(0, low_open=True))``.
    Section: ``trainer: Trainer = doc_field(doc="Trainer settings.", default_factory=Trainer)``.
    ``choices`` restricts a ``str`` field to the given values; prefer ``Literal[...]``.
    ``valid`` is checked by :func:`check_ranges` (and shown in the reference).
    Named sections: ``sections: Sections = doc_field(doc=..., default_factory=Sections,
    sections=NamedSections(...))`` (see :class:`NamedSections`).
    """
    if not doc or not doc.strip():
        raise TypeError("doc_field() needs a non-empty one-line doc")
    if default is not _MISSING and default_factory is not None:
        raise TypeError("doc_field() takes a default or a default_factory, not both")
    metadata: dict[str, Any] = {"doc": " ".join(doc.split())}
    if valid is not None:
        metadata["valid"] = valid
    if sections is not None:
        metadata["sections"] = sections
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
    """The fields that are keys in YAML (a :class:`NamedSections` field is not)."""
    return [f for f in dataclasses.fields(cls) if f.init and "sections" not in f.metadata]


def _named_sections(cls: type) -> tuple[str, NamedSections] | None:
    """``(field name, declaration)`` of the class's :class:`NamedSections` field, if it has one."""
    for f in dataclasses.fields(cls):
        if "sections" in f.metadata:
            return f.name, f.metadata["sections"]
    return None


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
