"""``sft-awr``: advantage-weighted regression (Peng et al. 2019) on sftrl's transitions.

Each transition's log-prob is weighted by exp(A / temperature), capped at ``max_weight``, with
A = c(x_0) - V(x_n, n) under the just-published critic and baseline (SFT-PG's advantage).
"""

from __future__ import annotations

import dataclasses

import torch

from sftrl.algos import PolicyAlgorithm, PolicyContext
from sftrl.algos.sft_pg import relabel, rescore
from sftrl.buffer import TransitionBatch
from sftrl.configtools import Range, doc_field
from sftrl.optim import gradient_step


@dataclasses.dataclass(frozen=True)
class AWRSettings:
    """Read from ``algo.sft-awr`` in the config."""

    temperature: float = doc_field(1.0, "beta: the advantage's scale in exp(A / beta).",
                                   valid=Range(0.0, low_open=True))
    max_weight: float = doc_field(20.0, "Cap of each transition's weight (AWR: 20).",
                                  valid=Range(1.0))


def awr_loss(log_prob: torch.Tensor, advantage: torch.Tensor, temperature: float,
             max_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """-mean[min(exp(A / beta), w_max) log pi(x_{n-1} | x_n)]; ``log_prob``, ``advantage``: ``(B,)``."""
    weight = (advantage / temperature).exp().clamp(max=max_weight)  # (B,), a constant
    loss = -(weight * log_prob).mean()
    return loss, {"awr_weight_mean": weight.mean().item(), "awr_weight_max": weight.max().item()}


class AWR(PolicyAlgorithm):
    """``n_generator`` policy steps, each on ``batch_size`` transitions sampled from the buffer."""

    data = "samples"
    settings_class = AWRSettings

    def update(self, ctx: PolicyContext, data: TransitionBatch | None) -> list[dict[str, float]]:
        assert data is not None, "sft-awr learns from buffer samples (data = 'samples')"
        batch = data.to_torch(ctx.device)
        params = [p for p in ctx.policy.parameters() if p.requires_grad]  # theta (LoRA: the adapters)
        out = []
        for j in range(ctx.n_generator):
            rows, reduce = ctx.shard.split(slice(j * ctx.batch_size, (j + 1) * ctx.batch_size), len(batch))
            mb = batch.select(rows)
            reward, values = relabel(ctx, mb)
            loss, metrics = awr_loss(rescore(ctx, mb), reward - values, self.settings.temperature,
                                     self.settings.max_weight)
            metrics |= gradient_step(loss, [ctx.optimizer], params, ctx.max_grad_norm, reduce)
            out.append(metrics)
        return out
