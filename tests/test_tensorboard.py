"""sftrl.tensorboard: scalars and images read back from the event files, and the JSONL replay."""

from __future__ import annotations

import io
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from sftrl import pictures
from sftrl.tensorboard import TensorBoardLogger, read_jsonl, replay_jsonl, scalar_value


def load_events(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    return acc


def scalar_points(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def decode(image_event) -> np.ndarray:
    with Image.open(io.BytesIO(image_event.encoded_image_string)) as png:
        return np.asarray(png.convert("RGB"))


def test_scalar_value_keeps_numbers_only():
    assert scalar_value(3) == 3.0
    assert scalar_value(np.float32(0.5)) == 0.5
    assert scalar_value(np.array(2.0)) == 2.0
    assert scalar_value(float("inf")) == math.inf
    for not_a_number in (float("nan"), True, "1.0", None, [1.0], np.zeros(2)):
        assert scalar_value(not_a_number) is None


def test_scalars_round_trip(tmp_path):
    records = [
        {
            "iteration": it,
            "critic/ipm_gap": 0.1 * it + 0.03,
            "policy/grad_norm": float("nan") if it == 5 else 1.0 / (it + 1),
            "counters/chains": 128 * it,
            "note": "text",
            "flag": True,
        }
        for it in (0, 5, 10)
    ]
    with TensorBoardLogger(tmp_path / "tb") as logger:
        written = [logger.scalars(r["iteration"], r) for r in records]
    assert written == [3, 2, 3]
    acc = load_events(tmp_path / "tb")
    assert set(acc.Tags()["scalars"]) == {"critic/ipm_gap", "policy/grad_norm", "counters/chains"}
    steps, values = zip(*scalar_points(acc, "critic/ipm_gap"))
    assert steps == (0, 5, 10)
    np.testing.assert_allclose(values, [0.03, 0.53, 1.03], rtol=1e-6)
    assert scalar_points(acc, "policy/grad_norm") == [
        (0, 1.0),
        (10, pytest.approx(1 / 11, rel=1e-6)),
    ]
    assert scalar_points(acc, "counters/chains") == [(0, 0.0), (5, 640.0), (10, 1280.0)]


def test_a_record_is_one_event(tmp_path):
    # One summary per record, not one event per scalar (the writer's queue made those cost
    # about 4 ms per toy iteration).
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    with TensorBoardLogger(tmp_path / "tb") as logger:
        for it in range(3):
            logger.scalars(it, {"iteration": it, "a/x": 1.0, "a/y": 2.0, "b/z": 3.0})
    (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    summaries = [e.summary for e in EventFileLoader(str(event_file)).Load() if e.HasField("summary")]
    assert [[v.tag for v in s.value] for s in summaries] == [["a/x", "a/y", "b/z"]] * 3


def test_image_from_png_path_and_from_array(tmp_path):
    grid_images = np.random.default_rng(0).uniform(-1, 1, (6, 3, 5, 4))
    png = pictures.image_grid(grid_images, tmp_path / "pics" / "grid.png", nrow=3)
    with Image.open(png) as f:
        png_pixels = np.asarray(f.convert("RGB"))  # (H, W, 3)
    chw = np.random.default_rng(1).uniform(0, 1, (3, 7, 9))
    with TensorBoardLogger(tmp_path / "tb") as logger:
        logger.image("samples/grid", png, iteration=20)
        logger.image("samples/array", chw, iteration=3)
    acc = load_events(tmp_path / "tb")
    assert set(acc.Tags()["images"]) == {"samples/grid", "samples/array"}
    (grid_event,) = acc.Images("samples/grid")
    assert grid_event.step == 20
    assert (grid_event.width, grid_event.height) == pictures.grid_size_px(6, 3, 5, 4)
    np.testing.assert_array_equal(decode(grid_event), png_pixels)
    (array_event,) = acc.Images("samples/array")
    assert (array_event.step, array_event.width, array_event.height) == (3, 9, 7)
    expected = np.floor(chw.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(decode(array_event), expected)


def test_image_array_must_match_dataformats(tmp_path):
    with (
        TensorBoardLogger(tmp_path / "tb") as logger,
        pytest.raises(ValueError, match="dataformats"),
    ):
        logger.image("x", np.zeros((4, 4)), iteration=0)


def write_jsonl(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in records) + tail)


def test_replay_jsonl_round_trip(tmp_path):
    records = [{"iteration": 0, "eval/sw2_mean": 0.44, "eval/sw2_floor_mean": 0.02}]
    for it in (5, 10, 15):
        records.append(
            {
                "iteration": it,
                "critic/ipm_gap": 0.01 * it,
                "policy/advantage_std": float("nan") if it == 10 else 0.2,
                "time/iteration_s": 0.03,
            }
        )
    records.append({"iteration": 15, "eval/sw2_mean": 0.43, "eval/sw2_floor_mean": 0.02})
    jsonl = tmp_path / "metrics.jsonl"
    write_jsonl(jsonl, records, tail='{"iteration": 20, "critic/ipm')  # torn last line
    written = replay_jsonl(jsonl, tmp_path / "tb")
    assert written == 4 + 3 * 3 - 1
    acc = load_events(tmp_path / "tb")
    for tag in acc.Tags()["scalars"]:
        expected = [
            (r["iteration"], r[tag]) for r in records if tag in r and not math.isnan(r[tag])
        ]
        got = scalar_points(acc, tag)
        assert [s for s, _ in got] == [s for s, _ in expected]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
    assert set(acc.Tags()["scalars"]) == {
        "eval/sw2_mean",
        "eval/sw2_floor_mean",
        "critic/ipm_gap",
        "policy/advantage_std",
        "time/iteration_s",
    }


def test_read_jsonl_rejects_bad_lines(tmp_path):
    bad_middle = tmp_path / "a.jsonl"
    bad_middle.write_text('{"iteration": 0, "x": 1}\nnot json\n{"iteration": 1}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2"):
        read_jsonl(bad_middle)
    no_iteration = tmp_path / "b.jsonl"
    no_iteration.write_text('{"iteration": 0}\n{"x": 1}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: .*'iteration'"):
        read_jsonl(no_iteration)


def test_missing_tensorboard_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
