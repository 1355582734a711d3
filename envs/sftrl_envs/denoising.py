"""The denoising MDP (the construction after the paper's Theorem 4.1).

State: ``{"x": x_n, "n": n}``; the chain starts at n = S with x_S ~ N(0, prior_std^2 I).
Action: the next state x_{n-1} itself (a Box of x's shape); the transition copies it and
decrements n. Reward: c(x_0) (the critic's value of the sample) at the terminal step n = 0, and
0 before. The horizon is fixed at S steps, so there is no TimeLimit.

``DenoisingChainEnv`` is the numpy single env (passes ``gymnasium.utils.env_checker.check_env``);
``DenoisingChainVectorEnv`` is the batched torch env that rollout workers drive on their device,
with tensors in and out: its observations, rewards and flags are ``torch.Tensor`` on
``env.device``, not numpy arrays (``observation_space`` gives their shapes, numpy-typed as
Gymnasium spaces are; ``OBSERVATION_DTYPES`` their torch dtypes).

Seeding follows Gymnasium: ``reset(seed=s)`` makes a chain's draws repeat; ``reset()`` keeps the
random stream, which is seeded from OS entropy on first use, so two unseeded envs differ. The
vector env keeps one stream per chain, as a ``SyncVectorEnv`` of single envs would:
``reset(seed=[s_0, ..., s_{N-1}])`` seeds chain i with s_i, ``reset(seed=s)`` with s + i, and
chain i then draws exactly what ``DenoisingChainEnv`` draws after ``reset(seed=s_i)``.

Rendering (``render_mode="rgb_array"``): ``render()`` is an ``(H, W, 3)`` uint8 picture of the
current states: for 2-D points (``data_shape == (2,)``) a scatter of the square
``[-RENDER_EXTENT, RENDER_EXTENT]^2`` prior standard deviations, for images ``(C, H, W)`` (C = 1
or 3, values in [-1, 1]) a grid of at most ``RENDER_MAX_IMAGES`` of them. The vector env draws all
its chains in one picture (Gymnasium's vector wrappers that expect one frame per sub-env, such as
``gymnasium.wrappers.vector.RecordVideo``, do not apply).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv

DEFAULT_NUM_STEPS = 10
DEFAULT_DATA_SHAPE = (2,)

RENDER_MODES = ["rgb_array"]
RENDER_FPS = 4  # a default 10-step chain plays in 2.5 s
RENDER_SIZE_PX = 256  # side of the square scatter picture of 2-D states
# Half-width of the scatter's square in prior standard deviations: 99.7% of x_S per coordinate;
# sftrl's 2-D data sets lie within about [-1, 1], inside it at prior_std = 1.
RENDER_EXTENT = 3.0
RENDER_DOT_PX = 3  # each point is a RENDER_DOT_PX x RENDER_DOT_PX square
RENDER_POINT_RGB = (31, 79, 216)  # sftrl.pictures.SAMPLES_COLOR, the samples' blue in run pictures
RENDER_AXIS_RGB = (210, 210, 210)  # light grey axes through the origin, the prior's mean
RENDER_MAX_IMAGES = 64  # an image picture shows the first 64 chains (an 8 x 8 grid)

# The vector env's observations as torch dtypes (the spaces' numpy dtypes are float32 and int64).
OBSERVATION_DTYPES: dict[str, torch.dtype] = {"x": torch.float32, "n": torch.int64}


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


def _drawable(data_shape: tuple[int, ...]) -> bool:
    return data_shape == (2,) or (len(data_shape) == 3 and data_shape[0] in (1, 3))


def _check_config(
    num_steps: int, data_shape: tuple[int, ...], prior_std: float, render_mode: str | None
) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps (S) must be >= 1, got {num_steps}")
    if not data_shape or any(d < 1 for d in data_shape):
        raise ValueError(f"data_shape must be a non-empty tuple of positive sizes, got {data_shape}")
    if prior_std <= 0:
        raise ValueError(f"prior_std must be > 0, got {prior_std}")
    if render_mode is not None and render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be None or one of {RENDER_MODES}, got {render_mode!r}")
    if render_mode is not None and not _drawable(data_shape):
        raise ValueError(
            f"render_mode={render_mode!r} draws 2-D points (data_shape (2,)) or images (C, H, W) "
            f"with C in (1, 3); data_shape {data_shape} is neither"
        )


def scatter_picture(points: np.ndarray, extent: float, size_px: int = RENDER_SIZE_PX) -> np.ndarray:
    """Points ``(N, 2)`` as an ``(size_px, size_px, 3)`` uint8 picture of the square
    ``[-extent, extent]^2`` (x to the right, y up): white, grey axes through the origin, each
    point a ``RENDER_DOT_PX`` square of ``RENDER_POINT_RGB``. A point outside the square is drawn
    on its border, so a diverging chain stays in view; NaN points are left out."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {points.shape}")
    picture = np.full((size_px, size_px, 3), 255, dtype=np.uint8)

    def pixel(u: np.ndarray) -> np.ndarray:  # [-extent, extent] -> {0 .. size_px - 1}
        scaled = np.rint((u + extent) / (2 * extent) * (size_px - 1))
        return np.clip(scaled, 0, size_px - 1).astype(np.int64)

    origin = int(pixel(np.zeros(1))[0])
    picture[size_px - 1 - origin, :] = RENDER_AXIS_RGB
    picture[:, origin] = RENDER_AXIS_RGB
    points = points[~np.isnan(points).any(axis=1)]
    cols, rows = pixel(points[:, 0]), size_px - 1 - pixel(points[:, 1])  # row 0 is the top
    half = RENDER_DOT_PX // 2
    for dr in range(-half, half + 1):
        for dc in range(-half, half + 1):
            picture[np.clip(rows + dr, 0, size_px - 1), np.clip(cols + dc, 0, size_px - 1)] = RENDER_POINT_RGB
    return picture


def image_picture(images: np.ndarray) -> np.ndarray:
    """Images ``(N, C, H, W)`` in [-1, 1] as one ``(height, width, 3)`` uint8 grid of the first
    ``RENDER_MAX_IMAGES`` (``sftrl.pictures.grid_array``, ceil(sqrt(N)) images per row)."""
    from sftrl.pictures import grid_array  # sftrl imports this package; import it when drawn

    images = images[:RENDER_MAX_IMAGES]
    grid = grid_array(images, nrow=math.ceil(math.sqrt(len(images))))
    return np.repeat(grid[:, :, None], 3, axis=2) if grid.ndim == 2 else grid


def states_picture(x: np.ndarray, prior_std: float) -> np.ndarray:
    """The ``render()`` picture of states ``(N, *D)``: a scatter for D = (2,), else an image grid."""
    if x.shape[1:] == (2,):
        return scatter_picture(x, RENDER_EXTENT * prior_std)
    return image_picture(x)


class DenoisingChainEnv(gymnasium.Env):
    """One denoising chain, numpy. ``reset(options={"x": x_S})`` starts from a given state.

    Observations are ``{"x": float32 array of shape data_shape, "n": int}``.
    """

    metadata = {"render_modes": RENDER_MODES, "render_fps": RENDER_FPS}

    def __init__(
        self,
        num_steps: int = DEFAULT_NUM_STEPS,
        data_shape: tuple[int, ...] = DEFAULT_DATA_SHAPE,
        reward_fn: Callable[[np.ndarray], float] | None = None,
        prior_std: float = 1.0,
        render_mode: str | None = None,
    ):
        data_shape = tuple(int(d) for d in data_shape)
        _check_config(num_steps, data_shape, prior_std, render_mode)
        self.num_steps = num_steps
        self.data_shape = data_shape
        self.prior_std = prior_std
        self.render_mode = render_mode
        self.reward_fn = reward_fn or squared_norm_reward
        self.observation_space, self.action_space = _spaces(num_steps, data_shape)
        self._x: np.ndarray | None = None
        self._n = 0

    def _obs(self) -> dict[str, Any]:
        assert self._x is not None, "reset() first"
        return {"x": self._x.copy(), "n": self._n}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)  # seed=None keeps np_random (seeded from entropy on first use)
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

    def render(self) -> np.ndarray | None:
        """The current state as an ``(H, W, 3)`` uint8 picture (see the module doc); ``None``
        with a warning when the env was made without a render mode, as Gymnasium's envs do."""
        if self.render_mode is None:
            gymnasium.logger.warn('render() without a render mode: make the env with render_mode="rgb_array"')
            return None
        if self._x is None:
            raise RuntimeError("render() before reset(): there is no state to draw yet")
        return states_picture(self._x[None], self.prior_std)


class DenoisingChainVectorEnv(VectorEnv):
    """``num_envs`` chains as torch tensors on ``device``; next-step autoreset.

    Observations are torch tensors on ``device``, not numpy arrays: ``reset`` returns
    ``{"x": (N, *D) float32, "n": (N,) int64}`` (``observation_space`` has these shapes,
    ``OBSERVATION_DTYPES`` these dtypes); ``step(actions)`` takes a ``(N, *D)`` tensor and returns
    ``(obs, rewards (N,) float32, terminations (N,) bool, truncations (N,) bool, infos)``.
    All chains share the horizon, so they terminate together; the step after that resets them.
    ``reset(options={"x": x_S})`` starts from given states ``(N, *D)``; without it, chain i draws
    x_S on the host from its own numpy stream ``np_randoms[i]`` (see the module doc on seeding),
    one copy to ``device`` per reset. That is Python work per chain (a few microseconds a draw,
    some tens to make a chain's stream when seeded), seconds for 65536 chains; rollout workers
    pass their own x_S and never draw here.
    """

    metadata = {
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": RENDER_MODES,
        "render_fps": RENDER_FPS,
    }
    observation_dtypes: ClassVar[dict[str, torch.dtype]] = OBSERVATION_DTYPES

    def __init__(
        self,
        num_envs: int = 1,
        num_steps: int = DEFAULT_NUM_STEPS,
        data_shape: tuple[int, ...] = DEFAULT_DATA_SHAPE,
        reward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prior_std: float = 1.0,
        device: torch.device | str = "cpu",
        render_mode: str | None = None,
    ):
        data_shape = tuple(int(d) for d in data_shape)
        _check_config(num_steps, data_shape, prior_std, render_mode)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.num_steps = num_steps
        self.data_shape = data_shape
        self.prior_std = prior_std
        self.device = torch.device(device)
        self.render_mode = render_mode
        self.reward_fn = reward_fn or squared_norm_reward_torch
        self.single_observation_space, self.single_action_space = _spaces(num_steps, data_shape)
        self.observation_space = spaces.Dict(
            {
                "x": spaces.Box(-np.inf, np.inf, shape=(num_envs, *data_shape), dtype=np.float32),
                "n": spaces.MultiDiscrete(np.full(num_envs, num_steps + 1)),
            }
        )
        self.action_space = spaces.Box(-np.inf, np.inf, shape=(num_envs, *data_shape), dtype=np.float32)
        self._np_randoms: list[np.random.Generator] | None = None  # one per chain, made on first use
        self._x = torch.zeros((num_envs, *data_shape), device=self.device)
        self._n = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self._started = False
        self._needs_reset = True

    @property
    def np_randoms(self) -> list[np.random.Generator]:
        """One numpy Generator per chain (``SyncVectorEnv.np_random``'s counterpart), seeded from
        OS entropy on first use when ``reset`` was given no seed."""
        if self._np_randoms is None:
            self._np_randoms = [seeding.np_random(None)[0] for _ in range(self.num_envs)]
        return self._np_randoms

    def _seed(self, seed: int | Sequence[int | None]) -> None:
        """Chain i gets seed s_i of a list, s + i of an int; a ``None`` entry keeps its stream."""
        if isinstance(seed, (int, np.integer)):
            seeds: list[int | None] = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = [None if s is None else int(s) for s in seed]
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset got {len(seeds)} seeds for num_envs={self.num_envs} chains (one each)")
        current: list[np.random.Generator | None] = (
            [None] * self.num_envs if self._np_randoms is None else list(self._np_randoms)
        )
        self._np_randoms = [
            seeding.np_random(s)[0] if s is not None or rng is None else rng for s, rng in zip(seeds, current)
        ]

    def _draw_prior(self) -> torch.Tensor:
        """x_S ``(N, *D)``: row i is what ``DenoisingChainEnv`` draws from chain i's stream."""
        z = np.stack([rng.standard_normal(self.data_shape) for rng in self.np_randoms])  # (N, *D) float64
        return torch.from_numpy((self.prior_std * z).astype(np.float32)).to(self.device)

    def _obs(self) -> dict[str, torch.Tensor]:
        return {"x": self._x, "n": self._n}

    def _start(self, x: torch.Tensor | None) -> None:
        if x is None:
            x = self._draw_prior()
        elif tuple(x.shape) != (self.num_envs, *self.data_shape):
            raise ValueError(
                f"options['x'] has shape {tuple(x.shape)}, expected {(self.num_envs, *self.data_shape)}"
            )
        self._x = x.to(self.device, torch.float32)
        self._n = torch.full((self.num_envs,), self.num_steps, dtype=torch.long, device=self.device)
        self._started = True
        self._needs_reset = False

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict | None = None
    ):
        """Start all chains at n = S; ``seed`` as in the module doc, ``options={"x": x_S}``."""
        if seed is not None:
            self._seed(seed)
        x = torch.as_tensor(options["x"], device=self.device) if options and "x" in options else None
        self._start(x)
        return self._obs(), {}

    def step(self, actions: torch.Tensor):
        if not isinstance(actions, torch.Tensor):
            raise TypeError(f"actions must be a torch.Tensor (N, *D), got {type(actions).__name__}")
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

    def render(self) -> np.ndarray | None:  # type: ignore[override]  # one picture of all chains, not one per chain
        """All chains' current states in one ``(H, W, 3)`` uint8 picture (see the module doc);
        ``None`` with a warning when the env was made without a render mode."""
        if self.render_mode is None:
            gymnasium.logger.warn('render() without a render mode: make the env with render_mode="rgb_array"')
            return None
        if not self._started:
            raise RuntimeError("render() before reset(): there is no state to draw yet")
        return states_picture(self._x.detach().cpu().numpy(), self.prior_std)
