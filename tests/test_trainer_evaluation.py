"""Evaluations run in a background thread beside the training and are logged as they finish."""

from __future__ import annotations

import json
import threading

from conftest import REPO
from sftrl.components import InitState
from sftrl.config import load
from sftrl.data import load_real_data
from sftrl.models import build_networks
from sftrl.system import build_local_system
from sftrl.trainer import Trainer
from sftrl.weights import to_numpy_state

SMOKE = REPO / "configs" / "smoke.yaml"


def _trainer(tmp_path, evaluate):
    cfg = load(SMOKE, ["ray.backend=local", "trainer.iterations=6", "trainer.eval_every=2", "trainer.log_every=1",
                       "trainer.checkpoint_every=0"])
    data = load_real_data(cfg)
    sampler, _, _ = build_networks(cfg, data.shape[1:])
    init = InitState(to_numpy_state(sampler), tuple(data.shape[1:]))
    return Trainer(cfg, build_local_system(cfg, init, data), tmp_path, evaluate, progress=False)


def test_training_goes_on_while_an_evaluation_runs(tmp_path):
    moved_on = threading.Event()
    calls = []

    def evaluate(weights):
        if not calls:  # the first evaluation (iteration 0) finishes only once training has moved on
            calls.append(moved_on.wait(timeout=60))
        else:
            calls.append(True)
        return {"score": float(len(calls))}

    trainer = _trainer(tmp_path, evaluate)
    trainer.fit(on_iteration=lambda t: moved_on.set() if t.iteration == 3 else None)
    assert calls[0], "the first evaluation blocked the training"
    assert [e["iteration"] for e in trainer.evaluations] == [0, 2, 4, 6]
    assert [e["policy_version"] for e in trainer.evaluations] == [0, 2, 4, 6]
    assert [e["score"] for e in trainer.evaluations] == [1.0, 2.0, 3.0, 4.0]
    assert all(0 < a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(trainer.evaluations, trainer.evaluations[1:]))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "eval/score" in x] == [0, 2, 4, 6]
    # the first evaluation was logged after training lines it did not block
    first_eval = next(i for i, x in enumerate(lines) if "eval/score" in x)
    assert any("critic/ipm_gap" in x for x in lines[:first_eval])


def test_an_evaluation_error_reaches_the_driver_as_an_event_and_the_run_goes_on(tmp_path):
    def evaluate(weights):
        raise ValueError("evaluation broke")

    trainer = _trainer(tmp_path, evaluate)
    trainer.fit()
    assert trainer.iteration == trainer.cfg.trainer.iterations
    assert {e["detail"] for e in trainer.events} == {"ValueError: evaluation broke"}
