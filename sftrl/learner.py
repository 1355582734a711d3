"""Learner: the sampler's optimiser and a pluggable policy-gradient algorithm."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sftrl.algos.base import PolicyAlgorithm, PolicyContext, Shard
from sftrl.buffer import Draw, TrajectoryBlock, TransitionBatch, gather
from sftrl.config import PerfConfig
from sftrl.diffusion.schedules import SamplingSchedule
from sftrl.diffusion.step import Reduction
from sftrl.diffusion.variance import LOG_STD_KEY, step_stds
from sftrl.lora import is_adapted, merged_state
from sftrl.perf import runner
from sftrl.weights import (
    NumpyState,
    Weights,
    frozen_keys,
    load_numpy_state,
    numpy_state,
    to_numpy_state,
    trainable_keys,
)

PHASE_S = "phase_s"  # seconds of a generator phase (on its first step's metrics)
DATA_BYTES = "data_bytes"  # bytes of the transitions the phase learned from (likewise)
GATHER_S = "gather_s"  # seconds the learner took to gather them from the blocks (likewise)


def sampler_state_dict(learner_state: dict) -> dict:
    """The weights to sample from in a checkpoint's learner state: the EMA when the run kept one
    (``algo.ema_decay > 0``), else the trained policy. With LoRA the average holds the trainable
    tensors alone and the policy the frozen base (``Learner.state_dict``); the keys are then the
    adapted network's (``sftrl.lora.merge_into`` makes a plain network of it)."""
    ema = learner_state.get("ema")
    if not ema:
        return learner_state["policy"]
    prefix = "module."
    return {**learner_state["policy"], **{k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}}


def learned_std_metrics(policy: nn.Module) -> dict[str, float]:
    """``learned_std/n{n}``: each step's learned std after the phase (the mean over channels where
    there is one per channel); nothing for a fixed-variance sampler."""
    stds = step_stds(policy)
    if stds is None:
        return {}
    return {f"learned_std/n{n}": float(stds[n].mean()) for n in range(1, len(stds))}


def _frozen(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def parameter_groups(policy: nn.Module, variance_lr: float | None) -> list[dict]:
    """The trainable parameters of ``policy`` as Adam's groups: one, or with ``variance_lr`` a
    second holding the learned step log-stds (``sftrl.diffusion.variance``) at that rate."""
    trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    is_std = [name.rsplit(".", 1)[-1] == LOG_STD_KEY for name, _ in trainable]
    if variance_lr is None or not any(is_std):
        return [{"params": [p for _, p in trainable]}]
    return [{"params": [p for (_, p), std in zip(trainable, is_std) if not std]},
            {"params": [p for (_, p), std in zip(trainable, is_std) if std], "lr": variance_lr}]


class Learner:
    """Owns theta. ``update_policy`` runs one generator phase and bumps the weights version.

    With ``ema_decay > 0`` it also keeps an exponential moving average of theta (updated after
    every generator phase): rollouts use theta itself (the gradient is on-policy), evaluation,
    pictures and ``sftrl sample`` use the average, which smooths the policy-gradient noise.
    """

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
        ema_decay: float = 0.0,
        perf: PerfConfig | None = None,
        variance_lr: float | None = None,
    ):
        """``perf``: how the sampler runs in policy steps (``sftrl.perf.runner``; None: float32, eager).
        ``variance_lr``: the learning rate of learned step log-stds (None: ``lr``)."""
        self.device = torch.device(device)
        # Eval mode: dropout would make the re-scored log-prob differ from the rollout's (the
        # ratio must be exactly 1 before an update); gradients flow all the same.
        self.policy = policy.to(self.device).eval()
        self.algorithm = algorithm
        # theta is the parameters with requires_grad: all of them, or (LoRA, ``sftrl.lora``) the
        # adapters and any tensor attached for fine-tuning, over a frozen base. Only theta is
        # optimised and published (None: the whole state dict is, as nothing is frozen).
        trainable = trainable_keys(self.policy)
        self.published_keys = trainable if len(trainable) < sum(1 for _ in self.policy.parameters()) else None
        self.adapted = is_adapted(self.policy)
        self.base_version = 0  # bumped when a checkpoint's state (its frozen base too) is loaded
        self.optimizer = torch.optim.Adam(parameter_groups(self.policy, variance_lr), lr=lr, foreach=True)
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
            net=runner(self.policy, perf or PerfConfig(), self.device),
            # theta_0 as the learner is built: the pretrained sampler (a resumed run loads its
            # checkpoint after this), for a KL penalty to it
            reference=_frozen(self.policy) if algorithm.needs_reference else None,
        )
        self.ema = (
            AveragedModel(self.policy, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            if ema_decay
            else None
        )
        if self.ema is not None:
            self.ema.update_parameters(self.policy)  # the first call copies: the average starts at theta_0
        self.version = 0
        self.critic_version = -1
        self.reference_iteration: int | None = None  # the evaluation ctx.reference was moved to (None: theta_0)

    def get_weights(self) -> Weights:
        """theta as numpy arrays, with its version: what the rollout workers run. Over a frozen
        base (LoRA) the trainable tensors alone; the workers hold the base (``get_base_weights``)."""
        return Weights(self.version, to_numpy_state(self.policy, self.published_keys))

    def get_base_weights(self) -> Weights | None:
        """The frozen rest of the sampler's state (LoRA's base network), versioned by
        ``base_version``: with ``get_weights`` the whole state. None when nothing is frozen."""
        if self.published_keys is None:
            return None
        return Weights(self.base_version, to_numpy_state(self.policy, frozen_keys(self.policy)))

    def get_sampler_weights(self) -> Weights:
        """The sampler to evaluate and ship: the EMA if kept, else theta; a plain network's state
        (adapters merged into the weights: ``sftrl.lora.merged_state``)."""
        module = self.ema.module if self.ema is not None else self.policy
        return Weights(self.version, numpy_state(merged_state(module)) if self.adapted else to_numpy_state(module))

    def set_critic_weights(self, critic: Weights) -> None:
        if critic.version != self.critic_version:
            load_numpy_state(self.ctx.critic, critic.state["critic"])
            load_numpy_state(self.ctx.baseline, critic.state["baseline"])
            self.critic_version = critic.version

    def set_reference(self, state: NumpyState, iteration: int) -> None:
        """Move ``ctx.reference`` to a sampler's weights (``get_sampler_weights``' state: the
        run's best evaluation, at ``iteration``), for an algorithm whose reference follows it."""
        if self.ctx.reference is None:
            raise RuntimeError(f"{self.algorithm.name} keeps no reference sampler to move")
        load_numpy_state(self.ctx.reference, state)
        self.reference_iteration = iteration

    def update_policy(self, data: TransitionBatch | None, critic: Weights) -> list[dict[str, float]]:
        """One generator phase with the given critic version; returns per-step metrics."""
        self.set_critic_weights(critic)
        self.ctx.version = self.version
        start = time.perf_counter()
        metrics = self.algorithm.update(self.ctx, data)
        if metrics:  # the phase's time and what it was handed: the trainer's time/learner_s, bytes/policy_batch
            metrics[0] = {**metrics[0], PHASE_S: time.perf_counter() - start,
                          DATA_BYTES: float(data.nbytes) if data is not None else 0.0}
            metrics[-1] = {**metrics[-1], **learned_std_metrics(self.policy)}
        self.version += 1
        if self.ema is not None:
            self.ema.update_parameters(self.policy)
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        return metrics

    def update_and_publish(self, draw: Draw | None, critic: Weights, *blocks: TrajectoryBlock
                           ) -> tuple[list[dict[str, float]], Weights]:
        """One generator phase on the transitions ``draw`` names, gathered here from ``blocks``
        (``sftrl.buffer.gather``; None: the algorithm takes no buffer data), then the new weights:
        ``(metrics, get_weights())`` (the next iteration's rollouts take them straight from this
        call). The blocks are separate arguments: through Ray each is read in place from this
        node's object store, fetched there while the critic works on them."""
        start = time.perf_counter()
        data = gather(draw, blocks) if draw is not None else None
        gathered = time.perf_counter() - start
        metrics = self.update_policy(data, critic)
        if metrics:
            metrics[0] = {**metrics[0], GATHER_S: gathered}
        return metrics, self.get_weights()

    def join_group(self, init_method: str, rank: int, world: int) -> None:
        """Share every policy batch with ``world`` learners (``ray.num_learners``): join their
        ``torch.distributed`` group (gloo on the CPU, NCCL on GPUs) as ``rank``. From then on the
        algorithm takes rows ``rank::world`` of each minibatch and the gradients are summed across
        the group (``Shard``): every learner makes the same update, the one a single learner
        would make on the whole minibatch."""
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        self.ctx.shard = Shard(rank, world, all_reduce=dist.all_reduce)

    def state_dict(self) -> dict:
        """``policy`` is the whole sampler (with LoRA: the frozen base once, and the adapters), so a
        checkpoint alone resumes, samples and exports. Over a frozen base the average keeps the
        trainable tensors alone (the base's average is the base)."""
        ema = self.ema.state_dict() if self.ema is not None else {}
        if ema and self.published_keys is not None:
            averaged = {f"module.{k}" for k in self.published_keys}
            ema = {k: v for k, v in ema.items() if k in averaged or not k.startswith("module.")}
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.ctx.generator.get_state(),
            "version": self.version,
            "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule is not None else {},
            "ema": ema,
            # a reference moved off theta_0 (reference_follows_best): theta_0 is rebuilt, this is not
            **({"reference": self.ctx.reference.state_dict(), "reference_iteration": self.reference_iteration}
               if self.ctx.reference is not None and self.reference_iteration is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.base_version += 1  # the checkpoint's base: workers load it again
        self.optimizer.load_state_dict(state["optimizer"])
        self.ctx.generator.set_state(state["generator"])
        self.version = state["version"]
        if self.lr_schedule is not None and state.get("lr_schedule"):
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        if state.get("reference") is not None and self.ctx.reference is not None:
            self.ctx.reference.load_state_dict(state["reference"])
            self.reference_iteration = state["reference_iteration"]
        if self.ema is not None:
            if state.get("ema"):  # over a frozen base: the policy's base, the averaged trainable tensors
                self.ema.load_state_dict({**{f"module.{k}": v for k, v in state["policy"].items()}, **state["ema"]})
            else:  # a checkpoint from a run without the average: start it from theta
                self.ema.module.load_state_dict(state["policy"])
