"""Networks: the toy MLPs, the DDPM U-Net, and the image critic and baseline."""

from __future__ import annotations

from torch import nn

from sftrl.models.toy import ToyBaseline, ToyCritic, ToySampler
from sftrl.models.unet import CheckpointMismatchError, UNet, load_ddim_checkpoint


def build_networks(cfg, data_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(sampler eps_theta, critic c_alpha, baseline V_omega) for ``cfg`` and the data's shape."""
    d = cfg.diffusion
    if cfg.model.sampler == "toy-mlp":
        if len(data_shape) != 1:
            raise ValueError(f"the toy MLP sampler needs flat data, got shape {data_shape}")
        dim = data_shape[0]
        return (
            ToySampler(d.num_train_steps, dim=dim, hidden=cfg.model.hidden),
            ToyCritic(dim=dim, hidden=tuple(cfg.model.critic_hidden)),
            ToyBaseline(d.steps, dim=dim, hidden=tuple(cfg.model.baseline_hidden)),
        )
    raise ValueError(f"unknown sampler {cfg.model.sampler!r}; valid: toy-mlp, unet")


__all__ = [
    "CheckpointMismatchError",
    "ToyBaseline",
    "ToyCritic",
    "ToySampler",
    "UNet",
    "build_networks",
    "load_ddim_checkpoint",
]
