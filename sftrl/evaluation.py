"""Evaluation of a sampler: SW2 (Table 1's "W2") with its noise floor, and exact W2, for 2-D data."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from sftrl.diffusion.schedules import SamplingSchedule
from sftrl.diffusion.step import sample
from sftrl.metrics.wasserstein import exact_w2, sw2_report
from sftrl.weights import NumpyState, load_numpy_state


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    num_samples: int = 10_000
    draws: int = 5
    exact_w2_points: int = 2000
    seed: int = 0


class ToyEvaluator:
    """Scores sampler weights against fresh draws of the real distribution.

    SW2 is the mean and spread over ``draws`` independent (samples, data) pairs, with the
    data-vs-data floor measured the same way beside it: at 10K points the floor (about 0.7e-2
    for swiss roll) is as large as the paper's best number.
    """

    def __init__(self, sampler: nn.Module, schedule: SamplingSchedule, data_fn, data_shape, settings: EvalSettings):
        self.sampler = sampler.eval()
        self.tables = schedule.tables("cpu")
        self.data_fn = data_fn
        self.data_shape = tuple(data_shape)
        self.settings = settings

    def sample(self, weights: NumpyState | None, n: int, seed: int) -> np.ndarray:
        if weights is not None:
            load_numpy_state(self.sampler, weights)
        generator = torch.Generator().manual_seed(seed)
        return sample(self.sampler, self.tables, n, self.data_shape, generator=generator).numpy()

    def evaluate(self, weights: NumpyState | None) -> dict[str, float]:
        """``{"sw2_mean", "sw2_std", "sw2_min", "sw2_max", "sw2_floor_mean", "sw2_floor_std", "exact_w2"}``."""
        s = self.settings
        if weights is not None:
            load_numpy_state(self.sampler, weights)
        report = sw2_report(
            lambda n, seed: self.sample(None, n, seed),
            self.data_fn,
            n=s.num_samples,
            draws=s.draws,
            seed=s.seed,
        )
        out = {
            "sw2_mean": report.mean,
            "sw2_std": report.std,
            "sw2_min": report.min,
            "sw2_max": report.max,
            "sw2_floor_mean": report.floor_mean,
            "sw2_floor_std": report.floor_std,
        }
        if s.exact_w2_points:
            fake = self.sample(None, s.exact_w2_points, s.seed + 7919)
            real = self.data_fn(s.exact_w2_points, s.seed + 104729)
            out["exact_w2"] = exact_w2(fake, real, max_points=s.exact_w2_points, seed=s.seed)
        return out


def build_evaluator(cfg, init):
    """The evaluator for ``cfg``'s data (None where no metric is configured)."""
    from sftrl.components import schedule_of
    from sftrl.data import fresh_data_fn
    from sftrl.models import build_networks

    if not cfg.is_toy:
        return None
    sampler, _, _ = build_networks(cfg, init.data_shape)
    t = cfg.trainer
    settings = EvalSettings(t.eval_samples, t.eval_draws, t.exact_w2_points, seed=cfg.seed + 12345)
    return ToyEvaluator(sampler, schedule_of(cfg), fresh_data_fn(cfg), init.data_shape, settings)
