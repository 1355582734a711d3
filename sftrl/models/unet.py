"""The DDPM U-Net (Ho et al., 2020) with the exact ``state_dict`` layout of the DDIM releases.

The public DDPM checkpoints that DDIM, FastDPM and SFT-PG start from (CIFAR-10 32x32: 35,746,307
parameters; CelebA 64x64: 78,700,803) are the PyTorch port published by the DDIM authors. Their
parameter names are fixed by that port, so every submodule here is named and nested so that
``UNet.state_dict()`` has exactly the same keys, shapes and order:

``temb.dense.{0,1}``                     timestep-embedding MLP
``conv_in``                              3x3 stem
``down.{i}.block.{j}`` / ``.attn.{j}``   ``num_res_blocks`` ResnetBlocks (+ attention) per level
``down.{i}.downsample.conv``             stride-2 conv (all levels but the last)
``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``
``up.{i}.block.{j}`` / ``.attn.{j}``     ``num_res_blocks + 1`` ResnetBlocks on [h, skip] per level
``up.{i}.upsample.conv``                 nearest x2 + 3x3 conv (all levels but level 0)
``norm_out`` / ``conv_out``              head

``up.{i}`` is the decoder level at the same resolution as ``down.{i}`` (level 0 = full resolution),
even though the decoder runs them from the deepest level back to level 0.

Shape notation: B batch, C channels, H x W spatial size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# GroupNorm settings of the released models (the TF original's tf.contrib.layers.group_norm).
GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
# Prefix nn.DataParallel / DistributedDataParallel put on every key (the CelebA release has it).
DATA_PARALLEL_PREFIX = "module."
# How many keys of each kind a CheckpointMismatchError lists before summarising the rest.
MAX_LISTED_KEYS = 20


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding of the DDPM U-Net: ``(B,)`` float timesteps -> ``(B, dim)``.

    ``[sin(t * f_0..f_{h-1}), cos(t * f_0..f_{h-1})]`` with h = dim // 2 and geometric frequencies
    ``f_k = 10000^(-k / (h - 1))`` (the released models were trained with exactly this layout: sin
    half first, the ``h - 1`` denominator), zero-padded by one column if ``dim`` is odd. ``t`` may be
    fractional (FastDPM's continuous-time samplers query e.g. t = 616.7).
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep embedding dimension must be >= 4, got {dim}")
    # float32 throughout, as in training: integer t would otherwise truncate the products.
    t = t.to(torch.float32)
    step = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


class Downsample(nn.Module):
    """Halve H and W: ``(B, C, H, W) -> (B, C, H/2, W/2)``; a strided 3x3 conv or 2x2 average pool."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # Asymmetric padding (right/bottom only) like TF's "SAME" for a stride-2 conv on even
            # sizes; the released weights were trained with it, symmetric padding shifts features.
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double H and W: ``(B, C, H, W) -> (B, C, 2H, 2W)``; nearest neighbour, then optionally a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class ResnetBlock(nn.Module):
    """Pre-activation residual block conditioned on the timestep embedding.

    ``x (B, C_in, H, W), temb (B, temb_ch) -> (B, C_out, H, W)``:
    ``shortcut(x) + conv2(dropout(swish(norm2(conv1(swish(norm1(x))) + temb_proj(swish(temb))))))``.
    The shortcut is the identity when ``C_in == C_out``, otherwise a 1x1 conv (``nin_shortcut``,
    what the releases use) or a 3x3 conv (``conv_shortcut``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float,
        conv_shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        # Registration order = state_dict order of the releases; keep it.
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # Only the projection a width change needs is registered (its name is a state_dict key).
        self.use_conv_shortcut = conv_shortcut
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: ``(B, C, H, W) -> (B, C, H, W)``.

    Every pixel attends to all H*W pixels: ``x + proj_out(softmax(q k^T / sqrt(C)) v)`` with q, k, v
    1x1 convs of ``norm(x)``. Computed with ``scaled_dot_product_attention`` (same math, fused).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = _group_norm(channels)
        # 1x1 convs rather than Linear layers: the releases store (C, C, 1, 1) weights.
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        q, k, v = tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn))
        # SDPA's default scale is 1 / sqrt(last dim) = 1 / sqrt(C), as in the original.
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _TimestepMLP(nn.Module):
    """Holds ``dense`` so that the keys read ``temb.dense.{0,1}.*`` as in the releases."""

    def __init__(self, ch: int, temb_ch: int) -> None:
        super().__init__()
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """``(B, ch)`` sinusoidal embedding -> ``(B, temb_ch)``."""
        return self.dense[1](F.silu(self.dense[0](emb)))


class UNet(nn.Module):
    """DDPM eps-prediction U-Net: ``forward(x (B, in_channels, H, W), t (B,)) -> (B, out_ch, H, W)``.

    Args:
        ch: base width; level i has ``ch * ch_mult[i]`` channels; the timestep embedding is ``4 * ch``.
        out_ch: output channels (3 for the RGB eps prediction).
        ch_mult: per-level width multipliers; ``len(ch_mult)`` levels, downsampling between them.
        num_res_blocks: ResnetBlocks per encoder level (the decoder has one more per level).
        attn_resolutions: spatial sizes at which an AttnBlock follows every ResnetBlock.
        dropout: dropout probability inside the ResnetBlocks (0.1 in the releases; call ``.eval()``
            for deterministic sampling).
        in_channels: input channels.
        resolution: input H = W; it fixes which levels get attention, so inputs must have it.
        resamp_with_conv: learned (conv) down/upsampling rather than pooling / plain nearest.

    Released configs: CIFAR-10 ``UNet(128, 3, (1, 2, 2, 2), 2, (16,), 0.1, 3, 32)``;
    CelebA 64 ``UNet(128, 3, (1, 2, 2, 2, 4), 2, (16,), 0.1, 3, 64)``.
    """

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        in_channels: int,
        resolution: int,
        resamp_with_conv: bool = True,
    ) -> None:
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if not ch_mult:
            raise ValueError("ch_mult must name at least one level")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        widths = [ch] + [ch * m for m in ch_mult]
        if any(w % GROUP_NORM_GROUPS for w in widths):
            raise ValueError(
                f"every level width ch * ch_mult must be divisible by {GROUP_NORM_GROUPS} "
                f"(GroupNorm groups); ch={ch}, ch_mult={ch_mult} gives {widths}"
            )
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(
                f"resolution {resolution} cannot be halved {len(ch_mult) - 1} times (ch_mult={ch_mult})"
            )
        self.ch = ch
        self.out_ch = out_ch
        self.ch_mult = ch_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = attn_resolutions
        self.dropout = float(dropout)
        self.in_channels = in_channels
        self.resolution = resolution
        self.resamp_with_conv = resamp_with_conv
        self.num_resolutions = len(ch_mult)
        self.temb_ch = 4 * ch

        # Registration order below reproduces the releases' state_dict order.
        self.temb = _TimestepMLP(ch, self.temb_ch)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        # Encoder: level i takes level i-1's width (ch for level 0) to ch * ch_mult[i].
        self.down = nn.ModuleList()
        skip_widths = [ch]  # widths of the activations the decoder will concatenate, in push order
        res = resolution
        block_in = ch
        for i in range(self.num_resolutions):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()  # empty (no keys) at resolutions without attention
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, self.temb_ch, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
                skip_widths.append(block_in)
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                skip_widths.append(block_in)
                res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, dropout)

        # Decoder, built deepest level first (the order it runs in) but stored so that up[i] is
        # the level at down[i]'s resolution: the releases index it that way.
        up_levels: list[nn.Module] = []
        for i in reversed(range(self.num_resolutions)):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                skip_in = skip_widths.pop()
                level.block.append(
                    ResnetBlock(block_in + skip_in, block_out, self.temb_ch, dropout)
                )
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            up_levels.append(level)
        assert not skip_widths, "every encoder activation is consumed by exactly one decoder block"
        self.up = nn.ModuleList(reversed(up_levels))

        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    @classmethod
    def from_fixture_config(cls, cfg: Mapping[str, Any]) -> UNet:
        """Build from a config mapping such as the DDIM YAML ``model:`` section.

        Accepts either a flat mapping with the constructor's keys (``resolution`` may instead be
        given as ``image_size`` or ``data_image_size``), or a whole fixture / config document
        holding a ``"config"`` mapping plus ``"data_image_size"``. Keys the network does not use
        (``type``, ``var_type``, ``ema_rate``, ``ema``, ...) are ignored.
        """
        if "config" in cfg and isinstance(cfg["config"], Mapping):
            flat = dict(cfg["config"])
            for size_key in ("data_image_size", "image_size", "resolution"):
                if size_key in cfg and "resolution" not in flat:
                    flat["resolution"] = cfg[size_key]
        else:
            flat = dict(cfg)
        if "resolution" not in flat:
            for size_key in ("data_image_size", "image_size"):
                if size_key in flat:
                    flat["resolution"] = flat[size_key]
                    break
        required = (
            "ch",
            "out_ch",
            "ch_mult",
            "num_res_blocks",
            "attn_resolutions",
            "dropout",
            "in_channels",
            "resolution",
        )
        missing = [k for k in required if k not in flat]
        if missing:
            raise KeyError(f"U-Net config lacks {missing}; it has {sorted(flat)}")
        return cls(
            ch=int(flat["ch"]),
            out_ch=int(flat["out_ch"]),
            ch_mult=tuple(flat["ch_mult"]),
            num_res_blocks=int(flat["num_res_blocks"]),
            attn_resolutions=tuple(flat["attn_resolutions"]),
            dropout=float(flat["dropout"]),
            in_channels=int(flat["in_channels"]),
            resolution=int(flat["resolution"]),
            resamp_with_conv=bool(flat.get("resamp_with_conv", True)),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps prediction ``(B, out_ch, H, W)`` for ``x (B, in_channels, H, W)`` at timesteps ``t (B,)``.

        ``t`` is a float (or integer) tensor of 0-indexed network timesteps; fractional values are
        fine. A scalar ``t`` is broadcast to the batch. H = W = ``resolution`` is required.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(
                f"this U-Net was built for {self.resolution}x{self.resolution} inputs, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")

        temb = self.temb(timestep_embedding(t.to(x.device), self.ch).to(x.dtype))

        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i in reversed(range(self.num_resolutions)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes differ from the model's; nothing was loaded.

    Attributes ``missing`` (keys the model needs that the file lacks), ``unexpected`` (keys in the
    file the model does not have) and ``mismatched`` (``(key, expected_shape, found_shape)``)
    hold the complete lists; the message lists the first ``MAX_LISTED_KEYS`` of each.
    """

    def __init__(
        self,
        path: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        self.path = path
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"checkpoint {path} does not match the model's state_dict (nothing was loaded):"]
        lines += _listing("missing key", missing)
        lines += _listing("unexpected key", unexpected)
        lines += _listing(
            "mis-shaped key",
            [f"{k}: expected {list(exp)} vs found {list(got)}" for k, exp, got in mismatched],
        )
        super().__init__("\n".join(lines))


def _listing(what: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {len(items)} {what}{'' if len(items) == 1 else 's'}:"]
    lines += [f"    {item}" for item in items[:MAX_LISTED_KEYS]]
    if len(items) > MAX_LISTED_KEYS:
        lines.append(f"    ... and {len(items) - MAX_LISTED_KEYS} more")
    return lines


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The weights to load from what ``torch.load`` returned, ``module.`` prefixes stripped.

    A mapping is taken as the state dict itself (the CIFAR-10 EMA release). A list / tuple is the
    DDIM training checkpoint ``[model_sd, optimizer_sd, epoch, step, ema_sd]`` (the CelebA release):
    its last mapping is the EMA state dict, the weights the papers sample with.
    """
    if isinstance(obj, Mapping):
        sd = obj
    elif isinstance(obj, (list, tuple)):
        dicts = [item for item in obj if isinstance(item, Mapping)]
        if not dicts:
            raise ValueError(f"checkpoint {path} is a {type(obj).__name__} without any state dict")
        sd = dicts[-1]
    else:
        raise ValueError(
            f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict or the "
            "DDIM list [model_sd, optimizer_sd, epoch, step, ema_sd]"
        )
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        # E.g. a list saved without EMA weights, whose last dict is the optimizer state.
        raise ValueError(
            f"checkpoint {path}: the chosen dict is not a state dict (non-tensor entries "
            f"{not_tensors[:MAX_LISTED_KEYS]})"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = str(key)
        if name.startswith(DATA_PARALLEL_PREFIX):
            name = name[len(DATA_PARALLEL_PREFIX) :]
        if name in out:
            raise ValueError(f"checkpoint {path}: key {name!r} appears with and without 'module.'")
        out[name] = value
    return out


def load_ddim_checkpoint(path: str | PathLike[str], unet: nn.Module) -> None:
    """Load a released DDPM/DDIM checkpoint into ``unet`` in place, all or nothing.

    Accepts a plain state dict (CIFAR-10 EMA release) or the training list
    ``[model_sd, optimizer_sd, epoch, step, ema_sd]`` (CelebA release; the EMA weights are used).
    A leading ``module.`` on keys is stripped. Keys and shapes are checked against
    ``unet.state_dict()`` before anything is copied.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a PyTorch checkpoint ``torch.load(weights_only=True)`` can read,
            or holds no state dict.
        CheckpointMismatchError: missing, unexpected or mis-shaped keys (all listed).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError:
        raise  # permission denied, a directory, ...: the path is the problem, not the format
    except Exception as exc:
        # Garbage surfaces as KeyError, EOFError, UnpicklingError, RuntimeError... depending on
        # its first bytes; all mean the same thing to the caller.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"{p} is not a PyTorch checkpoint readable by torch.load(weights_only=True) "
            f"({type(exc).__name__}: {first_line})"
        ) from exc

    state = _extract_state_dict(obj, str(p))
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, expected[k], tuple(v.shape))
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(str(p), missing, unexpected, mismatched)
    unet.load_state_dict(state, strict=True)
