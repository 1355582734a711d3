"""Run checkpoints: written atomically (temporary directory, then rename), rotated, with a
``latest`` pointer. Everything inside loads with ``torch.load(weights_only=True)``.

Layout: ``RUN/checkpoints/iter-000100/state.pt`` and ``RUN/checkpoints/latest`` (a text file
holding the directory name of the newest complete checkpoint).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from sftrl.files import DiskFull, fsync_dir, fsync_file, out_of_space, torch_save
from sftrl.signals import deferred

CHECKPOINT_FORMAT = "sftrl-run-v1"
STATE_FILE = "state.pt"
LATEST = "latest"


class CheckpointError(ValueError):
    """A run checkpoint that is missing, corrupt or of another format."""


def iteration_of(path: Path) -> int:
    """The iteration of a checkpoint directory ``iter-N`` (-1 for any other name)."""
    name = Path(path).name
    digits = name.removeprefix("iter-")
    return int(digits) if name.startswith("iter-") and digits.isdigit() else -1


def _by_iteration(paths) -> list[Path]:
    """Checkpoint directories oldest first, by iteration (names sort wrongly past 10M)."""
    return sorted((p for p in paths if iteration_of(p) >= 0), key=iteration_of)


def save_checkpoint(run_dir: Path, iteration: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``iter-{iteration}``; keep the newest ``keep``; returns its directory.

    The state file and its directory are flushed to the disk before the rename, so a checkpoint
    that ``latest`` names is whole after a crash or a power cut. A full disk raises
    :class:`sftrl.files.DiskFull` with the temporary copy removed and the earlier checkpoints
    as they were.

    A checkpoint of the same iteration (a stop right after a scheduled checkpoint saves again,
    with the evaluations that finished since) is replaced only once the new one is complete:
    the old directory is moved aside, the new one moved in, then the old one deleted, with
    SIGINT/SIGTERM held between the moves. Leftovers of a killed writer are swept.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".iter-*.*-*"):  # .iter-N.tmp-PID / .iter-N.old-PID of a killed writer
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    name = f"iter-{iteration:07d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        torch_save({"format": CHECKPOINT_FORMAT, **state}, tmp / STATE_FILE)
        fsync_file(tmp / STATE_FILE)
        fsync_dir(tmp)
        pointer_tmp.write_text(name + "\n")
        fsync_file(pointer_tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        pointer_tmp.unlink(missing_ok=True)
        if out_of_space(err):
            raise DiskFull(final / STATE_FILE, err) from err
        raise
    aside = root / f".{name}.old-{os.getpid()}"
    with deferred():  # SIGINT/SIGTERM wait until the renames are done
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        os.replace(pointer_tmp, root / LATEST)
        fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)
    for old in _by_iteration(p for p in root.glob("iter-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint directories, the one ``latest`` names first, then the
    others by iteration, newest first."""
    root = Path(run_dir) / "checkpoints"
    complete = _by_iteration(p for p in root.glob("iter-*") if (p / STATE_FILE).is_file())[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in complete:
            complete.remove(named)
            complete.insert(0, named)
    return complete


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    found = checkpoints_newest_first(run_dir)
    return found[0] if found else None


def load_latest_intact(run_dir: Path) -> tuple[Path, dict, list[str]]:
    """The newest checkpoint of a run that loads, its state, and a warning for each newer one
    that did not (a corrupt file is skipped loudly, never silently). Raises
    :class:`CheckpointError` when there is none, or none loads."""
    warnings: list[str] = []
    candidates = checkpoints_newest_first(run_dir)
    for path in candidates:
        try:
            return path, load_checkpoint(path), warnings
        except CheckpointError as err:
            warnings.append(f"{err}; trying the next newest checkpoint")
    if candidates:
        raise CheckpointError(f"no checkpoint of '{run_dir}' loads: {'; '.join(warnings)}")
    raise CheckpointError(f"no checkpoint in '{Path(run_dir) / 'checkpoints'}'")


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint directory (or its ``state.pt``)."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found (expected a directory with {STATE_FILE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file raises many types
        raise CheckpointError(f"checkpoint '{file}' is corrupt or not a PyTorch file ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{file}' is not an sftrl run checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    return state
