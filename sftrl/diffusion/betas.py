"""Base DDPM noise schedules (the forward process, paper Eq. 1).

Code name          -> paper symbol
``betas[t]``       -> beta_{t+1}            (0-indexed network timestep t = 0..T-1)
``alphas[t]``      -> alpha_{t+1} = 1 - beta_{t+1}
``alphas_cumprod`` -> alpha-bar_{t+1} = prod_{s<=t+1} alpha_s

All tables are float64 numpy arrays: the FastDPM timestep search needs float64 (in float32 it
lands about half a step off), and they are small.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

BetaScheduleName = Literal["linear", "sigmoid"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "sigmoid")

# Ho et al. (2020): linear betas from 1e-4 to 0.02 over T = 1000 steps.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
# The SFT-PG toy DDPM: sigmoid(linspace(-6, 6, T)) scaled to [1e-5, 1e-2], the same endpoints for
# every T, so T = 10 leaves alpha-bar_T = 0.95 (the prior mismatch of the paper's "Case 1").
SIGMOID_BETA_START = 1e-5
SIGMOID_BETA_END = 1e-2


def make_betas(name: str, num_steps: int) -> np.ndarray:
    """Base betas ``(T,)`` for the named schedule: ``linear`` (Ho et al.) or ``sigmoid`` (the toy one)."""
    if num_steps < 1:
        raise ValueError(f"the number of diffusion steps T must be >= 1, got {num_steps}")
    if name == "linear":
        return np.linspace(LINEAR_BETA_START, LINEAR_BETA_END, num_steps, dtype=np.float64)
    if name == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_steps, dtype=np.float64)))
        return s * (SIGMOID_BETA_END - SIGMOID_BETA_START) + SIGMOID_BETA_START
    raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha-bar ``(T,)``: ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``."""
    return np.cumprod(1.0 - betas)


def log_alpha_bar_continuous(t: float, beta_start: float, beta_end: float, num_steps: int) -> float:
    """log alpha-bar extended to real t for *linear* betas (FastDPM's continuous noise level).

    With beta_s = beta_start + s d, d = (beta_end - beta_start) / (T - 1), we have
    1 - beta_s = d (c - s), c = (1 - beta_start) / d, hence
    alpha-bar(t) = prod_{s=0..t} d (c - s) = d^{t+1} Gamma(c + 1) / Gamma(c - t),
    which is exact at integer t and smooth in between.
    """
    d = (beta_end - beta_start) / (num_steps - 1)
    c = (1.0 - beta_start) / d
    return (t + 1.0) * math.log(d) + math.lgamma(c + 1.0) - math.lgamma(c - t)
