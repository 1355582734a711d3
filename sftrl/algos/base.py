"""The policy-gradient plug-in interface and its registry.

An algorithm turns data from the replay buffer (or none, for pathwise SFT) into policy updates.
Adding one: write ``sftrl/algos/my_algo.py`` with a ``PolicyAlgorithm`` subclass decorated by
``@register("my-algo")``, and add its module to ``_PLUGIN_MODULES`` in ``sftrl/algos/__init__.py``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from sftrl.buffer import TransitionBatch
from sftrl.diffusion.schedules import StepTables
from sftrl.diffusion.step import Reduction

DataNeed = Literal["samples", "all", "none"]


@dataclasses.dataclass
class PolicyContext:
    """Everything an algorithm's update may touch, owned by the Learner."""

    policy: nn.Module
    optimizer: torch.optim.Optimizer
    critic: nn.Module  # frozen copy of the just-published critic
    baseline: nn.Module  # frozen copy of the just-published baseline
    tables: StepTables
    final_step_std: float
    reduction: Reduction
    max_grad_norm: float | None
    batch_size: int
    n_generator: int
    data_shape: tuple[int, ...]
    generator: torch.Generator
    device: torch.device
    version: int = 0  # theta's version as the generator phase starts (transitions carry theirs)


class PolicyAlgorithm(abc.ABC):
    """One generator phase of Algorithm 1: ``update`` returns a metrics dict per policy step.

    ``data`` says what the learner must be given: ``samples`` (``n_generator`` batches of
    ``batch_size`` transitions drawn uniformly from the buffer), ``all`` (every transition in the
    buffer) or ``none`` (the algorithm generates its own chains).
    """

    name: ClassVar[str]
    data: ClassVar[DataNeed]

    def __init__(self, settings: Any):
        self.settings = settings

    @abc.abstractmethod
    def update(self, ctx: PolicyContext, data: TransitionBatch | None) -> list[dict[str, float]]:
        ...


ALGORITHMS: dict[str, type[PolicyAlgorithm]] = {}


def register(name: str) -> Callable[[type[PolicyAlgorithm]], type[PolicyAlgorithm]]:
    def decorate(cls: type[PolicyAlgorithm]) -> type[PolicyAlgorithm]:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


def make_algorithm(name: str, settings: Any) -> PolicyAlgorithm:
    """The registered algorithm ``name``; an unknown name raises with the valid ones."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(sorted(ALGORITHMS))}") from None
    return cls(settings)
