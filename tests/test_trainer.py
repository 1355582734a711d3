"""The trainer's loop: rollouts asked for one iteration ahead (never before a checkpoint), and every
algorithm handed the data it asks for."""

from __future__ import annotations

import json
import math

import pytest

from conftest import REPO
from sftrl.algos import ALGORITHMS
from sftrl.components import InitState
from sftrl.config import load
from sftrl.data import load_real_data
from sftrl.models import build_networks
from sftrl.trainer import Trainer, build_local_system
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def local_trainer(run_dir, overrides: list[str]) -> Trainer:
    """The smoke config in one process, a metrics line every iteration, no evaluation."""
    cfg = load(SMOKE, ["ray.backend=local", "trainer.log_every=1", "trainer.eval_every=0", *overrides])
    data = load_real_data(cfg)
    sampler, _, _ = build_networks(cfg, data.shape[1:])
    system = build_local_system(cfg, InitState(to_numpy_state(sampler), tuple(data.shape[1:])), data)
    return Trainer(cfg, system, run_dir, progress=False)


def iteration_lines(run_dir) -> list[dict]:
    """The metrics lines of training iterations (evaluations' lines left out)."""
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "time/iteration_s" in x]


def test_rollouts_are_asked_for_one_iteration_ahead_except_before_a_checkpoint(tmp_path):
    trainer = local_trainer(tmp_path, ["trainer.iterations=5", "trainer.checkpoint_every=3"])
    cfg, system = trainer.cfg, trainer.system
    worker = system.workers[0]
    original_call = worker.call
    asked = []  # (the trainer's iteration when asked, the block ids asked for)

    def recording_call(method, *args, **kwargs):
        if method == "collect":
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


@pytest.mark.parametrize(
    "name, overrides",
    [("sft-pg", []), ("ppo", []), ("sft", ["algo.critic_regulariser=GP"])],
)
def test_every_algorithm_runs_through_the_trainer_with_the_data_it_asks_for(tmp_path, name, overrides):
    trainer = local_trainer(tmp_path, [f"algo.name={name}", *overrides, "trainer.iterations=3",
                                       "trainer.checkpoint_every=0"])
    cfg, system = trainer.cfg, trainer.system
    learner = system.learner
    original_call = learner.call
    given = []  # the number of transitions each generator phase was handed (None: no buffer data)

    def recording_call(method, *args, **kwargs):
        if method == "update_and_publish":
            given.append(None if args[0] is None else len(args[0]))
        return original_call(method, *args, **kwargs)

    learner.call = recording_call
    trainer.fit()
    a = cfg.algo
    per_iteration = {
        "samples": a.n_generator * a.batch_size,
        "all": a.n_critic * a.batch_size * len(trainer._steps()),  # this iteration's blocks only
        "none": None,
    }[ALGORITHMS[name].data]
    assert given == [per_iteration] * 3
    lines = iteration_lines(tmp_path)
    assert [x["iteration"] for x in lines] == [1, 2, 3]
    assert all(math.isfinite(x["policy/policy_loss"]) and math.isfinite(x["critic/critic_loss"]) for x in lines)
