"""A run directory belongs to one run, and one process at a time.

``RunDirectory.claim()`` takes an exclusive ``flock`` on ``RUN/.sftrl.lock`` for as long as the
command runs: a second command on the same directory is refused in one line naming the holder
(found in ``/proc/locks``, so the claim writes nothing into the file), and touches nothing. The kernel drops the lock with its process, so a run killed by ``kill -9``
or a crash never leaves it stuck. ``release()`` takes back what the claim made when the command
wrote nothing else (a refused start leaves no directory behind).

Before a run writes, the directory must be new, empty, or an sftrl run (``is_run_directory``):
a user's own folder that happens to hold a ``config.yaml`` or a ``report.md`` is never written
over. A checkpoint given to ``--resume`` must be one of the run directory's own.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".sftrl.lock"
CONFIG_HEADER = "# resolved sftrl config"  # the first line of every run's config.yaml
# What only an sftrl run directory holds (besides config.yaml with its header).
RUN_MARKERS = ("metrics.jsonl", "checkpoints")


class RunDirError(ValueError):
    """A run directory that is in use, foreign, or not the checkpoint's: a user error."""


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` holds an sftrl run (or the leftovers of one), not a folder of the user's."""
    if any((path / marker).exists() for marker in RUN_MARKERS):
        return True
    try:
        with (path / "config.yaml").open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(CONFIG_HEADER)
    except OSError:
        return False


def check_fresh(path: Path, flag: str = "--run-dir") -> None:
    """A new run may go into a new or empty directory, or one that holds an sftrl run (whose
    own checks follow); a non-empty folder of something else is refused."""
    if not path.is_dir() or is_run_directory(path):
        return
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise RunDirError(f"{flag} '{path}' is not empty and holds no sftrl run (it has {shown}); a run would "
                          "write over what is there: choose a new or empty directory")


def checkpoint_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint path (``RUN/checkpoints/iter-N`` or its ``state.pt``)
    belongs to, or None when it is not laid out as one."""
    path = checkpoint.resolve()
    if path.name == "state.pt":
        path = path.parent
    return path.parent.parent if path.parent.name == "checkpoints" else None


def check_checkpoint_belongs(checkpoint: Path, run_dir: Path, flag: str = "--resume") -> None:
    """``--resume PATH`` continues the run PATH was written by, in its own directory: a
    checkpoint of run A resumed into run B would cut B's metrics back and replace its report
    (``sftrl sample/eval --checkpoint`` likewise reads a checkpoint with its own run's config)."""
    owner = checkpoint_run_dir(checkpoint)
    if owner is None or owner != run_dir.resolve():
        whose = f"run '{owner}'" if owner is not None else "no run directory (not RUN/checkpoints/iter-N)"
        raise RunDirError(
            f"{flag} '{checkpoint}' belongs to {whose}, not to run directory '{run_dir}'; use a checkpoint of "
            "that run, or name the run it belongs to"
        )


def lock_holder(lock: os.stat_result) -> str:
    """``pid N: COMMAND`` of the process holding an flock on the file ``lock`` describes, from
    Linux's ``/proc/locks`` (elsewhere, or when it cannot be told: "another process")."""
    inode = f"{os.major(lock.st_dev):02x}:{os.minor(lock.st_dev):02x}:{lock.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "another process"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:678 0 EOF"
        fields = line.split()
        if "FLOCK" in fields and inode in fields:
            pid = fields[fields.index(inode) - 1]
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                command = ""
            return f"pid {pid}: {command.strip()[:200]}" if command.strip() else f"pid {pid}"
    return "another process"


class RunDirectory:
    """This command's hold on a run directory (see the module doc)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this claim made, outermost first
        self._made_lock = False  # the lock file is this claim's
        self._written = False  # the command wrote into the directory (``mark_written``)

    def claim(self) -> RunDirectory:
        """Make the directory if it is missing and lock it, or raise :class:`RunDirError` naming
        the command that holds it."""
        self._created = [p for p in [*reversed(self.path.parents), self.path] if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        self._made_lock = not lock.exists()
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(os.fstat(fd))
            os.close(fd)
            raise RunDirError(
                f"run directory '{self.path}' is in use by another sftrl command ({holder}); wait for it to end, "
                "or choose another --run-dir"
            ) from None
        self._fd = fd
        return self

    def mark_written(self) -> None:
        """The command starts writing the run: from now on the lock file stays (it marks the
        directory as an sftrl run's, and is free once the command ends)."""
        self._written = True

    def release(self) -> None:
        """Unlock; when the command wrote nothing, take back the lock file and the directories
        the claim made."""
        if self._fd is None:
            return
        try:
            if self._made_lock and not self._written:
                (self.path / LOCK_FILE).unlink()
                for directory in reversed(self._created):
                    directory.rmdir()
        except OSError:
            pass  # a directory something else wrote into meanwhile stays
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirectory:
        return self.claim()

    def __exit__(self, *exc) -> None:
        self.release()
