"""The README's reference of every key, and the schema's own check (``check_schema``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, get_args, get_origin

from sftrl.configtools.convert import _convert_keyed
from sftrl.configtools.errors import ConfigError, _join
from sftrl.configtools.schema import (
    _MISSING,
    Sections,
    _choices,
    _hints,
    _init_fields,
    _is_dataclass_type,
    _is_union,
    _named_sections,
    _NoneType,
    _section_class,
    type_string,
)
from sftrl.configtools.yaml_io import _to_plain


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
    named = _named_sections(cls)
    if named is not None:
        f = next(f for f in dataclasses.fields(cls) if f.name == named[0])
        if hints[f.name] is not Sections or f.default_factory is not Sections:
            problems.append(f"{_join(prefix, f.name)}: named sections are typed Sections, with "
                            "default_factory=Sections")
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
