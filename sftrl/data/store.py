"""Real images as ``uint8``, converted to float only a batch at a time, where they are used.

CelebA's 162,770 training images are 2.0 GB as ``uint8`` at 64x64 and 8 GB as ``float32``. An
``ImageStore`` holds the bytes (in memory for the sets that come as arrays, MNIST and CIFAR-10;
memory-mapped from a cache file for the decoded ones, so every process of a node that maps it
shares one copy in the page cache) and hands out float batches in [-1, 1] on the asking
device, each image flipped left-right at random where the data set's recipe flips
(``data.flip``: CIFAR-10 and CelebA in the authors' code).

An 8-bit pixel ``v`` is ``v / 127.5 - 1``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images -> ``float32`` in [-1, 1] (0 -> -1, 255 -> 1), on their device."""
    return images.float() / 127.5 - 1.0


class ImageStore:
    """``uint8`` images ``(N, C, H, W)`` (an array or a read-only memory map) and whether batches
    flip. Array-like where the rest of sftrl asks: ``shape``, ``len``, ``nbytes``."""

    def __init__(self, images: np.ndarray, *, flip: bool = False):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"an ImageStore holds uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
        self.images = images
        self.flip = flip

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: torch.Tensor | np.ndarray | slice, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``index`` as float32 ``(B, C, H, W)`` in [-1, 1] on ``device``; flipped left-right
        at random (coins from ``generator``) when the store flips."""
        rows = index if isinstance(index, slice) else np.asarray(
            index.cpu() if isinstance(index, torch.Tensor) else index)
        picked = torch.from_numpy(np.ascontiguousarray(self.images[rows]))  # (B, C, H, W) uint8: the batch's copy
        x = to_unit(picked.to(device))
        if self.flip:
            coins = torch.rand(len(x), generator=generator, device=generator.device if generator else x.device)
            x = torch.where((coins < 0.5).to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` images drawn uniformly with replacement, float, on the CPU (the critic's
        real-data source, ``sftrl.critic.RealData``)."""
        index = torch.randint(len(self.images), (batch_size,), generator=generator)
        return self.batch(index, "cpu", generator)

    def chunks(self, size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
        """The first ``limit`` images (all: None) in order, ``size`` at a time, as float on the CPU
        and never flipped (FID's reference set)."""
        end = len(self) if limit is None else min(limit, len(self))
        for start in range(0, end, size):
            x = torch.from_numpy(np.ascontiguousarray(self.images[start : min(start + size, end)]))
            yield to_unit(x)
