"""The denoising MDP (the construction after the paper's Theorem 4.1).

State: ``{"x": x_n, "n": n}``; the chain starts at n = S with x_S ~ N(0, prior_std^2 I).
Action: the next state x_{n-1} itself (a Box of x's shape); the transition copies it and
decrements n. Reward: c(x_0) (the critic's value of the sample) at the terminal step n = 0, and
0 before. The horizon is fixed at S steps, so there is no TimeLimit.

``DenoisingChainEnv`` is the numpy single env (passes ``gymnasium.utils.env_checker.check_env``);
``DenoisingChainVectorEnv`` is the batched torch env that rollout workers drive on their device,
with tensors in and out (no host copies).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

DEFAULT_NUM_STEPS = 10
DEFAULT_DATA_SHAPE = (2,)


def squared_norm_reward(x: np.ndarray) -> float:
    """The default reward of a bare env: -|x_0|^2, a fixed stand-in for a trained critic."""
    return -float(np.sum(np.square(x)))


def squared_norm_reward_torch(x: torch.Tensor) -> torch.Tensor:
    """Batched ``-|x_0|^2`` ``(N, *D) -> (N,)``, the vector env's default reward."""
    return -x.flatten(1).pow(2).sum(1)


def _spaces(num_steps: int, data_shape: tuple[int, ...]) -> tuple[spaces.Dict, spaces.Box]:
    x_space = spaces.Box(-np.inf, np.inf, shape=data_shape, dtype=np.float32)
    observation = spaces.Dict({"x": x_space, "n": spaces.Discrete(num_steps + 1)})
    action = spaces.Box(-np.inf, np.inf, shape=data_shape, dtype=np.float32)
    return observation, action


def _check_config(num_steps: int, data_shape: tuple[int, ...], prior_std: float) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps (S) must be >= 1, got {num_steps}")
    if not data_shape or any(d < 1 for d in data_shape):
        raise ValueError(f"data_shape must be a non-empty tuple of positive sizes, got {data_shape}")
    if prior_std <= 0:
        raise ValueError(f"prior_std must be > 0, got {prior_std}")


class DenoisingChainEnv(gymnasium.Env):
    """One denoising chain, numpy. ``reset(options={"x": x_S})`` starts from a given state."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        num_steps: int = DEFAULT_NUM_STEPS,
        data_shape: tuple[int, ...] = DEFAULT_DATA_SHAPE,
        reward_fn: Callable[[np.ndarray], float] | None = None,
        prior_std: float = 1.0,
    ):
        data_shape = tuple(int(d) for d in data_shape)
        _check_config(num_steps, data_shape, prior_std)
        self.num_steps = num_steps
        self.data_shape = data_shape
        self.prior_std = prior_std
        self.reward_fn = reward_fn or squared_norm_reward
        self.observation_space, self.action_space = _spaces(num_steps, data_shape)
        self._x: np.ndarray | None = None
        self._n = 0

    def _obs(self) -> dict[str, Any]:
        assert self._x is not None, "reset() first"
        return {"x": self._x.copy(), "n": self._n}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "x" in options:
            x = np.asarray(options["x"], dtype=np.float32)
            if x.shape != self.data_shape:
                raise ValueError(f"options['x'] has shape {x.shape}, expected {self.data_shape}")
            self._x = x.copy()
        else:
            self._x = (self.prior_std * self.np_random.standard_normal(self.data_shape)).astype(np.float32)
        self._n = self.num_steps
        return self._obs(), {}

    def step(self, action):
        if self._x is None or self._n == 0:
            raise RuntimeError("the chain has ended (n = 0) or was never started: call reset()")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self.data_shape:
            raise ValueError(f"action has shape {action.shape}, expected {self.data_shape}")
        self._x = action.copy()
        self._n -= 1
        terminated = self._n == 0
        reward = float(self.reward_fn(self._x)) if terminated else 0.0
        return self._obs(), reward, terminated, False, {}


class DenoisingChainVectorEnv(VectorEnv):
    """``num_envs`` chains as torch tensors on ``device``; next-step autoreset.

    ``reset`` returns ``{"x": (N, *D) float32, "n": (N,) long}``; ``step(actions (N, *D))``
    returns ``(obs, rewards (N,), terminations (N,) bool, truncations (N,) bool, infos)``.
    All chains share the horizon, so they terminate together; the step after that resets them.
    ``reset(options={"x": x_S})`` starts from given states ``(N, *D)``.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 1,
        num_steps: int = DEFAULT_NUM_STEPS,
        data_shape: tuple[int, ...] = DEFAULT_DATA_SHAPE,
        reward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prior_std: float = 1.0,
        device: torch.device | str = "cpu",
    ):
        data_shape = tuple(int(d) for d in data_shape)
        _check_config(num_steps, data_shape, prior_std)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.data_shape = data_shape
        self.prior_std = prior_std
        self.device = torch.device(device)
        self.reward_fn = reward_fn or squared_norm_reward_torch
        self.single_observation_space, self.single_action_space = _spaces(num_steps, data_shape)
        self.observation_space = spaces.Dict(
            {
                "x": spaces.Box(-np.inf, np.inf, shape=(num_envs, *data_shape), dtype=np.float32),
                "n": spaces.MultiDiscrete(np.full(num_envs, num_steps + 1)),
            }
        )
        self.action_space = spaces.Box(-np.inf, np.inf, shape=(num_envs, *data_shape), dtype=np.float32)
        self._generator = torch.Generator(device=self.device)
        self._x = torch.zeros((num_envs, *data_shape), device=self.device)
        self._n = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._needs_reset = True

    def _obs(self) -> dict[str, torch.Tensor]:
        return {"x": self._x, "n": self._n}

    def _start(self, x: torch.Tensor | None) -> None:
        if x is None:
            x = self.prior_std * torch.randn(
                (self.num_envs, *self.data_shape), generator=self._generator, device=self.device
            )
        elif tuple(x.shape) != (self.num_envs, *self.data_shape):
            raise ValueError(
                f"options['x'] has shape {tuple(x.shape)}, expected {(self.num_envs, *self.data_shape)}"
            )
        self._x = x.to(self.device, torch.float32)
        self._n = torch.full((self.num_envs,), self.num_steps, dtype=torch.long, device=self.device)
        self._needs_reset = False

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if seed is not None:
            self._generator.manual_seed(int(seed if isinstance(seed, int) else seed[0]))
        x = torch.as_tensor(options["x"], device=self.device) if options and "x" in options else None
        self._start(x)
        return self._obs(), {}

    def step(self, actions: torch.Tensor):
        zeros = torch.zeros(self.num_envs, device=self.device)
        no = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        if self._needs_reset:  # next-step autoreset: this step's action is ignored
            self._start(None)
            return self._obs(), zeros, no, no.clone(), {}
        if tuple(actions.shape) != (self.num_envs, *self.data_shape):
            raise ValueError(
                f"actions have shape {tuple(actions.shape)}, expected {(self.num_envs, *self.data_shape)}"
            )
        self._x = actions.to(self.device, torch.float32)
        self._n = self._n - 1
        terminated = self._n == 0
        rewards = self.reward_fn(self._x) if bool(terminated.any()) else zeros
        rewards = torch.where(terminated, rewards, zeros)
        self._needs_reset = bool(terminated.all())
        return self._obs(), rewards, terminated, no.clone(), {}
