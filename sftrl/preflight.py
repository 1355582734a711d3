"""Checks a command makes before any work, on what the config alone cannot tell.

Each raises a ``ValueError`` with a one-line message naming the settings to change (the commands
turn it into ``error: ...`` and exit code 2).
"""

from __future__ import annotations

import os

import torch

from sftrl.config import Config

# Bytes a float32 parameter costs while training, summed over the copies a run keeps: the
# weights, their gradient, Adam's two moments, the moving average, and the published copies.
BYTES_PER_PARAMETER = 4 * 8


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def check_networks(cfg: Config, data_shape: tuple[int, ...]) -> int:
    """Build the sampler, critic and baseline on the ``meta`` device (no memory, milliseconds):
    a ``model.*`` setting the networks cannot take, or networks too big for this machine, is an
    error now rather than a crash in an actor minutes later. Returns their parameter count."""
    from sftrl.models import build_networks

    try:
        with torch.device("meta"):
            networks = build_networks(cfg, tuple(data_shape))
    except ValueError as err:
        raise ValueError(f"model.*: the networks cannot be built for data of shape {tuple(data_shape)}: {err}") from None
    count = sum(p.numel() for net in networks for p in net.parameters())
    have = physical_memory_bytes()
    if have is not None and count * BYTES_PER_PARAMETER > have:
        raise ValueError(
            f"model.*: the sampler, critic and baseline have {count:,} parameters, about "
            f"{count * BYTES_PER_PARAMETER / 2**30:.0f} GiB to train, more than this machine's "
            f"{have / 2**30:.0f} GiB: lower model.hidden, the widths or the U-Net's channels"
        )
    return count
