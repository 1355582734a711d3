"""``perf.*``: the sampler in bfloat16 autocast or compiled, and the worker and the learner still
computing the same log-prob of the same transition (the re-scoring ratio, reported per step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_image_e2e import TINY, tiny_unet

from conftest import REPO
from sftrl import perf
from sftrl.algos import losses
from sftrl.buffer import ReplayBuffer
from sftrl.components import (
    InitState,
    fresh_sampler,
    make_critic_learner,
    make_learner,
    make_rollout_worker,
)
from sftrl.config import PerfConfig, load
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def _first_policy_step(cfg, init, real) -> dict[str, float]:
    """Roll out two blocks with a worker and take the learner's first policy step on them."""
    worker, learner = make_rollout_worker(cfg, init, 0), make_learner(cfg, init)
    critic = make_critic_learner(cfg, init, real)
    *blocks, _ = worker.collect(learner.get_weights(), critic.get_weights(), ["b0", "b1"], cfg.algo.batch_size)
    buffer = ReplayBuffer()
    buffer.add_blocks(blocks)
    return learner.update_policy(buffer.sample(cfg.algo.n_generator, cfg.algo.batch_size, seed=0),
                                 critic.get_weights())[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_learner_rescores_the_workers_transitions_exactly_in_each_precision(precision):
    """The toy MLP on the CPU: both precisions give the worker's batch and the learner's the same
    bits (MKL's strict mode for float32; oneDNN's bfloat16 kernels, measured batch-invariant)."""
    cfg = load(SMOKE, [f"perf.precision={precision}"])
    init = InitState(to_numpy_state(fresh_sampler(cfg, (2,))), (2,))
    real = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    first = _first_policy_step(cfg, init, real)
    assert first[losses.RESCORE_LOG_RATIO_ABSMAX] == 0.0
    assert first[losses.RATIO_MIN] == first[losses.RATIO_MAX] == 1.0
    steps = [k for k in first if k.startswith(losses.RESCORE_LOG_RATIO_ABSMAX + "/n")]
    assert steps and all(first[k] == 0.0 for k in steps)  # per denoising step too


def test_bf16_rollouts_of_a_unet_rescore_exactly_on_the_cpu():
    cfg = load(REPO / "configs" / "cifar10.yaml", [*TINY, "algo.batch_size=8", "data.path=unused",
                                                   "perf.precision=bf16"])
    assert cfg.diffusion.final_step_std == 0.001 and cfg.diffusion.log_prob_reduction == "mean"
    shape = (3, 16, 16)
    init = InitState(to_numpy_state(tiny_unet(3, 16)), shape)
    real = np.random.default_rng(0).uniform(-1, 1, (32, *shape)).astype(np.float32)
    first = _first_policy_step(cfg, init, real)
    assert first[losses.RESCORE_LOG_RATIO_ABSMAX] == 0.0 and first[losses.RATIO_MAX] == 1.0


def test_bf16_changes_the_numbers_fp32_would_give():
    cfg = load(SMOKE, [])
    model = fresh_sampler(cfg, (2,)).eval()
    x, t = torch.randn(64, 2), torch.randint(10, (64,))
    with torch.no_grad():
        fp32 = perf.runner(model, PerfConfig(), torch.device("cpu"))(x, t)
        bf16 = perf.runner(model, PerfConfig(precision="bf16"), torch.device("cpu"))(x, t)
    assert fp32.dtype == bf16.dtype == torch.float32  # the step's mean and log-prob stay float32
    assert 0 < (fp32 - bf16).abs().max().item() < 0.05


def test_compiled_rollouts_rescore_exactly_against_eager_learners():
    cfg = load(SMOKE, ["perf.compile=true"])
    init = InitState(to_numpy_state(fresh_sampler(cfg, (2,))), (2,))
    worker = make_rollout_worker(cfg, init, 0)  # compiled at its warm-up
    assert isinstance(worker.net, perf.CompiledOrEager) and worker.net.compiled is not None
    eager = load(SMOKE, [])
    learner, critic = make_learner(eager, init), make_critic_learner(eager, init, np.zeros((8, 2), np.float32))
    *blocks, _ = worker.collect(learner.get_weights(), critic.get_weights(), ["b0"], 32)
    buffer = ReplayBuffer()
    buffer.add_blocks(blocks)
    first = learner.update_policy(buffer.sample(1, 32, seed=0), critic.get_weights())[0]
    assert first[losses.RESCORE_LOG_RATIO_ABSMAX] == 0.0


def test_a_compile_that_fails_warns_once_and_runs_eagerly(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: broken)
    model = fresh_sampler(load(SMOKE, []), (2,)).eval()
    run = perf.runner(model, PerfConfig(compile=True), torch.device("cpu"))
    x, t = torch.randn(4, 2), torch.zeros(4)
    with torch.no_grad():
        assert torch.equal(run(x, t), model(x, t)) and torch.equal(run(x, t), model(x, t))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed here (RuntimeError: no C++ compiler here)") == 1
