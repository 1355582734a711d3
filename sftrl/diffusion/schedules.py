"""Sampling schedules: frozen tables of the one Gaussian step (paper Eq. 3 and 11).

Every sampler is the same step with different tables::

    x_{n-1} = coef_x[n] * x_n + coef_eps[n] * eps_theta(x_n, tau[n]) + sigma[n] * z

Code name         -> paper / FastDPM symbol
``n``             -> sampling step n = S..1 (x_n -> x_{n-1}; x_0 is the sample)
``tau``           -> tau_n, the network timestep fed to eps_theta (may be fractional)
``gamma_bar``     -> gamma-bar_n, alpha-bar at step n
``gamma_bar_next``-> gamma-bar_{n-1} (1 at n = 1)
``sigma``         -> sigma_n, the step's noise std (the policy's fixed std)
``kappa``         -> FastDPM's eta (kappa = 1: DDPM-like stochastic steps)

A published name never changes meaning; a new variant gets a new name. Tables are float64 numpy
arrays in sampling order (entry 0 is the noisiest step, n = S).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from sftrl.diffusion.betas import alphas_cumprod, log_alpha_bar_continuous, make_betas

ScheduleName = Literal["ddpm", "strided", "fastdpm-var-linear", "fastdpm-var-quadratic", "ddim"]
VarianceName = Literal["beta", "posterior"]

# FastDPM's bisections stop once the value lies within this relative distance above the target:
# 1e-4 for the VAR end-beta x (on prod(1 - beta_n)), 1e-8 for the continuous timestep tau (on
# log alpha-bar). A 1e-4 stop for tau would leave it 0.015-0.027 low (616.719 for 616.734).
FASTDPM_BETA_RTOL = 1e-4
FASTDPM_TAU_RTOL = 1e-8
# FastDPM's VAR domains: linear end-beta in (beta_1, 0.99); quadratic x in (0, 0.95 / (sqrt(beta_1) S)).
FASTDPM_LINEAR_MAX_BETA = 0.99
FASTDPM_QUADRATIC_MAX_BETA = 0.95


@dataclasses.dataclass(frozen=True, eq=False)
class SamplingSchedule:
    """One sampler as a table; arrays ``(S,)`` in sampling order (index 0 is n = S)."""

    name: str
    num_train_steps: int  # T of the base DDPM
    n: np.ndarray
    tau: np.ndarray
    gamma_bar: np.ndarray
    gamma_bar_next: np.ndarray
    sigma: np.ndarray
    coef_x: np.ndarray
    coef_eps: np.ndarray

    @property
    def num_steps(self) -> int:
        """S, the number of sampling steps."""
        return len(self.n)

    def rows(self) -> list[dict[str, float]]:
        """The table as dicts in sampling order (the ``sftrl schedule --json`` view)."""
        return [
            {
                "n": int(self.n[i]),
                "tau": float(self.tau[i]),
                "gamma_bar": float(self.gamma_bar[i]),
                "gamma_bar_next": float(self.gamma_bar_next[i]),
                "sigma": float(self.sigma[i]),
                "coef_x": float(self.coef_x[i]),
                "coef_eps": float(self.coef_eps[i]),
            }
            for i in range(self.num_steps)
        ]

    def tables(self, device: torch.device | str = "cpu", dtype=torch.float32) -> StepTables:
        """Torch tables indexed by n directly (entry 0 unused), for per-sample gathers."""
        order = np.argsort(self.n)  # n = 1..S

        def col(values: np.ndarray) -> torch.Tensor:
            padded = np.concatenate([[np.nan], values[order]])
            return torch.as_tensor(padded, dtype=dtype, device=device)

        return StepTables(
            num_steps=self.num_steps,
            tau=col(self.tau),
            sigma=col(self.sigma),
            coef_x=col(self.coef_x),
            coef_eps=col(self.coef_eps),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class StepTables:
    """A schedule's step coefficients as tensors ``(S + 1,)`` indexed by n (index 0 unused)."""

    num_steps: int
    tau: torch.Tensor
    sigma: torch.Tensor
    coef_x: torch.Tensor
    coef_eps: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Step coefficients (pure functions of gamma-bar values)


def ddpm_coefficients(
    gamma_bar: np.ndarray, gamma_bar_next: np.ndarray, variance: VarianceName
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coef_x, coef_eps, sigma) of the DDPM step between two noise levels (paper Eq. 2-3).

    With the step's beta = 1 - gamma_bar / gamma_bar_next, the mean is
    (x_n - beta / sqrt(1 - gamma_bar) eps) / sqrt(1 - beta); the variance is beta or the
    posterior variance beta~ = beta (1 - gamma_bar_next) / (1 - gamma_bar) (Eq. 2).
    """
    beta = 1.0 - gamma_bar / gamma_bar_next
    coef_x = 1.0 / np.sqrt(1.0 - beta)
    coef_eps = -beta / (np.sqrt(1.0 - beta) * np.sqrt(1.0 - gamma_bar))
    if variance == "beta":
        sigma = np.sqrt(beta)
    elif variance == "posterior":
        sigma = np.sqrt(beta * (1.0 - gamma_bar_next) / (1.0 - gamma_bar))
    else:
        raise ValueError(f"unknown variance {variance!r}; valid: beta, posterior")
    return coef_x, coef_eps, sigma


def ddim_coefficients(
    gamma_bar: np.ndarray, gamma_bar_next: np.ndarray, eta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coef_x, coef_eps, sigma) of the generalised DDIM step with noise scale eta (kappa).

    sigma = eta sqrt((1 - gb') / (1 - gb) (1 - gb / gb')), coef_x = sqrt(gb' / gb),
    coef_eps = sqrt(1 - gb' - sigma^2) - sqrt(1 - gb) sqrt(gb' / gb), gb' = gamma_bar_next.
    eta = 0 is the deterministic DDIM step; eta = 1 gives the DDPM posterior step.
    """
    ratio = gamma_bar_next / gamma_bar
    sigma = eta * np.sqrt((1.0 - gamma_bar_next) / (1.0 - gamma_bar) * (1.0 - 1.0 / ratio))
    coef_x = np.sqrt(ratio)
    coef_eps = np.sqrt(np.maximum(1.0 - gamma_bar_next - sigma**2, 0.0)) - np.sqrt(
        1.0 - gamma_bar
    ) * np.sqrt(ratio)
    return coef_x, coef_eps, sigma


# ---------------------------------------------------------------------------------------------
# FastDPM's VAR construction (Kong & Ping 2021)


def bisect_decreasing(
    f: Callable[[float], float], lo: float, hi: float, target: float, rtol: float
) -> float:
    """x in [lo, hi] with ``target <= f(x) <= target + rtol |target|`` for a decreasing f.

    FastDPM's stopping rule. When no x in the domain reaches the target the search walks to the
    domain's edge and stops there (the saturation of the quadratic schedule at S = 10).
    """
    x = 0.5 * (lo + hi)
    while True:
        x = 0.5 * (lo + hi)
        if x in (lo, hi):  # no float left between the ends: the edge of the domain
            return x
        value = f(x)
        if value < target:
            hi = x
        elif value > target + rtol * abs(target):
            lo = x
        else:
            return x


def fastdpm_var_betas(
    kind: Literal["linear", "quadratic"], num_steps: int, beta_start: float, alpha_bar_T: float
) -> np.ndarray:
    """FastDPM's VAR sub-betas ``(S,)``, n = 1..S, bisected so that prod(1 - beta_n) -> alpha-bar_T."""
    steps = np.arange(num_steps, dtype=np.float64)
    if kind == "linear":

        def sub_betas(x: float) -> np.ndarray:
            return np.linspace(beta_start, x, num_steps, dtype=np.float64)

        lo, hi = beta_start, FASTDPM_LINEAR_MAX_BETA
    elif kind == "quadratic":

        def sub_betas(x: float) -> np.ndarray:
            return beta_start * (1.0 + steps * x) ** 2

        lo, hi = 0.0, FASTDPM_QUADRATIC_MAX_BETA / (math.sqrt(beta_start) * num_steps)
    else:
        raise ValueError(f"unknown FastDPM VAR kind {kind!r}; valid: linear, quadratic")
    x = bisect_decreasing(
        lambda v: float(np.prod(1.0 - sub_betas(v))), lo, hi, alpha_bar_T, FASTDPM_BETA_RTOL
    )
    return sub_betas(x)


def continuous_timestep(
    gamma_bar: float, base_alphas_cumprod: np.ndarray, beta_start: float, beta_end: float
) -> float:
    """tau with alpha-bar(tau) = gamma_bar on the continuous extension of linear betas.

    Bisection inside the integer bracket [i, i + 1] with alpha-bar[i] >= gamma_bar > alpha-bar[i+1];
    a gamma_bar at or below alpha-bar_T maps to T - 1, as in FastDPM. float64 throughout.
    """
    num_train_steps = len(base_alphas_cumprod)
    brackets = np.nonzero(
        (base_alphas_cumprod[:-1] >= gamma_bar) & (gamma_bar > base_alphas_cumprod[1:])
    )[0]
    if len(brackets) == 0:
        return float(num_train_steps - 1)
    i = float(brackets[0])
    return bisect_decreasing(
        lambda t: log_alpha_bar_continuous(t, beta_start, beta_end, num_train_steps),
        i,
        i + 1.0,
        math.log(gamma_bar),
        FASTDPM_TAU_RTOL,
    )


# ---------------------------------------------------------------------------------------------
# Named schedules


def _uniform_timesteps(num_steps: int, num_train_steps: int) -> np.ndarray:
    """DDIM's uniform skip: tau = 0, k, 2k, ... with k = T // S, for n = 1..S."""
    skip = num_train_steps // num_steps
    return np.arange(num_steps, dtype=np.float64) * skip


def _from_levels(
    name: str,
    num_train_steps: int,
    tau: np.ndarray,
    gamma_bar: np.ndarray,
    coefficients: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> SamplingSchedule:
    """Build the table from per-n noise levels given for n = 1..S (least noisy first)."""
    gamma_bar_next = np.concatenate([[1.0], gamma_bar[:-1]])
    coef_x, coef_eps, sigma = coefficients(gamma_bar, gamma_bar_next)
    n = np.arange(1, len(tau) + 1)
    flip = slice(None, None, -1)  # store in sampling order: n = S first
    return SamplingSchedule(
        name=name,
        num_train_steps=num_train_steps,
        n=n[flip].copy(),
        tau=tau[flip].copy(),
        gamma_bar=gamma_bar[flip].copy(),
        gamma_bar_next=gamma_bar_next[flip].copy(),
        sigma=sigma[flip].copy(),
        coef_x=coef_x[flip].copy(),
        coef_eps=coef_eps[flip].copy(),
    )


def make_schedule(
    name: str,
    num_steps: int,
    *,
    num_train_steps: int = 1000,
    beta_schedule: str = "linear",
    kappa: float = 1.0,
    variance: VarianceName = "beta",
) -> SamplingSchedule:
    """The named sampling schedule with S = ``num_steps`` steps of a T = ``num_train_steps`` DDPM.

    ``ddpm``: all T steps (S must equal T), variance ``beta`` or ``posterior``.
    ``strided``: S uniformly spaced timesteps (tau = 0, k, 2k, .. with k = T // S), DDPM steps
    between them ("naive DDPM sub-sampling").
    ``fastdpm-var-linear`` / ``fastdpm-var-quadratic``: FastDPM's VAR schedules, DDIM-style steps
    with eta = kappa (needs linear base betas).
    ``ddim``: the deterministic DDIM step on the uniform timesteps (comparison only).
    """
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown sampling schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(
            f"steps must be between 1 and T = {num_train_steps} for schedule {name!r}, got {num_steps}"
        )
    if name == "ddpm" and num_steps != num_train_steps:
        raise ValueError(
            f"schedule 'ddpm' runs all T = {num_train_steps} steps, got steps = {num_steps}; "
            "use 'strided' or a FastDPM schedule for fewer steps"
        )
    betas = make_betas(beta_schedule, num_train_steps)
    base = alphas_cumprod(betas)

    if name in ("ddpm", "strided"):
        tau = _uniform_timesteps(num_steps, num_train_steps)
        return _from_levels(
            name,
            num_train_steps,
            tau,
            base[tau.astype(int)],
            lambda gb, gbn: ddpm_coefficients(gb, gbn, variance),
        )
    if name == "ddim":
        tau = _uniform_timesteps(num_steps, num_train_steps)
        return _from_levels(
            name, num_train_steps, tau, base[tau.astype(int)], lambda gb, gbn: ddim_coefficients(gb, gbn, 0.0)
        )
    # FastDPM VAR
    if beta_schedule != "linear":
        raise ValueError(
            f"schedule {name!r} needs the 'linear' base beta schedule (its timestep search "
            f"extends linear betas to real t), got {beta_schedule!r}"
        )
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0 for schedule {name!r}, got {kappa}")
    kind: Literal["linear", "quadratic"] = "linear" if name == "fastdpm-var-linear" else "quadratic"
    sub_betas = fastdpm_var_betas(kind, num_steps, float(betas[0]), float(base[-1]))
    gamma_bar = np.cumprod(1.0 - sub_betas)
    tau = np.array(
        [continuous_timestep(g, base, float(betas[0]), float(betas[-1])) for g in gamma_bar]
    )
    return _from_levels(
        name, num_train_steps, tau, gamma_bar, lambda gb, gbn: ddim_coefficients(gb, gbn, kappa)
    )


SCHEDULE_NAMES: tuple[str, ...] = (
    "ddpm",
    "strided",
    "fastdpm-var-linear",
    "fastdpm-var-quadratic",
    "ddim",
)
