"""sftrl.pictures: every picture is a PNG of its documented size, with content where the data
put it, written atomically; image grids are pixel-exact."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from PIL import Image

from sftrl import pictures
from sftrl.files import write_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG format puts first."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A valid PNG of ``size``, not one flat colour, alone in its directory (no temp files)."""
    path = Path(path)
    assert png_size(path) == size
    pixels = imread(path)  # (H, W) or (H, W, C), floats in [0, 1]
    assert pixels.shape[:2] == (size[1], size[0])
    assert pixels.std() > 0
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    return pixels


def blue_mask(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 2] - rgb[..., 0] > 0.25


def red_mask(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] - rgb[..., 2] > 0.25) & (rgb[..., 0] - rgb[..., 1] > 0.25)


def green_mask(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 1] - rgb[..., 0] > 0.25) & (rgb[..., 1] - rgb[..., 2] > 0.25)


def median_position(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    assert len(rows) > 20, "too few pixels of this colour"
    return float(np.median(rows)), float(np.median(cols))


# -- training curves ------------------------------------------------------------------------


def synthetic_metrics(iterations: int = 40, log_every: int = 5) -> list[dict]:
    """Records shaped like a run's metrics.jsonl: eval lines at 0, the middle and the end, train
    lines every ``log_every`` iterations, one NaN, counters and timings."""
    rng = np.random.default_rng(0)
    records = []

    def eval_line(it, sw2):
        return {
            "iteration": it,
            "eval/policy_version": it,
            "eval/sw2_mean": sw2,
            "eval/sw2_std": 0.001,
            "eval/sw2_floor_mean": 0.007,
            "eval/sw2_floor_std": 0.0004,
            "eval/exact_w2": sw2 * 1.4,
        }

    records.append(eval_line(0, 0.044))
    for it in range(log_every, iterations + 1, log_every):
        records.append(
            {
                "iteration": it,
                "critic/ipm_gap": 0.05 + 0.01 * it + 0.01 * rng.standard_normal(),
                "critic/baseline_loss": 0.1 * math.exp(-it / 20),
                "critic/critic_loss": -0.03 * it,
                "policy/policy_loss": 0.1 * rng.standard_normal(),
                "policy/advantage_mean": 0.01 * rng.standard_normal(),
                "policy/advantage_std": 0.2 + 0.001 * it,
                "policy/grad_norm": float("nan") if it == 10 else 0.1 + 0.002 * it,
                "time/iteration_s": 0.03,
                "throughput/rollout_chains_per_s": 4000.0,
                "counters/chains": it * 128,
            }
        )
        if it == iterations // 2:
            records.append(eval_line(it, 0.02))
    records.append(eval_line(iterations, 0.012))
    return records


def test_curve_series_selects_sorts_and_drops_nan():
    records = synthetic_metrics()
    series = pictures.curve_series(
        list(reversed(records)), ["policy/grad_norm", "eval/sw2_mean", "absent/key"]
    )
    assert set(series) == {"policy/grad_norm", "eval/sw2_mean", "eval/sw2_floor_mean"}
    iterations, values = series["policy/grad_norm"]
    np.testing.assert_array_equal(iterations, [5, 15, 20, 25, 30, 35, 40])  # 10 was NaN
    np.testing.assert_allclose(values, 0.1 + 0.002 * iterations)
    np.testing.assert_array_equal(series["eval/sw2_mean"][0], [0, 20, 40])
    np.testing.assert_allclose(series["eval/sw2_mean"][1], [0.044, 0.02, 0.012])
    np.testing.assert_allclose(series["eval/sw2_floor_mean"][1], [0.007] * 3)


def test_curve_series_ignores_non_numbers_and_records_without_iteration():
    records = [
        {"iteration": 1, "a": "text"},
        {"a": 2.0},
        {"iteration": 2, "a": True},
        {"iteration": 3, "a": None},
    ]
    assert pictures.curve_series(records, ["a"]) == {}


def test_training_curves_default_keys(tmp_path):
    path = pictures.training_curves(synthetic_metrics(), tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    check_png(path, pictures.CURVES_SIZE_PX)


def test_training_curves_chosen_keys_and_nothing_to_plot(tmp_path):
    one = pictures.training_curves(
        synthetic_metrics(), tmp_path / "a" / "one.png", keys=["critic/ipm_gap"]
    )
    check_png(one, pictures.CURVES_SIZE_PX)
    empty = pictures.training_curves([{"iteration": 0}], tmp_path / "b" / "empty.png")
    check_png(empty, pictures.CURVES_SIZE_PX)
    # The same data with more panels draws a different picture.
    six = pictures.training_curves(synthetic_metrics(), tmp_path / "c" / "six.png")
    assert not np.array_equal(imread(one), imread(six))


# -- 2-D samples ----------------------------------------------------------------------------


def corner_clouds(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Data in the lower-right of [0, 1]^2 (plus two corners that fix the range), samples in
    the upper-left."""
    rng = np.random.default_rng(seed)
    data = np.concatenate([rng.uniform([0.6, 0.0], [1.0, 0.4], (800, 2)), [[0.0, 0.0], [1.0, 1.0]]])
    samples = rng.uniform([0.0, 0.6], [0.4, 1.0], (800, 2))
    return samples, data


def test_plot_limits_from_data_range_with_margin():
    data = np.array([[0.0, 0.0], [2.0, 1.0], [1.0, 0.5]])
    (x_lo, x_hi), (y_lo, y_hi) = pictures.plot_limits(data)
    assert (x_lo, x_hi) == pytest.approx((-0.2, 2.2))
    assert (y_lo, y_hi) == pytest.approx((-0.1, 1.1))


def test_scatter_vs_data_puts_samples_blue_and_data_red_where_they_are(tmp_path):
    samples, data = corner_clouds()
    path = pictures.scatter_vs_data(samples, data, tmp_path / "scatter.png", title="smoke")
    rgb = check_png(path, pictures.SCATTER_SIZE_PX)[..., :3]
    height, width = rgb.shape[:2]
    blue_row, blue_col = median_position(blue_mask(rgb))
    red_row, red_col = median_position(red_mask(rgb))
    assert blue_row < height / 2 and blue_col < width / 2  # upper left
    assert red_row > height / 2 and red_col > width / 2  # lower right


def test_scatter_vs_data_rejects_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 2\)"):
        pictures.scatter_vs_data(np.zeros((5, 3)), np.zeros((5, 2)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_before_after_scatter_two_panels(tmp_path):
    samples, data = corner_clouds()
    tuned = samples + [0.6, -0.6]  # moved onto the data, lower right
    path = pictures.before_after_scatter(samples, tuned, data, tmp_path / "before_after.png")
    rgb = check_png(path, pictures.PAIR_SIZE_PX)[..., :3]
    height, width = rgb.shape[:2]
    left, right = rgb[:, : width // 2], rgb[:, width // 2 :]
    assert median_position(blue_mask(left))[0] < height / 2  # initial: upper half
    assert median_position(blue_mask(right))[0] > height / 2  # tuned: lower half


def test_sampling_paths_two_panels_with_starts_and_ends(tmp_path):
    rng = np.random.default_rng(1)
    steps, chains = 10, 30
    x_start = rng.standard_normal((chains, 2))
    data = rng.uniform(-1, 1, (500, 2))
    initial = x_start + np.cumsum(
        np.concatenate([np.zeros((1, chains, 2)), 0.1 * rng.standard_normal((steps, chains, 2))]), 0
    )
    tuned = initial * np.linspace(1.0, 0.5, steps + 1)[:, None, None]
    path = pictures.sampling_paths(initial, tuned, data, tmp_path / "paths.png", num_paths=20)
    rgb = check_png(path, pictures.PAIR_SIZE_PX)[..., :3]
    width = rgb.shape[1]
    for panel in (rgb[:, : width // 2], rgb[:, width // 2 :]):
        assert green_mask(panel).sum() > 20  # x_S marked
        assert blue_mask(panel).sum() > 20  # x_0 marked


def test_sampling_paths_requires_same_starts_and_shapes(tmp_path):
    xs = np.zeros((4, 5, 2))
    data = np.ones((10, 2))
    with pytest.raises(ValueError, match="same x_S"):
        pictures.sampling_paths(xs, xs + 1.0, data, tmp_path / "p.png")
    with pytest.raises(ValueError, match=r"\(S \+ 1, N, 2\)"):
        pictures.sampling_paths(xs[0], xs[0], data, tmp_path / "p.png")
    with pytest.raises(ValueError, match="chains"):
        pictures.sampling_paths(xs, xs[:, :3], data, tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []


# -- image grids ----------------------------------------------------------------------------


def test_to_uint8_maps_minus_one_to_one_onto_0_255():
    values = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, np.nan])
    np.testing.assert_array_equal(pictures.to_uint8(values), [0, 0, 128, 191, 255, 255, 0])


@pytest.mark.parametrize(
    ("n", "nrow", "h", "w", "expected"),
    [
        (4, 2, 3, 4, (2 * 6 + 2, 2 * 5 + 2)),
        (5, 3, 4, 6, (3 * 8 + 2, 2 * 6 + 2)),
        (3, 8, 8, 8, (3 * 10 + 2, 1 * 10 + 2)),
        (16, 4, 28, 28, (4 * 30 + 2, 4 * 30 + 2)),
    ],
)
def test_image_grid_size_matches_formula(tmp_path, n, nrow, h, w, expected):
    assert pictures.grid_size_px(n, nrow, h, w) == expected
    images = np.random.default_rng(0).uniform(-1, 1, (n, 3, h, w))
    path = pictures.image_grid(images, tmp_path / "grid.png", nrow=nrow)
    check_png(path, expected)


def test_image_grid_grey_2x2_pixel_values(tmp_path):
    h, w, pad = 3, 4, pictures.GRID_PADDING
    levels = [-1.0, 0.0, 1.0, 0.5]
    expected_levels = [0, 128, 255, 191]
    images = np.stack([np.full((1, h, w), v) for v in levels])  # (4, 1, 3, 4)
    path = pictures.image_grid(images, tmp_path / "grid.png", nrow=2)
    check_png(path, (2 * (w + pad) + pad, 2 * (h + pad) + pad))
    with Image.open(path) as png:
        assert png.mode == "L"
        grid = np.asarray(png)  # (H, W) uint8
    expected = np.full(grid.shape, pictures.GRID_PAD_VALUE, dtype=np.uint8)
    for k, level in enumerate(expected_levels):
        top, left = pad + (k // 2) * (h + pad), pad + (k % 2) * (w + pad)
        expected[top : top + h, left : left + w] = level
    np.testing.assert_array_equal(grid, expected)
    # Spot checks at hand-computed positions: image 1 starts at (2, 8), image 2 at (7, 2).
    assert grid[2, 8] == 128 and grid[4, 11] == 128
    assert grid[7, 2] == 255 and grid[9, 5] == 255
    assert grid[7, 8] == 191
    assert grid[0, 0] == grid[5, 3] == grid[3, 6] == pictures.GRID_PAD_VALUE


def test_image_grid_rgb_channels_and_empty_cell(tmp_path):
    h, w, pad = 2, 2, pictures.GRID_PADDING
    images = np.zeros((3, 3, h, w))
    images[0, 0] = 1.0  # red, others -> 128
    images[1, 1] = -1.0  # green channel off
    images[2] = -1.0  # black
    path = pictures.image_grid(images, tmp_path / "grid.png", nrow=2)
    check_png(path, (2 * (w + pad) + pad, 2 * (h + pad) + pad))
    with Image.open(path) as png:
        assert png.mode == "RGB"
        grid = np.asarray(png)  # (H, W, 3)
    np.testing.assert_array_equal(grid[2, 2], [255, 128, 128])
    np.testing.assert_array_equal(grid[3, 7], [128, 0, 128])
    np.testing.assert_array_equal(grid[6, 2], [0, 0, 0])
    no_fourth_image = grid[6:8, 6:8]
    np.testing.assert_array_equal(no_fourth_image, np.full((2, 2, 3), pictures.GRID_PAD_VALUE))


def test_before_after_grid_top_initial_bottom_tuned(tmp_path):
    n, h, w, pad = 4, 3, 3, pictures.GRID_PADDING
    initial = np.full((n, 1, h, w), -1.0)
    tuned = np.zeros((n, 1, h, w))
    path = pictures.before_after_grid(initial, tuned, tmp_path / "grid.png", nrow=2)
    check_png(path, pictures.grid_size_px(2 * n, 2, h, w))
    with Image.open(path) as png:
        grid = np.asarray(png)
    for row in range(4):
        for col in range(2):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            assert (grid[top : top + h, left : left + w] == (0 if row < 2 else 128)).all()
    default = pictures.before_after_grid(initial, tuned, tmp_path / "one_row_each.png")
    assert png_size(default) == pictures.grid_size_px(2 * n, n, h, w)


def test_grid_inputs_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pictures.image_grid(np.zeros((4, 2, 3, 3)), tmp_path / "g.png")
    with pytest.raises(ValueError, match="must divide"):
        pictures.before_after_grid(
            np.zeros((4, 1, 3, 3)), np.zeros((4, 1, 3, 3)), tmp_path / "g.png", nrow=3
        )
    with pytest.raises(ValueError, match="shape"):
        pictures.before_after_grid(
            np.zeros((4, 1, 3, 3)), np.zeros((2, 1, 3, 3)), tmp_path / "g.png"
        )
    assert list(tmp_path.iterdir()) == []


# -- atomic writes --------------------------------------------------------------------------


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "picture.png"
    target.write_bytes(b"old")

    def broken(tmp):
        Path(tmp).write_bytes(b"half a pic")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_rewrite_replaces_in_place(tmp_path):
    samples, data = corner_clouds()
    path = tmp_path / "scatter.png"
    pictures.scatter_vs_data(samples, data, path)
    first = path.read_bytes()
    pictures.scatter_vs_data(samples + [0.6, -0.6], data, path)
    assert path.read_bytes() != first
    check_png(path, pictures.SCATTER_SIZE_PX)
