"""DDPM pretraining loss: the simplified eps-matching objective of Ho et al. (2020).

Minimising it matches each step p^theta_t(x_t | x_{t+1}) to the backward posterior (paper Eq. 5).

Code name          -> paper symbol
``t``              -> network timestep (0-indexed: t = 0 is alpha-bar_1)
``alphas_cumprod`` -> alpha-bar
``noise``          -> epsilon ~ N(0, I)
"""

from __future__ import annotations

import torch
from torch import nn

EPS_MSE = "eps_mse"


def q_sample(
    x_0: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) noise (the forward process, Eq. 1 closed).

    ``x_0``, ``noise`` ``(B, *D)``; ``alphas_cumprod`` ``(T,)``; ``t`` ``(B,)`` long.
    """
    shape = (-1,) + (1,) * (x_0.dim() - 1)
    abar = alphas_cumprod[t].view(shape)
    return abar.sqrt() * x_0 + (1.0 - abar).sqrt() * noise


def eps_mse(
    model: nn.Module, x_0: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The loss tensor of ``eps_mse_loss`` without its metrics (no host sync: the training loop's form)."""
    x_t = q_sample(x_0, alphas_cumprod, t, noise)
    return (model(x_t, t.to(x_0.dtype)) - noise).pow(2).mean()


def eps_mse_loss(
    model: nn.Module,
    x_0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean |eps_theta(x_t, t) - noise|^2 over batch and dims; returns ``(loss, metrics)``."""
    loss = eps_mse(model, x_0, alphas_cumprod, t, noise)
    return loss, {EPS_MSE: loss.item()}
