"""SFT-PG's losses on hand-computed cases, and the policy-gradient estimator against the pathwise
gradient (and the exact gradient) on a linear-Gaussian chain where all three are computable."""

import math

import pytest
import torch
from torch import nn

from conftest import assert_close
from sftrl.algos import losses
from sftrl.diffusion.schedules import StepTables
from sftrl.diffusion.step import denoise_step, rollout

torch.set_num_threads(1)
F64 = torch.float64




def t64(values, requires_grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


# ---------------------------------------------------------------- policy gradient (Eq. 20)


def test_policy_gradient_loss_hand_case():
    log_prob = t64([-1.0, -2.0, 0.5], requires_grad=True)
    reward = t64([1.0, 0.0, 2.0], requires_grad=True)
    values = t64([0.5, 0.5, 1.0], requires_grad=True)
    # advantage = [0.5, -0.5, 1.0]; loss = -(0.5 * -1 + -0.5 * -2 + 1.0 * 0.5) / 3 = -1/3
    loss, metrics = losses.policy_gradient_loss(log_prob, reward, values)
    assert loss.item() == pytest.approx(-1.0 / 3.0, rel=1e-14)
    loss.backward()
    # d loss / d log_prob = -advantage / B; reward and values are constants
    assert_close(log_prob.grad, t64([-0.5 / 3, 0.5 / 3, -1.0 / 3]), rtol=1e-14, atol=0)
    assert reward.grad is None and values.grad is None
    assert metrics[losses.POLICY_LOSS] == pytest.approx(-1.0 / 3.0)
    assert metrics[losses.ADVANTAGE_MEAN] == pytest.approx(1.0 / 3.0)
    # unbiased std of [0.5, -0.5, 1.0]: sum of squared deviations 42/36 over 2
    assert metrics[losses.ADVANTAGE_STD] == pytest.approx(math.sqrt(21.0 / 36.0))
    assert metrics[losses.REWARD_MEAN] == pytest.approx(1.0)
    # 1 - Var[reward - values] / Var[reward] = 1 - (21/36) / 1
    assert metrics[losses.EXPLAINED_VARIANCE] == pytest.approx(5.0 / 12.0)


def test_weighted_policy_gradient_loss_and_truncated_importance_weight_hand_case():
    log_prob = t64([-1.0, -2.0, 0.5], requires_grad=True)
    behaviour = t64([-1.0, -2.0 - math.log(3.0), 0.5 + math.log(2.0)])
    # ratios pi / mu = [1, 3, 0.5]; truncated at 2: [1, 2, 0.5], the second cut
    weight, truncated = losses.truncated_importance_weight(log_prob, behaviour, 2.0)
    assert_close(weight, t64([1.0, 2.0, 0.5]), rtol=1e-14, atol=0)
    assert truncated.tolist() == [False, True, False] and not weight.requires_grad
    # log-probs averaged over D = 4 dims (the images' mean reduction): the same density ratios
    averaged, _ = losses.truncated_importance_weight(log_prob / 4, behaviour / 4, 2.0, dims_averaged=4)
    assert_close(averaged, weight, rtol=1e-14, atol=0)
    reward, values = t64([1.0, 0.0, 2.0]), t64([0.5, 0.5, 1.0])
    # weighted advantage = [0.5, -1.0, 0.5]; loss = -(0.5 * -1 + -1.0 * -2 + 0.5 * 0.5) / 3
    loss, metrics = losses.policy_gradient_loss(log_prob, reward, values, weight)
    assert loss.item() == pytest.approx(-1.75 / 3.0, rel=1e-14)
    loss.backward()
    assert_close(log_prob.grad, t64([-0.5 / 3, 1.0 / 3, -0.5 / 3]), rtol=1e-14, atol=0)
    assert metrics[losses.ADVANTAGE_MEAN] == pytest.approx(1.0 / 3.0)  # the advantage itself, unweighted
    # weight 1 everywhere is Eq. 20 exactly
    same, _ = losses.policy_gradient_loss(log_prob, reward, values, torch.ones(3, dtype=F64))
    assert same.item() == losses.policy_gradient_loss(log_prob, reward, values)[0].item()


def test_explained_variance_cases():
    targets = t64([1.0, 2.0, 4.0])
    assert losses.explained_variance(targets.clone(), targets) == 1.0
    assert losses.explained_variance(torch.full_like(targets, 7.0), targets) == pytest.approx(
        0.0, abs=1e-15
    )
    assert math.isnan(losses.explained_variance(targets, torch.full_like(targets, 3.0)))


# ---------------------------------------------------------------- PPO


def test_ppo_clip_loss_hand_case():
    ratios = [1.0, 1.5, 0.5, 1.1]
    log_prob = t64([math.log(r) for r in ratios], requires_grad=True)
    behaviour = t64([0.0, 0.0, 0.0, 0.0])
    advantage = t64([1.0, 1.0, -1.0, -2.0])
    loss, metrics = losses.ppo_clip_loss(log_prob, behaviour, advantage, clip_range=0.2)
    # min(r A, clip(r, 0.8, 1.2) A) = [1.0, 1.2, -0.8, -2.2]  ->  loss = -(-0.8) / 4 = 0.2
    assert loss.item() == pytest.approx(0.2, rel=1e-12)
    loss.backward()
    # rows 1 and 2 sit on the clipped branch (no gradient); rows 0, 3: d/dlogp = -r A / 4
    assert_close(log_prob.grad, t64([-0.25, 0.0, 0.0, 0.55]), rtol=1e-12, atol=1e-15)
    assert metrics[losses.CLIP_FRACTION] == 0.5  # |r - 1| > 0.2 for r = 1.5 and 0.5
    # mean[(r - 1) - log r] = (0 + 0.0945349 + 0.1931472 + 0.0046898) / 4
    assert metrics[losses.APPROX_KL] == pytest.approx(0.0730930, abs=1e-7)
    assert metrics[losses.RATIO_MIN] == pytest.approx(0.5)
    assert metrics[losses.RATIO_MEAN] == pytest.approx(1.025)
    assert metrics[losses.RATIO_MAX] == pytest.approx(1.5)


def test_ppo_clip_loss_at_ratio_one_is_the_policy_gradient_loss():
    log_prob = t64([-1.0, -2.0, 0.5], requires_grad=True)
    advantage = t64([0.5, -0.5, 1.0])
    loss, metrics = losses.ppo_clip_loss(log_prob, log_prob.detach(), advantage, clip_range=0.1)
    loss.backward()
    # the surrogate is -mean(r A) = -mean(A) at r = 1, and its gradient is -A / B
    assert loss.item() == pytest.approx(-1.0 / 3.0)
    assert_close(log_prob.grad, -advantage / 3, rtol=1e-14, atol=0)
    assert metrics[losses.RATIO_MIN] == metrics[losses.RATIO_MAX] == 1.0
    assert metrics[losses.APPROX_KL] == 0.0 and metrics[losses.CLIP_FRACTION] == 0.0


def test_ppo_clip_loss_with_mean_log_probs_clips_the_density_ratio_at_the_mean_reductions_scale():
    """Log-probs averaged over D = 100 dims: a per-dim shift of 0.002 is a density ratio of
    e^0.2 (clipped at 1.2), not e^0.002; at ratio 1 the gradient is the policy-gradient loss's."""
    D = 100
    log_prob = t64([0.002, -0.002, 0.0], requires_grad=True)
    advantage = t64([1.0, -1.0, 2.0])
    loss, metrics = losses.ppo_clip_loss(log_prob, t64([0.0, 0.0, 0.0]), advantage, clip_range=0.1, dims_averaged=D)
    ratio = [math.exp(0.2), math.exp(-0.2), 1.0]
    assert metrics[losses.RATIO_MAX] == pytest.approx(ratio[0]) and metrics[losses.CLIP_FRACTION] == pytest.approx(2 / 3)
    # min(r A, clip(r) A) = [1.1, -0.9, 2.0], the loss divided by D
    assert loss.item() == pytest.approx(-(1.1 - 0.9 + 2.0) / 3 / D)
    loss.backward()
    assert_close(log_prob.grad, t64([0.0, 0.0, -2.0 / 3]), rtol=1e-12, atol=1e-15)  # only row 2 unclipped
    at_one = log_prob.detach().clone().requires_grad_(True)
    losses.ppo_clip_loss(at_one, at_one.detach(), advantage, 0.1, dims_averaged=D)[0].backward()
    pg = log_prob.detach().clone().requires_grad_(True)
    losses.policy_gradient_loss(pg, advantage, torch.zeros(3, dtype=torch.float64))[0].backward()
    assert_close(at_one.grad, pg.grad, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- pathwise (Eq. 14)


def test_pathwise_loss_hand_case():
    c_fake = t64([1.0, 2.0, 3.0], requires_grad=True)
    loss, metrics = losses.pathwise_loss(c_fake)
    assert loss.item() == -2.0 and metrics[losses.REWARD_MEAN] == 2.0
    loss.backward()
    assert_close(c_fake.grad, t64([-1.0, -1.0, -1.0]) / 3, rtol=1e-15, atol=0)


# ---------------------------------------------------------------- critic losses (Eq. 21-23)

# m = 2 chains, S = 3 steps. c(x_0) - V(x_n, n) per chain: [0.5, 0, 1] and [0, 1, -0.5].
C_FAKE = [1.0, 2.0]
C_REAL = [3.0, 1.0]
VALUES = [[0.5, 2.0], [1.0, 1.0], [0.0, 2.5]]
R_B = (0.25 + 0.0 + 1.0 + 0.0 + 1.0 + 0.25) / 2  # mean over chains of the sum over steps = 1.25
# d R_B / d c_b = (2 / m) sum_n (c_b - V_nb);  d R_B / d V_nb = -(2 / m) (c_b - V_nb)
GRAD_RB_C = [1.5, 0.5]
GRAD_RB_V = [[-0.5, 0.0], [0.0, -1.0], [-1.0, 0.5]]


def test_baseline_regulariser_hand_case_grad_reaches_both_sides():
    c_fake, values = t64(C_FAKE, True), t64(VALUES, True)
    r_b = losses.baseline_regulariser(c_fake, values)
    assert r_b.item() == pytest.approx(R_B)
    r_b.backward()
    assert_close(c_fake.grad, t64(GRAD_RB_C), rtol=1e-14, atol=0)
    assert_close(values.grad, t64(GRAD_RB_V), rtol=1e-14, atol=0)


def test_critic_baseline_loss_hand_case():
    lam = 0.1
    c_real, c_fake, values = t64(C_REAL, True), t64(C_FAKE, True), t64(VALUES, True)
    loss, metrics = losses.critic_baseline_loss(c_real, c_fake, values, lam)
    gap = 2.0 - 1.5
    assert loss.item() == pytest.approx(-(gap - lam * R_B))  # -0.375
    assert metrics[losses.IPM_GAP] == pytest.approx(gap)
    assert metrics[losses.BASELINE_LOSS] == pytest.approx(R_B)
    assert metrics[losses.CRITIC_LOSS] == pytest.approx(-0.375)
    # targets c_fake per (n, chain) = [1,2,1,2,1,2] (var 0.3), residuals var 11/30: EV = 1 - 11/9
    assert metrics[losses.EXPLAINED_VARIANCE] == pytest.approx(-2.0 / 9.0)
    loss.backward()
    assert_close(c_real.grad, t64([-0.5, -0.5]), rtol=1e-14, atol=0)
    # R_B is not detached: its gradient reaches c_fake (on top of the +1/m of -gap) and values
    assert_close(c_fake.grad, t64([0.5 + lam * 1.5, 0.5 + lam * 0.5]), rtol=1e-14, atol=0)
    assert_close(values.grad, lam * t64(GRAD_RB_V), rtol=1e-14, atol=0)


def test_baseline_mse_loss_hand_case_does_not_reach_the_critic():
    c_fake, values = t64(C_FAKE, True), t64(VALUES, True)
    loss, metrics = losses.baseline_mse_loss(c_fake, values)
    assert loss.item() == pytest.approx(R_B)
    assert metrics[losses.BASELINE_LOSS] == pytest.approx(R_B)
    assert metrics[losses.EXPLAINED_VARIANCE] == pytest.approx(-2.0 / 9.0)
    loss.backward()
    assert c_fake.grad is None
    assert_close(values.grad, t64(GRAD_RB_V), rtol=1e-14, atol=0)


class LinearCritic(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(t64(w))

    def forward(self, x):
        return x @ self.w


def test_gradient_penalty_of_linear_critic_is_exact():
    critic = LinearCritic([3.0, 4.0])  # |grad c| = |w| = 5 everywhere
    g = torch.Generator().manual_seed(0)
    x_fake = torch.randn(6, 2, generator=g, dtype=F64)
    x_real = torch.randn(6, 2, generator=g, dtype=F64)
    mix = torch.rand(6, generator=g, dtype=F64)
    penalty = losses.gradient_penalty(critic, x_fake, x_real, mix)
    assert penalty.item() == 16.0  # (|w| - 1)^2
    # create_graph: the penalty differentiates in the critic's parameters, 2 (|w| - 1) w / |w|
    penalty.backward()
    assert_close(critic.w.grad, t64([4.8, 6.4]), rtol=1e-14, atol=0)


def test_gradient_penalty_interpolates_real_with_weight_mix():
    class HalfSquare(nn.Module):  # c(x) = |x|^2 / 2, grad c(x) = x
        def forward(self, x):
            return 0.5 * x.pow(2).sum(1)

    x_fake = t64([[0.0, 0.0], [2.0, 0.0]])
    x_real = t64([[3.0, 4.0], [0.0, 0.0]])
    mix = t64([0.4, 0.25])
    # x^ = mix x_real + (1 - mix) x_fake = [1.2, 1.6] (norm 2) and [1.5, 0] (norm 1.5)
    penalty = losses.gradient_penalty(HalfSquare(), x_fake, x_real, mix)
    assert penalty.item() == pytest.approx(((2.0 - 1.0) ** 2 + (1.5 - 1.0) ** 2) / 2)


def test_critic_gp_loss_hand_case():
    c_real, c_fake = t64(C_REAL, True), t64(C_FAKE, True)
    penalty = t64(16.0, True)
    loss, metrics = losses.critic_gp_loss(c_real, c_fake, penalty, eta=0.001)
    assert loss.item() == pytest.approx(-(0.5 - 0.016))
    assert metrics[losses.IPM_GAP] == pytest.approx(0.5)
    assert metrics[losses.GRADIENT_PENALTY] == 16.0
    loss.backward()
    assert_close(c_real.grad, t64([-0.5, -0.5]), rtol=1e-14, atol=0)
    assert_close(c_fake.grad, t64([0.5, 0.5]), rtol=1e-14, atol=0)
    assert penalty.grad.item() == pytest.approx(0.001)


# ---------------------------------------------------------------- ACCEPTANCE: PG == pathwise in expectation


class LinearEps(nn.Module):
    """eps_theta(x, t) = theta x with one theta *per chain* (all equal): autograd then returns every
    chain's own gradient, so the standard error comes from the per-chain samples."""

    def __init__(self, theta: float, num_chains: int):
        super().__init__()
        self.theta = nn.Parameter(torch.full((num_chains,), theta, dtype=F64))

    def forward(self, x, t):
        return self.theta.unsqueeze(1) * x  # (N, D)


def _two_step_ddpm_tables():
    """DDPM steps (sigma^2 = beta) between the noise levels gamma_bar_1 = 0.8, gamma_bar_2 = 0.3."""
    gbs = [1.0, 0.8, 0.3]  # gamma_bar_0 = 1
    coef_x, coef_eps, sigma = [math.nan], [math.nan], [math.nan]
    for n in (1, 2):
        beta = 1.0 - gbs[n] / gbs[n - 1]
        coef_x.append(1.0 / math.sqrt(1.0 - beta))
        coef_eps.append(-beta / (math.sqrt(1.0 - beta) * math.sqrt(1.0 - gbs[n])))
        sigma.append(math.sqrt(beta))
    return StepTables(
        num_steps=2,
        tau=t64([math.nan, 0.0, 1.0]),
        sigma=t64(sigma),
        coef_x=t64(coef_x),
        coef_eps=t64(coef_eps),
    )


def _exact_gradient(tables, theta, dim):
    """d/dtheta E[r], r = -sum_d (x_0 - 1)^2. Each coordinate of x_0 = a_1 a_2 x_2 + a_1 s_2 z_2 + s_1 z_1
    with a_n = coef_x + coef_eps theta is N(0, v), v = a_1^2 (a_2^2 + s_2^2) + s_1^2, so E[r] = -D (v + 1)."""
    th = torch.tensor(theta, dtype=F64, requires_grad=True)
    a1 = tables.coef_x[1] + tables.coef_eps[1] * th
    a2 = tables.coef_x[2] + tables.coef_eps[2] * th
    v = a1**2 * (a2**2 + tables.sigma[2] ** 2) + tables.sigma[1] ** 2
    expected_reward = -dim * (v + 1.0)
    (grad,) = torch.autograd.grad(expected_reward, th)
    return grad.item(), expected_reward.item()


def _reward(x_0):
    return -(x_0 - 1.0).pow(2).sum(1)  # (N,)


@pytest.mark.parametrize("use_baseline", [True, False])
def test_policy_gradient_agrees_with_pathwise_gradient(use_baseline):
    N, D, theta = 400_000, 2, 0.3
    tables = _two_step_ddpm_tables()
    exact, expected_reward = _exact_gradient(tables, theta, D)
    S = tables.num_steps
    model = LinearEps(theta, N)
    g = torch.Generator().manual_seed(0)
    traj = rollout(model, tables, torch.randn(N, D, generator=g, dtype=F64), generator=g)

    # Pathwise: back-propagate -r through the reparameterised chain (pathwise_loss = -mean r).
    loss, _ = losses.pathwise_loss(_reward(traj.x_0))
    (grad,) = torch.autograd.grad(loss, model.theta)
    pathwise = -N * grad  # (N,) per-chain d r / d theta

    # REINFORCE with a constant baseline on the same chains: re-score every transition (states
    # held fixed) and take the library's policy-gradient loss over all S N transitions.
    xs = traj.xs.detach()
    reward = _reward(xs[-1])
    log_prob = torch.cat(
        [
            denoise_step(model, tables, xs[k], torch.full((N,), S - k), x_prev=xs[k + 1]).log_prob
            for k in range(S)
        ]
    )  # (S N,), step-major
    baseline = expected_reward if use_baseline else 0.0
    loss, _ = losses.policy_gradient_loss(
        log_prob, reward.repeat(S), torch.full((S * N,), baseline, dtype=F64)
    )
    (grad,) = torch.autograd.grad(loss, model.theta)
    reinforce = -S * N * grad  # (N,) per-chain (r - V) sum_n d log pi / d theta

    def mean_se(samples):
        return samples.mean().item(), samples.std().item() / math.sqrt(N)

    pg, pg_se = mean_se(reinforce)
    pw, pw_se = mean_se(pathwise)
    diff, diff_se = mean_se(reinforce - pathwise)
    assert abs(exact) > 5.0  # the gradient is far from 0 ...
    assert pg_se < 0.01 * abs(exact)  # ... and the test resolves it to 1 % or better
    assert abs(diff) < 4 * diff_se, (pg, pw, diff_se)
    assert abs(pg - exact) < 4 * pg_se, (pg, exact, pg_se)
    assert abs(pw - exact) < 4 * pw_se, (pw, exact, pw_se)
