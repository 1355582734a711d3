"""Learner: the sampler's optimiser and a pluggable policy-gradient algorithm."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sftrl.algos.base import PolicyAlgorithm, PolicyContext
from sftrl.buffer import TransitionBatch
from sftrl.diffusion.schedules import SamplingSchedule
from sftrl.diffusion.step import Reduction
from sftrl.weights import NumpyState, load_numpy_state, to_numpy_state


def _frozen(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Learner:
    """Owns theta. ``update_policy`` runs one generator phase and bumps the weights version."""

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module,
        baseline: nn.Module,
        schedule: SamplingSchedule,
        algorithm: PolicyAlgorithm,
        *,
        lr: float,
        max_grad_norm: float | None,
        batch_size: int,
        n_generator: int,
        final_step_std: float,
        reduction: Reduction,
        data_shape: tuple[int, ...],
        device: str = "cpu",
        seed: int = 0,
        lr_decay_phases: int | None = None,
    ):
        self.device = torch.device(device)
        # Eval mode: dropout would make the re-scored log-prob differ from the rollout's (the
        # ratio must be exactly 1 before an update); gradients flow all the same.
        self.policy = policy.to(self.device).eval()
        self.algorithm = algorithm
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        # Linear decay to 0 over ``lr_decay_phases`` generator phases (None: constant, the paper).
        self.lr_schedule = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda phase: max(0.0, 1.0 - phase / lr_decay_phases))
            if lr_decay_phases
            else None
        )
        self.ctx = PolicyContext(
            policy=self.policy,
            optimizer=self.optimizer,
            critic=_frozen(critic).to(self.device),
            baseline=_frozen(baseline).to(self.device),
            tables=schedule.tables(self.device),
            final_step_std=final_step_std,
            reduction=reduction,
            max_grad_norm=max_grad_norm,
            batch_size=batch_size,
            n_generator=n_generator,
            data_shape=tuple(data_shape),
            generator=torch.Generator(device=self.device).manual_seed(seed),
            device=self.device,
        )
        self.version = 0
        self.critic_version = -1

    def get_weights(self) -> tuple[int, NumpyState]:
        """``(version, policy state)`` as numpy arrays."""
        return self.version, to_numpy_state(self.policy)

    def set_critic_weights(self, version: int, states: dict[str, NumpyState]) -> None:
        if version != self.critic_version:
            load_numpy_state(self.ctx.critic, states["critic"])
            load_numpy_state(self.ctx.baseline, states["baseline"])
            self.critic_version = version

    def update_policy(
        self, data: TransitionBatch | None, critic_weights: tuple[int, dict[str, NumpyState]]
    ) -> list[dict[str, float]]:
        """One generator phase with the given critic version; returns per-step metrics."""
        self.set_critic_weights(*critic_weights)
        metrics = self.algorithm.update(self.ctx, data)
        self.version += 1
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        return metrics

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.ctx.generator.get_state(),
            "version": self.version,
            "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule is not None else {},
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ctx.generator.set_state(state["generator"])
        self.version = state["version"]
        if self.lr_schedule is not None and state.get("lr_schedule"):
            self.lr_schedule.load_state_dict(state["lr_schedule"])
