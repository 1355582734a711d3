"""Weights as plain numpy dicts: what crosses process boundaries (Ray moves numpy far faster)."""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

NumpyState = dict[str, np.ndarray]


class Weights(NamedTuple):
    """One published version of a component's weights, as it travels between components.

    ``state``: the learner's is the sampler's numpy state dict (with LoRA, the trainable tensors
    alone: ``Learner.get_weights``); the critic's is
    ``{"critic": ..., "baseline": ...}``, one numpy state dict each.
    """

    version: int
    state: Any


def numpy_state(state: dict[str, torch.Tensor]) -> NumpyState:
    """A state dict's tensors as numpy arrays (copies, on the host)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def to_numpy_state(module: nn.Module, keys: Collection[str] | None = None) -> NumpyState:
    """``module``'s state dict as numpy arrays; only the entries ``keys`` where given."""
    state = module.state_dict()
    return numpy_state(state if keys is None else {k: state[k] for k in keys})


def trainable_keys(module: nn.Module) -> list[str]:
    """The state-dict keys of ``module``'s parameters with ``requires_grad`` (what the optimiser moves)."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def frozen_keys(module: nn.Module) -> list[str]:
    """Every other state-dict key: frozen parameters and buffers."""
    trainable = set(trainable_keys(module))
    return [k for k in module.state_dict() if k not in trainable]


def load_numpy_state(module: nn.Module, state: NumpyState, *, partial: bool = False) -> None:
    """Load a numpy state dict strictly (every key, every shape); with ``partial``, a part of
    one: every key must be ``module``'s and every shape fit, the other entries are left alone."""
    # Arrays from Ray's object store are read-only views: copy before handing them to torch.
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    if not partial:
        module.load_state_dict(tensors, strict=True)
        return
    unknown = sorted(set(tensors) - set(module.state_dict()))
    if unknown:
        raise RuntimeError(f"{len(unknown)} weights are not the module's: {', '.join(unknown[:5])}")
    module.load_state_dict(tensors, strict=False)  # shapes are still checked


def tensor_view(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``array`` as a tensor without a copy where possible (a copy on another device).

    Arrays from Ray's object store are read-only; torch warns that writing through such a
    tensor is undefined. Callers only read these (trajectory blocks), so the warning is noise.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array, device=device)
