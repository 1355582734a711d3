"""The paper's toy networks (Appendix F.1): sampler, critic and baseline MLPs for 2-D data.

The sampler and the baseline condition on the step through "conditional linear" layers: a linear
map whose output is multiplied, feature by feature, by a learned embedding of the step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STD_FLOOR = 1e-8  # input_stats: the smallest std a standardised critic divides by


class ConditionalLinear(nn.Module):
    """``linear(x) * embedding[step]``: ``x`` ``(B, in)``, ``step`` ``(B,)`` long -> ``(B, out)``."""

    def __init__(self, in_features: int, out_features: int, num_steps: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.embedding = nn.Embedding(num_steps, out_features)
        # Positive gains in [0, 1): every step starts as a scaled copy of the same layer.
        nn.init.uniform_(self.embedding.weight)

    def forward(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.embedding(step)


def _step_index(t: torch.Tensor) -> torch.Tensor:
    """Integer step index ``(B,)`` from a (possibly float) timestep tensor.

    Not range-checked here (that would sync a GPU every step): ``nn.Embedding`` rejects an
    out-of-range index itself, and the schedules only produce valid ones.
    """
    return torch.round(t).long()


class ToySampler(nn.Module):
    """eps_theta(x, t): 4-layer softplus MLP (dim -> h -> h -> h -> dim), conditional hidden layers.

    ``x`` ``(B, dim)``; ``t`` ``(B,)`` network timesteps 0..T-1 (float or long) -> ``(B, dim)``.
    """

    def __init__(self, num_train_steps: int, dim: int = 2, hidden: int = 128):
        super().__init__()
        self.num_train_steps = num_train_steps
        self.layers = nn.ModuleList(
            [
                ConditionalLinear(dim, hidden, num_train_steps),
                ConditionalLinear(hidden, hidden, num_train_steps),
                ConditionalLinear(hidden, hidden, num_train_steps),
            ]
        )
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = _step_index(t)
        h = x
        for layer in self.layers:
            h = F.softplus(layer(h, step))
        return self.out(h)


class ToyCritic(nn.Module):
    """c_alpha(x): ReLU MLP ``(B, dim) -> (B,)`` with ``len(hidden)`` hidden layers.

    With ``standardise`` it first maps x to (x - mean) / std, with the buffers ``input_mean`` and
    ``input_std`` ``(dim,)`` (identity until ``fit_input`` sets them from real data; they travel
    with the critic's weights and checkpoints). Without it the state dict has no such keys.
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, dim: int = 2, hidden: tuple[int, ...] = (256, 256), standardise: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.standardise = standardise
        if standardise:
            self.register_buffer("input_mean", torch.zeros(dim))
            self.register_buffer("input_std", torch.ones(dim))

    def fit_input(self, x: torch.Tensor) -> None:
        """Set the standardisation from real samples ``x`` ``(N, dim)``."""
        if not self.standardise:
            raise ValueError("this critic was built without input standardisation (model.critic_input: raw)")
        mean, std = input_stats(x.flatten(1))
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        if self.standardise:
            h = (h - self.input_mean) / self.input_std
        return self.net(h).squeeze(-1)


def input_stats(x: torch.Tensor, floor: float = STD_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std ``(D,)`` of samples ``x`` ``(N, D)``; the std floored at ``floor``
    (a constant coordinate would otherwise divide by 0)."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples of flat data (N, D) to standardise, got shape {tuple(x.shape)}")
    return x.mean(0), x.std(0).clamp_min(floor)


class ToyBaseline(nn.Module):
    """V_omega(x_n, n): ReLU MLP with per-step conditional layers; ``(B, dim), (B,) -> (B,)``.

    ``n`` is the sampling step 1..S (the state x_n the value is estimated at).
    """

    def __init__(self, num_steps: int, dim: int = 2, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.num_steps = num_steps
        widths = (dim, *hidden)
        self.layers = nn.ModuleList(
            [ConditionalLinear(a, b, num_steps + 1) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.out = nn.Linear(widths[-1], 1)

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        step = _step_index(n)
        h = x.flatten(1)
        for layer in self.layers:
            h = F.relu(layer(h, step))
        return self.out(h).squeeze(-1)
