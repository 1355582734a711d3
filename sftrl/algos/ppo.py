"""``ppo``: clipped importance ratio against the behaviour log-probs, several epochs (DDPO-style)."""

from __future__ import annotations

import torch

from sftrl.algos import losses
from sftrl.algos.base import PolicyAlgorithm, PolicyContext, register
from sftrl.algos.sft_pg import dims_averaged, relabel, rescore, rescore_metrics, with_entropy_bonus
from sftrl.buffer import TransitionBatch
from sftrl.optim import gradient_step


@register("ppo")
class PPO(PolicyAlgorithm):
    """``settings.ppo_epochs`` passes over every buffered transition in minibatches of ``batch_size``.

    Advantages are c(x_0) - V(x_n, n) under the just-published critic and baseline, fixed for the
    phase; the ratio is taken against the log-prob recorded at rollout time, as a density ratio
    under either log-prob reduction (``losses.ppo_clip_loss``).
    """

    data = "all"

    def update(self, ctx: PolicyContext, data: TransitionBatch | None) -> list[dict[str, float]]:
        assert data is not None, "ppo learns from the whole buffer (data = 'all')"
        batch = data.to_torch(ctx.device)
        reward, values = relabel(ctx, batch)
        advantage = reward - values  # (N,)
        params = [p for p in ctx.policy.parameters() if p.requires_grad]  # theta (LoRA: the adapters)
        dims = dims_averaged(ctx)
        out: list[dict[str, float]] = []
        for _ in range(self.settings.ppo_epochs):
            order = torch.randperm(len(batch), generator=ctx.generator, device=ctx.device)
            for start in range(0, len(batch), ctx.batch_size):
                index, reduce = ctx.shard.split(order[start : start + ctx.batch_size], len(batch))
                mb = batch.select(index)
                log_prob = rescore(ctx, mb)
                loss, metrics = losses.ppo_clip_loss(log_prob, mb.log_prob, advantage[index], self.settings.ppo_clip,
                                                     dims)
                loss, metrics = with_entropy_bonus(ctx, mb, self.algo.entropy_coef, loss, metrics)
                if not out:  # the phase's first step: theta is still the rollouts' own
                    metrics |= rescore_metrics(log_prob, mb, ctx)
                metrics |= gradient_step(loss, [ctx.optimizer], params, ctx.max_grad_norm, reduce)
                out.append(metrics)
        return out
