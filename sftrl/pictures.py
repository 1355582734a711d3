"""PNG pictures of a run: training curves, 2-D samples against the data (the paper's Figure 4),
whole sampling paths of the initial and the fine-tuned sampler (Figure 7), and image grids
(Figures 9 and 10).

Every function takes arrays and a path, writes the PNG atomically (``sftrl.files.write_atomic``:
a reader never sees half a file, a full disk leaves none), and returns the path. The
figures are built with matplotlib's object API on an Agg canvas: pyplot is never imported, so no
window opens, no GUI backend is needed, and the process-wide backend of a caller (a notebook)
is left as it was.

Sizes are fixed so a picture's size does not depend on its data:

=========================  ==================================================================
``training_curves``        ``CURVES_SIZE_PX`` = 1200 x 800
``scatter_vs_data``        ``SCATTER_SIZE_PX`` = 600 x 600
``before_after_scatter``   ``PAIR_SIZE_PX`` = 1200 x 600
``sampling_paths``         ``PAIR_SIZE_PX`` = 1200 x 600
``image_grid``             ``grid_size_px(N, nrow, H, W)``: pixel-exact, one PNG pixel per image
                           pixel, ``GRID_PADDING`` = 2 px of ``GRID_PAD_VALUE`` between images
``before_after_grid``      ``grid_size_px(2 N, nrow, H, W)``
=========================  ==================================================================

(width x height in pixels).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sftrl.files import write_atomic

DPI = 100
CURVES_SIZE_PX = (1200, 800)  # (width, height)
SCATTER_SIZE_PX = (600, 600)
PAIR_SIZE_PX = (1200, 600)

GRID_PADDING = 2  # pixels between images and around the border of a grid
GRID_PAD_VALUE = 255  # white, so dark-background images (digits) stay apart

# The paper's Figure 4 colours: generated samples blue, real data red.
SAMPLES_COLOR = "#1f4fd8"
DATA_COLOR = "#d62728"
START_COLOR = "#2ca02c"  # x_S, the prior draw, in sampling paths
AXIS_MARGIN = 0.1  # fraction of the data's span added on each side of a 2-D plot

DEFAULT_CURVE_KEYS: tuple[str, ...] = (
    "critic/ipm_gap",
    "critic/baseline_loss",
    "policy/policy_loss",
    "policy/advantage_std",
    "policy/grad_norm",
    "eval/sw2_mean",
    "eval/fid",
    "eval/kid_mean",
)
# Series drawn dashed on the axes of another key: SW2 beside its data-vs-data noise floor.
CURVE_OVERLAYS: dict[str, tuple[str, ...]] = {"eval/sw2_mean": ("eval/sw2_floor_mean",)}
CURVE_COLUMNS = 3


# -- writing --------------------------------------------------------------------------------


def _new_figure(size_px: tuple[int, int]) -> Figure:
    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    # No bbox_inches="tight": it would make the PNG size depend on the labels.
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


# -- training curves ------------------------------------------------------------------------


def _finite_number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def curve_series(
    metrics: Iterable[Mapping], keys: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (iterations, values)}`` for each key in ``keys`` (and its overlays) that has at
    least one finite number in ``metrics``, sorted by iteration; NaN, inf and non-numbers are
    dropped. Records without an ``iteration`` are ignored."""
    wanted = list(dict.fromkeys(k for key in keys for k in (key, *CURVE_OVERLAYS.get(key, ()))))
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in wanted}
    for record in metrics:
        iteration = _finite_number(record.get("iteration"))
        if iteration is None:
            continue
        for key in wanted:
            value = _finite_number(record.get(key))
            if value is not None:
                points[key].append((iteration, value))
    out = {}
    for key, pts in points.items():
        if pts:
            pts.sort(key=lambda p: p[0])  # stable: a resumed run's repeated iterations keep order
            arr = np.asarray(pts, dtype=float)  # (P, 2)
            out[key] = (arr[:, 0], arr[:, 1])
    return out


def training_curves(
    metrics: Sequence[Mapping], path: str | os.PathLike, keys: Sequence[str] | None = None
) -> Path:
    """One panel per metric against ``iteration`` (``CURVES_SIZE_PX``).

    ``metrics`` are metrics.jsonl records. ``keys`` default to ``DEFAULT_CURVE_KEYS``; a key with
    no finite value is skipped, and ``eval/sw2_mean`` gets ``eval/sw2_floor_mean`` dashed on
    its axes. With nothing to plot, the picture says so.
    """
    keys = DEFAULT_CURVE_KEYS if keys is None else tuple(keys)
    series = curve_series(metrics, keys)
    panels = [k for k in keys if k in series]
    fig = _new_figure(CURVES_SIZE_PX)
    if not panels:
        fig.text(0.5, 0.5, "no data for: " + ", ".join(keys), ha="center", va="center", wrap=True)
        return _save_figure(fig, path)
    ncols = min(CURVE_COLUMNS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        key = panels[i]
        iterations, values = series[key]
        ax.plot(iterations, values, marker="o", markersize=3, label=key)
        for overlay in CURVE_OVERLAYS.get(key, ()):
            if overlay in series:
                o_iterations, o_values = series[overlay]
                ax.plot(
                    o_iterations, o_values, linestyle="--", marker="o", markersize=3, label=overlay
                )
                ax.legend(fontsize="small")
        ax.set_title(key, fontsize="medium")
        ax.grid(alpha=0.3)
        if i >= len(panels) - ncols:
            ax.set_xlabel("iteration")
    fig.tight_layout()
    return _save_figure(fig, path)


# -- 2-D samples ----------------------------------------------------------------------------


def _check_points(name: str, points) -> np.ndarray:
    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {points.shape}")
    return points


def plot_limits(
    *point_sets: np.ndarray, margin: float = AXIS_MARGIN
) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((x_lo, x_hi), (y_lo, y_hi))`` covering the finite points of ``point_sets`` ``(N, 2)``
    with ``margin`` times the span added on each side (a zero span counts as 1)."""
    stacked = np.concatenate([p.reshape(-1, 2) for p in point_sets])
    stacked = stacked[np.isfinite(stacked).all(axis=1)]
    if len(stacked) == 0:
        return (-1.0, 1.0), (-1.0, 1.0)
    lo, hi = stacked.min(axis=0), stacked.max(axis=0)
    center, span = (lo + hi) / 2, np.where(hi > lo, hi - lo, 1.0)
    half = span * (0.5 + margin)
    return (center[0] - half[0], center[0] + half[0]), (center[1] - half[1], center[1] + half[1])


def _outside(points: np.ndarray, limits) -> int:
    (x_lo, x_hi), (y_lo, y_hi) = limits
    x, y = points[:, 0], points[:, 1]
    inside = (x >= x_lo) & (x <= x_hi) & (y >= y_lo) & (y <= y_hi)
    return int(len(points) - inside.sum())


def _scatter_panel(ax: Axes, samples: np.ndarray, data: np.ndarray, limits, title: str) -> None:
    ax.scatter(data[:, 0], data[:, 1], s=2, c=DATA_COLOR, alpha=0.5, linewidths=0, label="data")
    ax.scatter(
        samples[:, 0], samples[:, 1], s=2, c=SAMPLES_COLOR, alpha=0.5, linewidths=0, label="samples"
    )
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_aspect("equal", adjustable="box")
    outside = _outside(samples, limits)
    # A diverged sampler would otherwise look like an empty plot.
    suffix = f" ({outside} of {len(samples)} samples outside)" if outside else ""
    ax.set_title(title + suffix, fontsize="medium")
    ax.legend(loc="upper right", fontsize="small", markerscale=4)


def scatter_vs_data(samples, data, path: str | os.PathLike, title: str = "samples vs data") -> Path:
    """Samples ``(N, 2)`` in blue over data ``(M, 2)`` in red (the paper's Figure 4), axis limits
    fixed by the data's range with ``AXIS_MARGIN``; ``SCATTER_SIZE_PX``."""
    samples, data = _check_points("samples", samples), _check_points("data", data)
    fig = _new_figure(SCATTER_SIZE_PX)
    _scatter_panel(fig.add_subplot(), samples, data, plot_limits(data), title)
    fig.tight_layout()
    return _save_figure(fig, path)


def before_after_scatter(initial, tuned, data, path: str | os.PathLike) -> Path:
    """``scatter_vs_data`` of the initial (left) and fine-tuned (right) samples ``(N, 2)`` over
    the same data ``(M, 2)`` with the same limits; ``PAIR_SIZE_PX``."""
    initial, tuned = _check_points("initial", initial), _check_points("tuned", tuned)
    data = _check_points("data", data)
    limits = plot_limits(data)
    fig = _new_figure(PAIR_SIZE_PX)
    left, right = fig.subplots(1, 2)
    _scatter_panel(left, initial, data, limits, "initial sampler")
    _scatter_panel(right, tuned, data, limits, "fine-tuned sampler")
    fig.tight_layout()
    return _save_figure(fig, path)


def _check_paths(name: str, xs) -> np.ndarray:
    xs = np.asarray(xs, dtype=float)
    if xs.ndim != 3 or xs.shape[2] != 2 or xs.shape[0] < 2:
        raise ValueError(f"{name} must have shape (S + 1, N, 2) with S >= 1, got {xs.shape}")
    return xs


def _paths_panel(ax: Axes, xs: np.ndarray, data: np.ndarray, limits, title: str) -> None:
    ax.scatter(data[:, 0], data[:, 1], s=2, c=DATA_COLOR, alpha=0.15, linewidths=0, label="data")
    # One line per chain: xs[:, i] (S + 1, 2) from x_S to x_0.
    ax.plot(xs[:, :, 0], xs[:, :, 1], color="black", alpha=0.25, linewidth=0.6)
    ax.scatter(
        xs[0, :, 0], xs[0, :, 1], s=10, c=START_COLOR, marker="o", linewidths=0, label="x_S (start)"
    )
    ax.scatter(
        xs[-1, :, 0],
        xs[-1, :, 1],
        s=10,
        c=SAMPLES_COLOR,
        marker="o",
        linewidths=0,
        label="x_0 (sample)",
    )
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper right", fontsize="small", markerscale=2)


def sampling_paths(
    initial_xs, tuned_xs, data, path: str | os.PathLike, num_paths: int = 50
) -> Path:
    """The whole sampling path of the initial (left) and fine-tuned (right) sampler from the same
    seeds (the paper's Figure 7); ``PAIR_SIZE_PX``.

    ``initial_xs``, ``tuned_xs`` ``(S + 1, N, 2)`` in sampling order (``Trajectory.xs``:
    xs[0] = x_S, xs[S] = x_0), with the same starting points x_S; ``data`` ``(M, 2)``. The first
    ``num_paths`` chains are drawn as faint lines x_S -> x_0, starts green, ends blue, data
    red behind. Both panels share limits covering the data and the drawn starts.
    """
    initial_xs, tuned_xs = (
        _check_paths("initial_xs", initial_xs),
        _check_paths("tuned_xs", tuned_xs),
    )
    data = _check_points("data", data)
    if initial_xs.shape[1] != tuned_xs.shape[1]:
        raise ValueError(
            f"initial_xs has {initial_xs.shape[1]} chains but tuned_xs has {tuned_xs.shape[1]}"
        )
    if num_paths < 1:
        raise ValueError(f"num_paths must be >= 1, got {num_paths}")
    initial_xs, tuned_xs = initial_xs[:, :num_paths], tuned_xs[:, :num_paths]
    if not np.allclose(initial_xs[0], tuned_xs[0]):
        raise ValueError(
            "initial_xs and tuned_xs must start from the same x_S (sample both from the same seed)"
        )
    limits = plot_limits(data, initial_xs[0])
    fig = _new_figure(PAIR_SIZE_PX)
    left, right = fig.subplots(1, 2)
    _paths_panel(left, initial_xs, data, limits, "initial sampler")
    _paths_panel(right, tuned_xs, data, limits, "fine-tuned sampler")
    fig.tight_layout()
    return _save_figure(fig, path)


# -- image grids ----------------------------------------------------------------------------


def grid_size_px(num_images: int, nrow: int, height: int, width: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of ``image_grid`` for ``num_images`` images of
    ``height x width`` with ``nrow`` images per row:

        columns = min(nrow, N), rows = ceil(N / nrow)
        width  = columns * (W + GRID_PADDING) + GRID_PADDING
        height = rows    * (H + GRID_PADDING) + GRID_PADDING
    """
    columns, rows = min(nrow, num_images), math.ceil(num_images / nrow)
    grid_width = columns * (width + GRID_PADDING) + GRID_PADDING
    grid_height = rows * (height + GRID_PADDING) + GRID_PADDING
    return grid_width, grid_height


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] -> {0..255}: ``floor((clip(x, -1, 1) + 1) / 2 * 255 + 0.5)``, so -1 -> 0,
    0 -> 128, 1 -> 255 (NaN -> 0)."""
    scaled = (np.clip(np.nan_to_num(images, nan=-1.0), -1.0, 1.0) + 1.0) / 2.0 * 255.0
    return np.floor(scaled + 0.5).astype(np.uint8)


def _check_images(name: str, images) -> np.ndarray:
    images = np.asarray(images, dtype=float)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (N, C, H, W) with N >= 1 and C in (1, 3), got {images.shape}"
        )
    return images


def grid_array(images, nrow: int) -> np.ndarray:
    """The grid of ``image_grid`` as uint8 ``(height, width)`` for C = 1 or
    ``(height, width, 3)`` for C = 3; images fill rows left to right, empty cells are padding."""
    images = _check_images("images", images)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, c, h, w = images.shape
    width, height = grid_size_px(n, nrow, h, w)
    pixels = to_uint8(images).transpose(0, 2, 3, 1)  # (N, H, W, C)
    grid = np.full((height, width, c), GRID_PAD_VALUE, dtype=np.uint8)
    for i in range(n):
        top = GRID_PADDING + (i // nrow) * (h + GRID_PADDING)
        left = GRID_PADDING + (i % nrow) * (w + GRID_PADDING)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid[:, :, 0] if c == 1 else grid


def image_grid(images, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Images ``(N, C, H, W)`` in [-1, 1] as one pixel-exact PNG, ``nrow`` images per row
    (torchvision's ``make_grid`` convention): 8-bit grey for C = 1, RGB for C = 3, of size
    ``grid_size_px(N, nrow, H, W)``, pixel values ``to_uint8``."""
    return save_png(grid_array(images, nrow), path)


def save_png(pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """``uint8`` pixels ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) as a PNG, atomically."""
    from PIL import Image  # Pillow is a dependency of matplotlib

    image = Image.fromarray(pixels)  # uint8 (H, W) -> mode L, (H, W, 3) -> RGB
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def before_after_grid(initial, tuned, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Initial samples in the top rows, fine-tuned samples from the same seeds in the bottom
    rows (the paper's Figures 9 and 10): ``initial``, ``tuned`` ``(N, C, H, W)`` in [-1, 1];
    sample i of each sits in the same column. ``nrow`` (default N, one row each) must divide N.
    Size ``grid_size_px(2 N, nrow, H, W)``."""
    initial, tuned = _check_images("initial", initial), _check_images("tuned", tuned)
    if initial.shape != tuned.shape:
        raise ValueError(f"initial has shape {initial.shape} but tuned has {tuned.shape}")
    n = initial.shape[0]
    nrow = n if nrow is None else nrow
    if nrow < 1 or n % nrow:
        raise ValueError(f"nrow ({nrow}) must divide the number of images per sampler ({n})")
    return image_grid(np.concatenate([initial, tuned]), path, nrow)
