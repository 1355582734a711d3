"""The policy-gradient plug-in interface and its registry.

An algorithm turns data from the replay buffer (or none, for pathwise SFT) into policy updates.
Adding one: write ``sftrl/algos/my_algo.py`` with a ``PolicyAlgorithm`` subclass decorated by
``@register("my-algo")``, and add its module to ``_PLUGIN_MODULES`` in ``sftrl/algos/__init__.py``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from sftrl.buffer import TransitionBatch
from sftrl.diffusion.schedules import StepTables
from sftrl.diffusion.step import Reduction

DataNeed = Literal["samples", "all", "none"]


Rows = Any  # a slice or a LongTensor of row indices into a TransitionBatch


@dataclasses.dataclass(frozen=True)
class Shard:
    """This learner's part of every policy batch when ``world`` learners share it
    (``ray.num_learners``): rows ``rank::world`` of each minibatch. Each learner's gradient is
    scaled by its share of the rows and the shares are summed (``all_reduce``), so every
    learner steps with the gradient of the whole minibatch, as one learner would."""

    rank: int = 0
    world: int = 1
    all_reduce: Callable[[torch.Tensor], None] | None = None  # in-place sum over the learners

    def split(self, rows: Rows, num_rows: int) -> tuple[Rows, Callable[[list[nn.Parameter]], None] | None]:
        """``(my rows, reduce)`` of a minibatch of ``num_rows`` rows: all of them and no reduce
        for a single learner (its numbers are exactly as before)."""
        if self.world == 1:
            return rows, None
        index = torch.arange(num_rows)[rows] if isinstance(rows, slice) else rows
        mine = index[self.rank :: self.world]
        return mine, functools.partial(self._reduce, fraction=len(mine) / max(len(index), 1))

    def _reduce(self, params: list[nn.Parameter], fraction: float) -> None:
        """Sum ``fraction`` x each learner's gradients into every learner's (one flat tensor)."""
        assert self.all_reduce is not None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]) * fraction
        self.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


@dataclasses.dataclass
class PolicyContext:
    """Everything an algorithm's update may touch, owned by the Learner. ``policy`` holds theta
    (the optimiser's parameters); ``forward`` is how it is called (precision, compilation)."""

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
    net: nn.Module | None = None  # how to call the policy (``sftrl.perf.runner``); None: the policy itself
    shard: Shard = dataclasses.field(default_factory=Shard)  # this learner's rows (several learners)

    @property
    def forward(self) -> nn.Module:
        return self.net if self.net is not None else self.policy


class PolicyAlgorithm(abc.ABC):
    """One generator phase of Algorithm 1: ``update`` returns a metrics dict per policy step.

    ``data`` says what the learner must be given: ``samples`` (``n_generator`` batches of
    ``batch_size`` transitions drawn uniformly from the buffer), ``all`` (every transition in the
    buffer) or ``none`` (the algorithm generates its own chains).
    """

    name: ClassVar[str]
    data: ClassVar[DataNeed]
    shardable: ClassVar[bool] = True  # learners may share its batches (ray.num_learners > 1)

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
