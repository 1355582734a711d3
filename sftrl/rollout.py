"""RolloutWorker: a policy copy that drives the batched denoising env and returns trajectory blocks."""

from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np
import torch
from torch import nn

from sftrl.buffer import TrajectoryBlock
from sftrl.config import PerfConfig
from sftrl.diffusion.schedules import SamplingSchedule
from sftrl.diffusion.step import Reduction, denoise_step
from sftrl.perf import runner
from sftrl.weights import NumpyState, Weights, load_numpy_state
from sftrl_envs.denoising import DenoisingChainVectorEnv


def block_seed(seed: int, block_id: str) -> int:
    """The seed of one block's noise: a function of the run's rollout seed and the block id alone."""
    digest = hashlib.sha256(f"{seed}:{block_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RolloutWorker:
    """Holds a copy of the sampler (and of the critic, for the env's terminal reward).

    ``rollout(num_blocks, chains_per_block)`` runs ``num_blocks * chains_per_block`` chains in one
    vectorised env on the worker's device and splits them into blocks of the current version.

    A block's noise (its x_S and every step's z) comes from its own generator, seeded by
    ``block_seed(seed, block_id)``: a block is the same whichever worker collects it, with which
    other blocks, and after a worker restart. So the number of workers, a lost worker's blocks
    collected again elsewhere, and a resume change no number of a run, and workers keep no
    random state to checkpoint.
    """

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module,
        schedule: SamplingSchedule,
        data_shape: tuple[int, ...],
        *,
        final_step_std: float,
        reduction: Reduction,
        device: str = "cpu",
        seed: int = 0,
        worker_id: str = "worker-0",
        perf: PerfConfig | None = None,
    ):
        """``perf``: how the sampler runs (``sftrl.perf.runner``; None: float32, eager)."""
        self.device = torch.device(device)
        self.policy = policy.to(self.device).eval()
        self.net = runner(self.policy, perf or PerfConfig(), self.device)  # what rollouts call
        self.critic = critic.to(self.device).eval()
        self.tables = schedule.tables(self.device)
        self.data_shape = tuple(data_shape)
        self.final_step_std = final_step_std
        self.reduction = reduction
        self.worker_id = worker_id
        self.seed = seed
        self.policy_version = -1
        self.critic_version = -1
        self.base_version = -1  # the frozen base's version (LoRA: ``set_base_weights``); -1: none given
        self._policy_keys = set(self.policy.state_dict())
        self._block_counter = itertools.count()

    def set_base_weights(self, state: NumpyState, version: int) -> None:
        """Load the frozen part of the sampler (LoRA's base network) of ``version``, once: the
        publications then carry the trainable tensors alone."""
        if version != self.base_version:
            load_numpy_state(self.policy, state, partial=True)
            self.base_version = version

    def set_policy_weights(self, state: NumpyState, version: int) -> None:
        """Load the sampler weights of ``version`` (a no-op when already at that version): the
        whole state, or the trainable tensors over the base given before."""
        if version != self.policy_version:
            partial = set(state) != self._policy_keys
            if partial and self.base_version < 0:
                raise RuntimeError(f"{self.worker_id}: weights version {version} hold {len(state)} of the sampler's "
                                   f"{len(self._policy_keys)} tensors, and no frozen base was given (collect's base)")
            load_numpy_state(self.policy, state, partial=partial)
            self.policy_version = version

    def set_critic_weights(self, state: NumpyState, version: int) -> None:
        if version != self.critic_version:
            load_numpy_state(self.critic, state)
            self.critic_version = version

    def _reward(self, x_0: torch.Tensor) -> torch.Tensor:
        return self.critic(x_0)

    def collect(self, policy: Weights, critic: Weights, block_ids: list[str], chains_per_block: int,
                base: Weights | None = None) -> tuple:
        """Pull the given weights versions, roll out, and return ``(*blocks, summary)``.
        ``base``: the frozen base the policy's publications leave out (LoRA), loaded the first time
        its version is seen (a restarted worker gets it with its next call).

        One return value per block (with Ray's ``num_returns = len(block_ids) + 1`` each block is
        its own object-store entry) and a small summary last, which the driver fetches to learn
        that the blocks exist without fetching the blocks. The summary also says how long the call
        took (the driver's watch on hung workers) and how many chains ended non-finite.
        """
        start = time.perf_counter()
        if base is not None:
            self.set_base_weights(base.state, base.version)
        self.set_policy_weights(policy.state, policy.version)
        self.set_critic_weights(critic.state["critic"], critic.version)
        blocks = self.rollout(len(block_ids), chains_per_block, block_ids)
        rewards = np.concatenate([b.rewards for b in blocks])
        summary = {
            "worker_id": self.worker_id,
            "block_ids": [b.block_id for b in blocks],
            "policy_version": self.policy_version,
            "reward_mean": float(rewards.mean()),
            "nonfinite_chains": [b.nonfinite_chains() for b in blocks],  # per block
            "bytes": sum(b.nbytes for b in blocks),  # what the critic and the buffer read of this call
            "seconds": time.perf_counter() - start,
        }
        return (*blocks, summary)

    @torch.no_grad()
    def rollout(
        self, num_blocks: int, chains_per_block: int, block_ids: list[str] | None = None
    ) -> list[TrajectoryBlock]:
        """Run the chains; returns ``num_blocks`` blocks of ``chains_per_block`` chains each."""
        if block_ids is not None and len(block_ids) != num_blocks:
            raise ValueError(f"{len(block_ids)} block ids for {num_blocks} blocks")
        if self.policy_version < 0:
            raise RuntimeError(f"{self.worker_id}: no policy weights set before rollout")
        num_chains = num_blocks * chains_per_block
        if block_ids is None:
            block_ids = [f"{self.worker_id}/{next(self._block_counter)}" for _ in range(num_blocks)]
        generators = [torch.Generator(device=self.device).manual_seed(block_seed(self.seed, i)) for i in block_ids]
        shape = (num_chains, *self.data_shape)

        def draw() -> torch.Tensor:  # (num_chains, *D): each block's rows from its own generator
            z = torch.empty(shape, device=self.device)
            for b, generator in enumerate(generators):
                z[b * chains_per_block : (b + 1) * chains_per_block].normal_(generator=generator)
            return z

        env = DenoisingChainVectorEnv(
            num_envs=num_chains,
            num_steps=self.tables.num_steps,
            data_shape=self.data_shape,
            reward_fn=self._reward,
            device=self.device,
        )
        obs, _ = env.reset(options={"x": draw()})
        xs, log_probs, stds = [obs["x"]], [], []
        terminated = torch.zeros(num_chains, dtype=torch.bool)
        while not bool(terminated.all()):
            out = denoise_step(
                self.net,
                self.tables,
                obs["x"],
                obs["n"],
                noise=draw(),
                final_step_std=self.final_step_std,
                reduction=self.reduction,
            )
            obs, rewards, terminated, _, _ = env.step(out.x_prev)
            xs.append(obs["x"])
            log_probs.append(out.log_prob)
            stds.append(out.std[0].amin())  # per channel: 0 only where the step is deterministic
        xs_np = torch.stack(xs).cpu().numpy()  # (S + 1, N, *D)
        log_probs_np = torch.stack(log_probs).cpu().numpy()  # (S, N)
        stds_np = torch.stack(stds).cpu().numpy()
        rewards_np = rewards.cpu().numpy()
        ns = np.arange(self.tables.num_steps, 0, -1)
        blocks = []
        for b in range(num_blocks):
            chains = slice(b * chains_per_block, (b + 1) * chains_per_block)
            blocks.append(
                TrajectoryBlock(
                    xs=xs_np[:, chains],
                    log_probs=log_probs_np[:, chains],
                    ns=ns,
                    stds=stds_np,
                    rewards=rewards_np[chains],
                    version=self.policy_version,
                    block_id=block_ids[b],
                )
            )
        return blocks
