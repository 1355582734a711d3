"""Sampling schedules against independent, written-out math (DESIGN.md section 1).

Every expected number here is derived in the test itself (plain loops, the formulas of the
design notes, scipy's brentq for the timestep search), not by calling the library's helpers.
"""

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from sftrl.diffusion.betas import alphas_cumprod, log_alpha_bar_continuous, make_betas
from sftrl.diffusion.schedules import SCHEDULE_NAMES, make_schedule

T_IMAGE = 1000
BETA_1, BETA_T = 1e-4, 0.02  # Ho et al. linear betas
FASTDPM_RTOL = 1e-4  # FastDPM's end-beta bisection stops within 1e-4 relative above alpha-bar_T
FASTDPM_TAU_RTOL = 1e-8  # its timestep bisection, within 1e-8 relative (of the log) above the target
# lgamma(c + 1) - lgamma(c - t) subtracts two numbers of size ~5e5 (c ~ 5e4), so the continuous
# log alpha-bar carries an absolute rounding error of a few 1e-11 whatever t is.
LGAMMA_NOISE = 1e-10


# ---------------------------------------------------------------- independent reference math


def linear_betas_loop(T):
    return [BETA_1 + (BETA_T - BETA_1) * t / (T - 1) for t in range(T)]


def cumprod_loop(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return out


def log_abar_cont(t, T=T_IMAGE):
    """log alpha-bar(t) = (t+1) log d + lgamma(c+1) - lgamma(c-t), linear betas (written out)."""
    d = (BETA_T - BETA_1) / (T - 1)
    c = (1.0 - BETA_1) / d
    return (t + 1.0) * math.log(d) + math.lgamma(c + 1.0) - math.lgamma(c - t)


def ddim_step_loop(gamma_bars, kappa):
    """(sigma, coef_x, coef_eps) per n = 1..S from gamma_bar_1..gamma_bar_S, one n at a time."""
    sig, cx, ce = [], [], []
    for i, gb in enumerate(gamma_bars):
        gbp = 1.0 if i == 0 else gamma_bars[i - 1]  # gamma_bar_{n-1}, 1 at n = 1
        s = kappa * math.sqrt((1.0 - gbp) / (1.0 - gb) * (1.0 - gb / gbp))
        sig.append(s)
        cx.append(math.sqrt(gbp / gb))
        ce.append(
            math.sqrt(max(1.0 - gbp - s * s, 0.0)) - math.sqrt(1.0 - gb) * math.sqrt(gbp / gb)
        )
    return np.array(sig), np.array(cx), np.array(ce)


def tau_root(gamma_bar, T=T_IMAGE):
    """The exact continuous timestep: alpha-bar(tau) = gamma_bar, by brentq on the formula above."""
    return brentq(lambda t: log_abar_cont(t, T) - math.log(gamma_bar), -0.999, T - 1.0, xtol=1e-12)


def tau_tolerance(tau, gamma_bar):
    """How far FastDPM's stopping rule may leave tau from the root.

    The bisection accepts t once log abar(t) lies in [log gb, log gb + 1e-8 |log gb|]; log abar
    falls with slope about log(1 - beta(t)) (at least |log(1 - beta(t))| of the bracket's left
    end), so t may stop up to 1e-8 |log gb| / |slope| before the root (about 3e-6 at tau = 617).
    LGAMMA_NOISE (in log space) adds the rounding of the two large lgamma terms, which matters only
    near t = 0 where |log gb| is about 1e-4.
    """
    beta_lo = BETA_1 + (BETA_T - BETA_1) * math.floor(tau) / (T_IMAGE - 1)
    slope = -math.log(1.0 - beta_lo)
    return (FASTDPM_TAU_RTOL * abs(math.log(gamma_bar)) + LGAMMA_NOISE) / slope


def sampling_order(values):
    """Reverse a per-n (n = 1..S) list into the library's sampling order (n = S first)."""
    return np.asarray(values)[::-1]


# ---------------------------------------------------------------- base betas


def test_linear_betas_and_cumprod_match_plain_loops():
    betas = make_betas("linear", T_IMAGE)
    np.testing.assert_allclose(betas, linear_betas_loop(T_IMAGE), rtol=0, atol=1e-15)
    np.testing.assert_allclose(alphas_cumprod(betas), cumprod_loop(betas), rtol=1e-12)


def test_sigmoid_toy_betas_T10_prior_mismatch():
    betas = make_betas("sigmoid", 10)
    expected = [1e-5 + (1e-2 - 1e-5) / (1.0 + math.exp(-(-6.0 + 12.0 * i / 9))) for i in range(10)]
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    # The same endpoints for every T: alpha-bar_T stays near 0.95 at T = 10 (the paper's Case 1).
    assert alphas_cumprod(betas)[-1] == pytest.approx(0.951, abs=5e-4)


def test_continuous_alpha_bar_matches_discrete_cumprod_at_integers():
    abar = cumprod_loop(linear_betas_loop(T_IMAGE))
    for t in (0, 1, 2, 10, 99, 500, 616, 617, 998, 999):
        # Both the written-out formula and the library's agree with the discrete product, to 1e-10
        # relative in alpha-bar (i.e. 1e-10 absolute in log alpha-bar: the lgamma rounding above).
        assert math.exp(log_abar_cont(t)) == pytest.approx(abar[t], rel=1e-10)
        assert math.exp(log_alpha_bar_continuous(t, BETA_1, BETA_T, T_IMAGE)) == pytest.approx(
            abar[t], rel=1e-10
        )
        assert log_alpha_bar_continuous(t, BETA_1, BETA_T, T_IMAGE) == pytest.approx(
            log_abar_cont(t), rel=0, abs=1e-12
        )


# ---------------------------------------------------------------- FastDPM VAR schedules


def test_fastdpm_var_quadratic_acceptance():
    s = make_schedule(
        "fastdpm-var-quadratic", 10, num_train_steps=T_IMAGE, beta_schedule="linear", kappa=1.0
    )
    S = 10
    # The quadratic domain x in (0, 0.95 / (sqrt(beta_1) S)) = (0, 9.5) cannot reach alpha-bar_T
    # at S = 10, so x saturates at its edge 9.5.
    x_edge = 0.95 / (math.sqrt(BETA_1) * S)
    assert x_edge == pytest.approx(9.5)
    sub_betas = [BETA_1 * (1.0 + i * 9.5) ** 2 for i in range(S)]  # n = 1..S
    gamma_bar = cumprod_loop(sub_betas)
    assert gamma_bar[-1] > cumprod_loop(linear_betas_loop(T_IMAGE))[-1]  # saturated, above abar_T
    # Recover the library's sub-betas from its gamma_bar (n = 1..S order).
    gb_lib = s.gamma_bar[::-1]
    lib_betas = 1.0 - gb_lib / np.concatenate([[1.0], gb_lib[:-1]])
    np.testing.assert_allclose(lib_betas, sub_betas, rtol=0, atol=1e-9)

    # FastDPM's own numbers: sampling starts at gamma_bar 0.0208, tau 616.734 (a 1e-4 stop of the
    # timestep bisection gives 616.719).
    assert s.n.tolist() == list(range(S, 0, -1))
    assert s.gamma_bar[0] == pytest.approx(0.0208, abs=5e-5)
    assert s.tau[0] == pytest.approx(616.734, abs=5e-4)

    sigma, coef_x, coef_eps = ddim_step_loop(gamma_bar, kappa=1.0)
    np.testing.assert_allclose(s.gamma_bar, sampling_order(gamma_bar), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        s.gamma_bar_next, sampling_order([1.0] + gamma_bar[:-1]), rtol=0, atol=1e-9
    )
    np.testing.assert_allclose(s.sigma, sampling_order(sigma), rtol=0, atol=1e-4)
    np.testing.assert_allclose(s.coef_x, sampling_order(coef_x), rtol=0, atol=1e-4)
    np.testing.assert_allclose(s.coef_eps, sampling_order(coef_eps), rtol=0, atol=1e-4)
    assert s.sigma[-1] == 0.0  # the last DDIM step (n = 1) is deterministic

    # tau: brentq's root of the continuous alpha-bar. FastDPM's bisection stops anywhere in the
    # accepted window (within 1e-8 relative in log space), so tau sits up to ~3e-6 below the root.
    for tau, gb in zip(s.tau, s.gamma_bar):
        root = tau_root(gb)
        slack = tau_tolerance(tau, gb)
        assert root - slack <= tau <= root + LGAMMA_NOISE / BETA_1, (tau, root, gb)
        assert tau == pytest.approx(root, abs=1e-4)
        # and the stopping rule itself, on the written-out formula
        target = math.log(gb)
        value = log_abar_cont(tau)
        assert target - LGAMMA_NOISE <= value <= target + FASTDPM_TAU_RTOL * abs(target) + LGAMMA_NOISE


def test_fastdpm_var_linear_bisected_end_beta():
    S = 10
    s = make_schedule(
        "fastdpm-var-linear", S, num_train_steps=T_IMAGE, beta_schedule="linear", kappa=1.0
    )
    abar_T = cumprod_loop(linear_betas_loop(T_IMAGE))[-1]
    gb_lib = s.gamma_bar[::-1]  # n = 1..S
    lib_betas = 1.0 - gb_lib / np.concatenate([[1.0], gb_lib[:-1]])
    x = lib_betas[-1]
    assert BETA_1 < x < 0.99
    # sub-betas are linspace(beta_1, x, S) ...
    np.testing.assert_allclose(
        lib_betas, [BETA_1 + (x - BETA_1) * i / (S - 1) for i in range(S)], rtol=1e-9
    )
    # ... with x bisected so that prod(1 - beta_n) lands in [abar_T, abar_T (1 + 1e-4)].
    prod = float(np.prod([1.0 - b for b in lib_betas]))
    assert abar_T <= prod <= abar_T * (1.0 + FASTDPM_RTOL)

    gamma_bar = cumprod_loop(lib_betas)
    sigma, coef_x, coef_eps = ddim_step_loop(gamma_bar, kappa=1.0)
    np.testing.assert_allclose(s.gamma_bar, sampling_order(gamma_bar), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, sampling_order(sigma), rtol=0, atol=1e-9)
    np.testing.assert_allclose(s.coef_x, sampling_order(coef_x), rtol=1e-9, atol=0)
    np.testing.assert_allclose(s.coef_eps, sampling_order(coef_eps), rtol=0, atol=1e-9)
    for tau, gb in zip(s.tau, s.gamma_bar):
        if gb <= abar_T:  # at or below alpha-bar_T FastDPM maps to T - 1
            assert tau == T_IMAGE - 1
            continue
        root = tau_root(gb)
        slack = tau_tolerance(tau, gb)
        assert root - slack <= tau <= root + LGAMMA_NOISE / BETA_1, (tau, root, gb)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_fastdpm_kappa_scales_sigma(kappa):
    s = make_schedule("fastdpm-var-quadratic", 10, kappa=kappa)
    sigma, coef_x, coef_eps = ddim_step_loop(list(s.gamma_bar[::-1]), kappa=kappa)
    np.testing.assert_allclose(s.sigma, sampling_order(sigma), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.coef_eps, sampling_order(coef_eps), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- DDPM, strided, DDIM


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_equals_classical_step_loop(variance):
    T = 10
    s = make_schedule("ddpm", T, num_train_steps=T, beta_schedule="sigmoid", variance=variance)
    betas = [
        1e-5 + (1e-2 - 1e-5) / (1.0 + math.exp(-(-6.0 + 12.0 * i / (T - 1)))) for i in range(T)
    ]
    abar = cumprod_loop(betas)
    assert abar[-1] == pytest.approx(0.951, abs=5e-4)
    for row in s.rows():
        t = row["n"] - 1  # step n uses network timestep t = n - 1 (0-indexed)
        alpha = 1.0 - betas[t]
        assert row["tau"] == t
        assert row["gamma_bar"] == pytest.approx(abar[t], rel=1e-12)
        assert row["coef_x"] == pytest.approx(1.0 / math.sqrt(alpha), rel=1e-9)
        assert row["coef_eps"] == pytest.approx(
            -betas[t] / (math.sqrt(alpha) * math.sqrt(1.0 - abar[t])), rel=1e-9
        )
        if variance == "beta":
            var = betas[t]
        else:
            abar_prev = abar[t - 1] if t > 0 else 1.0
            var = betas[t] * (1.0 - abar_prev) / (1.0 - abar[t])
        assert row["sigma"] ** 2 == pytest.approx(var, rel=1e-9, abs=1e-15)
    assert [r["n"] for r in s.rows()] == list(range(T, 0, -1))


def test_strided_with_all_steps_equals_ddpm():
    a = make_schedule("strided", 20, num_train_steps=20, beta_schedule="linear")
    b = make_schedule("ddpm", 20, num_train_steps=20, beta_schedule="linear")
    assert a.rows() == b.rows()


def test_strided_subsampling_loop():
    T, S = 20, 5
    s = make_schedule("strided", S, num_train_steps=T, beta_schedule="linear", variance="posterior")
    abar = cumprod_loop(linear_betas_loop(T))
    taus = [k * (T // S) for k in range(S)]  # DDIM's uniform skip: 0, 4, 8, 12, 16 for n = 1..S
    np.testing.assert_array_equal(s.tau, sampling_order(taus))
    for i, row in enumerate(reversed(s.rows())):  # n = 1..S
        gb = abar[taus[i]]
        gbp = abar[taus[i - 1]] if i > 0 else 1.0
        beta = 1.0 - gb / gbp  # the step's effective beta between two noise levels
        assert row["coef_x"] == pytest.approx(1.0 / math.sqrt(1.0 - beta), rel=1e-9)
        assert row["coef_eps"] == pytest.approx(
            -beta / (math.sqrt(1.0 - beta) * math.sqrt(1.0 - gb)), rel=1e-9
        )
        assert row["sigma"] ** 2 == pytest.approx(
            beta * (1.0 - gbp) / (1.0 - gb), rel=1e-9, abs=1e-15
        )


def test_ddim_is_deterministic_and_recovers_the_noise_path():
    T, S = 1000, 10
    s = make_schedule("ddim", S, num_train_steps=T, beta_schedule="linear")
    assert np.all(s.sigma == 0.0)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(7)
    eps = rng.standard_normal(7)
    for row in s.rows():
        gb, gbp = row["gamma_bar"], row["gamma_bar_next"]
        x_n = math.sqrt(gb) * x0 + math.sqrt(1.0 - gb) * eps
        # The model returns the true noise: one DDIM step lands on the same noise path one level down.
        x_prev = row["coef_x"] * x_n + row["coef_eps"] * eps
        np.testing.assert_allclose(
            x_prev, math.sqrt(gbp) * x0 + math.sqrt(1.0 - gbp) * eps, rtol=0, atol=1e-12
        )
    # The last step (n = 1, gb' = 1) lands on x0 itself.
    last = s.rows()[-1]
    x_1 = math.sqrt(last["gamma_bar"]) * x0 + math.sqrt(1.0 - last["gamma_bar"]) * eps
    np.testing.assert_allclose(
        last["coef_x"] * x_1 + last["coef_eps"] * eps, x0, rtol=0, atol=1e-12
    )


# ---------------------------------------------------------------- invalid input


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("strided", 21), {"num_train_steps": 20}, "21"),
        (("strided", 0), {"num_train_steps": 20}, "0"),
        (("no-such-schedule", 10), {}, "no-such-schedule"),
        (("fastdpm-var-quadratic", 10), {"beta_schedule": "sigmoid"}, "sigmoid"),
        (("fastdpm-var-linear", 10), {"beta_schedule": "sigmoid"}, "sigmoid"),
        (("ddpm", 10), {"num_train_steps": 20}, "10"),
        (("ddpm", 20), {"num_train_steps": 20, "variance": "wrong"}, "wrong"),
        (("strided", 5), {"num_train_steps": 20, "beta_schedule": "cosine"}, "cosine"),
        (("fastdpm-var-linear", 10), {"kappa": -1.0}, "-1.0"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_value(args, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        make_schedule(*args, **kwargs)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as info:
        make_schedule("bogus", 10)
    for name in SCHEDULE_NAMES:
        assert name in str(info.value)


# ---------------------------------------------------------------- torch tables


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_tables_are_indexed_by_n(name):
    T = 20
    S = T if name == "ddpm" else 5
    beta = "linear"
    s = make_schedule(name, S, num_train_steps=T, beta_schedule=beta)
    tables = s.tables("cpu", dtype=torch.float64)
    assert tables.num_steps == S
    for row in s.rows():
        n = row["n"]
        assert tables.coef_x[n].item() == row["coef_x"]
        assert tables.coef_eps[n].item() == row["coef_eps"]
        assert tables.sigma[n].item() == row["sigma"]
        assert tables.tau[n].item() == row["tau"]
    assert tables.coef_x.shape == (S + 1,)
    # float32 tables are the float64 values rounded once
    t32 = s.tables("cpu")
    assert t32.coef_eps.dtype == torch.float32
    assert torch.equal(t32.coef_eps[1:], tables.coef_eps[1:].float())


def test_schedule_command_prints_the_table_and_refuses_a_bad_T(capsys):
    from sftrl.cli import main

    assert main(["schedule", "fastdpm-var-quadratic", "--steps", "10", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["name"] == "fastdpm-var-quadratic" and len(table["steps"]) == 10
    assert table["steps"][0]["tau"] == pytest.approx(616.7, abs=0.05)  # the README's example
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "strided", "--steps", "10", "--T", "0"])
    assert exit_info.value.code == 2 and "argument --T: 0 is invalid: must be >= 1" in capsys.readouterr().err
    for kappa in ("nan", "-1", "inf"):
        with pytest.raises(SystemExit) as exit_info:
            main(["schedule", "fastdpm-var-linear", "--steps", "5", "--kappa", kappa])
        assert exit_info.value.code == 2
        assert f"argument --kappa: {kappa} is invalid: must be a finite number >= 0" in capsys.readouterr().err
