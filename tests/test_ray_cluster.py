"""Ray: the trainer on a two-node ``ray.cluster_utils.Cluster``, and ``ray job submit`` against a
local head that the test starts itself (and stops by its process id)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import REPO
from sftrl.components import InitState
from sftrl.config import load
from sftrl.data import load_real_data
from sftrl.distributed import build_ray_system
from sftrl.models import build_networks
from sftrl.trainer import Trainer
from sftrl.weights import to_numpy_state


def test_trainer_places_rollout_workers_on_both_nodes(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        cfg = load(REPO / "configs" / "smoke.yaml", ["rollout.num_workers=2", "rollout.num_cpus_per_worker=1", "trainer.iterations=3"])
        data = load_real_data(cfg)
        sampler, _, _ = build_networks(cfg, data.shape[1:])
        init = InitState(to_numpy_state(sampler), tuple(data.shape[1:]))
        system = build_ray_system(cfg, init)
        nodes = {worker.handle.node_id() for worker in system.workers}
        assert len(nodes) == 2, "each rollout worker (1 CPU) must land on its own node"
        trainer = Trainer(cfg, system, tmp_path, progress=False)
        for _ in range(3):
            metrics = trainer.step()
        assert trainer.counters["blocks"] == 3 * cfg.algo.n_critic
        assert metrics["critic/ipm_gap"] == metrics["critic/ipm_gap"]  # a real number, not NaN
        version, _ = ray.get(system.learner.get_weights())
        assert version == 3
        system.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_blocks_lost_with_their_node_are_told_from_present_ones_without_the_driver_fetching_them():
    """``RayHandle.available``: blocks whose only copy was on a node that is gone read as lost, and
    the check reads blocks on the checking actor's node (the critic's), never the driver's: a block
    it read before the loss is still there to read."""
    import numpy as np

    from sftrl.distributed.system import ComponentActor, RayHandle

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    producer_node = cluster.add_node(num_cpus=1, resources={"producer": 1})
    cluster.add_node(num_cpus=1, resources={"checker": 1})
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)

        @ray.remote(num_cpus=0, resources={"producer": 1}, max_restarts=0)
        class Producer:
            def block(self, seed):  # 1.2 MB: kept in the producer node's object store, not inlined
                return np.random.default_rng(seed).standard_normal(300_000).astype(np.float32)

        checker = RayHandle(ray.remote(ComponentActor).options(num_cpus=0, resources={"checker": 1}).remote(), "critic")
        producer = Producer.remote()
        read, unread = producer.block.remote(0), producer.block.remote(1)
        ray.wait([read, unread], num_returns=2, fetch_local=False)
        assert checker.available([read]) == [True]
        driver_node = ray.get_runtime_context().get_node_id()
        for location in ray.experimental.get_object_locations([read, unread]).values():
            assert driver_node not in location["node_ids"]  # the driver holds no copy
        cluster.remove_node(producer_node)
        assert checker.available([read, unread]) == [True, False]
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """A Ray head from cluster/start-local-head.sh (--block), stopped by its process group id."""
    gcs_port, dash_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "SFTRL_GCS_PORT": str(gcs_port),
        "SFTRL_DASHBOARD_PORT": str(dash_port),
        # the job agent's own port: Ray's default (52365) is taken by any other Ray on this machine,
        # and jobs then fail with "No available agent to submit job"
        "SFTRL_DASHBOARD_AGENT_PORT": str(_free_port()),
        "SFTRL_RAY": f"{sys.executable} -m ray.scripts.scripts",  # the interpreter running the tests
    }
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    head = subprocess.Popen(
        ["bash", str(REPO / "cluster" / "start-local-head.sh"), "--block", "--num-cpus=2"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "list", "--address", address],
            capture_output=True, text=True, env=env,
        )
        if probe.returncode == 0:
            break
        assert head.poll() is None, "the Ray head exited while starting"
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head's job server did not come up within 120 s")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # only the processes this fixture started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()


def _submit(address: str, env: dict, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address, *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )


def test_job_submit_with_working_dir(local_head, tmp_path, cache_dir):
    address, env = local_head
    run_dir = tmp_path / "job-run"
    result = _submit(
        address, env,
        ["--working-dir", ".", "--", "python", "-m", "sftrl.run", "configs/smoke.yaml",
         "trainer.iterations=10", f"pretrain.cache_dir={cache_dir}", "--run-dir", str(run_dir), "--no-progress"],
        cwd=REPO,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in result.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["iterations"] == 10 and report["backend"] == "ray"


def test_bare_job_submit_resolves_the_installed_config(local_head, tmp_path, cache_dir):
    """The card's form: no --working-dir; configs/smoke.yaml resolves from the installed package."""
    address, env = local_head
    run_dir = tmp_path / "bare-run"
    result = _submit(
        address, env,
        ["--", "python", "-m", "sftrl.run", "configs/smoke.yaml", "trainer.iterations=5",
         f"pretrain.cache_dir={cache_dir}", "--run-dir", str(run_dir), "--no-progress"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads((run_dir / "report.json").read_text())["iterations"] == 5
