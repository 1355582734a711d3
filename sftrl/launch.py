"""Starting a run: Ray and the actors start while the initial sampler is pretrained (or loaded).

Ray's start, the actors' processes and their imports take tens of seconds on a small machine;
the learner's actor starts empty and is built once the pretrained weights exist. With
``ray.backend: local`` there is nothing to start and the thread only pretrains.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sftrl.components import InitState
from sftrl.config import Config
from sftrl.data import RealData
from sftrl.signals import interrupt_on_sigterm
from sftrl.system import System


def build_initial_sampler(cfg: Config, data: RealData, progress: bool, stop: threading.Event | None = None,
                          fingerprint: str | None = None) -> tuple[InitState, dict[str, Any]]:
    """The pretrained sampler (from ``model.checkpoint``, the cache or a pretraining run) as the
    components' ``InitState``, and what ``load_or_pretrain`` reports of it."""
    from sftrl.components import fresh_sampler, resolve_device
    from sftrl.models import attach_variance
    from sftrl.pretraining import load_or_pretrain
    from sftrl.weights import to_numpy_state

    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))
    info = load_or_pretrain(cfg, sampler, data, device=resolve_device(cfg), progress=progress, stop=stop,
                            fingerprint=fingerprint)
    attach_variance(sampler.cpu(), cfg, tuple(data.shape[1:]))  # learned stds start from the schedule's
    return InitState(to_numpy_state(sampler.cpu()), tuple(data.shape[1:])), info


class Launch:
    """What a command starts before fine-tuning, and takes down again (see the module doc)."""

    def __init__(self, cfg: Config, fingerprint: str | None = None):
        """``fingerprint``: the data's, for the pretrained-sampler cache (None with ``model.checkpoint``)."""
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.started_ray = False  # this command started Ray (and shuts it down)
        self.actors: Any = None  # a RaySystemLaunch once the actors are asked for

    def start_while_pretraining(self, data: RealData, progress: bool) -> tuple[InitState, dict[str, Any]]:
        from sftrl.pretraining import cache_path

        data_shape = tuple(data.shape[1:])
        if self.fingerprint is None or cache_path(self.cfg, self.fingerprint).is_file():
            # Loading takes seconds, and a bad checkpoint is reported before anything starts.
            loaded = build_initial_sampler(self.cfg, data, progress, fingerprint=self.fingerprint)
            self.start_ray(data_shape)
            return loaded
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftrl-pretrain") as pool:
            pretraining = pool.submit(build_initial_sampler, self.cfg, data, progress, stop, self.fingerprint)
            try:
                self.start_ray(data_shape)
                return pretraining.result()
            except BaseException:
                stop.set()  # the pretraining thread ends at its next epoch (the pool waits for it)
                raise

    def start_ray(self, data_shape: tuple[int, ...]) -> None:
        if self.cfg.ray.backend != "ray" or self.actors is not None:
            interrupt_on_sigterm()
            return
        from sftrl.distributed import RaySystemLaunch, init_ray

        self.started_ray = init_ray(self.cfg)
        interrupt_on_sigterm()  # after Ray's start, which installs a handler that aborts with a stack dump
        self.actors = RaySystemLaunch(self.cfg, data_shape, fixed_size=self.started_ray)

    def system(self, init: InitState, data: RealData) -> System:
        """The components' clients: the Ray actors (started by ``start_while_pretraining``)
        finished with ``init``, else local objects."""
        from sftrl.system import build_local_system

        if self.cfg.ray.backend != "ray":
            return build_local_system(self.cfg, init, data)
        return self.actors.finish(init)

    def abandon(self) -> None:
        """Stop what was started (a failed start: the actors have no system to shut them down)."""
        if self.actors is not None:
            self.actors.shutdown()
        self.shutdown_ray()

    def shutdown_ray(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False
