"""User mistakes: one line, exit code 2, nothing written.

Every error sftrl raises for a user's mistake is a ``ValueError`` (``ConfigError``,
``UsageError``, ``CheckpointError``, ``SamplerCheckpointError``, ``DataError``, ``RunDirError``,
``PretrainingFailed``, ``ResourceError``), so a command catches ``USER_ERRORS`` and prints
``error: <message>``; anything else is a fault of sftrl's and keeps its traceback.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USER_ERROR = 2

USER_ERRORS = (ValueError, FileNotFoundError)


class UsageError(ValueError):
    """A mistake in how a command was called (its flags, paths, or which run to continue)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``error: PROG: what (see PROG --help)``) and
    exit code 2, like every other user mistake, instead of the usage block and the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")
