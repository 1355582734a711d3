"""Networks: the toy MLPs, the DDPM U-Net, and the image critic and baseline."""

from __future__ import annotations

from torch import nn

from sftrl.models.diffusers_unet import (
    DiffusersFormatError,
    load_diffusers_unet,
    save_diffusers_unet,
)
from sftrl.models.image import ImageBaseline, ImageCritic
from sftrl.models.toy import ToyBaseline, ToyCritic, ToySampler
from sftrl.models.unet import CheckpointMismatchError, UNet, load_ddim_checkpoint

SAMPLERS = ("toy-mlp", "unet")


def build_unet(cfg, data_shape: tuple[int, ...]) -> UNet:
    """The DDPM U-Net of ``cfg.model.unet_*`` for square images ``data_shape = (C, H, H)``."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"the U-Net sampler needs square images (C, H, H), got shape {data_shape}")
    channels, resolution = data_shape[0], data_shape[1]
    m = cfg.model
    return UNet(
        ch=m.unet_ch,
        out_ch=channels,
        ch_mult=tuple(m.unet_ch_mult),
        num_res_blocks=m.unet_num_res_blocks,
        attn_resolutions=tuple(m.unet_attn_resolutions),
        dropout=m.unet_dropout,
        in_channels=channels,
        resolution=resolution,
    )


def build_networks(cfg, data_shape: tuple[int, ...], *, learned_variance: bool = True
                   ) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(sampler eps_theta, critic c_alpha, baseline V_omega) for ``cfg`` and the data's shape.

    ``toy-mlp``: flat data ``(D,)``, the toy MLPs. ``unet``: images ``(C, H, H)``, the DDPM U-Net,
    the paper's image critic (``model.critic_channels``) and baseline (``model.baseline_hidden``).
    With ``model.learn_variance`` the sampler carries its step stds (``attach_variance``), unless
    ``learned_variance`` is False: the pretrained network, which has none.
    """
    d = cfg.diffusion
    if cfg.model.sampler == "toy-mlp":
        if len(data_shape) != 1:
            raise ValueError(f"the toy MLP sampler needs flat data, got shape {data_shape}")
        dim = data_shape[0]
        sampler: nn.Module = ToySampler(d.num_train_steps, dim=dim, hidden=cfg.model.hidden)
        critic: nn.Module = ToyCritic(dim=dim, hidden=tuple(cfg.model.critic_hidden),
                                      standardise=cfg.model.critic_input == "standardised")
        baseline: nn.Module = ToyBaseline(d.steps, dim=dim, hidden=tuple(cfg.model.baseline_hidden))
    elif cfg.model.sampler == "unet":
        sampler = build_unet(cfg, tuple(data_shape))
        channels, resolution = data_shape[0], data_shape[1]
        critic = ImageCritic(channels, resolution, channels=tuple(cfg.model.critic_channels), init=cfg.model.image_init)
        baseline = ImageBaseline(data_shape, d.steps, hidden=tuple(cfg.model.baseline_hidden), init=cfg.model.image_init)
    else:
        raise ValueError(f"unknown sampler {cfg.model.sampler!r}; valid: {', '.join(SAMPLERS)}")
    if learned_variance:
        attach_variance(sampler, cfg, data_shape)
    return sampler, critic, baseline


def attach_variance(sampler: nn.Module, cfg, data_shape: tuple[int, ...]) -> nn.Module:
    """Give ``sampler`` its learned step stds (``sftrl.diffusion.variance``) where
    ``model.learn_variance`` asks for them, started at the schedule's stds; else leave it alone."""
    if not cfg.model.learn_variance:
        return sampler
    from sftrl.diffusion.variance import attach_learned_variance
    from sftrl.plan import initial_stds, schedule_of

    channels = data_shape[0] if cfg.model.learn_variance_per_channel else None
    return attach_learned_variance(sampler, initial_stds(cfg, schedule_of(cfg)), cfg.model.variance_floor, channels)


__all__ = [
    "SAMPLERS",
    "CheckpointMismatchError",
    "DiffusersFormatError",
    "ImageBaseline",
    "ImageCritic",
    "ToyBaseline",
    "ToyCritic",
    "ToySampler",
    "UNet",
    "attach_variance",
    "build_networks",
    "build_unet",
    "load_ddim_checkpoint",
    "load_diffusers_unet",
    "save_diffusers_unet",
]
