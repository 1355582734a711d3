"""The DDPM U-Net as a diffusers ``UNet2DModel`` folder: read it, check it, map it, write one.

A diffusers model folder holds ``config.json`` (the ``UNet2DModel`` settings) and
``diffusion_pytorch_model.safetensors`` (or ``.bin``); a pipeline folder (``model_index.json``)
holds it in ``unet/`` and the scheduler in ``scheduler/``. Reading and writing need only ``json``
and ``safetensors``: sftrl never imports diffusers.

The networks are the same; only names and the attention projections' shapes differ
(``L`` levels, level ``i`` at resolution ``resolution / 2**i``; diffusers lists its up blocks
deepest first, so sftrl's ``up.{i}`` is diffusers' ``up_blocks.{L-1-i}``):

======================================  ==================================================
sftrl key                               diffusers key
======================================  ==================================================
``temb.dense.{0,1}``                    ``time_embedding.linear_{1,2}``
``down.{i}.block.{j}``                  ``down_blocks.{i}.resnets.{j}``
``down.{i}.attn.{j}``                   ``down_blocks.{i}.attentions.{j}``
``down.{i}.downsample.conv``            ``down_blocks.{i}.downsamplers.0.conv``
``mid.block_1`` / ``attn_1`` / ``block_2``  ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``up.{i}.block.{j}`` / ``.attn.{j}``    ``up_blocks.{L-1-i}.resnets.{j}`` / ``.attentions.{j}``
``up.{i}.upsample.conv``                ``up_blocks.{L-1-i}.upsamplers.0.conv``
``norm_out``                            ``conv_norm_out``
ResnetBlock ``temb_proj``               ``time_emb_proj``
ResnetBlock ``nin_shortcut``            ``conv_shortcut`` (both 1x1 convs)
AttnBlock ``norm`` / ``q`` / ``k`` / ``v`` / ``proj_out``  ``group_norm`` / ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``
======================================  ==================================================

AttnBlock's q, k, v and proj_out are 1x1 convs, weights ``(C, C, 1, 1)``; diffusers' are Linear
layers on the pixel tokens, ``(C, C)``: the same matrix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from sftrl.models.unet import GROUP_NORM_EPS, GROUP_NORM_GROUPS, CheckpointMismatchError, UNet

MODEL_CLASS = "UNet2DModel"
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SCHEDULER_CLASS = "DDPMScheduler"
# The diffusers release whose UNet2DModel settings (names and defaults) this module was written
# and tested against; an exported config.json says it was written in that format.
DIFFUSERS_FORMAT_VERSION = "0.42.1"
DOWN_PLAIN, DOWN_ATTN = "DownBlock2D", "AttnDownBlock2D"
UP_PLAIN, UP_ATTN = "UpBlock2D", "AttnUpBlock2D"
MID_BLOCK = "UNetMidBlock2D"

# UNet2DModel.__init__'s defaults (diffusers 0.42): what a config.json that omits a setting means.
# Hub configs written by older diffusers releases omit the settings added since.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": [DOWN_PLAIN, DOWN_ATTN, DOWN_ATTN, DOWN_ATTN],
    "mid_block_type": MID_BLOCK,
    "up_block_types": [UP_ATTN, UP_ATTN, UP_ATTN, UP_PLAIN],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# sftrl's fixed parts of the DDPM U-Net, as UNet2DModel settings: each value the one it supports.
# (timestep_embedding: sin half first = flip_sin_to_cos false; the h - 1 denominator = freq_shift 1.
# Downsample: right/bottom padding = downsample_padding 0. GroupNorm: GROUP_NORM_* of unet.py.)
FIXED_SETTINGS: dict[str, Any] = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "mid_block_type": MID_BLOCK,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "norm_num_groups": GROUP_NORM_GROUPS,
    "norm_eps": GROUP_NORM_EPS,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
# diffusers' get_activation takes "swish" as another name of SiLU.
SILU_NAMES = ("silu", "swish")
# Attention projections: 1x1 conv weights in sftrl, Linear weights in diffusers.
ATTN_PROJECTIONS = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
RESNET_RENAMES = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}


class DiffusersFormatError(ValueError):
    """A diffusers folder sftrl cannot read, or a U-Net diffusers cannot represent (one line)."""


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """The U-Net settings both sftrl's ``UNet`` and diffusers' ``UNet2DModel`` can represent."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]  # only resolutions of levels the network has
    in_channels: int
    out_ch: int
    resolution: int
    dropout: float

    def level_resolutions(self) -> list[int]:
        """Spatial size of each level, full resolution first."""
        return [self.resolution // 2**i for i in range(len(self.ch_mult))]

    def build(self) -> UNet:
        return UNet(self.ch, self.out_ch, self.ch_mult, self.num_res_blocks, self.attn_resolutions,
                    self.dropout, self.in_channels, self.resolution)


# ---- the mapping: pure functions of keys, shapes and settings ----------------------------------


def diffusers_key(key: str, num_levels: int) -> str:
    """The diffusers ``UNet2DModel`` name of sftrl ``UNet`` state_dict key ``key`` (table above).

    ``num_levels`` = ``len(ch_mult)`` (up levels are listed in reverse in diffusers).
    """
    module, _, param = key.rpartition(".")
    parts = module.split(".")
    if parts[0] == "temb":  # temb.dense.{0,1}
        return f"time_embedding.linear_{int(parts[2]) + 1}.{param}"
    if parts[0] in ("conv_in", "conv_out"):
        return key
    if parts[0] == "norm_out":
        return f"conv_norm_out.{param}"
    if parts[0] == "mid":
        prefix = {"block_1": "mid_block.resnets.0", "block_2": "mid_block.resnets.1",
                  "attn_1": "mid_block.attentions.0"}[parts[1]]
        return f"{prefix}{_sublayer(parts[1].startswith('attn'), parts[2:])}.{param}"
    side, level, kind = parts[0], int(parts[1]), parts[2]
    if side == "down":
        head = f"down_blocks.{level}"
    elif side == "up":
        head = f"up_blocks.{num_levels - 1 - level}"
    else:
        raise KeyError(f"{key!r} is not a key of sftrl's UNet")
    if kind in ("downsample", "upsample"):
        return f"{head}.{kind}rs.0.conv.{param}"
    group = {"block": "resnets", "attn": "attentions"}[kind]
    return f"{head}.{group}.{parts[3]}{_sublayer(kind == 'attn', parts[4:])}.{param}"


def _sublayer(is_attention: bool, rest: list[str]) -> str:
    """The diffusers name of a layer inside a ResnetBlock or AttnBlock (``rest``: its sftrl name)."""
    (name,) = rest
    if is_attention:
        return "." + ("group_norm" if name == "norm" else ATTN_PROJECTIONS[name])
    return "." + RESNET_RENAMES.get(name, name)


def is_attention_projection(key: str) -> bool:
    """Whether sftrl key ``key`` is a q/k/v/proj_out weight, ``(C, C, 1, 1)`` here, ``(C, C)`` there."""
    return bool(re.search(r"(^|\.)attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", key))


def to_diffusers_tensor(key: str, value: torch.Tensor) -> torch.Tensor:
    """sftrl tensor -> diffusers tensor: attention projections ``(C, C, 1, 1) -> (C, C)``."""
    if is_attention_projection(key):
        return value.reshape(value.shape[0], value.shape[1])
    return value


def from_diffusers_tensor(key: str, value: torch.Tensor) -> torch.Tensor:
    """diffusers tensor -> sftrl tensor (``key`` is sftrl's): ``(C, C) -> (C, C, 1, 1)`` for projections."""
    if is_attention_projection(key) and value.ndim == 2:
        return value.reshape(*value.shape, 1, 1)
    return value


def to_diffusers_state_dict(state: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """An sftrl ``UNet`` state_dict renamed and reshaped for diffusers (contiguous copies)."""
    return {diffusers_key(k, num_levels): to_diffusers_tensor(k, v).detach().contiguous().clone()
            for k, v in state.items()}


def from_diffusers_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: str
) -> dict[str, torch.Tensor]:
    """diffusers weights -> the sftrl state_dict whose keys and shapes are ``expected``, strictly.

    Raises ``CheckpointMismatchError`` (naming the diffusers keys) on any missing, unexpected or
    mis-shaped tensor: nothing is partly mapped.
    """
    num_levels = 1 + max(int(k.split(".")[1]) for k in expected if k.startswith("down."))
    names = {diffusers_key(k, num_levels): k for k in expected}
    missing = [d for d in names if d not in state]
    unexpected = [d for d in state if d not in names]
    out: dict[str, torch.Tensor] = {}
    mismatched = []
    for d_key, value in state.items():
        if d_key not in names:
            continue
        key = names[d_key]
        tensor = from_diffusers_tensor(key, value)
        if tensor.shape != expected[key]:
            mismatched.append((d_key, tuple(to_diffusers_tensor(key, torch.empty(expected[key])).shape),
                               tuple(value.shape)))
        out[key] = tensor
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(path, missing, unexpected, mismatched)
    return out


# ---- settings: UNet2DModel config.json <-> UNetLayout --------------------------------------------


def _same(value: Any, supported: Any) -> bool:
    """``value == supported`` for JSON values, numbers compared as numbers (``1`` and ``1.0``)."""
    if supported is None or isinstance(supported, bool) or isinstance(value, bool):
        return value is supported
    if isinstance(supported, (int, float)) and isinstance(value, (int, float)):
        return math.isclose(value, supported, rel_tol=1e-9)
    return bool(value == supported)


def unsupported_settings(config: Mapping[str, Any]) -> list[str]:
    """``"key = value (supported: ...)"`` for each UNet2DModel setting sftrl's U-Net cannot represent.

    ``config``: a config.json's settings; an absent setting takes ``DIFFUSERS_DEFAULTS``.
    """
    s = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = [f"{k} = {v!r} (not a UNet2DModel setting sftrl knows; diffusers {DIFFUSERS_FORMAT_VERSION} has "
                f"{', '.join(sorted(DIFFUSERS_DEFAULTS))})" for k, v in s.items() if k not in DIFFUSERS_DEFAULTS]

    def bad(key: str, supported: str) -> None:
        problems.append(f"{key} = {json.dumps(s[key])} (supported: {supported})")

    for key, supported in FIXED_SETTINGS.items():
        ok = s[key] in SILU_NAMES if key == "act_fn" else _same(s[key], supported)
        if not ok:
            bad(key, json.dumps(supported))
    widths = s["block_out_channels"]
    if not (isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
        bad("block_out_channels", "a list of positive channel counts")
        return problems
    ch, levels = widths[0], len(widths)
    if any(w % ch for w in widths):
        bad("block_out_channels", f"multiples of the first entry {ch} (sftrl's ch * ch_mult with ch_mult[0] = 1)")
    down, up = s["down_block_types"], s["up_block_types"]
    if not (isinstance(down, list) and len(down) == levels and all(t in (DOWN_PLAIN, DOWN_ATTN) for t in down)):
        bad("down_block_types", f"{levels} entries (one per block_out_channels), each {DOWN_PLAIN!r} or {DOWN_ATTN!r}")
    elif up != [UP_ATTN if t == DOWN_ATTN else UP_PLAIN for t in reversed(down)]:
        mirror = [UP_ATTN if t == DOWN_ATTN else UP_PLAIN for t in reversed(down)]
        bad("up_block_types", f"{json.dumps(mirror)}, the mirror of down_block_types: sftrl's attention is at the "
                              "same resolutions on both sides")
    else:
        if s["downsample_type"] != "conv" and DOWN_ATTN in down[:-1]:
            bad("downsample_type", '"conv" (an AttnDownBlock2D downsamples with it)')
        if s["upsample_type"] != "conv" and UP_ATTN in up[:-1]:
            bad("upsample_type", '"conv" (an AttnUpBlock2D upsamples with it)')
        attention_widths = sorted({w for w, t in zip(widths, down) if t == DOWN_ATTN} | {widths[-1]})
        head_dim = s["attention_head_dim"]
        if head_dim is not None and any(head_dim != w for w in attention_widths):
            bad("attention_head_dim", "null (one head of all channels, sftrl's single-head attention)"
                + (f" or {attention_widths[0]}" if len(attention_widths) == 1 else ""))
    if s["attn_norm_num_groups"] not in (None, GROUP_NORM_GROUPS):
        bad("attn_norm_num_groups", f"null or {GROUP_NORM_GROUPS}")
    if s["time_embedding_dim"] not in (None, 4 * ch):
        bad("time_embedding_dim", f"null or {4 * ch} (4 x block_out_channels[0])")
    if not isinstance(s["layers_per_block"], int) or s["layers_per_block"] < 1:
        bad("layers_per_block", "a whole number >= 1")
    size = s["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size < 1:
        bad("sample_size", "the side of square images, a whole number")
    elif size % 2 ** (levels - 1):
        bad("sample_size", f"a multiple of {2 ** (levels - 1)} ({levels} levels halve it {levels - 1} times)")
    for key in ("in_channels", "out_channels"):
        if not isinstance(s[key], int) or s[key] < 1:
            bad(key, "a whole number >= 1")
    return problems


def layout_from_diffusers_config(config: Mapping[str, Any], where: str) -> UNetLayout:
    """The U-Net a UNet2DModel ``config`` describes; ``DiffusersFormatError`` naming every setting
    sftrl's U-Net cannot represent (``where``: the file, for the message)."""
    if config.get("_class_name", MODEL_CLASS) != MODEL_CLASS:
        raise DiffusersFormatError(f"'{where}' describes a {config['_class_name']}; sftrl reads {MODEL_CLASS} only")
    problems = unsupported_settings(config)
    if problems:
        raise DiffusersFormatError(f"'{where}' has settings sftrl's DDPM U-Net cannot represent: "
                                   + "; ".join(problems))
    s = {**DIFFUSERS_DEFAULTS, **config}
    widths = s["block_out_channels"]
    size = s["sample_size"][0] if isinstance(s["sample_size"], list) else s["sample_size"]
    return UNetLayout(
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=s["layers_per_block"],
        attn_resolutions=tuple(size // 2**i for i, t in enumerate(s["down_block_types"]) if t == DOWN_ATTN),
        in_channels=s["in_channels"],
        out_ch=s["out_channels"],
        resolution=size,
        dropout=float(s["dropout"]),
    )


def layout_of(unet: UNet) -> UNetLayout:
    """The layout of an sftrl ``UNet``; ``DiffusersFormatError`` if UNet2DModel cannot represent it."""
    problems = []
    if unet.ch_mult[0] != 1:
        problems.append(f"ch_mult[0] = {unet.ch_mult[0]} (supported: 1; UNet2DModel's first level keeps "
                        "conv_in's width)")
    if not unet.resamp_with_conv:
        problems.append("resamp_with_conv = False (supported: True; UNet2DModel resamples with convs)")
    if problems:
        raise DiffusersFormatError("this U-Net cannot be written as a diffusers UNet2DModel: " + "; ".join(problems))
    levels = [unet.resolution // 2**i for i in range(len(unet.ch_mult))]
    return UNetLayout(unet.ch, unet.ch_mult, unet.num_res_blocks,
                      tuple(r for r in levels if r in unet.attn_resolutions),
                      unet.in_channels, unet.out_ch, unet.resolution, unet.dropout)


def diffusers_config(layout: UNetLayout) -> dict[str, Any]:
    """The UNet2DModel config.json of ``layout``: every setting written out, none left to defaults."""
    attention = [r in layout.attn_resolutions for r in layout.level_resolutions()]
    down = [DOWN_ATTN if a else DOWN_PLAIN for a in attention]
    config = {
        "_class_name": MODEL_CLASS,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        **DIFFUSERS_DEFAULTS,
        **FIXED_SETTINGS,
        "sample_size": layout.resolution,
        "in_channels": layout.in_channels,
        "out_channels": layout.out_ch,
        "down_block_types": down,
        "up_block_types": [UP_ATTN if t == DOWN_ATTN else UP_PLAIN for t in reversed(down)],
        "block_out_channels": [layout.ch * m for m in layout.ch_mult],
        "layers_per_block": layout.num_res_blocks,
        "dropout": layout.dropout,
        "attention_head_dim": None,  # one head over all channels
    }
    return config


# ---- folders -----------------------------------------------------------------------------------


def unet_folder(path: str | PathLike[str]) -> Path | None:
    """The folder holding the UNet2DModel's config.json if ``path`` is a diffusers model or pipeline
    folder (``model_index.json`` with ``unet/``), else None."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / PIPELINE_INDEX).is_file() and (p / "unet" / CONFIG_NAME).is_file():
        return p / "unet"
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffusersFormatError(f"'{path}' is not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"'{path}' holds a JSON {type(data).__name__}, expected an object of settings")
    return data


def read_layout(folder: str | PathLike[str]) -> UNetLayout:
    """The checked ``UNetLayout`` of a diffusers model or pipeline folder."""
    where = unet_folder(folder)
    if where is None:
        raise DiffusersFormatError(f"'{folder}' is not a diffusers model folder (no {CONFIG_NAME}, nor "
                                   f"{PIPELINE_INDEX} with unet/{CONFIG_NAME})")
    return layout_from_diffusers_config(_read_json(where / CONFIG_NAME), str(where / CONFIG_NAME))


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The UNet2DModel tensors of ``folder``: ``diffusion_pytorch_model.safetensors``, else ``.bin``."""
    path = folder / SAFETENSORS_NAME
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path), path
        except (SafetensorError, OSError) as err:
            raise DiffusersFormatError(f"'{path}' is not a readable safetensors file ({err})") from None
    path = folder / BIN_NAME
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt file
            raise DiffusersFormatError(f"'{path}' is not readable by torch.load(weights_only=True) "
                                       f"({type(err).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DiffusersFormatError(f"'{path}' does not hold a state dict of tensors")
        return state, path
    raise DiffusersFormatError(f"diffusers folder '{folder}' has no weights ({SAFETENSORS_NAME} or {BIN_NAME})")


def load_diffusers_weights(folder: str | PathLike[str], unet: UNet) -> Path:
    """Load the weights of diffusers folder ``folder`` into ``unet`` in place, all or nothing.

    Returns the weights file. Raises ``CheckpointMismatchError`` (diffusers key names) if its
    tensors do not map onto ``unet``'s state_dict exactly.
    """
    where = unet_folder(folder)
    if where is None:
        raise DiffusersFormatError(f"'{folder}' is not a diffusers model folder")
    state, path = read_weights(where)
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    unet.load_state_dict(from_diffusers_state_dict(state, expected, str(path)), strict=True)
    return path


def load_diffusers_unet(folder: str | PathLike[str]) -> UNet:
    """sftrl's ``UNet`` with the settings and weights of a diffusers ``UNet2DModel`` folder.

    ``folder``: a ``save_pretrained`` folder (config.json + diffusion_pytorch_model.safetensors or
    .bin) or a pipeline folder holding one in ``unet/``.

    Raises:
        DiffusersFormatError: not such a folder, or a setting sftrl's U-Net cannot represent
            (all named in one line).
        CheckpointMismatchError: the weights do not match the config (every key listed).
    """
    unet = read_layout(folder).build()
    load_diffusers_weights(folder, unet)
    return unet


def save_diffusers_unet(unet: UNet, folder: str | PathLike[str]) -> None:
    """Write ``unet`` as a diffusers ``UNet2DModel`` folder (config.json + safetensors weights) that
    ``UNet2DModel.from_pretrained(folder)`` loads. ``folder`` is created if needed; files in it of
    the same names are replaced (atomic folder writes are the caller's: ``sftrl export``)."""
    from safetensors.torch import save_file

    layout = layout_of(unet)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    from sftrl.diffusion.variance import LOG_STD_KEY

    # Learned step stds are no part of a UNet2DModel: sftrl export writes them beside it.
    state = {k: v for k, v in unet.state_dict().items() if k != LOG_STD_KEY}
    weights = to_diffusers_state_dict(state, len(layout.ch_mult))
    save_file({k: v.cpu() for k, v in weights.items()}, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(diffusers_config(layout), indent=2) + "\n")


# ---- the beta schedule: DDPMScheduler config <-> diffusion.num_train_steps / beta_schedule -------

# diffusers' DDPMScheduler "linear" and "sigmoid" betas are sftrl's make_betas formulas (computed in
# float32 there, float64 here) when beta_start and beta_end are sftrl's endpoints.
SCHEDULER_BETAS = {
    "linear": (1e-4, 0.02),  # sftrl.diffusion.betas.LINEAR_BETA_START / _END
    "sigmoid": (1e-5, 1e-2),  # SIGMOID_BETA_START / _END
}


# diffusion.variance -> DDPMScheduler variance_type: sigma^2 = beta_t is "fixed_large", the
# posterior beta~_t "fixed_small" (what DDPMScheduler.step samples with in its own T-step chain).
VARIANCE_TYPES = {"beta": "fixed_large", "posterior": "fixed_small"}


def scheduler_config(num_train_steps: int, beta_schedule: str, variance: str = "beta") -> dict[str, Any]:
    """A DDPMScheduler config with sftrl's base betas (``beta_schedule``: linear or sigmoid)."""
    beta_start, beta_end = SCHEDULER_BETAS[beta_schedule]
    return {
        "_class_name": SCHEDULER_CLASS,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "num_train_timesteps": num_train_steps,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "trained_betas": None,
        "prediction_type": "epsilon",
        "variance_type": VARIANCE_TYPES[variance],
        "clip_sample": True,
    }


def scheduler_config_path(folder: str | PathLike[str]) -> Path | None:
    """The DDPMScheduler config beside a diffusers model: ``scheduler_config.json`` in the folder
    (the google/ddpm-* layout), ``scheduler/`` of a pipeline, or ``../scheduler/`` of ``unet/``."""
    p = Path(folder).expanduser()
    for candidate in (p / SCHEDULER_CONFIG_NAME, p / "scheduler" / SCHEDULER_CONFIG_NAME,
                      p.parent / "scheduler" / SCHEDULER_CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def read_scheduler(folder: str | PathLike[str]) -> tuple[int, str] | None:
    """``(num_train_steps, beta_schedule)`` of the folder's DDPMScheduler config, None without one;
    ``DiffusersFormatError`` naming every setting sftrl's base DDPM cannot represent."""
    path = scheduler_config_path(folder)
    if path is None:
        return None
    s = _read_json(path)
    problems = []
    name = s.get("beta_schedule", "linear")
    if name not in SCHEDULER_BETAS:
        problems.append(f"beta_schedule = {json.dumps(name)} (supported: {', '.join(map(json.dumps, SCHEDULER_BETAS))})")
    else:
        start, end = SCHEDULER_BETAS[name]
        for key, supported in (("beta_start", start), ("beta_end", end)):
            value = s.get(key, {"beta_start": 1e-4, "beta_end": 0.02}[key])  # DDPMScheduler's defaults
            if not _same(value, supported):
                problems.append(f"{key} = {json.dumps(value)} (supported with {name} betas: {supported})")
    if s.get("trained_betas") is not None:
        problems.append("trained_betas = [...] (supported: null)")
    if s.get("prediction_type", "epsilon") != "epsilon":
        problems.append(f"prediction_type = {json.dumps(s['prediction_type'])} (supported: \"epsilon\", what "
                        "sftrl's sampler predicts)")
    for key in ("rescale_betas_zero_snr",):
        if s.get(key):
            problems.append(f"{key} = {json.dumps(s[key])} (supported: false)")
    steps = s.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"num_train_timesteps = {json.dumps(steps)} (supported: a whole number >= 1)")
    if problems:
        raise DiffusersFormatError(f"'{path}' has settings sftrl's base DDPM cannot represent: " + "; ".join(problems))
    return steps, name


def config_settings(folder: str | PathLike[str]) -> dict[str, tuple[Any, str]]:
    """What a diffusers folder decides of the sftrl config: dotted key -> (value, file it comes from).

    ``model.unet_*`` and ``data.image_size`` from config.json; ``diffusion.num_train_steps`` and
    ``diffusion.beta_schedule`` from the scheduler config where the folder has one.
    """
    where = unet_folder(folder)
    assert where is not None, "config_settings() takes a folder unet_folder() recognised"
    config_file = str(where / CONFIG_NAME)
    layout = read_layout(folder)
    settings: dict[str, tuple[Any, str]] = {
        "model.unet_ch": (layout.ch, config_file),
        "model.unet_ch_mult": (list(layout.ch_mult), config_file),
        "model.unet_num_res_blocks": (layout.num_res_blocks, config_file),
        "model.unet_attn_resolutions": (list(layout.attn_resolutions), config_file),
        "data.image_size": (layout.resolution, config_file),
    }
    scheduler = read_scheduler(where)
    if scheduler is not None:
        source = str(scheduler_config_path(where))
        settings["diffusion.num_train_steps"] = (scheduler[0], source)
        settings["diffusion.beta_schedule"] = (scheduler[1], source)
    return settings
