"""The one Gaussian step of every sampler, and a trajectory rollout built on it.

    pi_theta(x_{n-1} | x_n) = N(mean, std_n^2 I),
    mean = coef_x[n] x_n + coef_eps[n] eps_theta(x_n, tau[n])          (paper Eq. 3 and 11)

The same function samples x_{n-1} (rollouts, evaluation, the env) or scores a given one
(re-scoring buffer transitions for the policy gradient), so the two can never drift apart.

Code name        -> paper symbol
``x_n``          -> x_{t+1} (the state), ``x_prev`` -> x_t (the action)
``log_prob``     -> log p^theta_t(x_t | x_{t+1})
``std``          -> the std of the step: sigma_n, or ``final_step_std`` where sigma_n = 0; for a
                    sampler with learned variances (``sftrl.diffusion.variance``) its own std_n,
                    per step or per step and channel

A step whose std is 0 is deterministic: it has no density, its ``log_prob`` is 0 and it carries no
policy gradient. ``final_step_std`` (the paper's image code uses 0.001 during training rollouts)
turns such steps into narrow Gaussians so they can be trained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from sftrl.diffusion.schedules import StepTables
from sftrl.diffusion.variance import floored_std, learned_log_std

Reduction = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean")
_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """One step for a batch: ``x_prev``, ``mean`` ``(B, *D)``; ``log_prob`` ``(B,)``; ``std`` ``(B,)``,
    or ``(B, C)`` for a sampler with a learned std per channel."""

    x_prev: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A batch of chains in sampling order.

    ``xs`` ``(S + 1, B, *D)``: xs[0] = x_S (the prior draw) ... xs[S] = x_0 (the sample).
    ``log_probs`` ``(S, B)``: log_probs[k] = log pi(xs[k + 1] | xs[k]).
    ``ns`` ``(S,)``: the step number n of each transition (S, S - 1, ..., 1).
    ``stds`` ``(S,)``: the std each step used (0 marks a deterministic step).
    """

    xs: torch.Tensor
    log_probs: torch.Tensor
    ns: torch.Tensor
    stds: torch.Tensor

    @property
    def x_0(self) -> torch.Tensor:
        return self.xs[-1]


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction
) -> torch.Tensor:
    """log N(x; mean, std^2 I) reduced over every non-batch dim, ``(B,)``; 0 where std = 0.

    ``x``, ``mean`` ``(B, *D)``; ``std`` ``(B,)``, or ``(B, C)`` (one per channel, ``D = (C, ...)``,
    all positive). ``reduction`` ``sum`` is the exact density; ``mean`` divides by the dimension
    (the paper's image code), which rescales the gradient.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown log-prob reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    stochastic = std > 0 if std.dim() == 1 else (std > 0).all(1)  # (B,)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    shape = tuple(std.shape) + (1,) * (x.dim() - std.dim())  # (B, 1, ...) or (B, C, 1, ...)
    z = (x - mean) / safe_std.view(shape)  # (B, *D)
    per_dim = -0.5 * z.pow(2) - torch.log(safe_std).view(shape) - 0.5 * _LOG_2PI
    per_dim = per_dim.flatten(1)  # (B, D)
    reduced = per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)
    return torch.where(stochastic, reduced, torch.zeros_like(reduced))


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor, reduction: Reduction
) -> torch.Tensor:
    """KL(N(mean_p, std_p^2 I) || N(mean_q, std_q^2 I)) reduced like ``gaussian_log_prob``, ``(B,)``.

    Per dim: log(std_q / std_p) + (std_p^2 + (mean_p - mean_q)^2) / (2 std_q^2) - 1/2. ``mean_*``
    ``(B, *D)``; ``std_*`` ``(B,)`` or ``(B, C)``, positive (a deterministic step has no KL).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown log-prob reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")

    def spread(std: torch.Tensor) -> torch.Tensor:
        return std.view(tuple(std.shape) + (1,) * (mean_p.dim() - std.dim()))

    s_p, s_q = spread(std_p), spread(std_q)
    per_dim = torch.log(s_q / s_p) + (s_p.pow(2) + (mean_p - mean_q).pow(2)) / (2.0 * s_q.pow(2)) - 0.5
    per_dim = per_dim.expand_as(mean_p).flatten(1)  # (B, D)
    return per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)


def step_std(tables: StepTables, n: torch.Tensor, final_step_std: float) -> torch.Tensor:
    """The std ``(B,)`` of step n: sigma_n, floored to ``final_step_std`` where sigma_n = 0."""
    sigma = tables.sigma[n]
    return torch.where(sigma > 0, sigma, torch.full_like(sigma, final_step_std))


def policy_std(model: nn.Module, tables: StepTables, n: torch.Tensor, final_step_std: float) -> torch.Tensor:
    """The std of step n under ``model``: its learned std_n ``(B,)`` or ``(B, C)`` where it learns
    its variances (``final_step_std`` is then only their starting value), else ``step_std``."""
    learned = learned_log_std(model)
    if learned is None:
        return step_std(tables, n, final_step_std)
    log_std, floor = learned
    return floored_std(log_std[n], floor)


def trainable_steps(stds, final_step_std: float = 0.0) -> tuple[int, ...]:
    """Indices k of the steps with a stochastic transition (a density to train): std_k > 0, or
    every step once ``final_step_std`` floors the deterministic ones. ``stds`` ``(S,)``: a
    schedule's sigma, or the stds a block's steps used (floor applied: pass no floor)."""
    return tuple(k for k, s in enumerate(stds) if float(s) > 0 or final_step_std > 0)


def denoise_step(
    model: nn.Module,
    tables: StepTables,
    x_n: torch.Tensor,
    n: torch.Tensor,
    *,
    x_prev: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    final_step_std: float = 0.0,
    reduction: Reduction = "sum",
) -> StepOutput:
    """One step x_n -> x_{n-1} for a batch whose rows may sit at different n.

    ``x_n`` ``(B, *D)``; ``n`` ``(B,)`` long, values in 1..S. Without ``x_prev`` the step samples
    x_{n-1} = mean + std z with z the given ``noise`` ``(B, *D)`` or drawn from ``generator``
    (reparameterised: gradients flow through the mean when autograd is on, which pathwise SFT,
    Eq. 14, uses). With ``x_prev`` it scores the given action instead. ``log_prob`` is
    log pi(x_prev | x_n) either way.
    """
    if x_n.shape[0] != n.shape[0]:
        raise ValueError(f"x_n has batch {x_n.shape[0]} but n has {n.shape[0]} entries")
    shape = (-1,) + (1,) * (x_n.dim() - 1)
    eps = model(x_n, tables.tau[n])  # (B, *D)
    mean = tables.coef_x[n].view(shape) * x_n + tables.coef_eps[n].view(shape) * eps
    std = policy_std(model, tables, n, final_step_std)  # (B,) or (B, C)
    if x_prev is None:
        if noise is None:
            noise = torch.randn(x_n.shape, generator=generator, device=x_n.device, dtype=x_n.dtype)
        elif noise.shape != x_n.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_n.shape)}")
        x_prev = mean + std.view(tuple(std.shape) + (1,) * (x_n.dim() - std.dim())) * noise
    elif x_prev.shape != x_n.shape:
        raise ValueError(f"x_prev has shape {tuple(x_prev.shape)}, expected {tuple(x_n.shape)}")
    return StepOutput(
        x_prev=x_prev, mean=mean, std=std, log_prob=gaussian_log_prob(x_prev, mean, std, reduction)
    )


def rollout(
    model: nn.Module,
    tables: StepTables,
    x_start: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    final_step_std: float = 0.0,
    reduction: Reduction = "sum",
) -> Trajectory:
    """Run the whole chain from x_S = ``x_start`` ``(B, *D)``; returns every state and log-prob.

    Autograd follows the caller's mode: under ``torch.no_grad()`` it is a plain rollout; with
    grad enabled the chain is reparameterised end to end (pathwise SFT, Eq. 10-12).
    """
    num_steps = tables.num_steps
    batch = x_start.shape[0]
    xs = [x_start]
    log_probs, stds = [], []
    x = x_start
    for n_value in range(num_steps, 0, -1):
        n = torch.full((batch,), n_value, dtype=torch.long, device=x.device)
        out = denoise_step(
            model, tables, x, n, generator=generator, final_step_std=final_step_std, reduction=reduction
        )
        x = out.x_prev
        xs.append(x)
        log_probs.append(out.log_prob)
        stds.append(out.std[0].amin())  # per channel: 0 only where the step is deterministic
    return Trajectory(
        xs=torch.stack(xs),  # (S + 1, B, *D)
        log_probs=torch.stack(log_probs),  # (S, B)
        ns=torch.arange(num_steps, 0, -1, device=x_start.device),
        stds=torch.stack(stds),
    )


def sample(
    model: nn.Module,
    tables: StepTables,
    num_samples: int,
    data_shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 10_000,
    on_batch=None,
) -> torch.Tensor:
    """Draw ``(num_samples, *data_shape)`` samples x_0 with the evaluation chain (no std floor).

    ``on_batch(n)`` (optional) is called after each batch of n samples, e.g. to move a progress bar.
    """
    out = []
    for x in sample_batches(model, tables, num_samples, data_shape, generator=generator, device=device,
                            batch_size=batch_size):
        out.append(x)
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(out)


def sample_batches(
    model: nn.Module,
    tables: StepTables,
    num_samples: int,
    data_shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 10_000,
) -> Iterator[torch.Tensor]:
    """:func:`sample`'s draws one batch ``(<= batch_size, *data_shape)`` at a time, on ``device``
    (the same samples: the batches draw their noise from ``generator`` in turn), so a caller can
    use and drop each batch: at most one batch of samples is held."""
    with torch.no_grad():
        for start in range(0, num_samples, batch_size):
            size = min(batch_size, num_samples - start)
            x_start = torch.randn((size, *data_shape), generator=generator, device=device)
            yield rollout(model, tables, x_start, generator=generator).x_0
