"""``sft-pg-kl``: SFT-PG plus beta x the closed-form per-step KL to the pretrained sampler."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import REPO, assert_close, run_cli
from sftrl.algos import algorithm_names, make_algorithm
from sftrl.algos.sft_pg_kl import KL_TO_BEST, KL_TO_PRETRAINED, floored_step_kl
from sftrl.buffer import ReplayBuffer
from sftrl.config import load
from sftrl.diffusion.schedules import make_schedule
from sftrl.diffusion.step import gaussian_kl
from sftrl.learner import Learner
from sftrl.models.toy import ToyBaseline, ToyCritic, ToySampler
from sftrl.rollout import RolloutWorker
from sftrl.weights import Weights, to_numpy_state

torch.set_num_threads(1)
SMOKE = REPO / "configs" / "smoke.yaml"
T, S = 10, 4


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_step_kl_is_the_gaussians_closed_form(reduction):
    g = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(5, 3, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    for std_p, std_q, view in ((torch.rand(5, generator=g, dtype=torch.float64) + 0.1,
                                torch.rand(5, generator=g, dtype=torch.float64) + 0.1, (5, 1, 1)),
                               (torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1,
                                torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1, (5, 3, 1))):
        p = torch.distributions.Normal(mean_p, std_p.view(view).expand_as(mean_p))
        q = torch.distributions.Normal(mean_q, std_q.view(view).expand_as(mean_q))
        per_dim = torch.distributions.kl_divergence(p, q).flatten(1)
        expected = per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)
        assert_close(gaussian_kl(mean_p, std_p, mean_q, std_q, reduction), expected, rtol=1e-12, atol=1e-12)
        assert_close(gaussian_kl(mean_p, std_p, mean_p, std_p, reduction), torch.zeros(5), atol=1e-12)


def test_min_std_floors_both_stds_inside_the_kl_only():
    g = torch.Generator().manual_seed(1)
    mean_p, mean_q = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    std = torch.tensor([0.001, 0.01, 0.2, 0.5], dtype=torch.float64)  # a last step, and three above the floor
    exact = gaussian_kl(mean_p, std, mean_q, std, "mean")
    assert torch.equal(floored_step_kl(mean_p, std, mean_q, std, "mean", 0.0), exact)  # 0: the exact KL
    floored = floored_step_kl(mean_p, std, mean_q, std, "mean", 0.1)
    # equal stds: |dmean|^2 / (2 max(std, 0.1)^2) per dim
    expected = (mean_p - mean_q).pow(2).mean(1) / (2 * std.clamp(min=0.1).pow(2))
    assert_close(floored, expected, rtol=1e-12)
    assert torch.equal(floored[2:], exact[2:]) and (floored[:2] < exact[:2] / 99).all()


def _setup(beta: float, lr: float = 3e-3, min_std: float = 0.0, reference: str = "pretrained"):
    torch.manual_seed(1)
    policy, critic, baseline = ToySampler(T, hidden=16), ToyCritic(hidden=(16, 16)), ToyBaseline(S, hidden=(16, 16))
    schedule = make_schedule("fastdpm-var-quadratic", S, num_train_steps=T)
    worker = RolloutWorker(copy.deepcopy(policy), copy.deepcopy(critic), schedule, (2,), final_step_std=0.001,
                           reduction="sum", seed=4, worker_id="w0")
    worker.set_policy_weights(to_numpy_state(policy), 0)
    buf = ReplayBuffer()
    buf.add_blocks(worker.rollout(2, 32))
    algo = load(SMOKE, ["algo.name=sft-pg-kl", f"algo.sft-pg-kl.beta={beta}", f"algo.sft-pg-kl.min_std={min_std}",
                        f"algo.sft-pg-kl.reference={reference}", "trainer.eval_every=2"]).algo
    learner = Learner(copy.deepcopy(policy), critic, baseline, schedule, make_algorithm(algo.name, algo), lr=lr,
                      max_grad_norm=None, batch_size=32, n_generator=2, final_step_std=0.001, reduction="sum",
                      data_shape=(2,), seed=3)
    published = Weights(1, {"critic": to_numpy_state(critic), "baseline": to_numpy_state(baseline)})
    return learner, buf, policy, published, schedule


def test_with_beta_zero_it_is_sft_pg_and_its_first_kl_is_zero():
    kl_learner, buf, policy, published, schedule = _setup(beta=0.0)
    algo = load(SMOKE).algo
    plain = Learner(copy.deepcopy(policy), copy.deepcopy(kl_learner.ctx.critic), copy.deepcopy(kl_learner.ctx.baseline),
                    schedule, make_algorithm("sft-pg", algo), lr=3e-3, max_grad_norm=None, batch_size=32,
                    n_generator=2, final_step_std=0.001, reduction="sum", data_shape=(2,), seed=3)
    data = buf.sample(2, 32, seed=0)
    kl_metrics = kl_learner.update_policy(data, published)
    plain_metrics = plain.update_policy(data, published)
    assert kl_metrics[0][KL_TO_PRETRAINED] == 0.0  # theta = theta_0 at the first step
    assert kl_metrics[1][KL_TO_PRETRAINED] > 0.0  # one step later it has moved
    assert kl_metrics[0]["ratio_min"] == kl_metrics[0]["ratio_max"] == 1.0
    for key, value in plain.policy.state_dict().items():
        assert torch.equal(kl_learner.policy.state_dict()[key], value)  # beta = 0: sft-pg's update exactly
    assert kl_metrics[1]["policy_loss"] == plain_metrics[1]["policy_loss"]


def test_a_larger_beta_keeps_the_sampler_closer_to_the_pretrained_one():
    final_kl = {}
    for beta in (0.0, 300.0):
        learner, buf, *_, published, _ = _setup(beta=beta, lr=1e-2)
        for phase in range(4):
            metrics = learner.update_policy(buf.sample(2, 32, seed=phase), published)
        final_kl[beta] = metrics[-1][KL_TO_PRETRAINED]
    assert final_kl[300.0] < 0.5 * final_kl[0.0], final_kl


def test_a_std_floor_takes_the_last_steps_weight_out_of_the_logged_kl():
    kls = {}
    for min_std in (0.0, 0.1):
        learner, buf, *_, published, _ = _setup(beta=0.0, lr=1e-2, min_std=min_std)  # beta 0: the same updates
        metrics = learner.update_policy(buf.sample(2, 32, seed=0), published)
        kls[min_std] = metrics[-1][KL_TO_PRETRAINED]
    assert 0 < kls[0.1] < kls[0.0] / 10, kls  # the 0.001 last step no longer dominates


def test_the_reference_stays_the_pretrained_sampler_across_a_resume():
    learner, buf, policy, published, _ = _setup(beta=1.0)
    learner.update_policy(buf.sample(2, 32, seed=0), published)
    state = copy.deepcopy(learner.state_dict())
    resumed, *_ = _setup(beta=1.0)
    resumed.load_state_dict(state)
    for key, value in policy.state_dict().items():
        assert torch.equal(resumed.ctx.reference.state_dict()[key], value)  # theta_0, not the checkpoint's theta
        assert not resumed.ctx.reference.state_dict()[key].requires_grad
    assert any(not torch.equal(resumed.policy.state_dict()[k], v) for k, v in policy.state_dict().items())
    plain = Learner(copy.deepcopy(policy), ToyCritic(hidden=(16, 16)), ToyBaseline(S, hidden=(16, 16)),
                    make_schedule("fastdpm-var-quadratic", S, num_train_steps=T), make_algorithm("sft-pg", load(SMOKE).algo),
                    lr=1e-3, max_grad_norm=None, batch_size=32, n_generator=1, final_step_std=0.001, reduction="sum",
                    data_shape=(2,))
    assert plain.ctx.reference is None  # only an algorithm that asks for it holds the copy


def test_a_run_logs_the_kl_and_the_config_names_its_setting(tmp_path, cache_dir):
    assert "sft-pg-kl" in algorithm_names()
    run = tmp_path / "run"
    done = run_cli(["sftrl.run", str(SMOKE), "algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.5", "ray.backend=local",
                    "trainer.iterations=6", f"pretrain.cache_dir={cache_dir}", "--run-dir", str(run), "--no-progress"])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get(f"policy/{KL_TO_PRETRAINED}", 0) > 0 for line in lines)
    assert "sft-pg-kl:\n    beta: 0.5" in (run / "config.yaml").read_text()
    bad = run_cli(["sftrl.run", str(SMOKE), "algo.name=sft-pg-kl", "algo.sft-pg-kl.bta=1", "--run-dir", str(tmp_path / "x")])
    assert bad.returncode == 2 and "algo.sft-pg-kl.bta" in bad.stderr and "beta" in bad.stderr
    assert not (tmp_path / "x").exists()
    negative = run_cli(["sftrl.run", str(SMOKE), "algo.name=sft-pg-kl", "algo.sft-pg-kl.min_std=-0.1",
                        "--run-dir", str(tmp_path / "y")])
    assert negative.returncode == 2 and "algo.sft-pg-kl.min_std" in negative.stderr
    assert not (tmp_path / "y").exists()


def test_a_reference_that_follows_the_best_moves_and_survives_a_resume():
    learner, buf, policy, published, _ = _setup(beta=1.0, reference="best")
    assert learner.algorithm.reference_follows_best
    first = learner.update_policy(buf.sample(2, 32, seed=0), published)
    assert KL_TO_BEST in first[-1] and KL_TO_PRETRAINED not in first[-1] and first[-1][KL_TO_BEST] > 0
    assert "reference" not in learner.state_dict()  # not moved yet: theta_0, which a resume rebuilds
    moved_to = to_numpy_state(learner.policy)  # as if the evaluation after this phase were a new best
    learner.set_reference(moved_to, 7)
    after = learner.update_policy(buf.sample(2, 32, seed=1), published)
    assert after[0][KL_TO_BEST] == 0.0 < after[1][KL_TO_BEST]  # the anchor is where theta was
    state = copy.deepcopy(learner.state_dict())
    assert state["reference_iteration"] == 7
    resumed, *_ = _setup(beta=1.0, reference="best")
    resumed.load_state_dict(state)
    assert resumed.reference_iteration == 7
    for key, value in resumed.ctx.reference.state_dict().items():
        assert torch.equal(value, torch.as_tensor(moved_to[key]))  # the moved anchor, not theta_0
        assert not value.requires_grad
    assert any(not torch.equal(resumed.ctx.reference.state_dict()[k], v) for k, v in policy.state_dict().items())


def test_reference_best_is_refused_without_evaluations_or_with_lora_in_one_line(tmp_path):
    base = [str(SMOKE), "algo.name=sft-pg-kl", "algo.sft-pg-kl.reference=best", "ray.backend=local"]
    for extra, words in ((["trainer.eval_every=0"], ["trainer.eval_every = 0", "'pretrained'"]),
                         (["trainer.eval_every=5", "model.lora_rank=2"], ["model.lora_rank = 2", "merged"]),
                         (["algo.sft-pg-kl.reference=latest"], ["latest", "'pretrained'", "'best'"])):
        run = tmp_path / f"run-{extra[-1].split('=')[0]}"
        done = run_cli(["sftrl.run", *base, *extra, "--run-dir", str(run)])
        if "model.lora_rank=2" in extra and "peft" in done.stderr:
            continue  # peft not installed: refused for that reason instead (tests/test_lora.py)
        assert done.returncode == 2, done.stderr[-1000:]
        error = done.stderr.strip().splitlines()[-1]
        assert "algo.sft-pg-kl.reference" in error and all(w in error for w in words), error
        assert not run.exists()


def test_a_run_whose_reference_follows_the_best_resumes_bit_for_bit(tmp_path, cache_dir):
    """6 iterations straight == 4, stop, resume to 6: the anchor moves at the same evaluations."""
    common = ["ray.backend=local", f"pretrain.cache_dir={cache_dir}", "trainer.log_every=1", "trainer.eval_every=2",
              "algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=1.0", "algo.sft-pg-kl.reference=best", "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for run_dir, plan in ((straight, [6]), (split, [4, 6])):
        for n, iterations in enumerate(plan):
            done = run_cli(["sftrl.run", str(SMOKE), f"trainer.iterations={iterations}", "--run-dir", str(run_dir),
                            *(["--resume", "auto"] if n else []), *common])
            assert done.returncode == 0, done.stderr[-2000:]

    def lines(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        training = [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
                    if "critic/ipm_gap" in r]
        moves = [r["iteration"] for r in rows if r.get("event") == "reference_moved"]
        return training, moves

    (a, moved_a), (b, moved_b) = lines(straight), lines(split)
    assert a == b and [line["iteration"] for line in b] == [1, 2, 3, 4, 5, 6]
    assert moved_a == moved_b and moved_a[0] == 0 and len(moved_a) >= 2, moved_a  # it moved past theta_0
    assert all(f"policy/{KL_TO_BEST}" in line for line in a)
