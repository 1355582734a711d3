"""Nothing lost, nothing run: full disks, shared and foreign run directories, untrusted data files,
poisoned caches, degenerate settings, hung workers.

Each fault is made for real where this machine allows it (a full tmpfs, a second process on the
run directory, a crafted pickle, a stopped worker process) and the test checks what the user sees
(one line, an exit code) and what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reliability import _init, _start_endless_run, _start_run, _wait_for

from conftest import REPO, run_cli
from sftrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sftrl.config import load
from sftrl.files import DiskFull
from sftrl.run import main as run_main
from sftrl.runlog import MetricsLog
from sftrl.system import build_local_system
from sftrl.trainer import NonFiniteError, Trainer

SMOKE = REPO / "configs" / "smoke.yaml"


def _local(cache_dir, *more: str) -> list[str]:
    return ["ray.backend=local", f"pretrain.cache_dir={cache_dir}", "trainer.eval_every=0", "trainer.log_every=1",
            "--no-progress", *more]


def _training_iterations(run_dir: Path) -> list[int]:
    return [r["iteration"] for r in MetricsLog(run_dir / "metrics.jsonl").read() if "critic/ipm_gap" in r]


def _one_line(err: str, needle: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith(("error", "warning", "note"))]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and needle in errors[0], err[-3000:]
    return errors[0]


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- the run log


def test_a_write_the_disk_cannot_take_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"iteration": 1, "x": 1.0})
    before = log.path.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # what a nearly full disk does: part of the line, then ENOSPC
        if len(data) > 10:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("sftrl.runlog.os.write", half_then_full)
    with pytest.raises(DiskFull, match="No space left on device while writing"):
        log.write({"iteration": 2, "x": 2.0})
    assert log.path.read_bytes() == before


def test_a_resume_cuts_a_torn_line_sets_damaged_ones_aside_and_says_so(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    assert run_main([str(SMOKE), "trainer.iterations=6", "trainer.checkpoint_every=3", "--run-dir", str(run_dir),
                     *_local(cache_dir)]) == 0
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    second = next(i for i, line in enumerate(lines) if json.loads(line)["iteration"] == 2 and "critic/ipm_gap" in line)
    lines[second] = '{"iteration": 2, "critic/ipm_ga'  # damaged by hand
    metrics.write_text("\n".join(lines) + '\n{"iteration": 7, "half a li')  # torn by a kill mid-write
    capsys.readouterr()
    assert run_main(["trainer.iterations=8", "--run-dir", str(run_dir), "--resume", "auto", *_local(cache_dir)]) == 0
    err = capsys.readouterr().err
    assert "cut a torn last line" in err and "set aside 1 damaged line(s)" in err and "Traceback" not in err
    assert _training_iterations(run_dir) == [1, 3, 4, 5, 6, 7, 8]
    dropped = (run_dir / "metrics.jsonl.dropped").read_text()
    assert '"critic/ipm_ga\n' in dropped and '"half a li\n' in dropped  # nothing the run logged is deleted


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return result.returncode == 0


@contextlib.contextmanager
def small_disk(where: Path, size: str = "8m"):
    """A real file system of ``size`` at ``where`` (a tmpfs this test mounts and unmounts)."""
    if not _mount_tmpfs(where, size):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the injected-fault tests above still run")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` (the run goes on writing meanwhile: take what is left)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for _ in range(1000):
            if (free := os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) == 0:
                break
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, os.fstat(fd).st_size, free)
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_freed(tmp_path, cache_dir):
    with small_disk(tmp_path / "disk") as disk:
        run_dir = disk / "run"
        proc = _start_run(run_dir, ["ray.backend=local", "trainer.iterations=100000", "trainer.log_every=1",
                                    "trainer.eval_every=0", "trainer.checkpoint_every=5",
                                    f"pretrain.cache_dir={cache_dir}"])
        metrics = run_dir / "metrics.jsonl"
        _wait_for(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 12)
        filler = _fill(disk)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1
        line = _one_line(err, "the disk is full")
        assert f"resume with: python -m sftrl.run --run-dir {run_dir} --resume auto" in line
        assert not list((run_dir / "checkpoints").glob(".*")), "a half-written checkpoint was left"
        stopped = load_checkpoint(latest_checkpoint(run_dir))["iteration"]
        filler.unlink()
        result = run_cli(["sftrl.run", "--run-dir", str(run_dir), "--resume", "auto", f"trainer.iterations={stopped + 3}",
                          "--no-progress"], timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        assert _training_iterations(run_dir) == list(range(1, stopped + 4))
        assert (run_dir / "report.md").is_file()


def test_a_finished_run_that_lost_its_report_to_a_full_disk_writes_it_on_resume(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    assert run_main([str(SMOKE), "trainer.iterations=3", "--run-dir", str(run_dir), *_local(cache_dir)]) == 0
    (run_dir / "report.json").unlink()
    (run_dir / "curves.png").unlink()
    assert run_main(["--run-dir", str(run_dir), "--resume", "auto", *_local(cache_dir)]) == 0
    assert json.loads((run_dir / "report.json").read_text())["iterations"] == 3
    assert (run_dir / "curves.png").is_file()
    capsys.readouterr()
    assert run_main(["--run-dir", str(run_dir), "--resume", "auto", *_local(cache_dir)]) == 2  # now it is finished
    assert "the run already reached trainer.iterations = 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------- run directories


def test_a_second_command_on_a_run_directory_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, cache_dir):
    from sftrl.rundir import RunDirectory

    run_dir = tmp_path / "run"
    proc, _ = _start_endless_run(run_dir, cache_dir, lines=3)
    config = (run_dir / "config.yaml").read_bytes()
    for argv in (["--run-dir", str(run_dir), "--resume", "auto"], [str(SMOKE), "seed=1", "--run-dir", str(run_dir)]):
        second = run_cli(["sftrl.run", *argv, "--no-progress"], timeout=120)
        assert second.returncode == 2
        line = _one_line(second.stderr, "is in use by another sftrl command")
        assert f"pid {proc.pid}: " in line and "sftrl.run" in line  # who holds it
    assert (run_dir / "config.yaml").read_bytes() == config  # the refused commands wrote nothing
    proc.kill()  # a crash: the kernel drops the lock with the process
    proc.communicate(timeout=60)
    RunDirectory(run_dir).claim().release()  # free at once, no stale lock to clear by hand


def test_a_folder_of_the_users_is_never_written_over(tmp_path, cache_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    (mine / "config.yaml").write_text("lr: 0.1\n")
    before = _snapshot(mine)
    assert run_main([str(SMOKE), "--run-dir", str(mine), *_local(cache_dir)]) == 2
    line = _one_line(capsys.readouterr().err, "is not empty and holds no sftrl run")
    assert "config.yaml, report.md" in line
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["config.yaml", "report.md"]


def test_a_checkpoint_resumes_only_the_run_it_belongs_to(tmp_path, cache_dir, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir, seed in ((a, 0), (b, 1)):
        assert run_main([str(SMOKE), f"seed={seed}", "trainer.iterations=4", "trainer.checkpoint_every=2",
                         "--run-dir", str(run_dir), *_local(cache_dir)]) == 0
    before = _snapshot(b)
    capsys.readouterr()
    a_first = a / "checkpoints" / "iter-0000002"
    assert run_main(["trainer.iterations=6", "--run-dir", str(b), "--resume", str(a_first), *_local(cache_dir)]) == 2
    _one_line(capsys.readouterr().err, f"belongs to run '{a.resolve()}', not to run directory '{b}'")
    assert _snapshot(b) == before
    # --resume PATH alone continues PATH's own run (here from its older checkpoint)
    assert run_main(["trainer.iterations=5", "--resume", str(a_first), *_local(cache_dir)]) == 0
    assert _training_iterations(a) == [1, 2, 3, 4, 5]
    assert '"iteration": 3' in (a / "metrics.jsonl.dropped").read_text()  # the cut lines are kept


# ---------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_flushed_rotated_by_iteration_and_a_corrupt_latest_falls_back(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr("sftrl.files.os.fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                               real_fsync(fd)))
    for iteration in (9_999_998, 9_999_999, 10_000_000, 10_000_001):  # past 10M names sort wrongly
        path = save_checkpoint(tmp_path, iteration, {"x": torch.tensor(iteration)}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter-*")) == ["iter-10000000", "iter-10000001"]
    assert any(s.endswith("/state.pt") for s in synced)  # the file, before the rename
    assert str(tmp_path / "checkpoints") in synced  # the rename itself
    assert latest_checkpoint(tmp_path) == path


def test_a_corrupt_latest_checkpoint_is_skipped_loudly_on_resume(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    assert run_main([str(SMOKE), "trainer.iterations=4", "trainer.checkpoint_every=2", "--run-dir", str(run_dir),
                     *_local(cache_dir)]) == 0
    latest = latest_checkpoint(run_dir)
    (latest / "state.pt").write_bytes(b"torn")
    capsys.readouterr()
    assert run_main(["trainer.iterations=5", "--run-dir", str(run_dir), "--resume", "auto", *_local(cache_dir)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint '{latest / 'state.pt'}' is corrupt" in err
    assert "resuming from" in err and "iter-0000002" in err
    assert _training_iterations(run_dir) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- untrusted data files


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_batch_is_refused_before_it_runs_anything(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsCode(str(marker))}, f, protocol=2)
    result = run_cli(["sftrl.run", str(REPO / "configs" / "cifar10.yaml"), f"data.path={tmp_path}",
                      "--run-dir", str(tmp_path / "run")], timeout=120)
    assert result.returncode == 2
    _one_line(result.stderr, "refused: the pickle names 'posix.system'")
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_genuine_cifar_batches_of_every_pickle_protocol_load(tmp_path):
    from sftrl.data.images import load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for i, protocol in enumerate((2, 4, 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"training batch", b"labels": [3, 4], b"data": images,
                         b"filenames": [b"a.png", b"b.png"]}, f, protocol=protocol)
    x = load_cifar10(tmp_path, limit=6)
    assert x.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(x[4], images[0].reshape(3, 32, 32) / np.float32(127.5) - 1)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 RGB PNG whose header (with a valid checksum) claims ``width`` x ``height`` pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: ("folder", _write(d / "big.png", _png_claiming(12_000, 12_000))),
         "the image claims 12000x12000 pixels, more than the 67,108,864 sftrl decodes"),
        (lambda d: ("folder", _write(d / "big.png", _png_claiming(30_000, 30_000))),
         "the image claims more pixels than the 67,108,864 sftrl decodes"),
        (lambda d: ("mnist", _write(d / "train-images-idx3-ubyte", struct.pack(">IIII", 2051, 5, 0, 0))),
         "the header gives 5 images of 0x0 pixels"),
    ],
    ids=["png-header-12000", "png-header-30000", "mnist-zero-size"],
)
def test_image_files_that_claim_absurd_sizes_are_one_line_errors(tmp_path, make, needle):
    name, _ = make(tmp_path)
    result = run_cli(["sftrl.run", str(REPO / "configs" / "mnist.yaml"), f"data.name={name}", f"data.path={tmp_path}",
                      "data.image_size=32", "--run-dir", str(tmp_path / "run")], timeout=120)
    assert result.returncode == 2
    _one_line(result.stderr, needle)
    assert not (tmp_path / "run").exists()


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------- the sampler cache


def test_a_diverging_pretraining_is_an_error_and_caches_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run_main([str(SMOKE), "pretrain.lr=1e30", "pretrain.epochs=3", f"pretrain.cache_dir={cache}",
                     "ray.backend=local", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "pretraining diverged")
    assert not list(cache.glob("*.pt")) and not (tmp_path / "run").exists()


def test_the_cache_key_follows_the_data_and_a_poisoned_entry_is_trained_again(tmp_path, capsys):
    from sftrl.components import fresh_sampler
    from sftrl.pretraining import cache_path, data_fingerprint, load_or_pretrain, sampler_checkpoint

    cfg = load(SMOKE, [f"pretrain.cache_dir={tmp_path}", "pretrain.epochs=2"])
    data = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    changed = data.copy()
    changed[0, 0] += 1e-3
    assert cache_path(cfg, data_fingerprint(data)) != cache_path(cfg, data_fingerprint(changed))
    assert cache_path(cfg, data_fingerprint(data)) == cache_path(cfg, data_fingerprint(data.copy()))

    poisoned = fresh_sampler(cfg, (2,))
    with torch.no_grad():
        next(poisoned.parameters()).fill_(float("nan"))
    path = cache_path(cfg, data_fingerprint(data))
    torch.save(sampler_checkpoint(poisoned, cfg, {"epoch_loss": [float("nan")]}), path)  # an older sftrl's entry
    sampler = fresh_sampler(cfg, (2,))
    info = load_or_pretrain(cfg, sampler, data, progress=False)
    assert info["source"] == "pretrained" and "has non-finite weights" in capsys.readouterr().err
    assert all(bool(torch.isfinite(p).all()) for p in sampler.parameters())
    again = fresh_sampler(cfg, (2,))
    assert load_or_pretrain(cfg, again, data, progress=False)["source"] == "cache"


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("algo.policy_lr=inf", "'algo.policy_lr' = inf is invalid: must be a finite number"),
        ("diffusion.kappa=inf", "'diffusion.kappa' = inf is invalid"),
        ("pretrain.lr=nan", "'pretrain.lr' = nan is invalid: must be a finite number"),
        ("diffusion.final_step_std=.inf", "'diffusion.final_step_std' = inf is invalid"),
        ("model.hidden=0", "'model.hidden' = 0 is invalid: must be between 1 and 16384"),
        ("model.hidden=10000000", "'model.hidden' = 10000000 is invalid"),
        ("model.critic_hidden=[]", "'model.critic_hidden' = [] is invalid"),
        ("model.critic_hidden=[64,0]", "'model.critic_hidden[1]' = 0 is invalid"),
        ("seed=-1", "'seed' = -1 is invalid: must be between 0 and 2147483647"),
        ("data.seed=99999999999", "'data.seed' = 99999999999 is invalid"),
        ("pretrain.seed=-5", "'pretrain.seed' = -5 is invalid"),
        ("trainer.iterations=0", "'trainer.iterations' = 0 is invalid: must be >= 1"),
        ("trainer.eval_samples=1000000000", "'trainer.eval_samples' = 1000000000 is invalid"),
        ("rollout.call_timeout_multiple=0.5", "'rollout.call_timeout_multiple' = 0.5 is invalid"),
        ("name=" + "n" * 250, "'name' = 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn...' is invalid: names the run directory"),
    ],
)
def test_degenerate_settings_are_one_line_errors_naming_the_key(tmp_path, override, needle, capsys):
    assert run_main([str(SMOKE), override, "--run-dir", str(tmp_path / "run"), "ray.backend=local"]) == 2
    _one_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()


def test_kappa_above_one_and_networks_that_cannot_be_built_are_refused(tmp_path, capsys):
    fastdpm = ["diffusion.schedule=fastdpm-var-linear", "diffusion.beta_schedule=linear",
               "diffusion.num_train_steps=1000", "diffusion.final_step_std=0.001"]
    assert run_main([str(SMOKE), *fastdpm, "diffusion.kappa=5", "--run-dir", str(tmp_path / "a")]) == 2
    _one_line(capsys.readouterr().err, "'diffusion.kappa' = 5.0 is invalid: must be in [0, 1]")
    digits = str(REPO / "configs" / "digits.yaml")
    assert run_main([digits, "model.unet_ch=48", "ray.backend=local", "--run-dir", str(tmp_path / "b")]) == 2
    _one_line(capsys.readouterr().err, "model.*: the networks cannot be built for data of shape (1, 8, 8)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- non-finite samples


def test_a_sampler_that_turns_non_finite_is_stopped_by_the_guard(tmp_path):
    cfg = load(SMOKE, ["ray.backend=local", "trainer.max_nonfinite_updates=2"])
    init, data = _init(cfg)
    system = build_local_system(cfg, init, data)
    trainer = Trainer(cfg, system, tmp_path, progress=False)
    trainer.step()
    saved = trainer.checkpoint()
    with torch.no_grad():
        for p in system.learner.handle.obj.policy.parameters():
            p.fill_(float("nan"))  # the weights the next update publishes
    with pytest.raises(NonFiniteError, match="rollout blocks with non-finite chains in a row"):
        for _ in range(4):
            trainer.step()
    assert trainer.counters["nonfinite_streak_rollout"] == 2
    assert latest_checkpoint(tmp_path) == saved


def test_a_failed_evaluation_is_an_event_and_the_run_still_checkpoints(tmp_path, capsys):
    cfg = load(SMOKE, ["ray.backend=local", "trainer.iterations=3", "trainer.checkpoint_every=0"])
    init, data = _init(cfg)

    def evaluate(weights):
        from sftrl.evaluation import check_finite

        check_finite(np.array([[0.0, np.nan]]))

    trainer = Trainer(cfg, build_local_system(cfg, init, data), tmp_path, evaluate, progress=False)
    trainer.fit()
    assert [e["event"] for e in trainer.events] == ["evaluation_failed", "evaluation_failed"]
    assert "1 of 1 samples are NaN or infinite" in trainer.events[0]["detail"]
    assert "warning: the evaluation at iteration 0 failed" in capsys.readouterr().err
    assert load_checkpoint(latest_checkpoint(tmp_path))["iteration"] == 3


def test_sample_refuses_to_write_non_finite_samples(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    assert run_main([str(SMOKE), "trainer.iterations=2", "--run-dir", str(run_dir), *_local(cache_dir)]) == 0
    state = load_checkpoint(latest_checkpoint(run_dir))
    for value in state["learner"]["policy"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    state.pop("format")
    save_checkpoint(run_dir, 3, state, keep=3)
    out = tmp_path / "samples.npz"
    result = run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "100", "--out", str(out)], timeout=120)
    assert result.returncode == 2
    _one_line(result.stderr, "draws non-finite samples (100 of 100 samples in batch 1 are NaN or infinite); nothing was written")
    assert not out.exists() and not list(tmp_path.glob(".samples*"))


# ---------------------------------------------------------------------------- hung workers


def _hang_worker_0_mid_run(tmp_path, num_workers: int, floor_s: int):
    """Three iterations of the smoke run on Ray, then worker 0 stopped (SIGSTOP: alive but stuck,
    so Ray alone would wait on it forever) for three more. Returns the system (for the caller to
    shut down), the trainer, the stopped worker's pid and the seconds the three iterations took."""
    from sftrl.distributed import build_ray_system

    cfg = load(SMOKE, [f"rollout.num_workers={num_workers}", "algo.n_critic=4", "rollout.call_timeout_multiple=3",
                       f"rollout.call_timeout_floor_s={floor_s}"])
    init, _ = _init(cfg)
    system = build_ray_system(cfg, init)
    trainer = Trainer(cfg, system, tmp_path, progress=False)
    for _ in range(3):
        trainer.step()
    victim = system.workers[0].placement()["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        start = time.monotonic()
        for _ in range(3):
            trainer.step()
        seconds = time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    return system, trainer, victim, seconds


def test_a_hung_rollout_worker_is_restarted_and_its_blocks_collected_elsewhere(local_ray, tmp_path):
    system, trainer, _, seconds = _hang_worker_0_mid_run(tmp_path, num_workers=2, floor_s=2)
    try:
        assert seconds < 60
        events = [e["event"] for e in trainer.events]
        assert "worker_hung" in events and "worker_lost" in events
        assert trainer.counters["blocks"] == 6 * 4  # every block exactly once
        assert system.buffer.resolve(system.buffer.state())["blocks_added"] == 6 * 4
    finally:
        system.shutdown()


def test_the_only_rollout_worker_hung_is_restarted_and_given_time_to_warm_up(local_ray, tmp_path):
    """With one worker nothing else can collect its blocks: the run waits for Ray to restart it,
    and the fresh process's first call gets the first-call wait (it imports and warms up again)
    instead of being restarted once more for being slower than the warm calls."""
    system, trainer, victim, _ = _hang_worker_0_mid_run(tmp_path, num_workers=1, floor_s=5)
    try:
        events = [e["event"] for e in trainer.events]
        assert events.count("worker_hung") == 1 and events.count("worker_lost") == 1
        assert system.workers[0].placement()["pid"] != victim  # a fresh process collects
        assert trainer.counters["blocks"] == 6 * 4
        assert system.buffer.resolve(system.buffer.state())["blocks_added"] == 6 * 4
    finally:
        system.shutdown()


def test_a_workers_first_call_after_a_restart_gets_the_first_call_wait():
    from sftrl.config import RolloutConfig
    from sftrl.ledger import RunLedger
    from sftrl.rollout_pool import RolloutCall, RolloutPool

    class Worker:
        name = "worker-0"

    pool = RolloutPool([Worker()], RolloutConfig(call_timeout_multiple=10, call_timeout_floor_s=60), 8, RunLedger(),
                       available=lambda blocks: [True] * len(blocks))
    assert pool.call_timeout() == 600  # nothing timed yet: every call is a first call
    pool.call_seconds.extend([1.0, 2.0, 3.0])
    assert pool.call_timeout() == 60 and pool.call_timeout(first_call=True) == 600
    pool.calls_made["worker-0"] = 5
    pool._restarted(Worker())
    assert pool._is_first_since_restart(RolloutCall(Worker(), [], [], 6))
    assert not pool._is_first_since_restart(RolloutCall(Worker(), [], [], 7))


# ---------------------------------------------------------------------------- one line, not a traceback


def test_yaml_bombs_and_deep_nesting_are_one_line_errors_in_moments(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(rows) + "\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    for path, needle in ((bomb, "more than 100,000 values once its aliases are expanded"), (deep, "nests deeper")):
        start = time.monotonic()
        result = run_cli(["sftrl.run", str(path), "--run-dir", str(tmp_path / "run")], timeout=60)
        assert result.returncode == 2 and time.monotonic() - start < 30
        assert len(_one_line(result.stderr, needle)) < 400
    result = run_cli(["sftrl.run", str(SMOKE), "model.critic_hidden=" + "[" * 3000 + "]" * 3000,
                      "--run-dir", str(tmp_path / "run")], timeout=60)
    assert len(_one_line(result.stderr, "nests deeper")) < 400


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sftrl.run", "--bogus"], "error: python -m sftrl.run: unrecognized arguments: --bogus"),
        (["sftrl.cli", "sample"], "error: sftrl sample: the following arguments are required: run_dir"),
        (["sftrl.cli", "schedule", "ddpm", "--steps", "x"], "error: sftrl schedule: argument --steps: 'x'"),
    ],
)
def test_usage_mistakes_are_one_line(argv, needle):
    result = run_cli(argv, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


def test_a_run_directory_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    assert run_main([str(SMOKE), "--run-dir", str(tmp_path / ("x" * 300) / "run")]) == 2
    _one_line(capsys.readouterr().err, "is 300 bytes long, more than the 255 file systems take")


def test_a_checkpoint_of_another_run_is_refused_by_sample_and_eval(tmp_path, cache_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main([str(SMOKE), "trainer.iterations=2", "--run-dir", str(a), *_local(cache_dir)]) == 0
    assert run_main([str(SMOKE), "model.hidden=32", "trainer.iterations=2", "--run-dir", str(b),
                     *_local(cache_dir)]) == 0
    for command in ("sample", "eval"):
        result = run_cli(["sftrl.cli", command, str(a), "--checkpoint", str(latest_checkpoint(b))], timeout=120)
        assert result.returncode == 2
        _one_line(result.stderr, "belongs to run")


def test_ctrl_c_during_sftrl_pretrain_is_one_line_and_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "sftrl.cli", "pretrain", str(SMOKE), "pretrain.epochs=100000",
                             f"pretrain.cache_dir={cache}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(proc, lambda: cache.exists() or time.sleep(3) is None)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: sftrl pretrain stopped")
    assert not list(cache.glob("*.pt"))
    shutil.rmtree(cache, ignore_errors=True)
