"""The one Gaussian step: log-probs, sampling, rollouts, re-scoring, and the pretraining loss.

A closed-form denoiser stands in for the network: for data that is a point mass at x0*, the
optimal eps-prediction is eps(x, t) = (x - sqrt(abar_t) x0*) / sqrt(1 - abar_t).
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, assert_close
from sftrl.diffusion.betas import alphas_cumprod, make_betas
from sftrl.diffusion.pretrain import eps_mse_loss, q_sample
from sftrl.diffusion.schedules import SCHEDULE_NAMES, make_schedule
from sftrl.diffusion.step import denoise_step, gaussian_log_prob, rollout, sample, step_std
from sftrl.models.toy import ToySampler

torch.set_num_threads(1)




class PointMassDenoiser(nn.Module):
    """The exact eps_theta for q_0 = delta(x0*): eps(x, t) = (x - sqrt(abar_t) x0*) / sqrt(1 - abar_t).

    ``t`` is the integer network timestep (0-indexed into ``alphas_cumprod``).
    """

    def __init__(self, x0_star: torch.Tensor, abar: np.ndarray, dtype=torch.float64):
        super().__init__()
        self.register_buffer("x0_star", x0_star.to(dtype))
        self.register_buffer("abar", torch.as_tensor(abar, dtype=dtype))

    def forward(self, x, t):
        index = torch.round(t).long()
        assert torch.allclose(t.to(self.abar.dtype), index.to(self.abar.dtype)), (
            "integer timesteps only"
        )
        a = self.abar[index].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (x - a.sqrt() * self.x0_star.to(x.dtype)) / (1.0 - a).sqrt()


def _schedule(name, T=20):
    S = T if name == "ddpm" else 5
    return make_schedule(name, S, num_train_steps=T, beta_schedule="linear")


# ---------------------------------------------------------------- gaussian_log_prob


def test_gaussian_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    mean = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0, 0.01], dtype=torch.float64)
    per_dim = torch.distributions.Normal(mean, std.view(-1, 1, 1)).log_prob(x).flatten(1)  # (4, 6)
    assert_close(gaussian_log_prob(x, mean, std, "sum"), per_dim.sum(1), rtol=1e-12, atol=1e-12)
    assert_close(gaussian_log_prob(x, mean, std, "mean"), per_dim.mean(1), rtol=1e-12, atol=1e-12)


def test_gaussian_log_prob_is_zero_for_deterministic_rows_and_rejects_bad_reduction():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    mean = torch.zeros_like(x)
    std = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = gaussian_log_prob(x, mean, std, "sum")
    assert out[0].item() == 0.0
    expected = sum(
        -0.5 * (v / 2.0) ** 2 - math.log(2.0) - 0.5 * math.log(2 * math.pi) for v in (3.0, -1.0)
    )
    assert out[1].item() == pytest.approx(expected, rel=1e-14)
    with pytest.raises(ValueError, match="median"):
        gaussian_log_prob(x, mean, std, "median")


def test_step_std_floors_only_zero_sigmas():
    tables = make_schedule("ddim", 5, num_train_steps=20).tables()  # sigma = 0 everywhere
    n = torch.tensor([1, 3, 5])
    assert torch.equal(step_std(tables, n, 0.001), torch.full((3,), 0.001))
    tables = make_schedule("strided", 5, num_train_steps=20).tables()
    assert torch.equal(step_std(tables, n, 0.001), tables.sigma[n])


# ---------------------------------------------------------------- one step


def test_denoise_step_mean_and_sampled_moments():
    """mean = coef_x x_n + coef_eps eps; the sample's empirical mean/std match (CLT tolerances)."""
    T = 20
    s = make_schedule("strided", 5, num_train_steps=T)
    tables = s.tables(dtype=torch.float64)
    model = PointMassDenoiser(torch.tensor([0.3, -0.2]), alphas_cumprod(make_betas("linear", T)))
    N, n_value = 200_000, 3
    x_n = torch.tensor([[0.7, -1.1]], dtype=torch.float64).expand(N, 2).clone()
    n = torch.full((N,), n_value)
    out = denoise_step(model, tables, x_n, n, generator=torch.Generator().manual_seed(1))
    row = s.rows()[s.num_steps - n_value]
    eps = model(x_n[:1], torch.tensor([row["tau"]], dtype=torch.float64))[0]
    expected_mean = row["coef_x"] * x_n[0] + row["coef_eps"] * eps
    assert_close(out.mean, expected_mean.expand(N, 2), rtol=1e-12, atol=1e-12)
    assert torch.all(out.std == row["sigma"])
    sigma = row["sigma"]
    # CLT: the sample mean has std sigma / sqrt(N); the sample std has std ~ sigma / sqrt(2N).
    emp_mean = out.x_prev.mean(0)
    emp_std = out.x_prev.std(0)
    assert torch.all((emp_mean - expected_mean).abs() < 5 * sigma / math.sqrt(N))
    assert torch.all((emp_std - sigma).abs() < 5 * sigma / math.sqrt(2 * N))
    # and log_prob scores the sample it drew
    assert_close(
        out.log_prob, gaussian_log_prob(out.x_prev, out.mean, out.std, "sum"), rtol=0, atol=0
    )


def test_denoise_step_mixed_n_equals_per_n_loop():
    """A batch whose rows sit at different n equals a plain per-row loop over n."""
    T = 20
    s = make_schedule("fastdpm-var-linear", 5, num_train_steps=T)
    tables = s.tables(dtype=torch.float64)
    torch.manual_seed(0)
    model = ToySampler(T, hidden=16).double()
    g = torch.Generator().manual_seed(3)
    x_n = torch.randn(10, 2, generator=g, dtype=torch.float64)
    x_prev = torch.randn(10, 2, generator=g, dtype=torch.float64)
    n = torch.tensor([5, 1, 3, 2, 4, 4, 1, 5, 2, 3])
    out = denoise_step(model, tables, x_n, n, x_prev=x_prev, final_step_std=0.01)
    rows = {r["n"]: r for r in s.rows()}
    for b in range(10):
        r = rows[int(n[b])]
        eps = model(x_n[b : b + 1], torch.tensor([r["tau"]], dtype=torch.float64))[0]
        mean = r["coef_x"] * x_n[b] + r["coef_eps"] * eps
        std = r["sigma"] if r["sigma"] > 0 else 0.01
        lp = sum(
            -0.5 * ((x_prev[b, d] - mean[d]) / std) ** 2
            - math.log(std)
            - 0.5 * math.log(2 * math.pi)
            for d in range(2)
        )
        assert_close(out.mean[b], mean, rtol=1e-12, atol=1e-12)
        assert out.std[b].item() == std
        assert out.log_prob[b].item() == pytest.approx(lp.item(), rel=1e-12)
    assert out.x_prev is x_prev


def test_denoise_step_shape_errors():
    tables = _schedule("strided").tables()
    model = ToySampler(20, hidden=8)
    with pytest.raises(ValueError, match="batch 3"):
        denoise_step(model, tables, torch.zeros(3, 2), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        denoise_step(
            model,
            tables,
            torch.zeros(3, 2),
            torch.ones(3, dtype=torch.long),
            x_prev=torch.zeros(3, 3),
        )


# ---------------------------------------------------------------- rollout and re-scoring (ACCEPTANCE)


def test_a_rows_network_output_does_not_depend_on_the_batch_around_it():
    """The worker scores a transition among its chains, the learner among buffer samples: the
    same row must give the same bits in any batch (``sftrl`` sets MKL's strict CNR mode, without
    which AVX-512 machines round rows of batches under 16 differently)."""
    import os

    import sftrl  # noqa: F401

    assert os.environ.get("MKL_CBWR")
    torch.manual_seed(0)
    model = ToySampler(10, hidden=128)
    x, t = torch.randn(640, 2), torch.randint(10, (640,))
    with torch.no_grad():
        full = model(x, t)
        for m in [*range(1, 33), 63, 64, 65, 127, 129, 150]:
            assert torch.equal(model(x[:m], t[:m]), full[:m]), m


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("final_step_std", [0.001, 0.0])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_rescored_log_probs_equal_recorded_ones(name, final_step_std, reduction):
    """Ratio exactly 1 before any update: every recorded transition re-scores bit for bit."""
    T, B = 20, 16
    s = _schedule(name, T)
    tables = s.tables()
    torch.manual_seed(0)
    model = ToySampler(T, hidden=32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        traj = rollout(
            model,
            tables,
            torch.randn(B, 2, generator=g),
            generator=g,
            final_step_std=final_step_std,
            reduction=reduction,
        )
    S = s.num_steps
    assert traj.xs.shape == (S + 1, B, 2)
    assert traj.log_probs.shape == (S, B)
    assert traj.ns.tolist() == list(range(S, 0, -1))
    expected_stds = [r["sigma"] if r["sigma"] > 0 else final_step_std for r in s.rows()]
    assert_close(traj.stds, torch.tensor(expected_stds, dtype=torch.float32), rtol=0, atol=0)

    # Every transition, shuffled so one batch holds rows at mixed n.
    x_n = traj.xs[:-1].reshape(S * B, 2)
    x_prev = traj.xs[1:].reshape(S * B, 2)
    n = traj.ns.repeat_interleave(B)
    recorded = traj.log_probs.reshape(S * B)
    perm = torch.randperm(S * B, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = denoise_step(
            model,
            tables,
            x_n[perm],
            n[perm],
            x_prev=x_prev[perm],
            final_step_std=final_step_std,
            reduction=reduction,
        )
    assert torch.equal(out.log_prob, recorded[perm])
    assert torch.equal((out.log_prob - recorded[perm]).exp(), torch.ones(S * B))

    deterministic = torch.tensor([r["sigma"] == 0 and final_step_std == 0 for r in s.rows()])
    # A deterministic step has log_prob 0 and lands exactly on its mean.
    assert torch.all(traj.log_probs[deterministic] == 0)
    assert torch.equal(
        out.x_prev[deterministic.repeat_interleave(B)[perm]],
        out.mean[deterministic.repeat_interleave(B)[perm]],
    )
    if name == "ddim" and final_step_std == 0:
        assert bool(deterministic.all())
    if name in ("ddpm", "strided"):
        assert not bool(deterministic.any())  # sigma^2 = beta_t at every step, the last included


def test_rollout_is_the_composition_of_steps_and_reparameterised():
    """rollout == a plain loop of denoise_step; with grad on, x_0 is differentiable in theta."""
    T, B = 20, 8
    s = _schedule("fastdpm-var-quadratic", T)
    tables = s.tables(dtype=torch.float64)
    torch.manual_seed(0)
    model = ToySampler(T, hidden=16).double()
    x_start = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    traj = rollout(
        model, tables, x_start, generator=torch.Generator().manual_seed(5), final_step_std=0.001
    )
    g = torch.Generator().manual_seed(5)
    x = x_start
    for k, n_value in enumerate(range(s.num_steps, 0, -1)):
        out = denoise_step(
            model, tables, x, torch.full((B,), n_value), generator=g, final_step_std=0.001
        )
        assert torch.equal(out.x_prev, traj.xs[k + 1])
        assert torch.equal(out.log_prob, traj.log_probs[k])
        x = out.x_prev
    # Reparameterised: d x_0 / d theta is the one a plain loop gives.
    (grad,) = torch.autograd.grad(traj.x_0.sum(), model.out.bias)
    (grad_loop,) = torch.autograd.grad(x.sum(), model.out.bias)
    assert_close(grad, grad_loop, rtol=0, atol=0)
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------- closed-form denoiser


def test_point_mass_chain_ends_at_the_point():
    """DDPM with the posterior variance and the exact denoiser lands on x0*: the last step (n = 1,
    beta~_1 = 0) is deterministic and its mean is (x_1 - sqrt(1 - abar_1) eps) / sqrt(alpha_1) = x0*."""
    T, B = 20, 64
    s = make_schedule("ddpm", T, num_train_steps=T, beta_schedule="linear", variance="posterior")
    assert s.sigma[-1] == 0.0
    x0_star = torch.tensor([0.5, -0.25], dtype=torch.float64)
    model = PointMassDenoiser(x0_star, alphas_cumprod(make_betas("linear", T)))
    traj = rollout(
        model,
        s.tables(dtype=torch.float64),
        torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        generator=torch.Generator().manual_seed(1),
    )
    assert_close(traj.x_0, x0_star.expand(B, 2), rtol=0, atol=1e-12)

    # With sigma^2 = beta_t the last step adds N(0, beta_1) noise around x0* instead.
    s = make_schedule("ddpm", T, num_train_steps=T, beta_schedule="linear", variance="beta")
    N = 100_000
    traj = rollout(
        model,
        s.tables(dtype=torch.float64),
        torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        generator=torch.Generator().manual_seed(1),
    )
    resid = traj.x_0 - x0_star
    sigma_1 = math.sqrt(1e-4)
    assert torch.all(resid.mean(0).abs() < 5 * sigma_1 / math.sqrt(N))
    assert torch.all((resid.std(0) - sigma_1).abs() < 5 * sigma_1 / math.sqrt(2 * N))


@pytest.mark.parametrize("name", ["ddpm", "strided"])
def test_point_mass_chain_marginals_follow_the_forward_process(name):
    """Started from q(x_S | x0*), the exact posterior steps keep x_n ~ N(sqrt(gb_n) x0*, (1 - gb_n) I)."""
    T, N = 20, 100_000
    S = T if name == "ddpm" else 5
    s = make_schedule(name, S, num_train_steps=T, beta_schedule="linear", variance="posterior")
    x0_star = torch.tensor([0.5, -0.25], dtype=torch.float64)
    model = PointMassDenoiser(x0_star, alphas_cumprod(make_betas("linear", T)))
    g = torch.Generator().manual_seed(0)
    gb_S = s.gamma_bar[0]
    x_start = math.sqrt(gb_S) * x0_star + math.sqrt(1 - gb_S) * torch.randn(
        N, 2, dtype=torch.float64, generator=g
    )
    traj = rollout(model, s.tables(dtype=torch.float64), x_start, generator=g)
    for k in range(1, S):  # xs[k] = x_{S-k}, at noise level gamma_bar of step n = S - k
        gb = s.gamma_bar[k]
        sd = math.sqrt(1 - gb)
        assert torch.all(
            (traj.xs[k].mean(0) - math.sqrt(gb) * x0_star).abs() < 5 * sd / math.sqrt(N)
        ), k
        assert torch.all((traj.xs[k].std(0) - sd).abs() < 5 * sd / math.sqrt(2 * N)), k


def test_sample_uses_the_evaluation_chain_without_std_floor():
    T = 20
    s = make_schedule("ddim", 5, num_train_steps=T)
    model = PointMassDenoiser(
        torch.tensor([0.1, 0.2]), alphas_cumprod(make_betas("linear", T)), dtype=torch.float32
    )
    out = sample(
        model, s.tables(), 50, (2,), generator=torch.Generator().manual_seed(0), batch_size=20
    )
    # deterministic DDIM with the exact denoiser of a point mass: every sample is the point
    assert_close(out, torch.tensor([[0.1, 0.2]]).expand(50, 2), rtol=0, atol=1e-5)
    x_start = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    again = rollout(model, s.tables(), x_start).x_0
    assert torch.equal(out[:20], again)


# ---------------------------------------------------------------- pretraining loss


def test_q_sample_closed_form():
    T = 10
    abar = torch.as_tensor(alphas_cumprod(make_betas("sigmoid", T)), dtype=torch.float64)
    x_0 = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]], dtype=torch.float64)
    noise = torch.tensor([[0.1, -0.2], [0.3, 0.4], [-1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([0, 4, 9])
    out = q_sample(x_0, abar, t, noise)
    for b in range(3):
        a = abar[t[b]].item()
        for d in range(2):
            assert out[b, d].item() == pytest.approx(
                math.sqrt(a) * x_0[b, d].item() + math.sqrt(1 - a) * noise[b, d].item(), rel=1e-14
            )


def test_eps_mse_loss_is_zero_for_the_exact_denoiser_and_the_plain_mse_otherwise():
    T, B = 10, 32
    abar_np = alphas_cumprod(make_betas("sigmoid", T))
    abar = torch.as_tensor(abar_np, dtype=torch.float64)
    x0_star = torch.tensor([0.5, 0.5], dtype=torch.float64)
    model = PointMassDenoiser(x0_star, abar_np)
    g = torch.Generator().manual_seed(0)
    x_0 = x0_star.expand(B, 2).clone()
    t = torch.randint(T, (B,), generator=g)
    noise = torch.randn(B, 2, generator=g, dtype=torch.float64)
    loss, metrics = eps_mse_loss(model, x_0, abar, t, noise)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)
    assert metrics["eps_mse"] == loss.item()

    # A model that always predicts 0: the loss is mean(noise^2).
    class Zero(nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    loss, _ = eps_mse_loss(Zero(), x_0, abar, t, noise)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-14)


def test_pretraining_stops_at_the_next_epoch_when_asked():
    import threading

    from sftrl.models.toy import ToySampler
    from sftrl.pretraining import PretrainingStopped, pretrain_sampler

    stop = threading.Event()
    stop.set()
    model = ToySampler(num_train_steps=10, hidden=16)
    before = [p.detach().clone() for p in model.parameters()]
    data = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    with pytest.raises(PretrainingStopped, match="after 0 of 5 epochs"):
        pretrain_sampler(model, data, make_betas("sigmoid", 10), epochs=5, batch_size=32, lr=1e-3,
                         max_grad_norm=1.0, seed=0, progress=False, stop=stop)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not one step taken


def test_pretraining_a_unet_with_dropout_is_a_function_of_its_seed():
    """The digits U-Net's cached sampler differed from one process to the next: dropout drew its
    masks from the global RNG, which torch seeds at random in each process."""
    from sftrl.models.unet import UNet
    from sftrl.pretraining import pretrain_sampler

    data = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    trained = []
    for global_seed in (1, 2, 2):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            model = UNet(ch=32, out_ch=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.5,
                         in_channels=1, resolution=8)
        torch.manual_seed(global_seed)  # whatever the process did before
        state = torch.get_rng_state()
        pretrain_sampler(model, data, make_betas("linear", 10), epochs=2, batch_size=8, lr=1e-3, max_grad_norm=1.0,
                         seed=3 if len(trained) < 2 else 4, progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(trained[0], trained[1])  # the same seed: the same sampler
    assert not torch.equal(trained[1], trained[2])  # another seed: another one (dropout and batches)


def test_pretrain_ema_decay_follows_the_model_recipe_and_keys_the_cache_only_when_set(tmp_path):
    from sftrl.config import load, pretrain_key
    from sftrl.pretraining import UNET_EMA_DECAY, cache_path, load_or_pretrain, pretrain_ema_decay

    smoke = load(REPO / "configs" / "smoke.yaml", [f"pretrain.cache_dir={tmp_path}", "pretrain.epochs=2"])
    assert pretrain_ema_decay(smoke) is None  # the toy MLP: the paper's recipe keeps no average
    assert pretrain_ema_decay(load(REPO / "configs" / "celeba.yaml", [])) == UNET_EMA_DECAY
    # samplers cached before the key existed keep their key; a set decay is another sampler
    assert pretrain_key(load(REPO / "configs" / "smoke.yaml", [])) == "8d0774b8135453bc"
    averaged = load(REPO / "configs" / "smoke.yaml", [f"pretrain.cache_dir={tmp_path}", "pretrain.epochs=2",
                                          "pretrain.ema_decay=0.9"])
    assert pretrain_ema_decay(averaged) == 0.9 and cache_path(averaged, "f") != cache_path(smoke, "f")
    data = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    models = {}
    for name, cfg in (("raw", smoke), ("averaged", averaged)):
        torch.manual_seed(0)
        models[name] = ToySampler(cfg.diffusion.num_train_steps, hidden=cfg.model.hidden)
        assert load_or_pretrain(cfg, models[name], data, progress=False)["source"] == "pretrained"
    raw, avg = (torch.cat([p.flatten() for p in models[k].parameters()]) for k in ("raw", "averaged"))
    assert not torch.equal(raw, avg)  # the same training run, ending on the average of its weights
