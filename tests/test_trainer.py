"""The trainer's loop: rollouts asked for one iteration ahead (never before a checkpoint), async
mode's bounded lag, and every algorithm handed the data it asks for."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO
from sftrl.algos import ALGORITHMS
from sftrl.components import InitState, fresh_sampler
from sftrl.config import load
from sftrl.data import load_real_data
from sftrl.distributed import build_ray_system
from sftrl.system import build_local_system
from sftrl.trainer import Trainer
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def local_trainer(run_dir, overrides: list[str], backend: str = "local") -> Trainer:
    """The smoke config in one process (or through Ray), a metrics line every iteration, no evaluation."""
    cfg = load(SMOKE, [f"ray.backend={backend}", "trainer.log_every=1", "trainer.eval_every=0", *overrides])
    data = load_real_data(cfg)
    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))  # seeded: every trainer starts from the same theta
    init = InitState(to_numpy_state(sampler), tuple(data.shape[1:]))
    system = build_local_system(cfg, init, data) if backend == "local" else build_ray_system(cfg, init)
    return Trainer(cfg, system, run_dir, progress=False)


def iteration_lines(run_dir) -> list[dict]:
    """The metrics lines of training iterations (evaluations' lines left out)."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "time/iteration_s" in x]


def test_rollouts_are_asked_for_one_iteration_ahead_except_before_a_checkpoint(tmp_path):
    trainer = local_trainer(tmp_path, ["trainer.iterations=5", "trainer.checkpoint_every=3"])
    cfg, system = trainer.cfg, trainer.system
    worker = system.workers[0].handle
    original_call = worker.call
    asked = []  # (the trainer's iteration when asked, the block ids asked for)

    def recording_call(method, *args, **kwargs):
        if method.__name__ == "collect":
            asked.append((trainer.iteration, args[2][0].split("/")[0]))
        return original_call(method, *args, **kwargs)

    worker.call = recording_call
    trainer.fit()
    # it1, it2 and it4 are asked for during the step before theirs; it3 follows the checkpoint
    # after iteration 3 and is asked for in its own step; nothing follows the last iteration.
    assert asked == [(0, "it0"), (0, "it1"), (1, "it2"), (3, "it3"), (3, "it4")]
    assert trainer.counters["blocks"] == 5 * cfg.algo.n_critic
    lines = iteration_lines(tmp_path)
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4, 5]
    assert all(x["time/iteration_s"] > 0 and x["rollout/weights_lag"] == 0 for x in lines)


def test_async_mode_runs_rollouts_max_lag_versions_behind_and_restarts_at_checkpoints(tmp_path):
    trainer = local_trainer(tmp_path, ["trainer.iterations=7", "trainer.checkpoint_every=4", "rollout.max_lag=2"])
    cfg, system = trainer.cfg, trainer.system
    worker, buffer = system.workers[0].handle, system.buffer.handle
    original_collect, original_refill = worker.call, buffer.call
    asked, buffered = [], []  # (trainer's iteration, block iteration, theta's version); metas' versions

    def recording_collect(method, *args, **kwargs):
        if method.__name__ == "collect":
            asked.append((trainer.iteration, args[2][0].split("/")[0], args[0][0]))
        return original_collect(method, *args, **kwargs)

    def recording_refill(method, *args, **kwargs):
        if method.__name__ == "refill":
            buffered.append({meta.version for meta in args[1]} | {block.version for block in args[0]})
        return original_refill(method, *args, **kwargs)

    worker.call, buffer.call = recording_collect, recording_refill
    trainer.fit()
    # Iteration j's rollouts run theta's version j - 2, asked for as soon as that version is
    # known; the pipeline restarts after the checkpoint at 4 (the current theta for 4, 5 and 6)
    # and never asks past the last iteration.
    assert asked == [(0, "it0", 0), (0, "it1", 0), (0, "it2", 0), (0, "it3", 1),
                     (4, "it4", 4), (4, "it5", 4), (4, "it6", 4)]
    assert buffered == [{0}, {0}, {0}, {1}, {4}, {4}, {4}]  # the driver's metas agree with the blocks
    assert trainer.counters["blocks"] == 7 * cfg.algo.n_critic
    lines = iteration_lines(tmp_path)
    assert [x["rollout/weights_lag"] for x in lines] == [0, 1, 2, 2, 0, 1, 2]
    # sft-pg reweights stale transitions (and only those): a weight in (0, 1] with rho-bar = 1
    for x in lines:
        assert ("policy/importance_weight_mean" in x) == (x["rollout/weights_lag"] > 0)
        assert 0 < x.get("policy/importance_weight_mean", 1.0) <= 1.0


def test_the_number_of_rollout_workers_changes_no_number_of_the_run(tmp_path):
    """A block's noise follows its id: one worker collecting both blocks of an iteration, or two
    workers one each, train the same sampler (bit for bit here: the toy MLP's rows do not depend
    on the batch beside them on this CPU)."""
    lines = {}
    for workers in (1, 2):
        run_dir = tmp_path / f"w{workers}"
        run_dir.mkdir()
        trainer = local_trainer(run_dir, ["trainer.iterations=4", "trainer.checkpoint_every=0",
                                          f"rollout.num_workers={workers}"])
        trainer.fit()
        lines[workers] = [{k: v for k, v in x.items() if not k.startswith(("time/", "throughput/"))}
                          for x in iteration_lines(run_dir)]
    # the logged rollout reward is a mean of the workers' means: equal up to float32 rounding
    rewards = {w: [x.pop("rollout/reward_mean") for x in lines[w]] for w in lines}
    assert rewards[1] == pytest.approx(rewards[2], rel=1e-6)
    assert len(lines[1]) == 4 and lines[1] == lines[2]


def test_async_mode_through_ray_repeats_the_one_process_run_bit_for_bit(local_ray, tmp_path):
    """Which weights a rollout runs is fixed by the schedule, not by timing: two workers running
    two versions behind give the same numbers through Ray as in one process."""
    overrides = ["trainer.iterations=6", "trainer.checkpoint_every=0", "rollout.max_lag=2", "rollout.num_workers=2"]
    runs = {}
    for backend in ("local", "ray"):
        trainer = local_trainer(tmp_path / backend, overrides, backend)
        (tmp_path / backend).mkdir()
        trainer.fit()
        trainer.system.shutdown()
        runs[backend] = [{k: v for k, v in x.items() if not k.startswith(("time/", "throughput/"))}
                         for x in iteration_lines(tmp_path / backend)]
    assert [x["rollout/weights_lag"] for x in runs["ray"]] == [0, 1, 2, 2, 2, 2]
    assert runs["ray"] == runs["local"]


@pytest.mark.parametrize(
    "name, overrides",
    [("sft-pg", []), ("ppo", []), ("sft", ["algo.critic_regulariser=GP"]),
     ("ppo", ["rollout.max_lag=1"]), ("sft", ["algo.critic_regulariser=GP", "rollout.max_lag=1"])],
)
def test_every_algorithm_runs_through_the_trainer_with_the_data_it_asks_for(tmp_path, name, overrides):
    trainer = local_trainer(tmp_path, [f"algo.name={name}", *overrides, "trainer.iterations=3",
                                       "trainer.checkpoint_every=0"])
    cfg, system = trainer.cfg, trainer.system
    learner = system.learner.handle
    original_call = learner.call
    given = []  # the number of transitions each generator phase was handed (None: no buffer data)

    def recording_call(method, *args, **kwargs):
        if method.__name__ == "update_and_publish":
            given.append(None if args[0] is None else len(args[0]))
        return original_call(method, *args, **kwargs)

    learner.call = recording_call
    trainer.fit()
    a = cfg.algo
    per_iteration = {
        "samples": a.n_generator * a.batch_size,
        "all": a.n_critic * a.batch_size * len(trainer.plan.trainable_steps),  # this iteration's blocks only
        "none": None,
    }[ALGORITHMS[name].data]
    assert given == [per_iteration] * 3
    lines = iteration_lines(tmp_path)
    assert [x["iteration"] for x in lines] == [1, 2, 3]
    assert all(math.isfinite(x["policy/policy_loss"]) and math.isfinite(x["critic/critic_loss"]) for x in lines)
