"""Weights as plain numpy dicts: what crosses process boundaries (Ray moves numpy far faster)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

NumpyState = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weights version of one or more networks (name -> numpy state dict)."""

    version: int
    states: dict[str, NumpyState]


def to_numpy_state(module: nn.Module) -> NumpyState:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: NumpyState) -> None:
    """Load a numpy state dict strictly (every key, every shape)."""
    # Arrays from Ray's object store are read-only views: copy before handing them to torch.
    module.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}, strict=True)
