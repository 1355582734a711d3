"""Generic machinery for a typed, frozen dataclass config tree loaded from YAML.

The schema itself (``sftrl/config.py``) is a tree of ``@dataclass(frozen=True)`` classes.
This module knows nothing about that schema; it only relies on these conventions:

* every field is declared with :func:`doc_field`, which records a one-line ``doc`` (and
  optionally ``choices`` for a plain ``str`` field) in the field's metadata;
* a nested section is a field whose type is another such dataclass, with a
  ``default_factory``;
* a field declared with ``sections=NamedSections(...)`` (typed ``Sections``) gathers the
  section's other keys as sub-sections whose schema is looked up by name when the config is
  read (an algorithm plug-in's own settings: ``algo.my-pg.temperature``);
* leaf types are ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None`` /
  ``Optional[X]`` and ``tuple[X, ...]`` (or fixed ``tuple[X, Y]``) of those;
* string annotations

Why not pydantic (2.13, installed with ray[default]): a ``TypeAdapter`` over these dataclasses
in lax mode accepts what a config must refuse (``3.0``, ``"3"`` and ``true`` for an int, ``1`` and
``"yes"`` for a bool, ``true`` for a float: the "boolean flag parsed as a string" of STYLE.md);
in strict mode it refuses a YAML list for a tuple and a mapping for a nested section. Either
way its errors would still need translating into these messages (the dotted key, the value,
what is valid, "did you mean", the override to blame), so it would replace no code here.

The package's modules: ``schema`` (declaring fields), ``convert`` (building a tree, ranges),
``yaml_io`` (reading and writing YAML), ``overrides`` (``key=value`` and ``load_config``),
``reference`` (the README reference, the schema check), ``errors``.
"""

from sftrl.configtools.convert import check_ranges, from_dict
from sftrl.configtools.errors import ConfigError, short_repr
from sftrl.configtools.overrides import apply_overrides, load_config, override_key, parse_override
from sftrl.configtools.reference import (
    FieldInfo,
    check_schema,
    config_reference_markdown,
    iter_fields,
)
from sftrl.configtools.schema import NamedSections, Range, Sections, doc_field, type_string
from sftrl.configtools.yaml_io import dump_yaml, flat_dict, load_yaml_file, to_dict

__all__ = [
    "ConfigError",
    "FieldInfo",
    "NamedSections",
    "Range",
    "Sections",
    "apply_overrides",
    "check_ranges",
    "check_schema",
    "config_reference_markdown",
    "doc_field",
    "dump_yaml",
    "flat_dict",
    "from_dict",
    "iter_fields",
    "load_config",
    "load_yaml_file",
    "override_key",
    "parse_override",
    "short_repr",
    "to_dict",
    "type_string",
]
