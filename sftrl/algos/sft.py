"""``sft``: pathwise shortcut fine-tuning (Eq. 14), back-propagating -c(x_0) through the chain."""

from __future__ import annotations

import torch

from sftrl.algos import losses
from sftrl.algos.base import PolicyAlgorithm, PolicyContext, register
from sftrl.buffer import TransitionBatch
from sftrl.diffusion.step import rollout
from sftrl.optim import gradient_step


@register("sft")
class PathwiseSFT(PolicyAlgorithm):
    """``n_generator`` steps, each on ``batch_size`` fresh reparameterised chains (no buffer)."""

    data = "none"
    shardable = False  # each learner would draw its own chains: not the one learner's update

    def update(self, ctx: PolicyContext, data: TransitionBatch | None) -> list[dict[str, float]]:
        params = [p for p in ctx.policy.parameters() if p.requires_grad]  # theta (LoRA: the adapters)
        out = []
        for _ in range(ctx.n_generator):
            x_start = torch.randn(
                (ctx.batch_size, *ctx.data_shape), generator=ctx.generator, device=ctx.device
            )
            trajectory = rollout(
                ctx.forward, ctx.tables, x_start, generator=ctx.generator, final_step_std=ctx.final_step_std
            )
            loss, metrics = losses.pathwise_loss(ctx.critic(trajectory.x_0))
            metrics |= gradient_step(loss, [ctx.optimizer], params, ctx.max_grad_norm)
            out.append(metrics)
        return out
