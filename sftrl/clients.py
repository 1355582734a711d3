"""Typed clients of the four components: the trainer's only way to call them.

Each client method names the component method it runs (``handle.call(Learner.update_and_publish,
...)``), so an editor, a type checker and a reader follow every call from the trainer to the
code that answers it; the handle (``sftrl.handles``) alone decides whether that code runs here or
in a Ray actor. What a call returns is a ``Future``: the value itself for a local component, an
object reference for an actor, which can be passed straight into another call (the critic's new
weights into the learner's update) without a trip through the driver. ``resolve`` waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftrl.buffer import BlockMeta, Draw, ReplayBuffer
from sftrl.critic import CriticLearner
from sftrl.handles import Handle
from sftrl.learner import Learner
from sftrl.rollout import RolloutWorker
from sftrl.weights import NumpyState, Weights

Future = Any  # a value (local component) or a Ray ObjectRef to one (actor)
Metrics = list[dict[str, float]]


class Client:
    """What every client offers besides its component's calls (see ``sftrl.handles.Handle``)."""

    def __init__(self, handle: Handle):
        self.handle = handle
        self.name = handle.name

    def resolve(self, futures: Any) -> Any:
        return self.handle.resolve(futures)

    def ping(self) -> None:
        self.handle.ping()

    def available(self, futures: Sequence[Future]) -> list[bool]:
        """Whether each future's value (a rollout block) can still be read, found out where this
        component runs: a block is never fetched to the driver."""
        return self.handle.available(list(futures))

    def placement(self) -> dict[str, Any]:
        return self.handle.placement()


class WorkerClient(Client):
    """A rollout worker (``RolloutWorker``)."""

    def collect(self, policy: Future, critic: Future, block_ids: Sequence[str], chains_per_block: int,
                base: Future | None = None) -> list[Future]:
        """The blocks, one future each, then the call's summary (Weights futures in; ``base``: the
        frozen base the policy's publications leave out, LoRA's: one object, read once per worker)."""
        extra = () if base is None else (base,)
        return self.handle.call(RolloutWorker.collect, policy, critic, list(block_ids), chains_per_block, *extra,
                                num_returns=len(block_ids) + 1)

    def probe(self) -> Future:
        return self.handle.probe()

    def done(self, future: Future) -> bool:
        return self.handle.done(future)

    def wait(self, future: Future, timeout: float) -> bool:
        return self.handle.wait(future, timeout)

    def restart(self) -> None:
        self.handle.restart()


class BufferClient(Client):
    """The replay buffer (``ReplayBuffer``)."""

    def refill(self, blocks: Sequence[Future], metas: Sequence[BlockMeta], draw: str, num_batches: int,
               batch_size: int, seed: int) -> Future:
        """Step 5 then the generator phase's draw: a future ``Draw`` (which transitions; the
        learner gathers them from the blocks)."""
        return self.handle.call(ReplayBuffer.refill, list(blocks), list(metas), draw, num_batches, batch_size, seed)

    def discard(self, block_ids: Sequence[str]) -> Future:
        return self.handle.call(ReplayBuffer.discard, list(block_ids))

    def state(self) -> Future:
        return self.handle.call(ReplayBuffer.state)


class CriticClient(Client):
    """The critic and baseline learner (``CriticLearner``)."""

    def update_and_publish(self, blocks: Sequence[Future]) -> tuple[Future, Future]:
        """One update per block: ``(metrics, Weights)`` futures."""
        metrics, weights = self.handle.call(CriticLearner.update_and_publish, *blocks, num_returns=2)
        return metrics, weights

    def get_weights(self) -> Future:
        return self.handle.call(CriticLearner.get_weights)

    def state_dict(self) -> Future:
        return self.handle.call(CriticLearner.state_dict)

    def load_state_dict(self, state: dict) -> Future:
        return self.handle.call(CriticLearner.load_state_dict, state)


class LearnerClient(Client):
    """The policy learner (``Learner``)."""

    @property
    def members(self) -> list[LearnerClient]:
        """The learner actors behind this client (one; several for a ``LearnerGroup``)."""
        return [self]

    def metrics(self, future: Future) -> Metrics:
        """The metrics of an ``update_and_publish`` call, waited for."""
        return self.handle.resolve(future)

    def update_and_publish(self, draw: Future | Draw | None, critic: Future | Weights,
                           blocks: Sequence[Future] = ()) -> tuple[Future, Future]:
        """One generator phase with the critic's weights on the transitions ``draw`` names, gathered
        by the learner from ``blocks``: ``(metrics, theta's next Weights)``."""
        metrics, weights = self.handle.call(Learner.update_and_publish, draw, critic, *blocks, num_returns=2)
        return metrics, weights

    def get_weights(self) -> Future:
        return self.handle.call(Learner.get_weights)

    def get_base_weights(self) -> Future:
        return self.handle.call(Learner.get_base_weights)

    def get_sampler_weights(self) -> Future:
        return self.handle.call(Learner.get_sampler_weights)

    def state_dict(self) -> Future:
        return self.handle.call(Learner.state_dict)

    def load_state_dict(self, state: dict) -> Future:
        return self.handle.call(Learner.load_state_dict, state)

    def set_reference(self, state: NumpyState, iteration: int) -> Future:
        return self.handle.call(Learner.set_reference, state, iteration)


def combine_shards(steps: tuple[dict[str, float], ...]) -> dict[str, float]:
    """One policy step's metrics from the members' (a key some members lack: over those that have it)."""
    out = {}
    for key in dict.fromkeys(k for step in steps for k in step):
        values = [step[key] for step in steps if key in step]
        name = key.split("/")[0]
        out[key] = max(values) if name.endswith("max") else min(values) if name.endswith("min") else sum(values) / len(values)
    return out


class LearnerGroup(LearnerClient):
    """Several learners sharing each policy batch (``ray.num_learners``, ``Learner.join_group``):
    every update goes to all of them; they hold the same weights, so member 0 publishes them,
    answers for them and is checkpointed, and a state is loaded into all."""

    def __init__(self, members: list[LearnerClient]):
        super().__init__(members[0].handle)
        self._members = members

    @property
    def members(self) -> list[LearnerClient]:
        return self._members

    def update_and_publish(self, draw: Future | Draw | None, critic: Future | Weights,
                           blocks: Sequence[Future] = ()) -> tuple[Future, Future]:
        calls = [m.update_and_publish(draw, critic, blocks) for m in self._members]
        return [metrics for metrics, _ in calls], calls[0][1]

    def metrics(self, future: Future) -> Metrics:
        """Each policy step's metrics over the members (each saw its share of the rows): the
        largest of a maximum, the smallest of a minimum, the mean of anything else."""
        per_member = [m.handle.resolve(f) for m, f in zip(self._members, future, strict=True)]
        return [combine_shards(steps) for steps in zip(*per_member)]

    def load_state_dict(self, state: dict) -> Future:
        return [m.load_state_dict(state) for m in self._members]

    def set_reference(self, state: NumpyState, iteration: int) -> Future:
        return [m.set_reference(state, iteration) for m in self._members]

    def ping(self) -> None:
        for m in self._members:
            m.ping()
