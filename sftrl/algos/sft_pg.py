"""``sft-pg``: the paper's REINFORCE with a learned baseline (Eq. 20), rewards relabelled."""

from __future__ import annotations

import math

import torch

from sftrl.algos import losses
from sftrl.algos.base import PolicyAlgorithm, PolicyContext, register
from sftrl.buffer import TransitionBatch
from sftrl.diffusion.step import denoise_step
from sftrl.diffusion.variance import step_entropy
from sftrl.optim import gradient_step


def relabel(ctx: PolicyContext, batch: TransitionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """c(x_0) and V(x_n, n) under the just-published critic and baseline, ``(B,)`` each."""
    with torch.no_grad():
        return ctx.critic(batch.x_0), ctx.baseline(batch.x_n, batch.n)


def rescore(ctx: PolicyContext, batch: TransitionBatch) -> torch.Tensor:
    """log pi_theta(x_{n-1} | x_n) of stored transitions under the current policy, ``(B,)``."""
    return denoise_step(
        ctx.forward,
        ctx.tables,
        batch.x_n,
        batch.n,
        x_prev=batch.x_prev,
        final_step_std=ctx.final_step_std,
        reduction=ctx.reduction,
    ).log_prob


def dims_averaged(ctx: PolicyContext) -> int:
    """D when log-probs are averaged over the D data dims (``mean`` reduction), else 1: the
    density ratio pi / mu is exp(D (log_prob - behaviour_log_prob))."""
    return math.prod(ctx.data_shape) if ctx.reduction == "mean" else 1


def ratio_metrics(log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, dims: int = 1) -> dict[str, float]:
    """Min, mean and max of the density ratio pi / pi_behaviour (``dims``: see ``dims_averaged``)."""
    ratio = ((log_prob.detach() - behaviour_log_prob) * dims).exp()
    return {losses.RATIO_MIN: ratio.min().item(), losses.RATIO_MEAN: ratio.mean().item(), losses.RATIO_MAX: ratio.max().item()}


def rescore_metrics(log_prob: torch.Tensor, batch: TransitionBatch, ctx: PolicyContext) -> dict[str, float]:
    """How far the learner's log-prob of a transition is from the one its worker recorded, for the
    transitions collected with theta as the phase starts (before any step they must agree: the
    same weights, the same transition): the largest |log density ratio|, overall and per step n
    (``/n{n}``; the last steps, with the smallest std, amplify any difference most)."""
    current = batch.version == ctx.version
    if not bool(current.any()):
        return {}
    gap = ((log_prob.detach() - batch.log_prob).abs() * dims_averaged(ctx))[current]  # (B_current,)
    steps = batch.n[current]
    out = {losses.RESCORE_LOG_RATIO_ABSMAX: gap.max().item()}
    for n in steps.unique().tolist():
        out[f"{losses.RESCORE_LOG_RATIO_ABSMAX}/n{n}"] = gap[steps == n].max().item()
    return out


def stale_importance_weights(
    ctx: PolicyContext, batch: TransitionBatch, max_weight: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Async mode: ``(weight, truncated)`` ``(B,)`` each, the truncated pi_theta / pi_behaviour of
    transitions collected with an older version than theta's as the phase starts (weight 1 for
    current ones). None when every transition is current (sync mode: Eq. 20 exactly, without an
    extra forward pass)."""
    stale = batch.version != ctx.version
    if not bool(stale.any()):
        return None
    with torch.no_grad():  # in batches of the policy step's size (image batches are large)
        log_prob = torch.cat([rescore(ctx, batch.select(slice(k, k + ctx.batch_size)))
                              for k in range(0, len(batch), ctx.batch_size)])
        weight, truncated = losses.truncated_importance_weight(log_prob, batch.log_prob, max_weight, dims_averaged(ctx))
    return torch.where(stale, weight, torch.ones_like(weight)), truncated & stale


@register("sft-pg")
class SFTPG(PolicyAlgorithm):
    """``n_generator`` policy steps, each on ``batch_size`` transitions sampled from the buffer.

    In async mode (``rollout.max_lag >= 1``) transitions from older weights are reweighted by
    ``stale_importance_weights``, taken once against theta as the phase starts: the version sync
    mode would have collected them with.
    """

    data = "samples"

    def update(self, ctx: PolicyContext, data: TransitionBatch | None) -> list[dict[str, float]]:
        assert data is not None, "sft-pg learns from buffer samples (data = 'samples')"
        batch = data.to_torch(ctx.device)
        weights = stale_importance_weights(ctx, batch, self.algo.max_importance_weight)
        params = [p for p in ctx.policy.parameters() if p.requires_grad]
        out = []
        for j in range(ctx.n_generator):
            rows, reduce = ctx.shard.split(slice(j * ctx.batch_size, (j + 1) * ctx.batch_size), len(batch))
            mb = batch.select(rows)
            weight = None if weights is None else weights[0][rows]
            loss, metrics, log_prob = self.step_loss(ctx, mb, weight)
            if weights is not None and weight is not None:
                metrics[losses.IMPORTANCE_WEIGHT_MEAN] = weight.mean().item()
                metrics[losses.IMPORTANCE_WEIGHT_TRUNCATED] = weights[1][rows].float().mean().item()
            metrics |= ratio_metrics(log_prob, mb.log_prob, dims_averaged(ctx))
            if j == 0:
                metrics |= rescore_metrics(log_prob, mb, ctx)
            metrics |= gradient_step(loss, [ctx.optimizer], params, ctx.max_grad_norm, reduce)
            out.append(metrics)
        return out

    def step_loss(self, ctx: PolicyContext, mb: TransitionBatch, weight: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """``(loss, metrics, log_prob)`` of one policy step on minibatch ``mb``: Eq. 20's loss
        (``weight``: async mode's importance weights, or None). Subclasses add terms here."""
        reward, values = relabel(ctx, mb)
        log_prob = rescore(ctx, mb)
        loss, metrics = losses.policy_gradient_loss(log_prob, reward, values, weight)
        loss, metrics = with_entropy_bonus(ctx, mb, self.algo.entropy_coef, loss, metrics)
        return loss, metrics, log_prob


def with_entropy_bonus(ctx: PolicyContext, mb: TransitionBatch, coef: float, loss: torch.Tensor,
                       metrics: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss`` and ``metrics`` with ``algo.entropy_coef``'s bonus on the learned step stds (as
    they were where it is 0, or the sampler's stds are fixed)."""
    entropy = step_entropy(ctx.policy, mb.n, ctx.data_shape, ctx.reduction) if coef else None
    if entropy is None:
        return loss, metrics
    bonus, more = losses.entropy_bonus(entropy, coef)
    return loss + bonus, metrics | more
