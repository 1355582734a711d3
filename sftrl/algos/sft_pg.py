"""``sft-pg``: the paper's REINFORCE with a learned baseline (Eq. 20), rewards relabelled."""

from __future__ import annotations

import torch

from sftrl.algos import losses
from sftrl.algos.base import PolicyAlgorithm, PolicyContext, register
from sftrl.buffer import TransitionBatch
from sftrl.diffusion.step import denoise_step
from sftrl.optim import gradient_step


def relabel(ctx: PolicyContext, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """c(x_0) and V(x_n, n) under the just-published critic and baseline, ``(B,)`` each."""
    with torch.no_grad():
        return ctx.critic(batch.x_0), ctx.baseline(batch.x_n, batch.n)


def rescore(ctx: PolicyContext, batch: TransitionBatch) -> torch.Tensor:
    """log pi_theta(x_{n-1} | x_n) of stored transitions under the current policy, ``(B,)``."""
    return denoise_step(
        ctx.policy,
        ctx.tables,
        batch.x_n,
        batch.n,
        x_prev=batch.x_prev,
        final_step_std=ctx.final_step_std,
        reduction=ctx.reduction,
    ).log_prob


def ratio_metrics(log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor) -> dict[str, float]:
    ratio = (log_prob.detach() - behaviour_log_prob).exp()
    return {losses.RATIO_MIN: ratio.min().item(), losses.RATIO_MEAN: ratio.mean().item(), losses.RATIO_MAX: ratio.max().item()}


@register("sft-pg")
class SFTPG(PolicyAlgorithm):
    """``n_generator`` policy steps, each on ``batch_size`` transitions sampled from the buffer."""

    data = "samples"

    def update(self, ctx: PolicyContext, data: TransitionBatch | None) -> list[dict[str, float]]:
        batch = data.to_torch(ctx.device)
        params = list(ctx.policy.parameters())
        out = []
        for j in range(ctx.n_generator):
            mb = batch.select(slice(j * ctx.batch_size, (j + 1) * ctx.batch_size))
            reward, values = relabel(ctx, mb)
            log_prob = rescore(ctx, mb)
            loss, metrics = losses.policy_gradient_loss(log_prob, reward, values)
            metrics |= ratio_metrics(log_prob, mb.log_prob)
            metrics |= gradient_step(loss, [ctx.optimizer], params, ctx.max_grad_norm)
            out.append(metrics)
        return out
