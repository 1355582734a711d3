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

CHECKPOINT_FORMAT = "sftrl-run-v1"
STATE_FILE = "state.pt"
LATEST = "latest"


class CheckpointError(ValueError):
    """A run checkpoint that is missing, corrupt or of another format."""


def save_checkpoint(run_dir: Path, iteration: int, state: dict, keep: int) -> Path:
    """Write ``state`` as ``iter-{iteration}``; keep the newest ``keep``; returns its directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:07d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    for old in sorted(p for p in root.glob("iter-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("iter-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


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
