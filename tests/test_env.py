"""The denoising MDP as Gymnasium envs: checker, registration, vector env vs single envs."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import sftrl  # noqa: F401  (registers the env)
from sftrl_envs import ENV_ID, DenoisingChainEnv, DenoisingChainVectorEnv


def test_single_env_passes_the_gymnasium_checker():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checker warns about unbounded Boxes: x is unbounded
        check_env(DenoisingChainEnv(num_steps=4, data_shape=(3,)), skip_render_check=True)


def test_make_with_defaults_is_a_small_2d_chain():
    env = gymnasium.make(ENV_ID)
    obs, _ = env.reset(seed=0)
    assert obs["x"].shape == (2,) and obs["n"] == 10
    assert env.spec.max_episode_steps is None  # fixed horizon, no TimeLimit
    total_steps, terminated = 0, False
    while not terminated:
        obs, reward, terminated, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
        total_steps += 1
        assert not truncated
        if not terminated:
            assert reward == 0.0
    assert total_steps == 10 and obs["n"] == 0
    assert reward == 0.0  # default reward -|x_0|^2 at x_0 = 0


def test_reward_is_paid_once_at_the_terminal_step():
    env = DenoisingChainEnv(num_steps=3, reward_fn=lambda x: float(x.sum()))
    env.reset(seed=1)
    rewards = [env.step(np.array([1.0, 2.0], dtype=np.float32))[1] for _ in range(3)]
    assert rewards == [0.0, 0.0, 3.0]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(2, dtype=np.float32))


def test_make_vec_uses_the_torch_vector_env():
    env = gymnasium.make_vec(ENV_ID, num_envs=5, vectorization_mode="vector_entry_point", num_steps=3)
    assert isinstance(env.unwrapped, DenoisingChainVectorEnv)
    obs, _ = env.reset(seed=0)
    assert isinstance(obs["x"], torch.Tensor) and obs["x"].shape == (5, 2)
    assert torch.equal(obs["n"], torch.full((5,), 3))


def test_vector_env_agrees_with_single_envs_step_by_step():
    num_envs, num_steps, shape = 4, 5, (2,)

    def reward_np(x):
        return float(np.sin(x).sum())

    def reward_torch(x):
        return torch.sin(x).flatten(1).sum(1)

    vec = DenoisingChainVectorEnv(num_envs=num_envs, num_steps=num_steps, data_shape=shape, reward_fn=reward_torch)
    singles = [DenoisingChainEnv(num_steps=num_steps, data_shape=shape, reward_fn=reward_np) for _ in range(num_envs)]
    rng = np.random.default_rng(0)
    x_start = rng.standard_normal((num_envs, *shape)).astype(np.float32)
    vec_obs, _ = vec.reset(options={"x": torch.from_numpy(x_start)})
    single_obs = [env.reset(options={"x": x_start[i]})[0] for i, env in enumerate(singles)]
    for _ in range(num_steps):
        np.testing.assert_array_equal(vec_obs["x"].numpy(), np.stack([o["x"] for o in single_obs]))
        assert vec_obs["n"].tolist() == [o["n"] for o in single_obs]
        actions = rng.standard_normal((num_envs, *shape)).astype(np.float32)
        vec_obs, vec_rew, vec_term, vec_trunc, _ = vec.step(torch.from_numpy(actions))
        results = [env.step(actions[i]) for i, env in enumerate(singles)]
        single_obs = [r[0] for r in results]
        np.testing.assert_allclose(vec_rew.numpy(), [r[1] for r in results], rtol=1e-6, atol=1e-7)
        assert vec_term.tolist() == [r[2] for r in results]
        assert vec_trunc.tolist() == [r[3] for r in results]
    assert bool(vec_term.all())
    # next-step autoreset: the following step starts new chains at n = S and pays nothing
    obs, rew, term, _, _ = vec.step(torch.zeros(num_envs, *shape))
    assert obs["n"].tolist() == [num_steps] * num_envs and not bool(term.any()) and float(rew.abs().sum()) == 0.0


def test_bad_env_arguments_are_named():
    with pytest.raises(ValueError, match="num_steps"):
        DenoisingChainEnv(num_steps=0)
    with pytest.raises(ValueError, match="prior_std"):
        DenoisingChainVectorEnv(prior_std=0.0)
    env = DenoisingChainVectorEnv(num_envs=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="actions have shape"):
        env.step(torch.zeros(3, 2))
