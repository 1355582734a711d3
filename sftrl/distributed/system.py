"""Ray actors, placement and the Ray-backed ``System``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray

from sftrl import components
from sftrl.buffer import ReplayBuffer
from sftrl.config import Config
from sftrl.handles import ComponentLost
from sftrl.trainer import System


class ComponentActor:
    """A thin shell: builds one plain component with ``factory(*args)`` and forwards calls."""

    def __init__(self, factory: Callable[..., Any], *args: Any):
        self.component = factory(*args)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.component, method)(*args)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _ray_buffer() -> ReplayBuffer:
    # The buffer holds object references to blocks and fetches the ones a sample needs.
    return ReplayBuffer(resolve=ray.get)


class RayHandle:
    """``call`` returns object references; ``resolve`` is ``ray.get``."""

    def __init__(self, actor: Any, name: str):
        self.actor = actor
        self.name = name

    def call(self, method: str, *args: Any, num_returns: int = 1) -> Any:
        # Named "component.method" in the Ray dashboard and timeline.
        remote = self.actor.call.options(name=f"{self.name}.{method}", num_returns=num_returns)
        return remote.remote(method, *args)

    def resolve(self, futures: Any) -> Any:
        try:
            return ray.get(futures)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
            raise ComponentLost(self.name, str(err).splitlines()[0]) from err

    def node_id(self) -> str:
        return self.resolve(self.actor.node_id.remote())

    def ping(self) -> None:
        self.node_id()


def init_ray(cfg: Config) -> bool:
    """Join the configured or surrounding cluster, else start Ray in-process.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" starts a fresh instance: a bare ray.init() would try to join whatever cluster
        # /tmp/ray/ray_current_cluster names, even a dead one (minutes of GCS timeouts).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def build_ray_system(cfg: Config, init: components.InitState) -> System:
    """Rollout workers (spread across nodes), one buffer, one learner and one critic actor."""
    actor = ray.remote(ComponentActor)
    init_ref = ray.put(init)  # the pretrained weights travel once, shared by learner and critic
    # Workers get only the data shape (small, inlined): restartable actors should not depend on
    # object-store arguments, and every collect() call brings the current weights anyway.
    worker_init = init.shape_only()
    r = cfg.rollout
    workers = [
        actor.options(
            num_cpus=r.num_cpus_per_worker,
            num_gpus=r.num_gpus_per_worker,
            max_restarts=r.max_restarts,
            scheduling_strategy="SPREAD",
        ).remote(components.make_rollout_worker, cfg, worker_init, i)
        for i in range(r.num_workers)
    ]
    buffer = actor.options(num_cpus=0).remote(_ray_buffer)
    learner = actor.options(num_cpus=0, num_gpus=cfg.ray.learner_num_gpus).remote(components.make_learner, cfg, init_ref)
    critic = actor.options(num_cpus=0, num_gpus=cfg.ray.critic_num_gpus).remote(components.make_critic_learner, cfg, init_ref)
    handles = [RayHandle(w, f"worker-{i}") for i, w in enumerate(workers)]

    def shutdown() -> None:
        for a in [*workers, buffer, learner, critic]:
            ray.kill(a, no_restart=True)

    return System(
        workers=handles,
        buffer=RayHandle(buffer, "buffer"),
        learner=RayHandle(learner, "learner"),
        critic=RayHandle(critic, "critic"),
        backend="ray",
        shutdown=shutdown,
    )
