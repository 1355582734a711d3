"""CriticLearner: the critic c_alpha and the baseline V_omega, with a real-data source."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from sftrl.algos import losses
from sftrl.buffer import TrajectoryBlock
from sftrl.optim import gradient_step
from sftrl.weights import NumpyState, Weights, load_numpy_state, tensor_view, to_numpy_state

Regulariser = Literal["B", "GP"]
UPDATE_S = "update_s"  # seconds one update took (the trainer sums them: time/critic_s)
REGULARISERS: tuple[str, ...] = ("B", "GP")


class RealData(Protocol):
    """A source of real samples x ~ q_0."""

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch_size, *data_shape)`` float32 on CPU."""
        ...


class TensorData:
    """Real data held in memory as one tensor ``(N, *D)``; uniform sampling with replacement."""

    def __init__(self, data: np.ndarray | torch.Tensor):
        self.data = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if len(self.data) == 0:
            raise ValueError("the real-data set is empty")

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(self.data), (batch_size,), generator=generator)
        return self.data[index]


class CriticLearner:
    """One update of (alpha, omega) per trajectory block (Algorithm 1's critic phase).

    ``B`` (Eq. 23): critic and baseline maximise g - lambda R_B together.
    ``GP`` (Eq. 22): the critic maximises g - eta R_GP; the baseline fits c(x_0) by MSE.
    """

    def __init__(
        self,
        critic: nn.Module,
        baseline: nn.Module,
        real_data: RealData,
        *,
        regulariser: Regulariser,
        lam: float,
        gp_eta: float,
        critic_lr: float,
        baseline_lr: float,
        device: str = "cpu",
        seed: int = 0,
    ):
        if regulariser not in REGULARISERS:
            raise ValueError(f"unknown critic regulariser {regulariser!r}; valid: {', '.join(REGULARISERS)}")
        self.device = torch.device(device)
        self.critic = critic.to(self.device)
        self.baseline = baseline.to(self.device)
        self.real_data = real_data
        self.regulariser = regulariser
        self.lam = lam
        self.gp_eta = gp_eta
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic_lr, foreach=True)
        self.baseline_opt = torch.optim.Adam(self.baseline.parameters(), lr=baseline_lr, foreach=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0

    def update(self, blocks: Sequence[TrajectoryBlock]) -> list[dict[str, float]]:
        """One update per block; returns one metrics dict per update (with its ``update_s``)."""
        out = []
        for block in blocks:
            start = time.perf_counter()
            metrics = self._update_one(block)
            metrics[UPDATE_S] = time.perf_counter() - start
            out.append(metrics)
        return out

    def update_and_publish(self, *blocks: TrajectoryBlock) -> tuple[list[dict[str, float]], Weights]:
        """One critic phase, then the new weights: ``(metrics, get_weights())``. The blocks are
        separate arguments (Ray resolves each reference); as two return values of one Ray call,
        the weights reach the learner without a trip through the driver."""
        return self.update(blocks), self.get_weights()

    def _update_one(self, block: TrajectoryBlock) -> dict[str, float]:
        xs = tensor_view(block.xs, self.device)  # (S + 1, m, *D)
        num_steps, m = xs.shape[0] - 1, xs.shape[1]
        x_fake = xs[-1]
        x_real = self.real_data.sample(m, self.generator).to(self.device)
        c_fake, c_real = self.critic(x_fake), self.critic(x_real)  # (m,)
        ns = tensor_view(block.ns, self.device).repeat_interleave(m)  # (S * m,)
        values = self.baseline(xs[:-1].reshape(num_steps * m, *xs.shape[2:]), ns).view(num_steps, m)
        params = list(self.critic.parameters()) + list(self.baseline.parameters())
        if self.regulariser == "B":
            loss, metrics = losses.critic_baseline_loss(c_real, c_fake, values, self.lam)
            metrics |= gradient_step(loss, [self.critic_opt, self.baseline_opt], params, None)
        else:
            mix = torch.rand(m, generator=self.generator).to(self.device)
            penalty = losses.gradient_penalty(self.critic, x_fake, x_real, mix)
            critic_loss, metrics = losses.critic_gp_loss(c_real, c_fake, penalty, self.gp_eta)
            baseline_loss, baseline_metrics = losses.baseline_mse_loss(c_fake, values)
            # The two losses touch disjoint parameters, so one backward of their sum is exact.
            metrics |= baseline_metrics
            metrics |= gradient_step(critic_loss + baseline_loss, [self.critic_opt, self.baseline_opt], params, None)
        self.version += 1
        return metrics

    def get_weights(self) -> Weights:
        """``{"critic": ..., "baseline": ...}`` as numpy state dicts, with their version."""
        return Weights(self.version, {"critic": to_numpy_state(self.critic), "baseline": to_numpy_state(self.baseline)})

    def state_dict(self) -> dict:
        return {
            "critic": self.critic.state_dict(),
            "baseline": self.baseline.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "baseline_opt": self.baseline_opt.state_dict(),
            "generator": self.generator.get_state(),
            "version": self.version,
        }

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.baseline.load_state_dict(state["baseline"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.baseline_opt.load_state_dict(state["baseline_opt"])
        self.generator.set_state(state["generator"])
        self.version = state["version"]

    def load_weights(self, weights: dict[str, NumpyState]) -> None:
        load_numpy_state(self.critic, weights["critic"])
        load_numpy_state(self.baseline, weights["baseline"])
