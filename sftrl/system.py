"""The components of one run, local or remote, as the trainer sees them: typed clients."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from sftrl.clients import BufferClient, CriticClient, LearnerClient, LearnerGroup, WorkerClient
from sftrl.config import Config
from sftrl.handles import Handle, LocalHandle
from sftrl.plan import worker_name


@dataclasses.dataclass
class System:
    """Clients of the rollout workers, the buffer, the learner and the critic of one run."""

    workers: list[WorkerClient]
    buffer: BufferClient
    learner: LearnerClient
    critic: CriticClient
    backend: str
    shutdown: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, workers: Sequence[Handle], buffer: Handle, learner: Handle | Sequence[Handle], critic: Handle,
           backend: str, shutdown: Callable[[], None] | None = None) -> System:
        """A system over the components' handles (``LocalHandle``\\ s, Ray handles, test stubs);
        several learner handles share each batch (a ``LearnerGroup``)."""
        learners = [LearnerClient(h) for h in (learner if isinstance(learner, Sequence) else [learner])]
        return cls([WorkerClient(w) for w in workers], BufferClient(buffer),
                   learners[0] if len(learners) == 1 else LearnerGroup(learners), CriticClient(critic), backend,
                   shutdown or (lambda: None))

    def placement(self) -> dict[str, dict[str, Any]]:
        """Where each component runs, by name: node, torch device, the GPUs Ray gave it, its pid."""
        return {c.name: c.placement() for c in [*self.workers, self.buffer, *self.learner.members, self.critic]}


def build_local_system(cfg: Config, init, real_data=None) -> System:
    """Every component in this process (``ray.backend: local``): no Ray at all."""
    from sftrl import components

    return System.of(
        workers=[LocalHandle(components.make_rollout_worker(cfg, init, i), worker_name(i))
                 for i in range(cfg.rollout.num_workers)],
        buffer=LocalHandle(components.make_replay_buffer(), "buffer"),
        learner=LocalHandle(components.make_learner(cfg, init), "learner"),
        critic=LocalHandle(components.make_critic_learner(cfg, init, real_data), "critic"),
        backend="local",
    )
