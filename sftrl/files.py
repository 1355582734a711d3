"""Writing files so that nothing is ever half written: one helper for every file sftrl makes.

``write_atomic(path, write)`` lets ``write`` fill a temporary file beside ``path``, flushes it to
the disk, renames it onto ``path`` and flushes the directory entry, so a reader (or a resumed
run after a crash or a power cut) sees the old file or the new one, never a mix. On any failure
(a full disk above all) the temporary file is removed and the old file is left as it was.

A full disk is a fault a user can mend (free space, then resume), not a bug: ``out_of_space``
tells it apart from other ``OSError``\\ s, and ``DiskFull`` carries it to the command's top level
with the file it was writing.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeGuard, cast

# ENOSPC: the file system is full; EDQUOT: the user's quota is; EFBIG: the file would pass the
# process's file-size limit (``ulimit -f``) or the file system's largest file.
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space(err: BaseException | None) -> TypeGuard[OSError]:
    """Whether ``err`` says the disk (or a quota, or a file-size limit) is full."""
    return isinstance(err, OSError) and err.errno in OUT_OF_SPACE


class DiskFull(OSError):
    """Writing ``path`` ran out of space. Nothing half-written was left behind."""

    def __init__(self, path: str | os.PathLike, err: OSError):
        super().__init__(err.errno, f"{err.strerror or err} while writing '{path}'")
        self.path = str(path)


def quiet_disk_full_in_threads() -> None:
    """A full disk met by a library's writer thread (TensorBoard's) is not a traceback: the
    command's main thread meets it too and says so in one line. Other errors print as before."""
    previous = threading.excepthook
    if getattr(previous, "sftrl_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not out_of_space(args.exc_value):
            previous(args)

    hook.sftrl_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename or a new file in it) to the disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``; it then replaces ``path``.

    Raises :class:`DiskFull` when the disk fills up (``path`` keeps its old content); any other
    error is raised as it is, the temporary file removed either way. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if out_of_space(err):
            raise DiskFull(path, err) from err
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write)


class _WriteRecorder(io.RawIOBase):
    """A file that remembers the ``OSError`` its writes raised (torch turns it into a
    RuntimeError that no longer says the disk is full)."""

    def __init__(self, file: IO[bytes]):
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, except that a full disk raises its ``OSError``."""
    import torch

    with open(path, "wb") as f:
        sink = _WriteRecorder(f)
        try:
            torch.save(obj, cast(IO[bytes], sink))
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: torch_save(obj, tmp))
