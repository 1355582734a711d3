"""Real data q_0: the toy generators and the image sets."""

from __future__ import annotations

import numpy as np

from sftrl.data.toy import TOY_DATASETS, make_toy


def load_real_data(cfg) -> np.ndarray:
    """The training set of ``cfg.data`` as float32 ``(N, *data_shape)``."""
    if cfg.data.name in TOY_DATASETS:
        return make_toy(cfg.data.name, cfg.data.num_train, seed=cfg.data.seed)
    from sftrl.data.images import DataError, load_image_dataset

    data = load_image_dataset(cfg.data.name, cfg.data.path, image_size=cfg.data.image_size, limit=cfg.data.limit)
    if len(data) == 0:
        raise DataError(f"data.path '{cfg.data.path}': the {cfg.data.name} files there hold no images")
    return data


def fresh_data_fn(cfg):
    """``(n, seed) -> (n, *D)`` fresh draws of the real distribution (toy sets), for evaluation."""
    name = cfg.data.name
    if name not in TOY_DATASETS:
        raise ValueError(f"fresh draws exist only for the toy sets {sorted(TOY_DATASETS)}, not {name!r}")
    return lambda n, seed: make_toy(name, n, seed=seed)
