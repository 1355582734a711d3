"""Several learners sharing each policy batch (``ray.num_learners``): the update of one learner on
the whole batch, with gloo on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from sftrl.algos.base import Shard
from sftrl.components import InitState, fresh_sampler
from sftrl.config import load
from sftrl.configtools import ConfigError
from sftrl.distributed import build_ray_system
from sftrl.trainer import Trainer
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def test_a_shard_takes_every_worldth_row_and_its_share_of_the_gradient():
    sums = []
    shards = [Shard(rank, 3, all_reduce=lambda flat: sums.append(flat.clone())) for rank in range(3)]
    rows = [shard.split(slice(10, 17), 20)[0].tolist() for shard in shards]
    assert rows == [[10, 13, 16], [11, 14], [12, 15]]
    assert sorted(sum(rows, [])) == list(range(10, 17))  # each row once
    assert Shard().split(slice(10, 17), 20) == (slice(10, 17), None)  # one learner: as before
    _, reduce = shards[0].split(slice(10, 17), 20)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([7.0, 14.0])
    reduce([p])
    assert torch.allclose(sums[0], torch.tensor([3.0, 6.0]))  # 3 of the 7 rows: 3/7 of its gradient


@pytest.mark.parametrize("name", ["sft-pg", "ppo"])
def test_two_learners_make_the_update_one_learner_makes_on_the_whole_batch(local_ray, tmp_path, name):
    weights, step_metrics = {}, {}
    for k in (1, 2):
        cfg = load(SMOKE, [f"algo.name={name}", f"ray.num_learners={k}", "algo.n_generator=2"])
        init = InitState(to_numpy_state(fresh_sampler(cfg, (2,))), (2,))  # the same start for both
        system = build_ray_system(cfg, init)
        trainer = Trainer(cfg, system, tmp_path / f"k{k}", progress=False)
        step_metrics[k] = metrics = trainer.step()
        assert np.isfinite(metrics["policy/policy_loss"])
        weights[k] = [system.learner.resolve(m.get_weights()) for m in system.learner.members]
        start = init.sampler_state
        assert set(system.placement()) >= ({"learner"} if k == 1 else {"learner-0", "learner-1"})
        system.shutdown()
    # Adam's first steps hide a gradient's size: compare the whole-batch gradient's norm itself, and
    # the loss (the mean of the two halves' losses is the whole batch's)
    for key in ("policy/grad_norm", "policy/policy_loss"):
        assert step_metrics[2][key] == pytest.approx(step_metrics[1][key], rel=1e-5)
    (one,), (first, second) = weights[1], weights[2]
    assert first.version == second.version == one.version == 1
    for key, value in first.state.items():
        assert np.array_equal(value, second.state[key])  # the two learners step identically, bit for bit
        # the whole batch's gradient, summed in another order: equal up to float rounding
        np.testing.assert_allclose(value, one.state[key], rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(value, start[key]) for key, value in one.state.items())  # it did step


def test_learners_that_cannot_share_a_batch_are_refused():
    with pytest.raises(ConfigError, match="'sft' cannot share its batches between learners"):
        load(SMOKE, ["algo.name=sft", "algo.critic_regulariser=GP", "ray.num_learners=2"])
    with pytest.raises(ConfigError, match="several learners are Ray actors: use ray.backend=ray"):
        load(SMOKE, ["ray.backend=local", "ray.num_learners=2"])


def test_a_joined_cluster_that_cannot_place_the_actors_stops_in_bounded_time_naming_what_is_missing(local_ray):
    import time

    from sftrl.distributed import RaySystemLaunch
    from sftrl.handles import ResourceError

    cfg = load(SMOKE, ["rollout.num_gpus_per_worker=1", "ray.placement_timeout_s=2"])
    start = time.monotonic()
    with pytest.raises(ResourceError, match=r"could not place this run's actors within 2 s .*GPU: 1 .*the cluster has "
                                            r"CPU 2, GPU 0"):
        RaySystemLaunch(cfg, (2,), fixed_size=False)  # a joined cluster: an autoscaler might have added a node
    assert time.monotonic() - start < 30
