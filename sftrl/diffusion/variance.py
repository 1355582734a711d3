"""Learned step variances (``model.learn_variance``): the policy's std as trainable parameters.

The paper fixes each step's variance and names learning it as future work. Here the std of step
n is a parameter the policy gradient trains with eps_theta, one per step (``(S + 1,)``, index 0
unused) or, for images, one per step and channel (``(S + 1, C)``):

    std_n = sqrt(floor^2 + exp(2 s_n))                           (s_n = ``step_log_std[n]``)

It is always above ``floor`` (``model.variance_floor``) and smooth in s_n, so the gradient never
dies at the floor. s_n starts where std_n equals the schedule's std (sigma_n, or
``diffusion.final_step_std`` where sigma_n = 0): before any update the policy is the fixed-variance
sampler it was built from.

The parameter lives on the sampler network itself (``step_log_std``), so the optimiser, weights
publication, checkpoints and the moving average carry it with eps_theta's weights; the step kernel
(``sftrl.diffusion.step.denoise_step``) finds it there. A pretrained sampler has none: it is
attached after the pretrained weights are loaded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_STD_KEY = "step_log_std"  # the parameter's name on the sampler (and its state-dict key)
FLOOR_ATTR = "step_std_floor"  # the floor, a plain attribute set with the parameter


def floored_std(log_std: torch.Tensor, floor: float) -> torch.Tensor:
    """std = sqrt(floor^2 + exp(2 s)), elementwise: above ``floor``, equal to exp(s) far above it."""
    return torch.sqrt(floor * floor + torch.exp(2.0 * log_std))


def initial_log_std(stds: torch.Tensor, floor: float, channels: int | None = None) -> torch.Tensor:
    """The s that gives std = ``stds`` ``(S + 1,)`` (index 0 unused, set to step 1's) under ``floor``:
    ``(S + 1,)``, or ``(S + 1, C)`` with every channel alike when ``channels`` is given.

    Every std of steps 1..S must be above the floor (``ValueError`` otherwise)."""
    stds = stds.detach().to(torch.float64).clone()
    low = [n for n in range(1, len(stds)) if not float(stds[n]) > floor]
    if low:
        raise ValueError(f"step(s) n = {low[:5]} start at std {float(stds[low[0]]):.3g}, not above the floor {floor:g}")
    stds[0] = stds[1]
    log_std = 0.5 * torch.log(stds * stds - floor * floor)
    if channels is not None:
        log_std = log_std[:, None].repeat(1, channels)
    return log_std.to(torch.float32)


def attach_learned_variance(model: nn.Module, initial_stds: torch.Tensor, floor: float,
                            channels: int | None = None) -> nn.Module:
    """Register ``step_log_std`` on ``model`` (in place; returned for chaining), started at
    ``initial_stds`` ``(S + 1,)``; per channel when ``channels`` is given."""
    if hasattr(model, LOG_STD_KEY):
        raise ValueError(f"the sampler already has a learned variance ({LOG_STD_KEY})")
    model.register_parameter(LOG_STD_KEY, nn.Parameter(initial_log_std(initial_stds, floor, channels)))
    setattr(model, FLOOR_ATTR, float(floor))
    return model


def learned_log_std(model: nn.Module) -> tuple[torch.Tensor, float] | None:
    """``(step_log_std, floor)`` of a sampler with learned variances, else None. Looks through the
    wrappers that run a sampler (``sftrl.perf``'s ``.module``)."""
    for _ in range(8):  # a few wrappers deep at most
        inner = getattr(model, "module", None)
        if hasattr(model, LOG_STD_KEY) or not isinstance(inner, nn.Module):
            break
        model = inner
    log_std = getattr(model, LOG_STD_KEY, None)
    if log_std is None:
        return None
    return log_std, float(getattr(model, FLOOR_ATTR))


def step_stds(model: nn.Module) -> torch.Tensor | None:
    """The learned stds ``(S + 1,)`` or ``(S + 1, C)`` of ``model`` (index 0 unused), detached; None
    for a fixed-variance sampler."""
    found = learned_log_std(model)
    if found is None:
        return None
    log_std, floor = found
    return floored_std(log_std.detach(), floor)


def step_entropy(model: nn.Module, n: torch.Tensor, data_shape: tuple[int, ...], reduction: str) -> torch.Tensor | None:
    """The entropy of each transition's step Gaussian pi_theta(. | x_n), ``(B,)`` for the steps
    ``n`` ``(B,)``, with the gradient to ``step_log_std``: over the D data dims,
    sum_d (log std_n,d + log(2 pi e) / 2), or its mean over the dims under the ``mean`` log-prob
    reduction (the entropy is reduced like the log-prob it goes with). None for a fixed-variance
    sampler, whose entropy no parameter moves."""
    found = learned_log_std(model)
    if found is None:
        return None
    log_std, floor = found
    per_dim = torch.log(floored_std(log_std, floor))[n]  # (B,) or (B, C): a channel's std covers D / C dims
    per_dim = (per_dim.mean(dim=1) if per_dim.dim() == 2 else per_dim) + 0.5 * math.log(2.0 * math.pi * math.e)
    return per_dim * math.prod(data_shape) if reduction == "sum" else per_dim
