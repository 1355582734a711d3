"""The run's best sampler (``RUN/best-sampler.pt``, ``trainer.keep_best``) and the stop on a
diverged score (``trainer.stop_above_best``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import REPO
from sftrl.best import BEST_FILE, best_of, is_new_best, read_best, score_of
from sftrl.checkpoint import latest_checkpoint, load_checkpoint
from sftrl.cli import _load_run, main
from sftrl.components import InitState
from sftrl.config import load
from sftrl.configtools import ConfigError, dump_yaml
from sftrl.data import load_real_data
from sftrl.models import build_networks
from sftrl.pretraining import SamplerCheckpointError
from sftrl.system import build_local_system
from sftrl.trainer import DivergedError, Trainer
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def _trainer(run_dir, scores, *overrides):
    """A smoke-config trainer evaluating at 0, 2, 4, 6 whose evaluations score ``scores`` in
    turn (as SW2); ``scored`` records the weights each one was handed."""
    cfg = load(SMOKE, ["ray.backend=local", "trainer.iterations=6", "trainer.eval_every=2", "trainer.log_every=1",
                       "trainer.checkpoint_every=0", *overrides])
    data = load_real_data(cfg)
    sampler, _, _ = build_networks(cfg, data.shape[1:])
    init = InitState(to_numpy_state(sampler), tuple(data.shape[1:]))
    scored: list[dict] = []

    def evaluate(weights):
        scored.append({k: np.array(v, copy=True) for k, v in weights.items()})
        return {"sw2_mean": scores[len(scored) - 1]}

    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    return Trainer(cfg, build_local_system(cfg, init, data), run_dir, evaluate, progress=False), scored


def _kept_state(run_dir) -> dict[str, np.ndarray]:
    ckpt = torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in ckpt["state_dict"].items()}


def test_an_evaluation_is_scored_by_its_fid_else_its_mean_sw2_and_lower_is_better():
    assert score_of({"fid": 7.5, "sw2_mean": 0.1}) == ("fid", 7.5)
    assert score_of({"fid": math.nan, "sw2_mean": 0.1}) == ("sw2_mean", 0.1)
    assert score_of({"kid_mean": 0.01}) is None  # FID skipped (no Inception weights): not ranked
    evaluations = [{"iteration": 0, "sw2_mean": 3.0}, {"iteration": 2, "sw2_mean": 1.0},
                   {"iteration": 4, "sw2_mean": math.nan}, {"iteration": 6, "sw2_mean": 1.0}]
    assert best_of(evaluations)["iteration"] == 2  # the earliest of equals
    assert is_new_best({"sw2_mean": 0.9}, evaluations) and not is_new_best({"sw2_mean": 1.0}, evaluations)
    assert is_new_best({"sw2_mean": 5.0}, []) and not is_new_best({"sw2_mean": math.inf}, [])
    assert best_of([]) is None


def test_the_best_evaluated_sampler_is_kept_and_a_worse_one_never_replaces_it(tmp_path):
    run_dir = tmp_path / "run"
    trainer, scored = _trainer(run_dir, [5.0, 3.0, 4.0, 3.5])
    trainer.fit()
    assert [e["sw2_mean"] for e in trainer.evaluations] == [5.0, 3.0, 4.0, 3.5]
    assert read_best(run_dir) == {"iteration": 2, "policy_version": 2, "metric": "sw2_mean", "value": 3.0}
    kept = _kept_state(run_dir)
    assert kept.keys() == scored[1].keys()
    assert all(np.array_equal(kept[k], scored[1][k]) for k in kept)  # the weights iteration 2 scored
    assert not any(np.array_equal(kept[k], scored[3][k]) for k in kept if kept[k].size > 1)  # not the last ones
    assert not list(run_dir.glob(f".{BEST_FILE}*"))  # written atomically: no temporary file left

    # The sftrl commands read it with --best; they refuse --best with --checkpoint, in one line.
    _, sampler, _, path = _load_run(str(run_dir), None, best=True)
    assert path == run_dir / BEST_FILE
    assert all(np.array_equal(v.numpy(), scored[1][k]) for k, v in sampler.state_dict().items())
    out = tmp_path / "best.npz"
    assert main(["sample", str(run_dir), "--best", "-n", "20", "--out", str(out), "--no-progress"]) == 0
    assert np.load(out)["x"].shape == (20, 2)
    with pytest.raises(ValueError, match="--best and --checkpoint each name the sampler"):
        _load_run(str(run_dir), str(latest_checkpoint(run_dir)), best=True)

    # The file is an sftrl sampler checkpoint: model.checkpoint starts another run from it.
    cfg = load(SMOKE, [f"model.checkpoint={run_dir / BEST_FILE}"])
    from sftrl.pretraining import load_initial_checkpoint

    fresh, _, _ = build_networks(cfg, (2,))
    assert load_initial_checkpoint(cfg.model.checkpoint, fresh, cfg)["format"] == "sftrl-sampler-v1"
    assert all(np.array_equal(v.numpy(), scored[1][k]) for k, v in fresh.state_dict().items())


def test_keep_best_off_keeps_no_file_and_a_run_without_one_says_so(tmp_path):
    run_dir = tmp_path / "run"
    trainer, _ = _trainer(run_dir, [5.0, 3.0, 4.0, 3.5], "trainer.keep_best=false")
    trainer.fit()
    assert not (run_dir / BEST_FILE).exists()
    with pytest.raises(ValueError, match=r"has no best sampler .*keep_best.*drop --best"):
        _load_run(str(run_dir), None, best=True)
    (run_dir / BEST_FILE).write_bytes(b"not a torch file")
    with pytest.raises(SamplerCheckpointError, match=f"{BEST_FILE}' is not a readable PyTorch file"):
        read_best(run_dir)


def test_a_score_far_above_the_best_stops_the_run_and_keeps_its_good_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    trainer, _ = _trainer(run_dir, [1.0, 0.5, 80.0, 1.0], "trainer.stop_above_best=100", "trainer.checkpoint_every=2",
                          "trainer.iterations=8")
    with pytest.raises(DivergedError) as stopped:
        trainer.fit()
    message = str(stopped.value)
    assert "iteration 4 scored sw2_mean 80" in message and "160x the run's best (0.5 at iteration 2" in message
    assert "trainer.stop_above_best = 100" in message and str(run_dir / BEST_FILE) in message
    assert read_best(run_dir)["iteration"] == 2
    # The diverged state is not checkpointed over the good ones: the newest is from before it
    # was scored (iteration 4's checkpoint was saved before its evaluation finished, or not at all).
    assert load_checkpoint(latest_checkpoint(run_dir))["iteration"] <= 4
    assert trainer.iteration < 8

    below, _ = _trainer(tmp_path / "below", [1.0, 0.5, 40.0, 1.0], "trainer.stop_above_best=100")
    below.fit()  # 80x the best: under the limit, the run goes on to the end
    assert below.iteration == 6 and len(below.evaluations) == 4


@pytest.mark.parametrize("value", ["0.5", "1", "-2"])
def test_stop_above_best_must_be_above_one_or_zero(value):
    with pytest.raises(ConfigError, match=r"trainer.stop_above_best.*above 1.*or 0|trainer.stop_above_best.*>= 0"):
        load(SMOKE, [f"trainer.stop_above_best={value}"])


def test_a_resumed_run_says_when_the_best_sampler_is_from_after_its_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first, _ = _trainer(run_dir, [5.0, 4.0, 3.0, 6.0], "trainer.checkpoint_every=2")
    first.fit()
    assert read_best(run_dir)["iteration"] == 4
    state = load_checkpoint(run_dir / "checkpoints" / "iter-0000002")
    again, scored = _trainer(run_dir, [3.5, 9.0], "trainer.checkpoint_every=2")
    again.restore(state)
    assert "holds the sampler of iteration 4, after the checkpoint this run resumes from (iteration 2)" in \
        capsys.readouterr().err
    again.fit()
    # Its own iteration 4 scores 3.5, below the best before the checkpoint (4.0): it replaces the file.
    assert read_best(run_dir) == {"iteration": 4, "policy_version": 4, "metric": "sw2_mean", "value": 3.5}
    assert all(np.array_equal(v, scored[0][k]) for k, v in _kept_state(run_dir).items())


def test_a_best_sampler_that_cannot_be_written_is_a_warning_and_an_event_and_the_run_goes_on(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer, _ = _trainer(run_dir, [5.0, 3.0, 4.0, 2.0], "trainer.checkpoint_every=2")
    (run_dir / BEST_FILE).mkdir()  # something in the way (a folder of that name, a read-only file)
    (run_dir / BEST_FILE / "mine.txt").write_text("kept")
    trainer.fit()
    assert trainer.iteration == 6 and len(trainer.evaluations) == 4
    assert load_checkpoint(latest_checkpoint(run_dir))["iteration"] == 6  # the run's state is whole
    assert (run_dir / BEST_FILE / "mine.txt").read_text() == "kept"
    assert not list(run_dir.glob(f".{BEST_FILE}*"))  # no temporary file left behind
    events = [e for e in trainer.events if e["event"] == "best_sampler_not_saved"]
    assert [e["iteration"] for e in events] == [0, 2, 6]  # each new best tried, 4 was no best
    assert "IsADirectoryError" in events[0]["detail"]
    assert "warning: the best sampler (iteration 0)" in capsys.readouterr().err
