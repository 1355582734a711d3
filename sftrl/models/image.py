"""The paper's image critic and baseline (Appendix F.2), for data in [-1, 1].

Critic c_alpha(x): three 4x4 stride-2 padding-1 convolutions with LeakyReLU(0.2) (paper: 256, 512,
1024 channels; the authors' code: 128, 256, 512), then a 4x4 stride-1 padding-0 convolution to one
channel, averaged over its spatial output. Baseline V_omega(x_n, n): a 4-layer MLP on the flattened
image (1024, 1024, 256, 1) whose hidden layers are multiplied by a learned embedding of the step n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from sftrl.models.toy import ConditionalLinear

__all__ = ["IMAGE_INITS", "ImageBaseline", "ImageCritic", "authors_init_", "critic_feature_sizes"]

IMAGE_INITS = ("authors", "torch")

PAPER_CRITIC_CHANNELS = (256, 512, 1024)
PAPER_BASELINE_HIDDEN = (1024, 1024, 256)
FINAL_KERNEL = 4  # the paper's last convolution: 4x4, stride 1, padding 0


def _down_size(size: int) -> int:
    """Side length after a 4x4 stride-2 padding-1 convolution."""
    return (size + 2 * 1 - 4) // 2 + 1


def critic_feature_sizes(resolution: int, num_down: int = 3) -> list[int]:
    """Side lengths of the critic's feature maps: ``[resolution, after conv 1, ..., after conv k]``.

    Example: 32 -> [32, 16, 8, 4]; 28 (MNIST) -> [28, 14, 7, 3]; 8 (digits) -> [8, 4, 2, 1].
    """
    sizes = [int(resolution)]
    for _ in range(num_down):
        sizes.append(_down_size(sizes[-1]))
    return sizes


def authors_init_(module: nn.Module) -> nn.Module:
    """The authors' init, in place: Kaiming-normal (fan-in, gain sqrt 2) for every conv weight,
    Xavier-normal for every linear weight; biases and embeddings keep PyTorch's init. At 32x32 the
    critic's initial output is about 30x larger than with PyTorch's defaults (mean |c| 0.42 vs 0.015
    on uniform noise, channels 128-256-512)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    return module


def _check_init(init: str) -> None:
    if init not in IMAGE_INITS:
        raise ValueError(f"init must be one of {IMAGE_INITS}, got {init!r}")


class ImageCritic(nn.Module):
    """c_alpha(x): ``(B, C, H, W)`` in [-1, 1] -> ``(B,)``, larger = more real.

    Three ``Conv2d(k=4, s=2, p=1)`` + LeakyReLU(0.2) with ``channels`` outputs, then
    ``Conv2d(k, s=1, p=0)`` to one channel and a mean over its spatial output. The paper's final
    kernel is 4; where the last feature map is smaller than 4x4 (MNIST 28 -> 3x3, digits 16 -> 2x2,
    digits 8 -> 1x1) the final kernel is ``min(4, size)`` so that the output is 1x1 rather than
    empty. At 32x32 the final map is 4x4 and the critic is exactly the paper's; at 64x64 (CelebA)
    the final conv gives 5x5 scores and their mean is the output.
    Inputs must be square, with side ``resolution`` >= 8 (three halvings leave at least 1x1).
    ``init``: ``"authors"`` (:func:`authors_init_`) or ``"torch"`` (PyTorch's defaults).
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        channels: Sequence[int] = PAPER_CRITIC_CHANNELS,
        init: str = "authors",
    ):
        super().__init__()
        _check_init(init)
        channels = tuple(int(c) for c in channels)
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive widths, got {channels}")
        sizes = critic_feature_sizes(resolution, len(channels))
        if sizes[-1] < 1:
            raise ValueError(f"resolution {resolution} is too small for the critic (need >= 8)")
        self.in_channels = int(in_channels)
        self.resolution = int(resolution)
        widths = (self.in_channels, *channels)
        self.down = nn.ModuleList(
            [
                nn.Conv2d(a, b, kernel_size=4, stride=2, padding=1)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.final_kernel = min(FINAL_KERNEL, sizes[-1])
        self.out = nn.Conv2d(channels[-1], 1, kernel_size=self.final_kernel, stride=1, padding=0)
        if init == "authors":
            authors_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ImageCritic expects (B, {expected}), got {tuple(x.shape)}")
        h = x
        for conv in self.down:
            h = F.leaky_relu(conv(h), 0.2)  # (B, c_i, s_i, s_i)
        return self.out(h).mean(dim=(1, 2, 3))  # (B, 1, s', s') -> (B,)


class ImageBaseline(nn.Module):
    """V_omega(x_n, n): ``x_n`` ``(B, C, H, W)``, ``n`` ``(B,)`` step 0..S -> ``(B,)``.

    An MLP on the flattened image: each hidden layer is ``Linear(x) * embedding[n]`` (a learned
    per-step gain, initialised uniform in [0, 1)) followed by ReLU; a final ``Linear`` to one
    output. ``n`` may be long or float (rounded); it is the sampling step of the state x_n.
    ``init``: ``"authors"`` (:func:`authors_init_`: Xavier-normal linear weights) or ``"torch"``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_steps: int,
        hidden: Sequence[int] = PAPER_BASELINE_HIDDEN,
        init: str = "authors",
    ):
        super().__init__()
        _check_init(init)
        self.data_shape = tuple(int(d) for d in data_shape)
        if len(self.data_shape) != 3:
            raise ValueError(f"data_shape must be (C, H, W), got {self.data_shape}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        dim = self.data_shape[0] * self.data_shape[1] * self.data_shape[2]
        widths = (dim, *(int(h) for h in hidden))
        self.layers = nn.ModuleList(
            [ConditionalLinear(a, b, self.num_steps + 1) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.out = nn.Linear(widths[-1], 1)
        if init == "authors":
            authors_init_(self)

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"ImageBaseline expects (B, {self.data_shape}), got {tuple(x.shape)}")
        if n.shape != x.shape[:1]:
            raise ValueError(f"n must have shape ({x.shape[0]},), got {tuple(n.shape)}")
        # Not range-checked (a check would sync the GPU every call); nn.Embedding rejects an
        # index outside 0..S itself.
        step = torch.round(n).long()  # (B,)
        h = x.flatten(1)  # (B, C*H*W)
        for layer in self.layers:
            h = F.relu(layer(h, step))  # (B, width)
        return self.out(h).squeeze(-1)  # (B,)
