"""Faults and bad input: resume, lost workers, lost learner, non-finite updates, user mistakes.

Each fault class here is injected for real (a killed Ray actor, NaN data, a corrupt file) and the
test checks what was kept: counters, checkpoints, the run directory (or its absence).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from conftest import REPO, run_cli
from sftrl.checkpoint import latest_checkpoint, load_checkpoint
from sftrl.components import InitState
from sftrl.config import load
from sftrl.data import load_real_data
from sftrl.distributed import build_ray_system
from sftrl.handles import ComponentLost
from sftrl.models import build_networks
from sftrl.rollout_pool import RolloutCall, Rollouts
from sftrl.run import main as run_main
from sftrl.system import System, build_local_system
from sftrl.trainer import NonFiniteError, Pending, Trainer
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def _init(cfg):
    data = load_real_data(cfg)
    sampler, _, _ = build_networks(cfg, data.shape[1:])
    return InitState(to_numpy_state(sampler), tuple(data.shape[1:])), data


def _training_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    volatile = ("time/", "throughput/")
    return [
        {k: v for k, v in line.items() if not k.startswith(volatile)}
        for line in lines
        if "critic/ipm_gap" in line
    ]


@pytest.mark.parametrize(
    "mode",
    [
        ["trainer.checkpoint_every=0"],
        # async: the straight run restarts its pipeline at the checkpoint the split run resumes from
        ["rollout.max_lag=2", "trainer.checkpoint_every=3"],
    ],
    ids=["sync", "async"],
)
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, cache_dir, mode):
    """On CPU: 6 iterations straight == 3, stop, resume to 6 (bit for bit)."""
    common = ["ray.backend=local", f"pretrain.cache_dir={cache_dir}", "trainer.log_every=1", *mode,
              "trainer.eval_every=0", "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main([str(SMOKE), "trainer.iterations=6", "--run-dir", str(straight), *common]) == 0
    assert run_main([str(SMOKE), "trainer.iterations=3", "--run-dir", str(split), *common]) == 0
    assert run_main([str(SMOKE), "trainer.iterations=6", "--run-dir", str(split), "--resume", "auto", *common]) == 0
    a, b = _training_lines(straight), _training_lines(split)
    assert [line["iteration"] for line in b] == [1, 2, 3, 4, 5, 6]
    assert a == b
    state = load_checkpoint(latest_checkpoint(split))
    assert state["iteration"] == 6 and state["counters"]["blocks"] == 6 * 2


def test_resume_refuses_another_experiment_and_continues_with_the_runs_own_config(tmp_path, cache_dir, capsys):
    """A resume that would continue a different experiment (another data set, another mode) or
    stop before the checkpoint is one line, exit 2, and leaves the run as it was; without a config
    the run's own is used, and the report's speed counts only this command's iterations."""
    run_dir = tmp_path / "run"
    common = ["ray.backend=local", f"pretrain.cache_dir={cache_dir}", "trainer.eval_every=0", "--no-progress",
              "--run-dir", str(run_dir)]
    assert run_main([str(SMOKE), "trainer.iterations=4", "trainer.checkpoint_every=2", "rollout.max_lag=1", *common]) == 0
    config_before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    for argv, needle in [
        ([str(REPO / "configs" / "moons.yaml")], "continues a run with data.name = 'swissroll', this command gives 'moons'"),
        ([str(SMOKE), "trainer.checkpoint_every=2"], "continues a run with rollout.max_lag = 1, this command gives 0"),
        (["trainer.iterations=3"], "trainer.iterations = 3 is below the checkpoint's iteration 4"),
        (["seed=3"], "continues a run with seed = 0, this command gives 3; drop seed=3, or start"),
    ]:
        assert run_main([*argv, *common, "--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert (run_dir / "config.yaml").read_bytes() == config_before
    assert run_main(["trainer.iterations=6", *common, "--resume", "auto"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["iterations"] == 6 and report["resumed_from_iteration"] == 4
    assert report["config"]["rollout"]["max_lag"] == 1 and report["config"]["trainer"]["checkpoint_every"] == 2
    report_md = (run_dir / "report.md").read_text()
    assert "- iterations: 6 (2 in this command, resumed at 4)" in report_md
    assert re.search(r"- rollout chains: \d+ \(\d+ per second in this command\)", report_md), report_md
    assert [(c["from_iteration"], c["to_iteration"]) for c in report["commands"]] == [(0, 4), (4, 6)]


def test_run_dir_under_a_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert run_main([str(SMOKE), "--run-dir", str(tmp_path / "afile" / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0]


def test_resume_of_a_run_directory_without_checkpoint_is_a_user_error(tmp_path, capsys):
    code = run_main([str(SMOKE), "--run-dir", str(tmp_path / "empty"), "--resume", "auto"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0]
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("max_lag", [0, 2], ids=["sync", "async"])
def test_killed_rollout_worker_is_restarted_and_no_block_is_lost_or_doubled(local_ray, tmp_path, max_lag):
    """The worker dies just after iteration 3's rollouts are asked of it (during step 2 in sync
    mode; in async mode during step 0, so its calls for iterations 1-3 fail and each recovers)."""
    cfg = load(SMOKE, ["rollout.num_workers=2", "rollout.max_restarts=3", "algo.n_critic=4", "trainer.iterations=5",
                       f"rollout.max_lag={max_lag}"])
    init, _ = _init(cfg)
    system = build_ray_system(cfg, init)
    trainer = Trainer(cfg, system, tmp_path, progress=False)
    victim = system.workers[0].handle
    original_call = victim.call
    killed = []

    def call_then_kill(method, *args, **kwargs):
        out = original_call(method, *args, **kwargs)
        if method.__name__ == "collect" and args[2][0].startswith("it3/") and not killed:
            ray.kill(victim.actor, no_restart=False)  # dies while its collect is pending
            killed.append(True)
        return out

    victim.call = call_then_kill
    for _ in range(5):
        metrics = trainer.step()
    assert trainer.counters["worker_failures"] >= 1
    assert trainer.counters["blocks"] == 5 * 4
    assert trainer.counters["chains"] == 5 * 4 * cfg.algo.batch_size
    buffer_state = ray.get(system.buffer.state())
    assert buffer_state["blocks_added"] == 5 * 4  # each block id exactly once
    assert ray.get(system.learner.get_weights())[0] == 5
    assert np.isfinite(metrics["critic/ipm_gap"])
    # the restarted worker pulled the current weights and keeps working (once its restart is over)
    _wait_until_alive(victim)
    out = system.workers[0].collect(system.learner.get_weights(), system.critic.get_weights(), ["x/0"], 8)
    assert ray.get(out[-1])["policy_version"] == 5
    system.shutdown()


LOST = object()  # a future whose component died


class StubHandle:
    """Records calls; resolving ``LOST`` raises ComponentLost, anything else is its own value."""

    def __init__(self, name: str, dead: bool = False):
        self.name = name
        self.dead = dead  # every call's futures are LOST (an actor Ray will not restart)
        self.calls: list[tuple[str, tuple]] = []

    def call(self, method, *args, num_returns=1):
        self.calls.append((method.__name__, args))
        out = [LOST if self.dead else f"{self.name}.{method.__name__}.{len(self.calls)}.{k}" for k in range(num_returns)]
        return out if num_returns > 1 else out[0]

    def probe(self):
        return LOST if self.dead else "answered"

    def done(self, future):
        return True

    def resolve(self, futures):
        if futures is LOST or (isinstance(futures, list) and any(f is LOST for f in futures)):
            raise ComponentLost(self.name, "the actor died")
        return futures

    def ping(self):
        pass

    def available(self, futures):
        self.calls.append(("available", (list(futures),)))
        return [f is not LOST for f in futures]


def test_recovery_keeps_what_a_dying_worker_delivered_and_counts_its_death_once(tmp_path):
    """Worker 0 delivers one call of iteration 0 and dies before the next, with iteration 1's call
    already queued on it (async mode). Its delivered block is kept, only the lost ids are asked
    again (of worker 1, which delivered), and the death counts once though it fails two iterations."""
    w0, w1, buffer, learner, critic = (StubHandle(n) for n in ("worker-0", "worker-1", "buffer", "learner", "critic"))
    cfg = load(SMOKE, ["ray.backend=local"])
    trainer = Trainer(cfg, System.of([w0, w1], buffer, learner, critic, "stub"), tmp_path, progress=False)
    trainer.pool.calls_made = {"worker-0": 3, "worker-1": 2}
    c0, c1 = trainer.system.workers  # the trainer's clients of the two stub workers
    failed_policy = Pending(LOST, None)  # the learner's call never ran: its input failed

    it0 = Rollouts(["it0/b0", "it0/b1", "it0/b2"], "theta0", "critic0", 0, [
        RolloutCall(c0, ["it0/b0"], ["block-a", {"ok": 1}], 1),
        RolloutCall(c0, ["it0/b1"], ["block-b", LOST], 2),
        RolloutCall(c1, ["it0/b2"], ["block-c", {"ok": 1}], 1),
    ])
    delivered = list(it0.calls[::2])
    trainer.recover(it0, failed_policy)
    assert it0.calls[:2] == delivered  # worker 0's first block stays
    (resent,) = it0.calls[2:]
    assert resent.worker is c1 and resent.ids == ["it0/b1"] and resent.seq == 3
    assert w1.calls == [("collect", ("theta0", "critic0", ["it0/b1"], cfg.algo.batch_size))]
    assert it0.blocks()[0] == "block-a" and it0.blocks()[2] == "block-c"
    assert ("discard", (it0.ids,)) in buffer.calls
    assert trainer.counters["worker_failures"] == 1

    it1 = Rollouts(["it1/b0", "it1/b1"], "theta0", "critic0", 0, [
        RolloutCall(c0, ["it1/b0"], ["block-d", LOST], 3),  # queued before the death was seen
        RolloutCall(c1, ["it1/b1"], ["block-e", {"ok": 1}], 2),
    ])
    trainer.recover(it1, failed_policy)
    assert [c.ids for c in it1.calls] == [["it1/b1"], ["it1/b0"]] and it1.calls[1].worker is c1
    assert trainer.counters["worker_failures"] == 1
    assert [e["event"] for e in trainer.events] == ["worker_lost"]


def test_a_worker_that_stays_dead_is_not_asked_again_and_its_death_counts_once(tmp_path):
    """Worker 1 dies for good (Ray's restarts used up): its share of iteration 0 goes to worker 0
    in one retry, later iterations ask worker 0 alone, and the death counts once. When a probe
    answers again (Ray restarted it), the worker gets its share back."""
    w0, buffer, learner, critic = (StubHandle(n) for n in ("worker-0", "buffer", "learner", "critic"))
    w1 = StubHandle("worker-1", dead=True)
    cfg = load(SMOKE, ["ray.backend=local", "algo.n_critic=16"])
    trainer = Trainer(cfg, System.of([w0, w1], buffer, learner, critic, "stub"), tmp_path, progress=False)
    failed_policy = Pending(LOST, None)

    it0 = trainer.collect_rollouts("theta0", "critic0", 0, version=0)
    assert [c.worker.name for c in it0.calls] == ["worker-0", "worker-1"]
    trainer.recover(it0, failed_policy)
    assert [(c.worker.name, len(c.ids)) for c in it0.calls] == [("worker-0", 8), ("worker-0", 8)]
    assert sorted(i for c in it0.calls for i in c.ids) == sorted(it0.ids)

    for iteration in (1, 2):
        later = trainer.collect_rollouts("theta", "critic", iteration, version=iteration)
        assert [(c.worker.name, len(c.ids)) for c in later.calls] == [("worker-0", 16)]
    assert trainer.counters["worker_failures"] == 1 and len(w1.calls) == 1

    w1.dead = False  # restarted: the probe asked during the next iteration answers
    assert len(trainer.collect_rollouts("theta", "critic", 3, version=3).calls) == 1
    back = trainer.collect_rollouts("theta", "critic", 4, version=4)
    assert [(c.worker.name, len(c.ids)) for c in back.calls] == [("worker-0", 8), ("worker-1", 8)]


def test_blocks_lost_with_their_node_are_collected_again_though_their_summary_came(tmp_path):
    """A lost node takes the blocks in its object store; the summaries live with the driver."""
    w0, w1, buffer, learner, critic = (StubHandle(n) for n in ("worker-0", "worker-1", "buffer", "learner", "critic"))
    cfg = load(SMOKE, ["ray.backend=local"])
    trainer = Trainer(cfg, System.of([w0, w1], buffer, learner, critic, "stub"), tmp_path, progress=False)
    trainer.pool.calls_made = {"worker-0": 1, "worker-1": 1}
    c0, c1 = trainer.system.workers
    it0 = Rollouts(["it0/b0", "it0/b1"], "theta0", "critic0", 0, [
        RolloutCall(c0, ["it0/b0"], [LOST, {"ok": 1}], 1),
        RolloutCall(c1, ["it0/b1"], ["block-b", {"ok": 1}], 1),
    ])
    trainer.recover(it0, Pending(LOST, None))
    assert [(c.worker.name, c.ids) for c in it0.calls] == [("worker-1", ["it0/b1"]), ("worker-1", ["it0/b0"])]
    assert [e["event"] for e in trainer.events] == ["blocks_lost"]
    assert "blocks it0/b0 of worker-0 were lost with their node" in trainer.events[0]["detail"]
    # the blocks' presence was asked of the critic (which reads them next), not fetched to the driver
    assert critic.calls[-1] == ("available", ([LOST, "block-b"],))


def test_lost_learner_stops_the_run_with_a_clear_error_and_the_checkpoint_intact(local_ray, tmp_path):
    cfg = load(SMOKE, ["trainer.iterations=4"])
    init, _ = _init(cfg)
    system = build_ray_system(cfg, init)
    trainer = Trainer(cfg, system, tmp_path, progress=False)
    trainer.step()
    saved = trainer.checkpoint()
    ray.kill(system.learner.handle.actor, no_restart=True)
    with pytest.raises(ComponentLost, match="learner was lost"):
        trainer.step()
    assert latest_checkpoint(tmp_path) == saved
    assert load_checkpoint(saved)["iteration"] == 1
    system.shutdown()


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
    cfg = load(SMOKE, ["ray.backend=local", "trainer.max_nonfinite_updates=3", "algo.n_critic=2"])
    init, data = _init(cfg)
    system = build_local_system(cfg, init, data)
    trainer = Trainer(cfg, system, tmp_path, progress=False)
    trainer.step()
    saved = trainer.checkpoint()
    critic_before = {k: v.clone() for k, v in system.critic.handle.obj.critic.state_dict().items()}
    system.critic.handle.obj.real_data.data[:] = float("nan")  # every critic loss is now NaN
    with pytest.raises(NonFiniteError, match="trainer.max_nonfinite_updates = 3"):
        for _ in range(3):
            trainer.step()
    assert trainer.counters["nonfinite_total"] >= 3
    for k, v in system.critic.handle.obj.critic.state_dict().items():
        assert torch.equal(v, critic_before[k]), "a skipped update must not move the critic"
    assert latest_checkpoint(tmp_path) == saved


def _one_line_exit_2(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: ["model.checkpoint=" + str(d / "missing.pt")], "not found"),
        (lambda d: ["model.checkpoint=" + str(_write(d / "corrupt.pt", b"not a torch file"))], "not a readable PyTorch file"),
        (lambda d: ["data.name=mnist", "model.sampler=unet"], "data.path"),
    ],
)
def test_bad_files_are_one_line_errors_and_write_nothing(tmp_path, make, needle):
    run_dir = tmp_path / "run"
    result = run_cli(["sftrl.run", str(SMOKE), *make(tmp_path), "--run-dir", str(run_dir)], timeout=120)
    _one_line_exit_2(result, needle)
    assert not run_dir.exists()


def test_checkpoint_of_another_model_shape_is_refused(tmp_path, cache_dir):
    other = tmp_path / "other.pt"
    result = run_cli(["sftrl.cli", "pretrain", str(SMOKE), "model.hidden=32", "pretrain.epochs=1",
                      f"pretrain.cache_dir={cache_dir}", "--out", str(other), "--no-progress"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"] == str(other)  # where it was written, beside the cache's path
    run_dir = tmp_path / "run"
    result = run_cli(["sftrl.run", str(SMOKE), f"model.checkpoint={other}", "--run-dir", str(run_dir)], timeout=120)
    _one_line_exit_2(result, "hidden: checkpoint 32 vs config 64")
    assert not run_dir.exists()


def test_broken_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  n_critic: 5\n  batch_size: [1, 2\n")
    result = run_cli(["sftrl.run", str(bad), "--run-dir", str(tmp_path / "run")], timeout=60)
    _one_line_exit_2(result, "bad.yaml")
    assert "line" in result.stderr and not (tmp_path / "run").exists()


def test_wrong_type_names_key_value_and_type(tmp_path):
    result = run_cli(["sftrl.run", str(SMOKE), "algo.batch_size=many", "--run-dir", str(tmp_path / "run")], timeout=60)
    _one_line_exit_2(result, "'algo.batch_size' must be an int, got 'many'")


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; it only waits to be reaped


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Linux /proc), found without extra packages."""
    parents = {int(p.name): _parent_of(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = [], [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def test_sigint_checkpoints_stops_cleanly_and_resume_continues(tmp_path, cache_dir):
    """SIGINT on the driver: checkpoint, exit 130, Ray's processes gone; resume appends."""
    import signal

    run_dir = tmp_path / "run"
    proc, metrics = _start_endless_run(run_dir, cache_dir, lines=12)
    descendants = _descendants(proc.pid)
    assert descendants, "a Ray run starts helper processes"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "checkpointing after this iteration" in stderr
    _assert_all_exit(descendants)
    state = load_checkpoint(latest_checkpoint(run_dir))
    stopped_at = state["iteration"]
    assert stopped_at >= 10
    assert f"**Stopped early** at iteration {stopped_at} of 100000" in (run_dir / "report.md").read_text()
    lines = [json.loads(x)["iteration"] for x in metrics.read_text().splitlines() if "critic/ipm_gap" in x]
    assert lines == list(range(1, stopped_at + 1))
    # resume for 5 more iterations in-process (local backend): appended, never repeated
    code = run_main([str(SMOKE), f"trainer.iterations={stopped_at + 5}", "trainer.log_every=1", "trainer.eval_every=0",
                     "ray.backend=local", f"pretrain.cache_dir={cache_dir}", "--run-dir", str(run_dir),
                     "--resume", "auto", "--no-progress"])
    assert code == 0
    lines = [json.loads(x)["iteration"] for x in metrics.read_text().splitlines() if "critic/ipm_gap" in x]
    assert lines == list(range(1, stopped_at + 6))


def test_linear_policy_lr_decay_reaches_zero_and_survives_a_resume():
    from sftrl.components import fresh_sampler, make_learner

    cfg = load(SMOKE, ["algo.policy_lr_decay=linear", "trainer.iterations=4", "algo.policy_lr=1e-3"])
    init = InitState(to_numpy_state(fresh_sampler(cfg, (2,))), (2,))
    learner = make_learner(cfg, init)
    lrs = []
    for _ in range(2):
        learner.optimizer.step()  # no gradients: a no-op, in the order torch expects
        learner.lr_schedule.step()
        lrs.append(learner.optimizer.param_groups[0]["lr"])
    resumed = make_learner(cfg, init)
    resumed.load_state_dict(learner.state_dict())
    for _ in range(2):
        resumed.optimizer.step()
        resumed.lr_schedule.step()
        lrs.append(resumed.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert make_learner(load(SMOKE), init).lr_schedule is None  # the paper's constant rate by default


def _wait_until_alive(handle, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            handle.ping()
            return
        except ComponentLost:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _start_run(run_dir: Path, overrides: list[str]):
    import os
    import signal
    import subprocess
    import sys

    args = [sys.executable, "-m", "sftrl.run", str(SMOKE), *overrides, "--run-dir", str(run_dir), "--no-progress"]
    # as from a terminal: a background job (CI) would hand the run an ignored SIGINT
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _start_endless_run(run_dir: Path, cache_dir, lines: int):
    """A smoke run with no end in sight, a metrics line per iteration, once past ``lines`` lines."""
    proc = _start_run(run_dir, ["trainer.iterations=100000", "trainer.log_every=1", "trainer.eval_every=0",
                                f"pretrain.cache_dir={cache_dir}"])
    metrics = run_dir / "metrics.jsonl"
    _wait_for(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) > lines)
    return proc, metrics


def _wait_for(proc, ready, seconds: float = 180) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ready():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.3)
    assert ready(), "the run did not get there in time"


def _assert_all_exit(pids: list[int], seconds: float = 30) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.5)
    alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"orphaned processes: {alive}"


def test_sigterm_while_pretraining_ends_in_one_line_and_stops_ray(tmp_path):
    """``ray job stop`` or a scheduler during Ray's start and pretraining: exit 143, no crash dump."""
    import signal
    import time

    proc = _start_run(tmp_path / "run", ["pretrain.epochs=100000", f"pretrain.cache_dir={tmp_path / 'cache'}"])
    _wait_for(proc, lambda: len(_descendants(proc.pid)) >= 4)  # Ray's daemons and the actors
    time.sleep(2.0)
    descendants = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted before fine-tuning: nothing was cached or written" in stderr
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    _assert_all_exit(descendants)
    assert not (tmp_path / "run").exists() and not any((tmp_path / "cache").glob("*.pt"))


def test_a_second_sigint_stops_at_once_in_one_line(tmp_path, cache_dir):
    import signal
    import threading

    run_dir = tmp_path / "run"
    proc, metrics = _start_endless_run(run_dir, cache_dir, lines=3)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, lambda: any("checkpointing after this iteration" in x for x in lines), 60)
    proc.send_signal(signal.SIGINT)  # once the first is seen (two at once would count as one)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # Ray's own exit may still log after it
    assert any(x.startswith("second SIGINT: stopped at once; ") for x in stderr.splitlines()), stderr[-3000:]


def test_a_run_directory_without_a_checkpoint_says_how_to_go_on(tmp_path, capsys):
    """A run killed (or stopped twice) before its first checkpoint can only start again."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(SMOKE.read_text())
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    assert run_main(["--run-dir", str(run_dir), "--resume", "auto"]) == 2
    assert "stopped before its first checkpoint; start again in a new --run-dir" in capsys.readouterr().err
    assert run_main([str(SMOKE), "--run-dir", str(run_dir)]) == 2
    assert "holds a run stopped before its first checkpoint: choose another --run-dir" in capsys.readouterr().err
    assert run_main(["--run-dir", str(tmp_path / "none"), "--resume", "auto"]) == 2
    assert "holds no run (no config.yaml)" in capsys.readouterr().err


def test_a_relative_run_directory_inside_a_ray_job_copy_is_warned_about(tmp_path, monkeypatch, capsys):
    from sftrl.run import warn_if_in_a_job_copy

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    warn_if_in_a_job_copy(Path("runs/x"))
    assert "goes with the Ray session: pass --run-dir with an absolute path" in capsys.readouterr().err
    warn_if_in_a_job_copy(tmp_path / "runs" / "x")
    assert capsys.readouterr().err == ""


def test_a_moving_average_longer_than_the_run_is_warned_about(capsys):
    """algo.ema_decay is applied once per iteration: 0.995 over a 150-iteration run leaves the
    evaluated weights about half the starting ones (the digits benchmark's 11.6 against 5.8)."""
    from sftrl.preflight import warn_if_average_lags

    warn_if_average_lags(load(SMOKE, ["algo.ema_decay=0.995", "trainer.iterations=150"]))
    err = capsys.readouterr().err
    assert "algo.ema_decay = 0.995 averages about the last 200 iterations" in err
    assert "still 47% the starting ones; algo.ema_decay=0.933 averages about the last 15" in err
    for fine in (["algo.ema_decay=0.95", "trainer.iterations=150"], ["algo.ema_decay=0.995", "trainer.iterations=1500"],
                 ["algo.ema_decay=0", "trainer.iterations=3"]):
        warn_if_average_lags(load(SMOKE, fine))
        assert capsys.readouterr().err == ""
    warn_if_average_lags(load(SMOKE, ["algo.ema_decay=0.9", "trainer.iterations=10"]))
    assert "a run this short needs no average (algo.ema_decay=0)" in capsys.readouterr().err


def test_another_algorithms_settings_are_warned_about_and_the_runs_own_are_not(capsys):
    """algo.sft-pg-kl.beta with algo.name=sft-pg (a forgotten algo.name) would change nothing."""
    from sftrl.preflight import warn_if_settings_unused

    warn_if_settings_unused(load(SMOKE, ["algo.sft-pg-kl.beta=0.1", "algo.ppo_epochs=4"]))
    err = capsys.readouterr().err
    assert err.startswith("warning: algo.ppo_epochs = 4; algo.sft-pg-kl.beta = 0.1: ")
    assert ("not used, since algo.name is 'sft-pg' (read by algorithms 'ppo', 'sft-pg-kl'); set algo.name to the "
            "one you meant, or remove them") in err
    assert err.count("\n") == 1
    warn_if_settings_unused(load(SMOKE, ["algo.sft-pg-kl.reference=best"]))
    assert ("warning: algo.sft-pg-kl.reference = 'best': not used, "
            "since algo.name is 'sft-pg' (read by algorithm 'sft-pg-kl'); set algo.name=sft-pg-kl to use them") in (
        capsys.readouterr().err)
    warn_if_settings_unused(load(SMOKE, ["algo.sft-pg-kl.beta=1.0"]))  # a section at its defaults is named
    assert capsys.readouterr().err.startswith("warning: algo.sft-pg-kl.* (its defaults): not used")
    for used in (["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.1"], ["algo.name=ppo", "algo.ppo_epochs=4"], []):
        warn_if_settings_unused(load(SMOKE, used))
        assert capsys.readouterr().err == ""
