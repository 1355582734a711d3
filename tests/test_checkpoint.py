"""Run checkpoints: a re-save of the same iteration never leaves the run without a checkpoint."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_reliability import _init

from conftest import REPO
from sftrl import checkpoint as ckpt
from sftrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sftrl.config import load
from sftrl.system import build_local_system
from sftrl.trainer import Trainer


def test_resaving_an_iteration_replaces_it_and_keeps_the_others(tmp_path):
    save_checkpoint(tmp_path, 10, {"x": torch.tensor(1)}, keep=3)
    save_checkpoint(tmp_path, 20, {"x": torch.tensor(2)}, keep=3)
    path = save_checkpoint(tmp_path, 20, {"x": torch.tensor(3)}, keep=3)
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path)["x"].item() == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-0000010", "iter-0000020", "latest"]


def test_a_second_ctrl_c_during_a_resave_comes_after_the_new_checkpoint_is_in_place(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 20, {"x": torch.tensor(1)}, keep=3)
    replace = os.replace

    def interrupted_replace(src, dst):
        if str(src).endswith("iter-0000020"):  # the old directory is moved aside: Ctrl-C now
            os.kill(os.getpid(), signal.SIGINT)
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", interrupted_replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may ignore SIGINT
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 20, {"x": torch.tensor(2)}, keep=3)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    assert load_checkpoint(latest_checkpoint(tmp_path))["x"].item() == 2
    # what the interrupted writer left (the old copy, moved aside) goes with the next save
    save_checkpoint(tmp_path, 30, {"x": torch.tensor(3)}, keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-0000020", "iter-0000030", "latest"]


def test_leftovers_of_a_killed_writer_are_swept(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".iter-0000040.tmp-99999").mkdir(parents=True)
    (root / ".iter-0000040.tmp-99999" / "state.pt").write_bytes(b"half")
    save_checkpoint(tmp_path, 30, {"x": torch.tensor(3)}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["iter-0000030", "latest"]


def test_a_stop_right_after_a_scheduled_checkpoint_does_not_write_it_again(tmp_path):
    cfg = load(REPO / "configs" / "smoke.yaml", ["ray.backend=local", "trainer.iterations=6",
                                                 "trainer.checkpoint_every=3"])
    init, data = _init(cfg)
    trainer = Trainer(cfg, build_local_system(cfg, init, data), tmp_path, progress=False)
    written = []
    real_save = ckpt.save_checkpoint

    def counting_save(run_dir, iteration, state, keep):
        written.append(iteration)
        return real_save(run_dir, iteration, state, keep)

    import sftrl.trainer as trainer_module

    trainer_module.save_checkpoint, saved = counting_save, trainer_module.save_checkpoint
    try:
        trainer.fit(on_iteration=lambda t: setattr(t, "stop_requested", t.iteration == 3))
    finally:
        trainer_module.save_checkpoint = saved
    assert written == [3]
    assert load_checkpoint(latest_checkpoint(tmp_path))["iteration"] == 3
