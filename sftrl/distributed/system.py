"""Ray actors, placement and the Ray-backed ``System``."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ray

from sftrl import components
from sftrl.buffer import ReplayBuffer
from sftrl.config import Config
from sftrl.handles import ComponentLost, ResourceError, component_device
from sftrl.learner import Learner
from sftrl.plan import worker_name
from sftrl.system import System

# Set by Ray's job supervisor (ray/dashboard/modules/job/job_supervisor.py) in its driver's
# environment: the job's config, and, when the submission declared no entrypoint resources, the
# flag that leaves CUDA_VISIBLE_DEVICES alone: the driver then sees every GPU and holds none.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
NOSET_CUDA_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


class ComponentActor:
    """A thin shell: builds one plain component with ``factory(*args)`` and forwards calls.

    Without a factory the shell starts empty (its process up, torch imported) and ``build``
    makes the component later: the learner's actor starts while the sampler is pretrained.
    """

    def __init__(self, factory: Callable[..., Any] | None = None, *args: Any):
        self.component = factory(*args) if factory is not None else None

    def build(self, factory: Callable[..., Any], *args: Any) -> None:
        self.component = factory(*args)

    def call(self, method_name: str, *args: Any) -> Any:
        """Run the component's method ``method_name`` (``RayHandle.call`` sends the name of the
        method it was given: the one string dispatch, at the Ray edge)."""
        return getattr(self.component, method_name)(*args)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def available(self, refs: list[Any]) -> list[bool]:
        """Whether each object can still be read (a lost node takes the objects in its store),
        found out by reading it here, on this actor's node: not the driver's (``RayHandle.available``)."""
        out = []
        for ref in refs:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                out.append(False)
            else:
                out.append(True)
        return out

    def rendezvous(self) -> str:
        """``tcp://IP:PORT`` on this actor's node where a torch.distributed group can meet (a port
        free now; the group forms at once)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def placement(self) -> dict[str, Any]:
        return {
            "node": self.node_id(),
            "ip": ray.util.get_node_ip_address(),
            "device": component_device(self.component),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "pid": os.getpid(),
        }


def _ray_buffer() -> ReplayBuffer:
    # The buffer holds object references to blocks and fetches the ones a sample needs.
    return ReplayBuffer(resolve=ray.get)


class RayHandle:
    """``call`` returns object references; ``resolve`` is ``ray.get``."""

    def __init__(self, actor: Any, name: str):
        self.actor = actor
        self.name = name

    def call(self, method: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        # The actor runs the component's method of that name; named "component.method" in the
        # Ray dashboard and timeline.
        name = method.__name__
        remote = self.actor.call.options(name=f"{self.name}.{name}", num_returns=num_returns)
        return remote.remote(name, *args)

    def resolve(self, futures: Any) -> Any:
        try:
            return ray.get(futures)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
            raise ComponentLost(self.name, str(err).splitlines()[0]) from err

    def node_id(self) -> str:
        return self.resolve(self.actor.node_id.remote())

    def ping(self) -> None:
        self.node_id()

    def available(self, futures: list[Any]) -> list[bool]:
        """Whether each object (a rollout block) can still be read, checked by this component's
        actor, which fetches them to its node (the critic's: it reads them next), so that the
        driver never holds a block."""
        return self.resolve(self.actor.available.remote(list(futures)))  # in a list: not resolved by Ray

    def probe(self) -> Any:
        return self.actor.node_id.remote()

    def done(self, future: Any) -> bool:
        ready, _ = ray.wait([future], timeout=0)
        return bool(ready)

    def wait(self, future: Any, timeout: float) -> bool:
        ready, _ = ray.wait([future], timeout=timeout)
        return bool(ready)

    def restart(self) -> None:
        # Ray kills the process (a stopped or deadlocked one too) and starts it again if its
        # max_restarts allow; the calls it held fail with an actor error.
        ray.kill(self.actor, no_restart=False)

    def placement(self) -> dict[str, Any]:
        return self.resolve(self.actor.placement.remote())


def init_ray(cfg: Config) -> bool:
    """Join the configured or surrounding cluster, else start Ray in-process.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" starts a fresh instance: a bare ray.init() would try to join whatever cluster
        # /tmp/ray/ray_current_cluster names, even a dead one (minutes of GCS timeouts).
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def check_reachable(address: str, key: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address where nothing listens is a user error now,
    rather than minutes of Ray retrying its connection. Other forms (``auto``, ``local``) pass."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or "://" in target:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        instead = "unset RAY_ADDRESS" if key == "RAY_ADDRESS" else "leave ray.address null"
        raise ValueError(
            f"{key} = '{address}': no Ray cluster answers there ({err.strerror or err}); start one "
            f"(bash cluster/start-local-head.sh) or {instead} to start Ray in this process"
        ) from None


# What a Ray job's driver that computes on a GPU reserves for itself (``ray job submit
# --entrypoint-num-gpus 1``, KubeRay's ``entrypointNumGpus: 1``): it pretrains, evaluates and draws
# there, so a whole GPU, which no actor's share can then land on.
DRIVER_NUM_GPUS = 1.0


def resource_asks(cfg: Config, driver_gpus: float = 0.0) -> dict[str, tuple[float, str]]:
    """What the run reserves in all: ``{resource: (amount, the config keys behind it)}``: the
    actors' shares, plus ``driver_gpus`` for a driver that computes on a GPU (``driver_num_gpus``)."""
    r, g = cfg.rollout, cfg.ray
    driver = f" + the driver's {driver_gpus:g} (ray job submit --entrypoint-num-gpus)" if driver_gpus else ""
    return {
        "CPU": (r.num_workers * r.num_cpus_per_worker,
                f"rollout.num_workers={r.num_workers} x rollout.num_cpus_per_worker={r.num_cpus_per_worker:g}"),
        "GPU": (r.num_workers * r.num_gpus_per_worker + g.num_learners * g.learner_num_gpus + g.critic_num_gpus
                + driver_gpus,
                f"rollout.num_workers={r.num_workers} x rollout.num_gpus_per_worker={r.num_gpus_per_worker:g} "
                + (f"+ ray.num_learners={g.num_learners} x " if g.num_learners > 1 else "+ ")
                + f"ray.learner_num_gpus={g.learner_num_gpus:g} + ray.critic_num_gpus={g.critic_num_gpus:g}" + driver),
    }


def driver_num_gpus(cfg: Config, env: Mapping[str, str]) -> float:
    """The GPU this process holds as the driver of a Ray job (``env``: its environment):
    ``DRIVER_NUM_GPUS`` when it computes on one, else 0. Outside a Ray job (Ray started here, or a
    script joining by address) the driver's GPU is not the cluster's to count."""
    in_a_job = RAY_JOB_CONFIG_ENV in env
    return DRIVER_NUM_GPUS if in_a_job and components.resolve_device(cfg) == "cuda" else 0.0


def unreserved_driver_gpu(env: Mapping[str, str]) -> str | None:
    """A warning when this job's driver computes on a GPU its submission did not reserve (Ray
    then sets ``NOSET_CUDA_ENV``): Ray may give that GPU to actors too."""
    if env.get(NOSET_CUDA_ENV) != "1":
        return None
    return ("warning: this job's driver computes on a GPU that its submission did not reserve, so Ray may give it to "
            f"actors too: submit with --entrypoint-num-gpus {DRIVER_NUM_GPUS:g} (KubeRay: entrypointNumGpus: "
            f"{DRIVER_NUM_GPUS:g}), or run it where it sees no GPU")


def check_resources(cfg: Config, have: dict[str, float], *, fixed: bool, driver_gpus: float = 0.0) -> str | None:
    """Actors that ask for more than the cluster has would wait forever. On a cluster of fixed
    size (Ray started by this command) that is an error; on a joined cluster an autoscaler may
    still add nodes, so it is a warning (returned, for the caller to print). ``driver_gpus``: what
    the driver holds of ``have`` (``driver_num_gpus``)."""
    short = [
        f"{resource}: {amount:g} asked ({keys}), the cluster has {have.get(resource, 0.0):g}"
        for resource, (amount, keys) in resource_asks(cfg, driver_gpus).items()
        if amount > have.get(resource, 0.0) + 1e-9
    ]
    if not short:
        return None
    message = "the actors ask for more than the Ray cluster has: " + "; ".join(short)
    if fixed:
        hint = " (set rollout.num_gpus_per_worker=0 ray.learner_num_gpus=0 ray.critic_num_gpus=0)" if any(
            s.startswith("GPU") for s in short) else ""
        raise ResourceError(f"{message}. Lower them{hint}, or give ray.address of a larger cluster")
    return (f"warning: {message}; waiting up to ray.placement_timeout_s = {cfg.ray.placement_timeout_s:g} s for the "
            "cluster to grow (an autoscaler may add nodes)")


def placement_bundles(cfg: Config) -> dict[str, dict[str, float]]:
    """What each actor that reserves anything reserves, by actor name: the bundles of the run's
    placement group (the buffer and actors without a share reserve nothing)."""
    r, g = cfg.rollout, cfg.ray
    asks = {worker_name(i): {"CPU": r.num_cpus_per_worker, "GPU": r.num_gpus_per_worker} for i in range(r.num_workers)}
    asks |= {learner_name(k, g.num_learners): {"GPU": g.learner_num_gpus} for k in range(g.num_learners)}
    asks["critic"] = {"GPU": g.critic_num_gpus}
    bundles = {name: {k: v for k, v in ask.items() if v > 0} for name, ask in asks.items()}
    return {name: bundle for name, bundle in bundles.items() if bundle}


def learner_name(index: int, count: int) -> str:
    return f"learner-{index}" if count > 1 else "learner"


def reserve(cfg: Config, driver_gpus: float = 0.0) -> tuple[Any, dict[str, int]]:
    """One placement group for every actor that reserves resources, so that a run starts all of
    its actors or none: ``(group, bundle index by actor name)``, or ``(None, {})`` when nothing is
    reserved. A group the cluster cannot place within ``ray.placement_timeout_s`` is removed and
    the run stops with what is missing (``unplaced_message``)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = placement_bundles(cfg)
    if not bundles:
        return None, {}
    group = placement_group(list(bundles.values()), strategy="SPREAD")  # rollout workers on different nodes
    ready, _ = ray.wait([group.ready()], timeout=cfg.ray.placement_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ResourceError(unplaced_message(cfg, bundles, ray.cluster_resources(), ray.available_resources(),
                                             driver_gpus))
    return group, {name: index for index, name in enumerate(bundles)}


def unplaced_message(cfg: Config, bundles: dict[str, dict[str, float]], total: dict[str, float],
                     free: dict[str, float], driver_gpus: float = 0.0) -> str:
    """One line on a placement group that did not place: what is missing (the actors' asks beyond
    what is free), what they ask and why, and what the cluster has in all and free."""
    asks = resource_asks(cfg, driver_gpus)
    actors = resource_asks(cfg)  # the driver's GPU is held already: not free, not in the group
    missing = [f"{r} {amount - free.get(r, 0.0):g}" for r, (amount, _) in actors.items()
               if amount > free.get(r, 0.0) + 1e-9]
    largest = max(bundles.values(), key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)))
    lack = ("missing " + ", ".join(missing) if missing else
            f"enough is free in all, but not on nodes that fit each bundle (the largest: {largest})")
    asked = "; ".join(f"{r}: {amount:g} ({keys})" for r, (amount, keys) in asks.items() if amount)
    have = ", ".join(f"{r} {total.get(r, 0.0):g}" for r in ("CPU", "GPU"))
    now = ", ".join(f"{r} {free.get(r, 0.0):g}" for r in ("CPU", "GPU"))
    return (f"the Ray cluster could not place this run's actors within {cfg.ray.placement_timeout_s:g} s "
            f"(ray.placement_timeout_s): {lack}. They ask {asked}, in bundles of up to {largest} per actor; "
            f"the cluster has {have} (free: {now}). Lower the asks, or add nodes that fit a bundle")


def actor_config(cfg: Config, num_gpus: float) -> Config:
    """``device: auto`` inside an actor: the GPU exactly when Ray reserved a share of one for it
    (an actor without a share must not compute on a GPU another actor reserved)."""
    if cfg.device != "auto":
        return cfg
    return dataclasses.replace(cfg, device="cuda" if num_gpus > 0 else "cpu")


class RaySystemLaunch:
    """The actors of one run, started before the pretrained weights exist.

    Rollout workers, the buffer and the critic need only the data shape (the critic and the
    baseline are not pretrained); the learner's actor starts empty. ``finish(init)`` builds the
    learner from the pretrained sampler and returns the ``System``.
    """

    def __init__(self, cfg: Config, data_shape: tuple[int, ...], *, fixed_size: bool = False):
        """``fixed_size``: Ray was started by this command, so no node will join (``check_resources``)."""
        driver_gpus = driver_num_gpus(cfg, os.environ)
        warnings = [check_resources(cfg, ray.cluster_resources(), fixed=fixed_size, driver_gpus=driver_gpus),
                    unreserved_driver_gpu(os.environ) if driver_gpus else None]
        for warning in filter(None, warnings):
            print(warning, file=sys.stderr, flush=True)
        self.cfg = cfg
        self.group, bundle_of = reserve(cfg, driver_gpus)

        def placed(name: str) -> dict[str, Any]:
            """Where the actor ``name`` goes: its bundle of the placement group, if it reserves any."""
            if name not in bundle_of:
                return {}
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=bundle_of[name])}

        actor: Any = ray.remote(ComponentActor)  # an ActorClass: typed loosely by Ray
        # Every argument is small and inlined: restartable workers must not depend on
        # object-store arguments, and every collect() call brings the current weights anyway.
        shape_only = components.InitState(None, tuple(data_shape))
        r = cfg.rollout
        self.workers = [
            actor.options(
                num_cpus=r.num_cpus_per_worker,
                num_gpus=r.num_gpus_per_worker,
                max_restarts=r.max_restarts,
                **(placed(worker_name(i)) or {"scheduling_strategy": "SPREAD"}),
            ).remote(components.make_rollout_worker, actor_config(cfg, r.num_gpus_per_worker), shape_only, i)
            for i in range(r.num_workers)
        ]
        self.buffer = actor.options(num_cpus=0).remote(_ray_buffer)
        self.critic = actor.options(num_cpus=0, num_gpus=cfg.ray.critic_num_gpus, **placed("critic")).remote(
            components.make_critic_learner, actor_config(cfg, cfg.ray.critic_num_gpus), shape_only
        )
        self.learners = [actor.options(num_cpus=0, num_gpus=cfg.ray.learner_num_gpus,
                                       **placed(learner_name(k, cfg.ray.num_learners))).remote()
                         for k in range(cfg.ray.num_learners)]

    def finish(self, init: components.InitState) -> System:
        """Build the learners from the pretrained sampler (waits for them; several join one
        torch.distributed group) and hand out the handles."""
        handles = [RayHandle(w, worker_name(i)) for i, w in enumerate(self.workers)]
        many = len(self.learners) > 1
        learners = [RayHandle(a, learner_name(k, len(self.learners))) for k, a in enumerate(self.learners)]
        learner_cfg = actor_config(self.cfg, self.cfg.ray.learner_num_gpus)
        state = ray.put(init)
        learners[0].resolve([a.build.remote(components.make_learner, learner_cfg, state) for a in self.learners])
        if many:
            address = learners[0].resolve(self.learners[0].rendezvous.remote())
            learners[0].resolve([h.call(Learner.join_group, address, k, len(learners))
                                 for k, h in enumerate(learners)])
        return System.of(
            workers=handles,
            buffer=RayHandle(self.buffer, "buffer"),
            learner=learners,
            critic=RayHandle(self.critic, "critic"),
            backend="ray",
            shutdown=self.shutdown,
        )

    def shutdown(self) -> None:
        for a in [*self.workers, self.buffer, *self.learners, self.critic]:
            ray.kill(a, no_restart=True)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def build_ray_system(cfg: Config, init: components.InitState, *, fixed_size: bool = False) -> System:
    """Rollout workers (spread across nodes), one buffer, one learner and one critic actor."""
    return RaySystemLaunch(cfg, init.data_shape, fixed_size=fixed_size).finish(init)
