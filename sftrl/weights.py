"""Weights as plain numpy dicts: what crosses process boundaries (Ray moves numpy far faster)."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

NumpyState = dict[str, np.ndarray]


class Weights(NamedTuple):
    """One published version of a component's weights, as it travels between components.

    ``state``: the learner's is the sampler's numpy state dict; the critic's is
    ``{"critic": ..., "baseline": ...}``, one numpy state dict each.
    """

    version: int
    state: Any


def to_numpy_state(module: nn.Module) -> NumpyState:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: NumpyState) -> None:
    """Load a numpy state dict strictly (every key, every shape)."""
    # Arrays from Ray's object store are read-only views: copy before handing them to torch.
    module.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}, strict=True)


def tensor_view(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``array`` as a tensor without a copy where possible (a copy on another device).

    Arrays from Ray's object store are read-only; torch warns that writing through such a
    tensor is undefined. Callers only read these (trajectory blocks), so the warning is noise.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array, device=device)
