"""The policy-gradient plug-in interface and its registry.

An algorithm turns data from the replay buffer (or none, for pathwise SFT) into policy updates.
The built-ins are ``PolicyAlgorithm`` subclasses in ``sftrl/algos/``, decorated by
``@register("name")`` and listed in ``_PLUGIN_MODULES`` of ``sftrl/algos/__init__.py``.

Any installed package adds one with an entry point in the group ``sftrl.algorithms``: its name
is the algorithm's name (``algo.name``), its object a ``PolicyAlgorithm`` subclass
(``my-pg = my_package.algo:MyPG``). Entry points are read only when a name that is not built
in is asked for, or when the valid names are listed; a plug-in is imported only when its name
is asked for. A plug-in cannot take a built-in's name (the built-in is found first).

An algorithm may declare ``settings_class``, a frozen dataclass of ``doc_field`` settings: its
values are read from the config section ``algo.<name>`` (the name verbatim: ``algo.my-pg.temperature``)
with the checks of every other section, and it is the ``settings`` the algorithm is built with.
One that declares none (the built-ins) is built with the whole ``algo`` section. Every algorithm
also sees the whole ``algo`` section as ``self.algo`` (the shared settings: ``batch_size``,
``max_importance_weight`` ...).

An algorithm that sets ``needs_reference = True`` gets ``PolicyContext.reference``: a frozen copy
of the sampler fine-tuning started from (the pretrained one, theta_0), e.g. for a KL penalty to it.
One whose ``reference_follows_best`` is true has the trainer move that copy to the run's best
evaluated sampler after each new best (``Learner.set_reference``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.metadata
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
from torch import nn

from sftrl.buffer import TransitionBatch
from sftrl.configtools import ConfigError, check_schema, from_dict
from sftrl.diffusion.schedules import StepTables
from sftrl.diffusion.step import Reduction

if TYPE_CHECKING:
    from sftrl.config import AlgoConfig

PLUGIN_GROUP = "sftrl.algorithms"  # the entry-point group of algorithm plug-ins

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
    reference: nn.Module | None = None  # frozen theta_0, for algorithms that set ``needs_reference``

    @property
    def forward(self) -> nn.Module:
        return self.net if self.net is not None else self.policy


class PolicyAlgorithm(abc.ABC):
    """One generator phase of Algorithm 1: ``update`` returns a metrics dict per policy step.

    ``data`` says what the learner must be given: ``samples`` (``n_generator`` batches of
    ``batch_size`` transitions drawn uniformly from the buffer), ``all`` (every transition in the
    buffer) or ``none`` (the algorithm generates its own chains). ``settings`` is an instance of
    ``settings_class`` (read from ``algo.<name>``), or the ``algo`` section where it is None.
    """

    name: ClassVar[str]
    data: ClassVar[DataNeed]
    shardable: ClassVar[bool] = True  # learners may share its batches (ray.num_learners > 1)
    settings_class: ClassVar[type | None] = None  # a frozen dataclass of doc_fields, or None
    needs_reference: ClassVar[bool] = False  # the learner keeps a frozen theta_0 as ``ctx.reference``

    def __init__(self, settings: Any, algo: AlgoConfig | None = None):
        """``algo``: the whole ``algo`` section (None: ``settings`` is it)."""
        self.settings = settings
        self.algo = algo if algo is not None else settings

    @property
    def reference_follows_best(self) -> bool:
        """Whether ``ctx.reference`` follows the run's best evaluated sampler (False: it stays theta_0)."""
        return False

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


class PluginError(ConfigError):
    """An algorithm that cannot be had, in one line: an unknown name, a plug-in that fails to
    load or is not an algorithm, or a name that two plug-ins claim."""


def make_algorithm(name: str, algo: AlgoConfig) -> PolicyAlgorithm:
    """The algorithm ``name`` built with its settings: its section of ``algo`` (defaults where
    there is none), or all of ``algo`` for one without a ``settings_class``."""
    cls = algorithm_class(name)
    if cls.settings_class is None:
        return cls(algo, algo)
    section = algo.sections.get(name)
    return cls(section if section is not None else from_dict(cls.settings_class, {}, where=f"algo.{name}"), algo)


def algorithm_class(name: str) -> type[PolicyAlgorithm]:
    """The algorithm ``name``: a built-in, else the plug-in of that name (loaded once)."""
    if name not in ALGORITHMS:
        ALGORITHMS[name] = _load_plugin(name)
    return ALGORITHMS[name]


def algorithm_names() -> list[str]:
    """Every valid ``algo.name``: the built-ins and the installed plug-ins (none is imported)."""
    return sorted(ALGORITHMS) + sorted(set(_entry_points()) - set(ALGORITHMS))


@functools.cache
def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """The plug-ins' entry points by name, as installed when first asked (``cache_clear`` to
    read them again)."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        if all(entry.value != other.value or _distribution(entry) != _distribution(other)
               for other in found.get(entry.name, [])):  # the same one seen twice on sys.path
            found.setdefault(entry.name, []).append(entry)
    return found


def _distribution(entry: importlib.metadata.EntryPoint) -> str:
    return f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else "an unnamed distribution"


def _describe(entry: importlib.metadata.EntryPoint) -> str:
    return f"plug-in '{entry.name} = {entry.value}' (distribution {_distribution(entry)})"


def _load_plugin(name: str) -> type[PolicyAlgorithm]:
    """Import the plug-in ``name`` and check it is an algorithm; every failure is one line."""
    entries = _entry_points().get(name, [])
    if not entries:
        raise PluginError(f"unknown algorithm {name!r}; valid: {', '.join(algorithm_names())} "
                          f"(plug-ins add names: entry-point group '{PLUGIN_GROUP}')")
    if len(entries) > 1:
        raise PluginError(f"algorithm {name!r} is claimed by {len(entries)} plug-ins: "
                          f"{'; '.join(sorted(map(_describe, entries)))}; uninstall all but one")
    entry = entries[0]
    try:
        cls = entry.load()
    except Exception as exc:  # whatever its import raises: said in one line, the built-ins unaffected
        raise PluginError(f"{_describe(entry)} failed to load: {type(exc).__name__}: {exc}") from None
    problem = _plugin_problem(cls)
    if problem:
        raise PluginError(f"{_describe(entry)} is not a usable algorithm: {problem}")
    cls.name = name
    return cls


def _plugin_problem(cls: Any) -> str:
    """What keeps ``cls`` from being an algorithm ('' when nothing does)."""
    if not (isinstance(cls, type) and issubclass(cls, PolicyAlgorithm)):
        return f"{cls!r} is not a subclass of sftrl.algos.PolicyAlgorithm"
    if inspect.isabstract(cls):
        return f"{cls.__qualname__} does not implement update()"
    data = getattr(cls, "data", None)
    if data not in get_args(DataNeed):
        return f"{cls.__qualname__}.data is {data!r}, not one of {', '.join(map(repr, get_args(DataNeed)))}"
    if cls.settings_class is not None:
        try:
            check_schema(cls.settings_class)
        except TypeError as exc:  # one line: the schema's problems, joined
            return f"settings_class {'; '.join(line.strip() for line in str(exc).splitlines()[1:])}"
    return ""
