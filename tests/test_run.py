"""End to end through ``python -m sftrl.run`` in a subprocess (Ray started in-process)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import REPO, run_cli
from sftrl.config import load
from sftrl.configtools import ConfigError
from sftrl.run import UsageError


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    result = run_cli(
        ["sftrl.run", "configs/smoke.yaml", f"pretrain.cache_dir={cache_dir}", "--run-dir", str(run_dir), "--no-progress"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_smoke_run_writes_a_complete_run_directory(smoke_run):
    run_dir, result = smoke_run
    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.md"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "critic/ipm_gap" in line]
    assert [line["iteration"] for line in train_lines] == [5, 10, 15, 20]
    # Evaluations run beside the training and are logged as they finish: the start's may come
    # after a few training lines, the final one is the last line.
    assert [line["iteration"] for line in lines if "eval/sw2_mean" in line] == [0, 20]
    assert "eval/sw2_mean" in lines[-1] and lines[-1]["iteration"] == 20
    # 20 iterations x n_critic 2 blocks x 64 chains, every one counted once
    assert train_lines[-1]["counters/chains"] == 20 * 2 * 64
    report = json.loads((run_dir / "report.json").read_text())
    assert report["backend"] == "ray" and report["iterations"] == 20
    # where an iteration's time went: the medians of the logged lines but the first (5, 10, 15, 20)
    split = report["time_split"]
    assert split["iterations_timed"] == 3
    assert split["time/critic_s"] == sorted(x["time/critic_s"] for x in train_lines[1:])[1]
    assert 0 < split["time/learner_gather_s"] < split["time/learner_s"] < split["time/iteration_s"]
    assert "- an iteration, median of 3 logged: " in (run_dir / "report.md").read_text()
    # Where each actor ran: one Ray node (this machine), every component on the CPU here.
    placement = report["placement"]
    assert set(placement) == {"worker-0", "buffer", "learner", "critic"}
    assert len({where["node"] for where in placement.values()}) == 1
    assert placement["worker-0"]["device"] == placement["learner"]["device"] == "cpu"
    assert placement["buffer"]["device"] == "-" and placement["learner"]["gpu_ids"] == []
    assert "worker-0 cpu on " in (run_dir / "report.md").read_text()
    assert "backend `ray`, 1 rollout worker(s), sync mode." in (run_dir / "report.md").read_text()
    rows = report["evaluations"]
    assert [r["sampler"] for r in rows] == ["initial (pretrained)", "fine-tuned"]
    assert rows[0]["sw2_floor_mean"] > 0 and rows[1]["sw2_mean"] > rows[1]["sw2_floor_mean"]
    # Seconds since the command started (pretraining included): a time-to-quality curve.
    assert 0 < rows[0]["elapsed_s"] < rows[1]["elapsed_s"]
    assert rows[0]["sw2_floor_mean"] == rows[1]["sw2_floor_mean"]  # the data floor is measured once
    assert all(0 < r["spread_ratio"] < 10 for r in rows)  # the samples' std against the data's
    assert "| fine-tuned | 20 |" in (run_dir / "report.md").read_text()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter-0000020"
    # The best evaluated sampler is kept beside the checkpoints, and the report and the last lines say where.
    best = min(rows, key=lambda r: r["sw2_mean"])
    assert report["best"] == {"iteration": best["iteration"], "metric": "sw2_mean", "value": best["sw2_mean"],
                              "file": "best-sampler.pt"}
    assert (run_dir / "best-sampler.pt").is_file()
    assert f"Best evaluation: iteration {best['iteration']}, SW2" in (run_dir / "report.md").read_text()
    assert f"best sampler: iteration {best['iteration']}, sw2_mean" in result.stderr


def test_eval_of_the_best_sampler_scores_what_the_run_recorded_for_it(smoke_run):
    run_dir, _ = smoke_run
    best = json.loads((run_dir / "report.json").read_text())["best"]
    result = run_cli(["sftrl.cli", "eval", str(run_dir), "--best"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"the best sampler of run '{run_dir}': iteration {best['iteration']}" in result.stderr
    # The file holds the very weights that evaluation scored: the same seeded evaluation, the same SW2.
    assert json.loads(result.stdout)["sw2_mean"] == pytest.approx(best["value"], rel=1e-9)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-n", "0"], "argument -n: 0 is invalid: must be >= 1"),
        (["--batch-size", "0"], "argument --batch-size: 0 is invalid"),
        (["--out", "{tmp}"], "is a directory: give a file path"),
        (["--out", "{tmp}/afile/x.npz"], "afile' is a file, not a directory"),
    ],
)
def test_sample_command_bad_arguments_exit_2_and_write_nothing(smoke_run, tmp_path, args, needle):
    run_dir, _ = smoke_run
    (tmp_path / "afile").write_text("")
    result = run_cli(["sftrl.cli", "sample", str(run_dir), *[a.format(tmp=tmp_path) for a in args]], timeout=60)
    assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_resuming_a_finished_run_says_it_is_finished_and_writes_nothing(smoke_run, capsys):
    from sftrl.run import main as run_main

    run_dir, _ = smoke_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert run_main(["--run-dir", str(run_dir), "--resume", "auto"]) == 2
    assert "the run already reached trainer.iterations = 20" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    report = json.loads((run_dir / "report.json").read_text())
    assert report["iterations"] == report["iterations_planned"] == 20
    assert "Stopped early" not in (run_dir / "report.md").read_text()


def test_sample_command_writes_npz(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    out = tmp_path / "x.npz"
    result = run_cli(["sftrl.cli", "sample", str(run_dir), "-n", "123", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    x = np.load(out)["x"]
    assert x.shape == (123, 2) and np.isfinite(x).all()
    # the fine-tuned sampler puts its mass near the data (swiss roll spans about [-0.55, 0.7])
    assert np.abs(x).max() < 3.0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("algo.n_critc=2", "did you mean 'n_critic'"),
        ("algo.n_critic=0", "'algo.n_critic' = 0 is invalid"),
        ("algo.policy_lr=-1", "'algo.policy_lr'"),
        ("diffusion.steps=50", "'diffusion.steps'"),
        ("algo.name=reinforce", "valid: ppo, sft, sft-pg, sft-pg-kl"),
        ("trainer.iterations=-3", "override 'trainer.iterations=-3': 'trainer.iterations' = -3 is invalid"),
        ("rollout.max_lag=10", "with trainer.checkpoint_every = 10 the lag never reaches it"),
        ("ray.num_cpus=-2", "'ray.num_cpus' = -2 is invalid"),
        ("rollout.max_lag=-1", "'rollout.max_lag' = -1 is invalid: must be >= 0 (0: sync mode)"),
        ("algo.max_importance_weight=0", "'algo.max_importance_weight' = 0.0 is invalid"),
        ("diffusion.schedule=ddim", "'diffusion.schedule' = 'ddim' is invalid: it has sigma = 0 at every step"),
        ("name=../elsewhere", "'name' = '../elsewhere' is invalid: names the run directory"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    result = run_cli(["sftrl.run", "configs/smoke.yaml", override, "--run-dir", str(run_dir)], timeout=60)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_gpu_ask_beyond_the_in_process_cluster_is_one_line_exit_2(tmp_path, cache_dir):
    """Actors asking for GPUs that a Ray started here does not have would wait forever."""
    run_dir = tmp_path / "run"
    result = run_cli(
        ["sftrl.run", "configs/smoke.yaml", f"pretrain.cache_dir={cache_dir}", "ray.num_cpus=2",
         "rollout.num_gpus_per_worker=0.5", "ray.learner_num_gpus=0.25", "--run-dir", str(run_dir), "--no-progress"],
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "GPU: 0.75 asked (rollout.num_workers=1 x rollout.num_gpus_per_worker=0.5 + ray.learner_num_gpus=0.25" in errors[0]
    assert "the cluster has 0" in errors[0] and "rollout.num_gpus_per_worker=0 " in errors[0]
    assert not run_dir.exists()


def test_cluster_address_where_nothing_listens_is_one_line_exit_2(tmp_path, cache_dir):
    """Rather than minutes of Ray retrying its connection."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    result = run_cli(["sftrl.run", "configs/smoke.yaml", f"pretrain.cache_dir={cache_dir}", f"ray.address=127.0.0.1:{port}",
                      "--run-dir", str(run_dir), "--no-progress"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"ray.address = '127.0.0.1:{port}': no Ray cluster answers there" in errors[0]
    assert not run_dir.exists()


def test_ctrl_c_while_the_sampler_pretrains_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import sftrl.launch
    import sftrl.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sftrl.launch, "build_initial_sampler", interrupted)
    run_dir = tmp_path / "run"
    code = sftrl.run.main(["configs/smoke.yaml", f"pretrain.cache_dir={tmp_path / 'cache'}", "ray.backend=local",
                           "--run-dir", str(run_dir), "--no-progress"])
    assert code == 130
    assert "interrupted before fine-tuning: nothing was cached or written" in capsys.readouterr().err
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_missing_config_file_is_named(tmp_path):
    result = run_cli(["sftrl.run", "configs/nope.yaml", "--run-dir", str(tmp_path / "r")], timeout=60)
    assert result.returncode == 2 and "config file 'configs/nope.yaml' not found" in result.stderr


def test_config_resolves_from_the_installed_package_outside_the_checkout(tmp_path):
    import os

    from sftrl.run import resolve_config_path

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert resolve_config_path("configs/smoke.yaml").read_text() == (REPO / "configs" / "smoke.yaml").read_text()
        (tmp_path / "configs").mkdir()
        with pytest.raises(UsageError, match="config 'configs' is a directory: give a YAML file in it"):
            resolve_config_path("configs")
    finally:
        os.chdir(cwd)


def test_a_built_wheel_ships_every_config(tmp_path):
    """A non-editable install (pip install sftrl, a cluster image) finds configs/x.yaml too."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("sftrl", "envs", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("sftrl-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("sftrl/configs/")}
    assert shipped == {f"sftrl/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}


def _png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_smoke_run_renders_every_picture(smoke_run):
    import matplotlib.image

    from sftrl import pictures

    run_dir, _ = smoke_run
    expected = {
        "curves.png": pictures.CURVES_SIZE_PX,
        "samples.png": pictures.PAIR_SIZE_PX,
        "sampling_paths.png": pictures.PAIR_SIZE_PX,
    }
    report = (run_dir / "report.md").read_text()
    for name, size in expected.items():
        assert _png_size(run_dir / name) == size, name
        assert matplotlib.image.imread(run_dir / name).std() > 0.01, f"{name} is blank"
        assert f"]({name})" in report


def test_smoke_run_writes_tensorboard_scalars_and_pictures(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = smoke_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"critic/ipm_gap", "policy/policy_loss", "eval/sw2_mean"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("critic/ipm_gap")] == [5, 10, 15, 20]
    assert "pictures/samples" in tags["images"]


def test_initial_sampler_weights_depend_only_on_the_pretrain_seed():
    """A cached pretrained sampler must be a function of its cache key: its initial weights may
    not depend on how much of the global RNG something else consumed before."""
    import torch

    from sftrl.components import fresh_sampler
    from sftrl.config import load

    cfg = load(REPO / "configs" / "smoke.yaml")
    torch.manual_seed(123)
    a = fresh_sampler(cfg, (2,)).state_dict()
    torch.rand(1000)
    b = fresh_sampler(cfg, (2,)).state_dict()
    c = fresh_sampler(load(REPO / "configs" / "smoke.yaml", ["pretrain.seed=1"]), (2,)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["algo.lam=0"], "'algo.lam' = 0.0 is invalid: critic_regulariser 'B' trains the baseline through R_B alone"),
        (["diffusion.schedule=fastdpm-var-linear", "diffusion.beta_schedule=linear", "diffusion.num_train_steps=100",
          "diffusion.kappa=0", "algo.name=ppo"], "it has sigma = 0 at every step with kappa = 0, so 'ppo'"),
    ],
)
def test_configs_that_could_not_learn_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load(REPO / "configs" / "smoke.yaml", overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo.lam=0", "algo.critic_regulariser=GP"],  # GP trains the baseline by regression
        ["diffusion.schedule=ddim", "diffusion.final_step_std=0.001"],  # the paper's image recipe
        ["diffusion.schedule=ddim", "algo.name=sft", "algo.critic_regulariser=GP"],  # pathwise: no transitions
    ],
)
def test_the_same_settings_are_fine_where_they_can_learn(overrides):
    load(REPO / "configs" / "smoke.yaml", overrides)


@pytest.mark.parametrize(
    ("overrides", "blamed"),
    [
        (["algo.name=sft", "trainer.iterations=3"], "override 'algo.name=sft': 'algo.critic_regulariser' = 'B'"),
        (["data.name=mnist"], "override 'data.name=mnist': 'model.sampler' = 'toy-mlp'"),
        (["trainer.iterations=3", "algo.n_critic=0"], "override 'algo.n_critic=0': 'algo.n_critic' = 0"),
    ],
)
def test_a_cross_field_error_is_blamed_on_the_override_that_caused_it(overrides, blamed):
    with pytest.raises(ConfigError, match=re.escape(blamed)):
        load(REPO / "configs" / "smoke.yaml", overrides)


def test_a_cross_field_error_of_the_file_itself_is_blamed_on_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs" / "smoke.yaml").read_text().replace("name: sft-pg", "name: sft"))
    with pytest.raises(ConfigError, match=re.escape(f"config file '{bad}': 'algo.critic_regulariser' = 'B'")):
        load(bad, ["trainer.iterations=3"])


def test_places_that_cannot_be_written_are_refused_before_any_work(smoke_run, tmp_path, capsys):
    """/proc takes no new files, even from root (for whom permissions say nothing)."""
    from sftrl.cli import main as cli_main
    from sftrl.run import main as run_main

    smoke = str(REPO / "configs" / "smoke.yaml")
    assert run_main([smoke, "--run-dir", "/proc/sftrl-run"]) == 2
    assert "--run-dir '/proc/sftrl-run': cannot write in '/proc'" in capsys.readouterr().err
    assert run_main([smoke, "pretrain.cache_dir=/proc/sftrl-cache", "--run-dir", str(tmp_path / "r")]) == 2
    assert "pretrain.cache_dir '/proc/sftrl-cache': cannot write in '/proc'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    (tmp_path / "afile").write_text("x")
    assert run_main([smoke, f"pretrain.cache_dir={tmp_path / 'afile'}", "--run-dir", str(tmp_path / "r")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    run_dir, _ = smoke_run
    assert cli_main(["sample", str(run_dir), "-n", "5", "--out", "/proc/x.npz"]) == 2
    assert "--out '/proc/x.npz': cannot write in '/proc'" in capsys.readouterr().err
