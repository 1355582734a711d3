"""Gymnasium environments of sftrl: the denoising chain of a diffusion sampler as an MDP.

Importing this package (``import sftrl`` does) registers ``sftrl/DenoisingChain-v0`` with both a
single-env entry point and a batched torch ``vector_entry_point``:

    env = gymnasium.make("sftrl/DenoisingChain-v0", render_mode="rgb_array")  # numpy observations
    envs = gymnasium.make_vec("sftrl/DenoisingChain-v0", num_envs=64, device="cpu",
                              vectorization_mode="vector_entry_point")         # torch observations

Both take ``num_steps``, ``data_shape``, ``reward_fn``, ``prior_std`` and ``render_mode``; see
``sftrl_envs.denoising`` for seeding, rendering and the torch observation types.
"""

from __future__ import annotations

import gymnasium

from sftrl_envs.denoising import OBSERVATION_DTYPES, DenoisingChainEnv, DenoisingChainVectorEnv

ENV_ID = "sftrl/DenoisingChain-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="sftrl_envs.denoising:DenoisingChainEnv",
        vector_entry_point="sftrl_envs.denoising:DenoisingChainVectorEnv",
        # Fixed horizon: the chain terminates at n = 0 by itself, no TimeLimit wrapper.
        max_episode_steps=None,
    )

__all__ = ["ENV_ID", "OBSERVATION_DTYPES", "DenoisingChainEnv", "DenoisingChainVectorEnv"]
