"""Gymnasium conventions of the denoising-chain envs: render modes, seeding, torch observations."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import sftrl  # noqa: F401  (registers the env)
from sftrl.pictures import grid_array
from sftrl_envs import ENV_ID, OBSERVATION_DTYPES, DenoisingChainEnv, DenoisingChainVectorEnv
from sftrl_envs.denoising import (
    RENDER_AXIS_RGB,
    RENDER_EXTENT,
    RENDER_POINT_RGB,
    RENDER_SIZE_PX,
    scatter_picture,
)

CENTER_ROW, CENTER_COL = 127, 128  # where (0, 0) lands: rint(127.5) = 128, rows counted from the top


def make_vec(num_envs: int, **kwargs) -> DenoisingChainVectorEnv:
    env = gymnasium.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="vector_entry_point", **kwargs)
    return env.unwrapped


def rgb(picture: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    return tuple(int(v) for v in picture[row, col])


# -- render modes ---------------------------------------------------------------------------


def test_make_with_rgb_array_draws_the_current_point():
    env = gymnasium.make(ENV_ID, render_mode="rgb_array")
    assert env.render_mode == "rgb_array"
    env.reset(seed=0, options={"x": np.zeros(2, dtype=np.float32)})
    picture = env.render()
    assert picture.shape == (RENDER_SIZE_PX, RENDER_SIZE_PX, 3) and picture.dtype == np.uint8
    assert rgb(picture, CENTER_ROW, CENTER_COL) == RENDER_POINT_RGB
    corner = RENDER_EXTENT  # prior_std = 1: the top-right corner of the picture
    env.step(np.array([corner, corner], dtype=np.float32))
    picture = env.render()
    assert rgb(picture, 0, RENDER_SIZE_PX - 1) == RENDER_POINT_RGB
    assert rgb(picture, CENTER_ROW, CENTER_COL) == RENDER_AXIS_RGB  # the point has moved away
    assert int((picture != 255).any(axis=2).sum()) == 2 * RENDER_SIZE_PX - 1 + 4  # axes + a clipped 2x2 dot


def test_make_vec_with_rgb_array_draws_every_chain_in_one_picture():
    env = make_vec(3, render_mode="rgb_array", prior_std=2.0)
    assert env.render_mode == "rgb_array"
    extent = RENDER_EXTENT * 2.0
    x = torch.tensor([[0.0, 0.0], [-extent, -extent], [extent, 0.0]])
    env.reset(options={"x": x})
    picture = env.render()
    assert picture.shape == (RENDER_SIZE_PX, RENDER_SIZE_PX, 3) and picture.dtype == np.uint8
    last = RENDER_SIZE_PX - 1
    for row, col in [(CENTER_ROW, CENTER_COL), (last, 0), (CENTER_ROW, last)]:
        assert rgb(picture, row, col) == RENDER_POINT_RGB, (row, col)
    np.testing.assert_array_equal(picture, scatter_picture(x.numpy(), extent))


def test_scatter_puts_y_up_and_keeps_far_points_on_the_border():
    picture = scatter_picture(np.array([[0.0, 1.0], [100.0, np.inf], [np.nan, 0.0]]), extent=2.0)
    up = round((1.0 + 2.0) / 4.0 * (RENDER_SIZE_PX - 1))  # column-index scale, counted from the bottom
    assert rgb(picture, RENDER_SIZE_PX - 1 - up, CENTER_COL) == RENDER_POINT_RGB
    assert rgb(picture, 0, RENDER_SIZE_PX - 1) == RENDER_POINT_RGB  # (100, inf) clipped to the corner
    dots = (picture == RENDER_POINT_RGB).all(axis=2)
    assert int(dots.sum()) == 9 + 4  # a full 3x3 dot and a corner 2x2 one; the NaN point is left out


@pytest.mark.parametrize("channels", [1, 3])
def test_image_data_renders_as_the_grid_of_current_images(channels):
    env = make_vec(5, data_shape=(channels, 4, 4), render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    picture = env.render()
    expected = grid_array(obs["x"].numpy(), nrow=3)  # ceil(sqrt(5)) images per row
    if channels == 1:
        expected = np.repeat(expected[:, :, None], 3, axis=2)
    assert picture.shape == (2 * 6 + 2, 3 * 6 + 2, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture, expected)
    single = gymnasium.make(ENV_ID, data_shape=(channels, 4, 4), render_mode="rgb_array")
    single.reset(seed=0)
    assert single.render().shape == (6 + 2, 6 + 2, 3)


def test_single_env_passes_the_checker_with_its_render_modes():
    env = gymnasium.make(ENV_ID, render_mode="rgb_array")
    assert env.metadata["render_modes"] == ["rgb_array"] and env.metadata["render_fps"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checker warns about unbounded Boxes: x is unbounded
        check_env(env.unwrapped)  # with the spec: makes the env in every declared render mode


def test_render_mode_mistakes_are_named():
    with pytest.raises(ValueError, match=r"render_mode must be None or one of \['rgb_array'\]"):
        DenoisingChainVectorEnv(render_mode="ansi")
    with pytest.raises(ValueError, match=r"data_shape \(3,\) is neither"):
        gymnasium.make(ENV_ID, data_shape=(3,), render_mode="rgb_array")
    with pytest.raises(RuntimeError, match="before reset"):
        DenoisingChainVectorEnv(render_mode="rgb_array").render()
    with pytest.raises(RuntimeError, match="before reset"):
        DenoisingChainEnv(render_mode="rgb_array").render()
    env = DenoisingChainVectorEnv()
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="without a render mode"):
        assert env.render() is None


# -- seeding --------------------------------------------------------------------------------


def test_unseeded_envs_start_from_different_states():
    a, b = make_vec(4), make_vec(4)
    assert not torch.equal(a.reset()[0]["x"], b.reset()[0]["x"])
    single_a, single_b = gymnasium.make(ENV_ID), gymnasium.make(ENV_ID)
    assert not np.array_equal(single_a.reset()[0]["x"], single_b.reset()[0]["x"])
    # and an unseeded reset continues the stream instead of repeating the first state
    first = a.reset()[0]["x"].clone()
    assert not torch.equal(a.reset()[0]["x"], first)


def test_each_chain_gets_its_own_seed():
    seeds = [5, 11, 3]
    obs, _ = make_vec(3).reset(seed=seeds)
    for i, seed in enumerate(seeds):
        single_x = DenoisingChainEnv().reset(seed=seed)[0]["x"]
        np.testing.assert_array_equal(obs["x"][i].numpy(), single_x)
    # a chain's draw depends on its seed alone, not on its position or its neighbours
    shifted, _ = make_vec(2).reset(seed=[11, 42])
    assert torch.equal(shifted["x"][0], obs["x"][1])


def test_an_int_seed_gives_consecutive_seeds_and_repeats():
    env = make_vec(3, prior_std=0.5)
    from_int = env.reset(seed=7)[0]["x"].clone()
    assert torch.equal(env.reset(seed=[7, 8, 9])[0]["x"], from_int)
    assert torch.equal(make_vec(3, prior_std=0.5).reset(seed=7)[0]["x"], from_int)
    assert not torch.equal(env.reset(seed=8)[0]["x"], from_int)


def test_a_none_seed_keeps_that_chains_stream():
    env = make_vec(2)
    env.reset(seed=[1, 2])
    second_of_chain_1 = env.reset()[0]["x"][1].clone()
    env.reset(seed=[1, 2])
    obs, _ = env.reset(seed=[3, None])
    assert torch.equal(obs["x"][1], second_of_chain_1)
    np.testing.assert_array_equal(obs["x"][0].numpy(), DenoisingChainEnv().reset(seed=3)[0]["x"])


def test_seed_mistakes_are_named():
    with pytest.raises(ValueError, match="2 seeds for num_envs=3"):
        make_vec(3).reset(seed=[1, 2])
    with pytest.raises(gymnasium.error.Error, match="greater or equal to zero"):
        make_vec(2).reset(seed=[1, -1])


def test_vector_env_matches_gymnasiums_sync_vector_env_across_autoresets():
    num_envs, num_steps = 3, 2
    ours = make_vec(num_envs, num_steps=num_steps)
    sync = gymnasium.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync", num_steps=num_steps)
    obs, _ = ours.reset(seed=123)
    sync_obs, _ = sync.reset(seed=123)
    rng = np.random.default_rng(0)
    for _ in range(2 * (num_steps + 1)):  # two chains each, the autoreset steps included
        np.testing.assert_array_equal(obs["x"].numpy(), sync_obs["x"])
        np.testing.assert_array_equal(obs["n"].numpy(), sync_obs["n"])
        actions = rng.standard_normal((num_envs, 2)).astype(np.float32)
        obs, rewards, terminated, truncated, _ = ours.step(torch.from_numpy(actions))
        sync_obs, sync_rewards, sync_terminated, sync_truncated, _ = sync.step(actions)
        np.testing.assert_allclose(rewards.numpy(), sync_rewards, rtol=1e-6)
        np.testing.assert_array_equal(terminated.numpy(), sync_terminated)
        np.testing.assert_array_equal(truncated.numpy(), sync_truncated)


# -- torch observations ---------------------------------------------------------------------


def test_vector_observations_are_torch_tensors_as_documented():
    env = make_vec(4, data_shape=(1, 3, 3), num_steps=2)
    assert env.observation_dtypes == OBSERVATION_DTYPES == {"x": torch.float32, "n": torch.int64}
    obs, _ = env.reset(seed=0)
    obs_after, rewards, terminated, truncated, _ = env.step(torch.zeros(4, 1, 3, 3, dtype=torch.float64))
    for o in (obs, obs_after):
        assert set(o) == {"x", "n"}
        for key, value in o.items():
            assert isinstance(value, torch.Tensor), key
            assert value.dtype == OBSERVATION_DTYPES[key] and value.device == env.device, key
            assert tuple(value.shape) == env.observation_space[key].shape, key
        assert env.observation_space.contains({k: v.numpy() for k, v in o.items()})
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert terminated.dtype == truncated.dtype == torch.bool and terminated.shape == (4,)
    with pytest.raises(TypeError, match="torch.Tensor"):
        env.step(np.zeros((4, 1, 3, 3), dtype=np.float32))


def test_single_env_observations_stay_numpy():
    obs, _ = gymnasium.make(ENV_ID).reset(seed=0)
    assert isinstance(obs["x"], np.ndarray) and obs["x"].dtype == np.float32 and isinstance(obs["n"], int)
