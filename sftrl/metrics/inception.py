"""The standard FID feature network: the TF "2015-12-05" InceptionV3 graph, pool3 (2048-d).

FID as published (Heusel et al., 2017; TTUR's ``fid.py``) is defined by one frozen TensorFlow graph,
``classify_image_graph_def.pb`` from ``inception-2015-12-05.tgz``. torch-fidelity converted its
constants to a PyTorch state dict, ``weights-inception-2015-12-05-6726825d.pth``, and its
``FeatureExtractorInceptionV3`` reproduces the graph. :class:`FIDInceptionV3` is an independent
implementation of the same computation with exactly that class's ``state_dict`` keys and shapes, so
the same file loads with ``strict=True`` and gives the same features without importing
torch-fidelity (whose package imports torchvision).

What the FID graph does, and what differs from torchvision's InceptionV3:

1. ``uint8`` images are cast to float and resized to 299 x 299 by TF1's ``ResizeBilinear`` with
   ``align_corners=False``: source coordinate ``y * (in / out)`` (no half-pixel offset), computed in
   float32 (:func:`resize_bilinear_tf1`). ``F.interpolate`` samples at ``(y + 0.5) * in / out - 0.5``
   and gives different pixels.
2. Normalisation ``(x - 128) / 128`` (the graph multiplies by 0.0078125 = 1/128, the same bits),
   so 0..255 maps to [-1, 0.9921875], not [-1, 1].
3. Every convolution is bias-free and followed by batch norm with the frozen moving statistics and
   ``eps = 1e-3`` (TF's default), then ReLU.
4. The 3x3 stride-1 average pools of the mixed blocks use TF's SAME padding, which averages only
   over the window's pixels inside the image (``count_include_pad=False``).
5. The last mixed block (``Mixed_7c``) pools its fourth branch with a 3x3 *max* pool where every
   other block, and the paper, use an average pool. The graph has it, so FID has it.
6. pool3 is the global average of the final ``(B, 2048, 8, 8)`` map. The 1008-way ``fc`` head
   (1000 ImageNet classes + 8 unused) is part of the state dict so that the file loads strictly;
   FID never uses it.

The weights file is a plain dict without the BatchNorm ``num_batches_tracked`` counters that
``nn.BatchNorm2d`` has; :func:`load_fid_inception` accepts the file with or without them.

Shape notation: B batch, C channels, H x W spatial size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_INPUT_SIZE",
    "FIDInceptionV3",
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_FILE",
    "file_sha256",
    "load_fid_inception",
    "random_fid_inception_state",
    "resize_bilinear_tf1",
    "state_sha256",
]

# The file torch-fidelity's FeatureExtractorInceptionV3 downloads (into torch.hub's checkpoints/);
# the name ends with the first 8 hex digits of its SHA-256, torch.hub's naming convention.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)
INCEPTION_SHA256_PREFIX = "6726825d"
# Side of the square images the FID graph feeds its first convolution.
FID_INPUT_SIZE = 299
# The FID graph's input normalisation: x -> (x - 128) / 128 (it multiplies by 0.0078125).
PIXEL_OFFSET = 128.0
PIXEL_SCALE = 128.0
# TF's batch-norm variance epsilon, baked into the FID graph.
BATCH_NORM_EPS = 1e-3
# Outputs of the 1008-way logits head (1000 ImageNet classes + 8 unused), kept for strict loading.
NUM_LOGITS = 1008
NUM_FEATURES = 2048
# Mis-matched keys a load error names before summarising the rest.
MAX_NAMED_KEYS = 3
# BatchNorm's step counter: not in the released file, unused in inference.
NUM_BATCHES_TRACKED = "num_batches_tracked"


# ---------------------------------------------------------------------------------- resize


def _tf1_source_coords(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 ``ResizeBilinear`` (``align_corners=False``) sampling along one axis.

    Output index ``i`` reads source coordinate ``s_i = i * (in_size / out_size)`` in float32 (TF's
    ``CalculateResizeScale`` and its float products): returns ``(lo, hi, frac)``, each ``(out_size,)``,
    with ``lo = floor(s_i)``, ``hi = min(lo + 1, in_size - 1)`` and ``frac = s_i - lo``.
    """
    # in/out rounded once to float32, as TF's float division gives it.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32, device=device)
    src = torch.arange(out_size, dtype=torch.float32, device=device) * scale  # (out,)
    lo = src.floor().to(torch.long)  # src >= 0, so floor is TF's (int64) truncation
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = src - lo.to(torch.float32)
    return lo, hi, frac


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``tf.image.resize_bilinear(x, size, align_corners=False)``.

    ``x``: float ``(B, C, H, W)``; ``size``: ``(H_out, W_out)``; returns ``(B, C, H_out, W_out)`` in
    ``x``'s dtype. Output pixel ``(i, j)`` interpolates the source at ``(i * H / H_out, j * W / W_out)``
    (coordinates in float32, as TF computes them; no half-pixel shift), rows first:
    ``top = a + (b - a) * dx``, ``bottom = c + (d - c) * dx``, ``out = top + (bottom - top) * dy``,
    the order of TF's kernel, so float32 results are bit-identical to it on CPU.
    """
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    h_out, w_out = (int(s) for s in size)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"output size must be positive, got {tuple(size)}")
    y_lo, y_hi, dy = _tf1_source_coords(x.shape[2], h_out, x.device)  # (H_out,)
    x_lo, x_hi, dx = _tf1_source_coords(x.shape[3], w_out, x.device)  # (W_out,)
    dx, dy = dx.to(x.dtype), dy.to(x.dtype)

    def along_width(rows: torch.Tensor) -> torch.Tensor:
        left = rows.index_select(3, x_lo)  # (B, C, H_out, W_out)
        right = rows.index_select(3, x_hi)
        return left + (right - left) * dx

    top = along_width(x.index_select(2, y_lo))  # (B, C, H_out, W_out)
    bottom = along_width(x.index_select(2, y_hi))
    return top + (bottom - top) * dy[:, None]


# ---------------------------------------------------------------------------------- layers


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same state-dict entries) that always normalises with the stored moving
    statistics, as the frozen FID graph does, whatever ``train()`` / ``eval()`` says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.running_mean is not None and self.running_var is not None
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvBN(nn.Module):
    """Bias-free convolution, frozen batch norm (eps 1e-3), ReLU: every convolution of the graph.

    ``(B, C_in, H, W) -> (B, C_out, H', W')``; entries ``conv.weight`` and ``bn.*``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = FrozenBatchNorm2d(out_channels, eps=BATCH_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3_same(x: torch.Tensor) -> torch.Tensor:
    """TF ``avg_pool`` 3x3, stride 1, SAME: border windows average only their in-image pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3_same(x: torch.Tensor) -> torch.Tensor:
    """TF ``max_pool`` 3x3, stride 1, SAME (padding never wins a max)."""
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _max_pool_3x3_valid_stride2(x: torch.Tensor) -> torch.Tensor:
    """TF ``max_pool`` 3x3, stride 2, VALID: ``(B, C, H, W) -> (B, C, (H - 3) // 2 + 1, ...)``."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


# ---------------------------------------------------------------------------------- blocks
# Submodule names are the checkpoint's (torchvision's InceptionV3 naming); the classes are ours.


class Mixed35(nn.Module):
    """Mixed_5b/5c/5d at 35x35: ``(B, C_in, 35, 35) -> (B, 224 + pool_features, 35, 35)``.

    Branches: 1x1 (64); 1x1 -> 5x5 (48 -> 64); 1x1 -> 3x3 -> 3x3 (64 -> 96 -> 96);
    avg pool (SAME, padding excluded) -> 1x1 (``pool_features``).
    """

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # (B, 64, 35, 35)
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # (B, 64, 35, 35)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, 35, 35)
        bp = self.branch_pool(_avg_pool_3x3_same(x))  # (B, pool_features, 35, 35)
        return torch.cat([b1, b5, b3, bp], dim=1)


class Reduce35To17(nn.Module):
    """Mixed_6a: ``(B, 288, 35, 35) -> (B, 768, 17, 17)``.

    Branches: 3x3 stride 2 (384); 1x1 -> 3x3 -> 3x3 stride 2 (64 -> 96 -> 96); max pool stride 2.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)  # (B, 384, 17, 17)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, 17, 17)
        bp = _max_pool_3x3_valid_stride2(x)  # (B, C_in, 17, 17)
        return torch.cat([b3, b3d, bp], dim=1)


class Mixed17(nn.Module):
    """Mixed_6b..6e at 17x17: ``(B, 768, 17, 17) -> (B, 768, 17, 17)``, factorised 7x7 convs.

    Branches: 1x1 (192); 1x1 -> 1x7 -> 7x1 (c7, c7, 192); 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7
    (c7, c7, c7, c7, 192); avg pool (SAME, padding excluded) -> 1x1 (192).
    """

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # (B, 192, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (B, 192, 17, 17)
        b7d = self.branch7x7dbl_1(x)  # (B, c7, 17, 17)
        b7d = self.branch7x7dbl_3(self.branch7x7dbl_2(b7d))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(b7d))  # (B, 192, 17, 17)
        bp = self.branch_pool(_avg_pool_3x3_same(x))  # (B, 192, 17, 17)
        return torch.cat([b1, b7, b7d, bp], dim=1)


class Reduce17To8(nn.Module):
    """Mixed_7a: ``(B, 768, 17, 17) -> (B, 1280, 8, 8)``.

    Branches: 1x1 -> 3x3 stride 2 (192 -> 320); 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 (192 each);
    max pool stride 2.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))  # (B, 320, 8, 8)
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))  # (B, 192, 17, 17)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))  # (B, 192, 8, 8)
        bp = _max_pool_3x3_valid_stride2(x)  # (B, 768, 8, 8)
        return torch.cat([b3, b7, bp], dim=1)


class Mixed8(nn.Module):
    """Mixed_7b / 7c at 8x8: ``(B, C_in, 8, 8) -> (B, 2048, 8, 8)``, split 3x3 convs.

    Branches: 1x1 (320); 1x1 -> [1x3, 3x1] (384 -> 384 + 384); 1x1 -> 3x3 -> [1x3, 3x1]
    (448 -> 384 -> 384 + 384); pool -> 1x1 (192). ``pool`` is ``"avg"`` (SAME, padding excluded)
    in Mixed_7b and ``"max"`` in Mixed_7c, as in the FID graph.
    """

    def __init__(self, in_channels: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # (B, 320, 8, 8)
        b3 = self.branch3x3_1(x)  # (B, 384, 8, 8)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)  # (B, 768, 8, 8)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))  # (B, 384, 8, 8)
        b3d_a, b3d_b = self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)  # (B, 384, 8, 8) each
        b3d = torch.cat([b3d_a, b3d_b], dim=1)  # (B, 768, 8, 8)
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        bp = self.branch_pool(pooled)  # (B, 192, 8, 8)
        return torch.cat([b1, b3, b3d, bp], dim=1)


# ---------------------------------------------------------------------------------- network


class FIDInceptionV3(nn.Module):
    """The FID Inception: ``uint8`` images ``(B, 3, H, W)`` 0..255, any H, W -> pool3 ``(B, 2048)``.

    Resize to 299 (:func:`resize_bilinear_tf1`), ``(x - 128) / 128``, the InceptionV3 trunk of the
    2015-12-05 graph (see the module docstring for where it differs from torchvision's), global
    average pool; computed in float32. Batch norm always uses the stored statistics. Build it with
    :func:`load_fid_inception`; a bare instance holds ``nn.Module``'s default (meaningless) weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = Mixed35(192, pool_features=32)
        self.Mixed_5c = Mixed35(256, pool_features=64)
        self.Mixed_5d = Mixed35(288, pool_features=64)
        self.Mixed_6a = Reduce35To17(288)
        self.Mixed_6b = Mixed17(768, channels_7x7=128)
        self.Mixed_6c = Mixed17(768, channels_7x7=160)
        self.Mixed_6d = Mixed17(768, channels_7x7=160)
        self.Mixed_6e = Mixed17(768, channels_7x7=192)
        self.Mixed_7a = Reduce17To8(768)
        self.Mixed_7b = Mixed8(1280, pool="avg")
        self.Mixed_7c = Mixed8(2048, pool="max")
        self.fc = nn.Linear(NUM_FEATURES, NUM_LOGITS)  # logits head: loaded, never used for FID

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"FIDInceptionV3 takes uint8 images (B, 3, H, W) in 0..255, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        x = images.to(torch.float32)
        x = resize_bilinear_tf1(x, (FID_INPUT_SIZE, FID_INPUT_SIZE))  # (B, 3, 299, 299)
        x = (x - PIXEL_OFFSET) / PIXEL_SCALE
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = _max_pool_3x3_valid_stride2(x)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = _max_pool_3x3_valid_stride2(x)  # (B, 192, 35, 35)
        x = self.Mixed_5b(x)  # (B, 256, 35, 35)
        x = self.Mixed_5c(x)  # (B, 288, 35, 35)
        x = self.Mixed_5d(x)  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_6d(x)
        x = self.Mixed_6e(x)  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)  # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)  # (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048): pool3


# ---------------------------------------------------------------------------------- loading


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors ``torch.load(path, weights_only=True)`` returns, or a ValueError naming ``path``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # permission denied, a directory, ...: the path is the problem, not the format
    except Exception as exc:
        # Garbage surfaces as UnpicklingError, EOFError, RuntimeError, KeyError... depending on
        # its first bytes; to the caller they all mean "not a weights file".
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path} is not a PyTorch state dict readable by torch.load(weights_only=True) "
            f"({type(exc).__name__}: {first_line})"
        ) from exc
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"{path} holds a {type(obj).__name__} that is not a state dict "
            "(a mapping from parameter names to tensors)"
        )
    return dict(obj)


def _first(items: list[str]) -> str:
    more = f" and {len(items) - MAX_NAMED_KEYS} more" if len(items) > MAX_NAMED_KEYS else ""
    return ", ".join(items[:MAX_NAMED_KEYS]) + more


def _check_keys(path: Path, state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise one ValueError naming ``path`` and the first few missing / unexpected / mis-shaped
    keys unless ``state`` fits ``model`` (``num_batches_tracked`` may be absent)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state and not k.endswith(NUM_BATCHES_TRACKED)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k])})"
        for k in state
        if k in expected and tuple(state[k].shape) != expected[k]
    ]
    problems = [
        f"{len(keys)} {what} ({_first(keys)})"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path} is not the FID InceptionV3 weights file ({INCEPTION_WEIGHTS_FILE}): its keys "
            f"do not match the network's: {'; '.join(problems)}."
        )


def file_sha256(path: str | PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_fid_inception(
    path: str | PathLike[str], *, expected_sha256_prefix: str | None = None
) -> FIDInceptionV3:
    """The FID network with the weights in ``path``, in eval mode with ``requires_grad`` off, on CPU.

    ``path``: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (from
    :data:`INCEPTION_URL`), or any state dict with the same keys and shapes; the BatchNorm
    ``num_batches_tracked`` counters may be absent (the released file has none). Loaded with
    ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``; nothing is downloaded.
    ``expected_sha256_prefix`` (e.g. :data:`INCEPTION_SHA256_PREFIX`): also check the file's
    SHA-256 starts with it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, its keys or shapes differ (the first few are
            named), or its hash does not start with ``expected_sha256_prefix``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found: {p} (the file is {INCEPTION_WEIGHTS_FILE}, "
            f"from {INCEPTION_URL})"
        )
    if expected_sha256_prefix is not None:
        digest = file_sha256(p)
        if not digest.startswith(expected_sha256_prefix.lower()):
            raise ValueError(
                f"{p} has SHA-256 {digest}, which does not start with {expected_sha256_prefix}"
            )
    state = _read_state_dict(p)
    # Built on the meta device: no default initialisation (which would also draw from, and so
    # shift, torch's global RNG), then storage is allocated and every entry overwritten below.
    with torch.device("meta"):
        model = FIDInceptionV3()
    model = model.to_empty(device="cpu")
    _check_keys(p, state, model)
    for key, value in model.state_dict().items():
        if key.endswith(NUM_BATCHES_TRACKED) and key not in state:
            state[key] = torch.zeros_like(value)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------- test weights


def _uniform(
    rng: np.random.Generator, shape: tuple[int, ...], low: float, high: float
) -> torch.Tensor:
    return torch.from_numpy(low + (high - low) * rng.random(shape)).to(torch.float32)


def random_fid_inception_state(seed: int) -> dict[str, torch.Tensor]:
    """Seeded stand-in weights with the real file's full key set, for tests (no download).

    Keys in sorted order, each drawn from ``numpy.random.default_rng(seed).random`` (uniform
    float64 on [0, 1), whose bit stream numpy keeps stable) mapped to:

    ===========================  ==============================================================
    ``*.conv.weight``            U(-a, a), a = sqrt(6 / fan_in): He-uniform, so activations keep
                                 their scale through ~95 ReLU layers
    ``*.bn.weight`` (gamma)      U(0.5, 1.5)
    ``*.bn.bias`` (beta)         U(-0.2, 0.2)
    ``*.bn.running_mean``        U(-0.2, 0.2)
    ``*.bn.running_var``         U(0.5, 1.5): positive, so every normalisation is finite
    ``*.bn.num_batches_tracked`` 0 (int64)
    ``fc.weight``                U(-a, a), a = sqrt(3 / 2048)
    ``fc.bias``                  U(-0.1, 0.1)
    ===========================  ==============================================================

    cast to float32. :func:`state_sha256` fingerprints the result.
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith(NUM_BATCHES_TRACKED):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("conv.weight"):
            bound = float(np.sqrt(6.0 / np.prod(shape[1:])))
            state[key] = _uniform(rng, shape, -bound, bound)
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            state[key] = _uniform(rng, shape, 0.5, 1.5)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = _uniform(rng, shape, -0.2, 0.2)
        elif key == "fc.weight":
            bound = float(np.sqrt(3.0 / shape[1]))
            state[key] = _uniform(rng, shape, -bound, bound)
        elif key == "fc.bias":
            state[key] = _uniform(rng, shape, -0.1, 0.1)
        else:
            raise AssertionError(f"no rule for state-dict entry {key!r}")
    return state


def state_sha256(state: Mapping[str, Any]) -> str:
    """Hex SHA-256 over ``state``'s entries in sorted key order: name, shape, dtype, raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{list(value.shape)}|{value.dtype}|".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()
