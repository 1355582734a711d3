"""Losses of SFT-PG and its relatives: pure functions returning ``(loss, metrics)``.

Sign convention (DESIGN.md): the critic c(x) scores how *real* x looks (paper f = -c). The IPM
estimate is g = E_q[c(x)] - E_p[c(x_0)]; the critic maximises it, the sampler maximises the
reward r = c(x_0). Every loss here is something to *minimise*.

Code name     -> paper symbol
``c_real``    -> c_alpha(x) for x ~ q_0,     ``c_fake`` -> c_alpha(x_0) for x_0 ~ p^theta_0
``values``    -> V_omega(x_n, n) (Eq. 20-21), ``advantage`` -> c(x_0) - V(x_n, n)
``log_prob``  -> log p^theta(x_{n-1} | x_n)
``lam``       -> lambda (Eq. 23),             ``eta`` -> the GP coefficient (Eq. 22)
"""

from __future__ import annotations

import torch

# Stable metric names (logs, TensorBoard and reports rely on them).
POLICY_LOSS = "policy_loss"
ADVANTAGE_MEAN = "advantage_mean"
ADVANTAGE_STD = "advantage_std"
CRITIC_LOSS = "critic_loss"
IPM_GAP = "ipm_gap"
BASELINE_LOSS = "baseline_loss"
GRADIENT_PENALTY = "gradient_penalty"
EXPLAINED_VARIANCE = "explained_variance"
APPROX_KL = "approx_kl"
CLIP_FRACTION = "clip_fraction"
RATIO_MIN = "ratio_min"
RATIO_MEAN = "ratio_mean"
RATIO_MAX = "ratio_max"
# |log pi_learner - log pi_rollout| (density) of transitions collected with the current theta, at
# a phase's first policy step: 0 when worker and learner compute the same log-prob; "/n{n}" per step.
RESCORE_LOG_RATIO_ABSMAX = "rescore_log_ratio_absmax"
REWARD_MEAN = "reward_mean"
ENTROPY = "entropy"  # the mean entropy of the minibatch's step Gaussians (algo.entropy_coef > 0)
IMPORTANCE_WEIGHT_MEAN = "importance_weight_mean"
IMPORTANCE_WEIGHT_TRUNCATED = "importance_weight_truncated"


def explained_variance(values: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[targets - values] / Var[targets]: 1 is a perfect baseline, 0 a constant one."""
    var = targets.var()
    if var.item() == 0:
        return float("nan")
    return (1.0 - (targets - values).var() / var).item()


def entropy_bonus(entropy: torch.Tensor, coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """-coef x mean entropy of the minibatch's step Gaussians (``entropy`` ``(B,)``,
    ``sftrl.diffusion.variance.step_entropy``), added to a policy loss: minimising it raises the
    learned stds against a policy gradient that shrinks them (PPO's entropy bonus)."""
    mean = entropy.mean()
    return -coef * mean, {ENTROPY: mean.item()}


def policy_gradient_loss(
    log_prob: torch.Tensor,
    reward: torch.Tensor,
    values: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT-PG's REINFORCE with a baseline (Eq. 20) over a batch of transitions.

    -mean[(c(x_0) - V(x_n, n)) log pi(x_{n-1} | x_n)]: ``log_prob`` ``(B,)`` carries the gradient,
    ``reward`` and ``values`` ``(B,)`` are treated as constants. Sampling transitions uniformly
    from the buffer makes this 1/S of Eq. 20's sum over steps, in expectation.

    ``weight`` ``(B,)`` (async mode only, a constant): importance weights of transitions collected
    with older weights (``truncated_importance_weight``); None is Eq. 20.
    """
    advantage = (reward - values).detach()  # (B,)
    weighted = advantage if weight is None else weight.detach() * advantage
    loss = -(weighted * log_prob).mean()
    return loss, {
        POLICY_LOSS: loss.item(),
        ADVANTAGE_MEAN: advantage.mean().item(),
        ADVANTAGE_STD: advantage.std().item() if advantage.numel() > 1 else 0.0,
        REWARD_MEAN: reward.mean().item(),
        EXPLAINED_VARIANCE: explained_variance(values.detach(), reward.detach()),
    }


def truncated_importance_weight(
    log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, max_weight: float, dims_averaged: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, truncated)``: min(max_weight, pi(a|s) / mu(a|s)) per transition and whether the
    ratio was cut, ``(B,)`` each, from ``(B,)`` log-probs (no gradient).

    Async mode's off-policy correction (not in the paper): ``mu`` is the older policy that
    collected the transition, ``pi`` the one the generator phase starts from. Per-step ratios
    truncated at ``max_weight``, as IMPALA's V-trace (rho-bar) does: bounded variance, at the cost
    of ignoring the shift of the states and of the reward-to-go, small for a lag of a few versions.

    ``dims_averaged``: D when the log-probs are averaged over D data dims (the ``mean`` reduction
    of images): the density ratio is exp(D (log_prob - behaviour_log_prob)), not its D-th root.
    """
    log_ratio = (log_prob.detach() - behaviour_log_prob.detach()) * dims_averaged
    ratio = log_ratio.exp()
    return ratio.clamp(max=max_weight), ratio > max_weight


def ppo_clip_loss(
    log_prob: torch.Tensor,
    behaviour_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    clip_range: float,
    dims_averaged: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate on single transitions (DDPO-style), ``(B,)`` tensors in.

    ratio = pi(a|s) / pi_behaviour(a|s); loss = -mean[min(ratio A, clip(ratio, 1 +- eps) A)].
    ``approx_kl`` is the low-variance estimator mean[(ratio - 1) - log ratio].

    ``dims_averaged``: D when the log-probs are averaged over D data dims (the ``mean``
    reduction): the ratio (clip, metrics) is the density's, exp(D (log_prob - behaviour)), and
    the loss is divided by D, so that its gradient at ratio 1 is the mean reduction's
    policy-gradient step (``policy_gradient_loss``), the learning rate's scale unchanged.
    """
    advantage = advantage.detach()
    log_ratio = (log_prob - behaviour_log_prob.detach()) * dims_averaged
    ratio = log_ratio.exp()
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantage
    loss = -torch.minimum(unclipped, clipped).mean() / dims_averaged
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean().item()
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean().item()
    return loss, {
        POLICY_LOSS: loss.item(),
        ADVANTAGE_MEAN: advantage.mean().item(),
        ADVANTAGE_STD: advantage.std().item() if advantage.numel() > 1 else 0.0,
        APPROX_KL: approx_kl,
        CLIP_FRACTION: clip_fraction,
        RATIO_MIN: ratio.min().item(),
        RATIO_MEAN: ratio.mean().item(),
        RATIO_MAX: ratio.max().item(),
    }


def pathwise_loss(c_fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Pathwise SFT (Eq. 14): minimise -E[c(h_theta(x_T))]; ``c_fake`` ``(B,)`` differentiable in theta."""
    loss = -c_fake.mean()
    return loss, {POLICY_LOSS: loss.item(), REWARD_MEAN: c_fake.mean().item()}


def baseline_regulariser(c_fake: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """R_B (Eq. 21): mean over chains of sum over steps of (c(x_0) - V(x_n, n))^2.

    ``c_fake`` ``(m,)``: c(x_0) per chain; ``values`` ``(S, m)``: V(x_n, n) for n = S..1.
    Neither side is detached: R_B pulls V towards c(x_0) *and* c towards V.
    """
    return (c_fake.unsqueeze(0) - values).pow(2).sum(0).mean()


def critic_baseline_loss(
    c_real: torch.Tensor, c_fake: torch.Tensor, values: torch.Tensor, lam: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT-PG (B), Eq. 23: minimise -(E_q[c] - E_p[c] - lam R_B) jointly over critic and baseline.

    ``c_real`` ``(m,)``, ``c_fake`` ``(m,)``, ``values`` ``(S, m)``.
    """
    gap = c_real.mean() - c_fake.mean()  # g, Eq. 6 with f = -c
    r_b = baseline_regulariser(c_fake, values)
    loss = -(gap - lam * r_b)
    targets = c_fake.detach().unsqueeze(0).expand_as(values)
    return loss, {
        CRITIC_LOSS: loss.item(),
        IPM_GAP: gap.item(),
        BASELINE_LOSS: r_b.item(),
        EXPLAINED_VARIANCE: explained_variance(values.detach().flatten(), targets.flatten()),
    }


def gradient_penalty(
    critic, x_fake: torch.Tensor, x_real: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """E[(|grad_x c(x^)| - 1)^2] with x^ = mix x_real + (1 - mix) x_fake (Eq. 22).

    ``x_fake``, ``x_real`` ``(m, *D)``; ``mix`` ``(m,)`` uniform in [0, 1], drawn by the caller.
    """
    shape = (-1,) + (1,) * (x_fake.dim() - 1)
    x_hat = (mix.view(shape) * x_real + (1.0 - mix.view(shape)) * x_fake).detach()
    x_hat.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


def critic_gp_loss(
    c_real: torch.Tensor, c_fake: torch.Tensor, penalty: torch.Tensor, eta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT-PG (GP) / SFT critic, Eq. 22: minimise -(E_q[c] - E_p[c] - eta R_GP)."""
    gap = c_real.mean() - c_fake.mean()
    loss = -(gap - eta * penalty)
    return loss, {CRITIC_LOSS: loss.item(), IPM_GAP: gap.item(), GRADIENT_PENALTY: penalty.item()}


def baseline_mse_loss(c_fake: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit V to a fixed critic by plain MSE (the GP variant): R_B with c(x_0) held constant."""
    target = c_fake.detach()
    loss = baseline_regulariser(target, values)
    targets = target.unsqueeze(0).expand_as(values)
    return loss, {
        BASELINE_LOSS: loss.item(),
        EXPLAINED_VARIANCE: explained_variance(values.detach().flatten(), targets.flatten()),
    }
