"""``sft-pg-kl``: SFT-PG (Eq. 20) with a KL penalty to the pretrained sampler (DPOK-style).

Each policy step minimises

    L = L_Eq.20 + beta * mean over the minibatch of KL(pi_theta(. | x_n) || pi_theta_0(. | x_n))

where theta_0 is the sampler fine-tuning started from (frozen: ``PolicyContext.reference``; the
default ``reference: pretrained``, DPOK's guard) and x_n are the buffer's states. Both steps are
Gaussians, so each KL is in closed form (``step.gaussian_kl``, reduced over the data dims like the
log-prob); with fixed variances it is the squared distance of the two means over 2 std_n^2. The penalty keeps the sampler near the
pretrained one: where plain SFT-PG drifts after its best point, the KL holds it back.

A nearly deterministic last step (``diffusion.final_step_std`` 0.001 on images) weighs a shift of
its mean by 1 / (2 x 0.001^2) = 500,000 per squared unit, against about 1 for the first steps, so
the exact KL is almost all last step and pins the sampler's output. ``min_std`` floors both stds
inside the KL only (``floored_step_kl``; sampling and Eq. 20 keep the exact stds), which spreads
the penalty over the chain: with 0.1, no step weighs more than 50 per squared unit.

``reference: best`` anchors the KL to the run's best evaluated sampler instead: theta_0 until the
first evaluation, then, after each evaluation that scores below every earlier one (the FID, else the
mean SW2), the weights it scored (the moving average where ``algo.ema_decay`` keeps one). On
digits the KL to theta_0 stays flat (about 0.009 from iteration 130 to 230 of a 250-iteration run)
while the FID climbs from 5.7 to 8.8: the sampler drifts along directions that keep its distance
to theta_0, which only an anchor at the best point sees. The trainer scores every evaluation
before the next update in this mode (``PolicyAlgorithm.reference_follows_best``), so the anchor
moves at the same iterations in every run of a seed and a resume repeats it.

Written against the plug-in interface only (``settings_class``, ``needs_reference``): its
settings are read from ``algo.sft-pg-kl`` (``beta``, ``min_std``, ``reference``), the shared ones
(``algo.max_importance_weight``) from ``algo``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from sftrl.algos import losses
from sftrl.algos.base import PolicyContext, register
from sftrl.algos.sft_pg import SFTPG, relabel
from sftrl.buffer import TransitionBatch
from sftrl.configtools import Range, doc_field
from sftrl.diffusion.step import Reduction, denoise_step, gaussian_kl

KL_TO_PRETRAINED = "kl_to_pretrained"  # mean per-step KL(pi_theta || pi_theta_0) of a minibatch
KL_TO_BEST = "kl_to_best"  # likewise, to the run's best evaluated sampler (reference: best)


@dataclasses.dataclass(frozen=True)
class KLSettings:
    """Read from ``algo.sft-pg-kl`` in the config."""

    beta: float = doc_field(
        1.0, "Weight of the per-step KL(pi_theta || pi_pretrained) added to Eq. 20's loss (reduced over data "
        "dims as diffusion.log_prob_reduction says).", valid=Range(0.0))
    min_std: float = doc_field(
        0.0, "Floor on both steps' stds inside the KL only (sampling and Eq. 20 keep the exact ones): with a "
        "nearly deterministic last step (diffusion.final_step_std) the exact KL is almost all that step; a floor "
        "such as 0.1 spreads the penalty over the chain. 0: the exact KL.", valid=Range(0.0))
    reference: Literal["pretrained", "best"] = doc_field(
        "pretrained", "The sampler the KL is to: 'pretrained' (theta_0, DPOK's guard) or 'best' (the run's best "
        "evaluated sampler so far: theta_0 until an evaluation scores, then the weights of each new best; needs "
        "trainer.eval_every > 0, and each evaluation is waited for before the next update).")


def kl_penalty(step_kl: torch.Tensor, beta: float, metric: str = KL_TO_PRETRAINED) -> tuple[torch.Tensor, dict[str, float]]:
    """beta x the mean of ``step_kl`` ``(B,)``, and its metric (the mean KL itself, as ``metric``)."""
    kl = step_kl.mean()
    return beta * kl, {metric: kl.item()}


def floored_step_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor,
                    reduction: Reduction, min_std: float) -> torch.Tensor:
    """``gaussian_kl`` of two steps ``(B,)`` with both stds floored at ``min_std`` (0: exact)."""
    if min_std > 0:
        std_p, std_q = std_p.clamp(min=min_std), std_q.clamp(min=min_std)
    return gaussian_kl(mean_p, std_p, mean_q, std_q, reduction)


@register("sft-pg-kl")
class SFTPGKL(SFTPG):
    """SFT-PG's generator phase (async reweighting included) with ``beta`` x the KL to theta_0."""

    settings_class = KLSettings
    needs_reference = True

    @property
    def reference_follows_best(self) -> bool:
        return self.settings.reference == "best"

    def step_loss(self, ctx: PolicyContext, mb: TransitionBatch, weight: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        assert ctx.reference is not None, "sft-pg-kl needs the learner's reference sampler (needs_reference)"
        reward, values = relabel(ctx, mb)
        step = denoise_step(ctx.forward, ctx.tables, mb.x_n, mb.n, x_prev=mb.x_prev,
                            final_step_std=ctx.final_step_std, reduction=ctx.reduction)
        with torch.no_grad():
            ref = denoise_step(ctx.reference, ctx.tables, mb.x_n, mb.n, x_prev=mb.x_prev,
                               final_step_std=ctx.final_step_std, reduction=ctx.reduction)
        loss, metrics = losses.policy_gradient_loss(step.log_prob, reward, values, weight)
        step_kl = floored_step_kl(step.mean, step.std, ref.mean, ref.std, ctx.reduction, self.settings.min_std)
        penalty, kl_metrics = kl_penalty(step_kl, self.settings.beta,
                                         KL_TO_BEST if self.reference_follows_best else KL_TO_PRETRAINED)
        return loss + penalty, metrics | kl_metrics, step.log_prob
