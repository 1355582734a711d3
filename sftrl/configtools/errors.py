"""The one error type of the config machinery, and how its messages quote values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_MAX_REPR = 80


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
        """A copy whose message starts with ``context: `` (e.g. the file it came from), once: a
        message that already names it (an override's own parse error) is kept as it is."""
        if self.message.startswith(f"{context}: "):
            return ConfigError(self.message, key=self.key)
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
