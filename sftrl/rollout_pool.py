"""The rollout workers of a run, tolerant of faults (the role of RLlib's FaultTolerantActorManager).

``RolloutPool.request`` hands an iteration's block ids to the usable workers; ``watch`` restarts
a worker whose call is far slower than the recent ones (hung, not dead: Ray would wait on it
forever); ``recover`` finds the calls a lost worker (or a lost node) failed and hands their
block ids to workers that answer. Block ids are fixed per iteration and a block's noise follows
its id, so a block collected again is the same block, and the buffer refuses one it has.

A worker seen dead is not asked again until a probe answers (Ray restarts it up to
``rollout.max_restarts`` times); one Ray will not restart is left out for good. A death counts
once in ``worker_failures``, whatever number of queued calls it failed.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from sftrl.clients import Future, WorkerClient
from sftrl.config import RolloutConfig
from sftrl.handles import ComponentLost
from sftrl.ledger import RunLedger

# How long to wait for Ray to restart a rollout worker when none is left (a restart re-imports
# torch and rebuilds the networks: seconds on an idle machine, and 100 s was measured on this
# 2-core one with five runs beside it, so the wait leaves room for several times that).
WORKER_RESTART_WAIT_S = 600.0
# Rollout calls whose durations set how long the next may take before its worker counts as hung.
RECENT_CALLS = 20


class RolloutError(RuntimeError):
    """Rollouts failed on every retry, or no worker came back."""


@dataclasses.dataclass(frozen=True)
class RolloutCall:
    """One ``collect`` call: its worker, the block ids it makes, its futures (the blocks, then a
    summary) and its number among the calls made to that worker (``seq``, from 1)."""

    worker: WorkerClient
    ids: list[str]
    out: list[Future]
    seq: int


@dataclasses.dataclass
class Rollouts:
    """One critic phase's rollout requests: block ids (fixed per iteration), the weights they run
    (``version``: theta's version, known before the weights exist) and pending calls."""

    ids: list[str]
    policy_weights: Future
    critic_weights: Future
    version: int
    calls: list[RolloutCall] = dataclasses.field(default_factory=list)

    def blocks(self) -> list[Future]:
        """Block futures in id order."""
        by_id = {i: block for call in self.calls for i, block in zip(call.ids, call.out[:-1])}
        return [by_id[i] for i in self.ids]


class RolloutPool:
    """See the module doc. ``ledger`` receives the failures and the events."""

    def __init__(self, workers: list[WorkerClient], settings: RolloutConfig, chains_per_block: int, ledger: RunLedger,
                 available: Callable[[list[Future]], list[bool]]):
        """``available(blocks)``: whether each block can still be read, found out away from the
        driver (the critic's ``Client.available``)."""
        self.workers = workers
        self.available = available
        self.settings = settings
        self.chains_per_block = chains_per_block
        self.ledger = ledger
        self.calls_made: dict[str, int] = {}  # collect calls made per worker
        self.deaths_seen: dict[str, int] = {}  # per worker: the calls made when its last death was seen
        self.dead: dict[str, Future] = {}  # workers seen dead, by name: a probe that resolves once one is back
        self.call_seconds: collections.deque[float] = collections.deque(maxlen=RECENT_CALLS)
        # Per worker restarted or seen dead: the number of its first call since (a fresh process
        # warms up again, so that call gets the first-call wait, not the recent calls' multiple).
        self.first_since_restart: dict[str, int] = {}
        # The sampler's frozen base (LoRA: ``Learner.get_base_weights``), passed with every call:
        # one object, which a worker loads once (and a restarted one again); None: no base.
        self.base: Future | None = None

    def request(self, ids: list[str], policy_weights: Future, critic_weights: Future, version: int) -> Rollouts:
        """Ask the usable workers for the blocks ``ids`` (not waited for), run with theta's
        version ``version``."""
        rollouts = Rollouts(ids, policy_weights, critic_weights, version)
        self._submit(rollouts, ids, self.usable() or self._wait_for_a_worker(self.workers))
        return rollouts

    def usable(self) -> list[WorkerClient]:
        """All workers but those seen dead and not back yet (a dead one's probe is checked
        without waiting)."""
        for worker in self.workers:
            if worker.name in self.dead and worker.done(self.dead[worker.name]):
                try:
                    worker.resolve(self.dead.pop(worker.name))
                except ComponentLost:
                    self.dead[worker.name] = worker.probe()  # still gone: ask again
        return [w for w in self.workers if w.name not in self.dead]

    def _submit(self, rollouts: Rollouts, ids: list[str], workers: list[WorkerClient]) -> None:
        for i, worker in enumerate(workers):
            worker_ids = ids[i :: len(workers)]
            if worker_ids:
                out = worker.collect(rollouts.policy_weights, rollouts.critic_weights, worker_ids, self.chains_per_block,
                                     self.base)
                self.calls_made[worker.name] = seq = self.calls_made.get(worker.name, 0) + 1
                rollouts.calls.append(RolloutCall(worker, worker_ids, out, seq))

    def summaries(self, rollouts: Rollouts) -> list[dict[str, Any]]:
        """The calls' summaries (delivered by now), their durations noted for ``call_timeout``."""
        summaries = [call.worker.resolve(call.out[-1]) for call in rollouts.calls]
        self.call_seconds.extend(s["seconds"] for s in summaries if "seconds" in s)
        return summaries

    # -- hung workers -----------------------------------------------------------------------

    def call_timeout(self, first_call: bool = False) -> float:
        """How long a rollout call may take before its worker counts as hung: a multiple of the
        recent calls' median, floored. Before any call was timed, and for a worker's first call
        after a restart (it re-imports and warms up): the multiple of the floor, if longer."""
        s = self.settings
        first = s.call_timeout_multiple * s.call_timeout_floor_s
        if not self.call_seconds:
            return first
        recent = max(s.call_timeout_floor_s, s.call_timeout_multiple * statistics.median(self.call_seconds))
        return max(recent, first) if first_call else recent

    def _is_first_since_restart(self, call: RolloutCall) -> bool:
        return call.seq <= self.first_since_restart.get(call.worker.name, 0)

    def _restarted(self, worker: WorkerClient) -> None:
        """``worker`` was restarted (or died): its next call is a first call."""
        self.first_since_restart[worker.name] = self.calls_made.get(worker.name, 0) + 1

    def watch(self, rollouts: Rollouts, iteration: int) -> None:
        """Wait for the calls up to ``call_timeout()``; a worker whose call is not back by then is
        restarted, which fails its calls for ``recover`` to collect elsewhere.

        The wait starts when the driver needs the blocks, and a worker runs its calls in order,
        so by then it is at most one call into this one."""
        if not self.settings.call_timeout_multiple:
            return
        start = time.monotonic()
        for call in rollouts.calls:
            limit = self.call_timeout(first_call=self._is_first_since_restart(call))
            if call.worker.wait(call.out[-1], max(0.0, start + limit - time.monotonic())):
                continue
            detail = (f"{call.worker.name} did not return its rollout call (blocks {', '.join(call.ids)}) within "
                      f"{limit:.0f} s (rollout.call_timeout_multiple x the recent calls, at least "
                      "rollout.call_timeout_floor_s)")
            print(f"warning: {detail}; restarting it and collecting its blocks elsewhere", file=sys.stderr, flush=True)
            self.ledger.event(iteration, "worker_hung", detail)
            call.worker.restart()
            self._restarted(call.worker)

    # -- lost workers -----------------------------------------------------------------------

    def recover(self, rollouts: Rollouts, iteration: int) -> list[str]:
        """After a failed critic call: find the calls whose worker died (or whose blocks went
        with their node), keep what the others delivered, and hand the lost block ids to the
        workers that delivered, then to the other live ones. Returns the lost ids.

        ``worker_failures`` counts deaths, not failed calls: the calls a worker had queued when
        it died (async mode queues several iterations') fail in their own iterations and are
        recovered there, without counting that death again.
        """
        answered, failed, lost = [], [], []
        for call in rollouts.calls:
            try:
                call.worker.resolve(call.out[-1])
                answered.append(call)
            except ComponentLost as err:
                failed.extend(call.ids)
                lost.append(call.worker)
                self._note_death(call, iteration, str(err))
        # The summary lives with the driver, the blocks on the worker's node: a lost node takes
        # them. Whether they are still there is found out where they are read next, not here.
        readable = self.available([block for call in answered for block in call.out[:-1]])
        delivered, start = [], 0
        for call in answered:
            start += len(call.ids)
            if all(readable[start - len(call.ids) : start]):
                delivered.append(call)
            else:
                failed.extend(call.ids)
                self.ledger.event(iteration, "blocks_lost", f"blocks {', '.join(call.ids)} of {call.worker.name} "
                                  "were lost with their node after the call returned")
        if not failed:
            raise RolloutError("the critic update failed but every rollout call succeeded")
        # A worker that delivered one call and then died is lost: its delivered blocks are kept.
        healthy = [w for w in dict.fromkeys(call.worker for call in delivered) if w not in lost]
        workers = healthy + [w for w in self.usable() if w not in healthy and w not in lost]
        rollouts.calls = delivered
        self._submit(rollouts, failed, workers or self._wait_for_a_worker(list(dict.fromkeys(lost))))
        return failed

    def _note_death(self, call: RolloutCall, iteration: int, detail: str) -> None:
        name = call.worker.name
        if name not in self.dead:
            self.dead[name] = call.worker.probe()
            self._restarted(call.worker)
        if call.seq > self.deaths_seen.get(name, 0):  # made before this death was seen
            self.ledger.counters["worker_failures"] += 1
            self.ledger.event(iteration, "worker_lost", detail)
            self.deaths_seen[name] = self.calls_made[name]

    def _wait_for_a_worker(self, workers: list[WorkerClient]) -> list[WorkerClient]:
        """No worker is usable: wait (bounded) until Ray has restarted one of them."""
        deadline = time.monotonic() + WORKER_RESTART_WAIT_S
        while time.monotonic() < deadline:
            for worker in workers:
                try:
                    worker.ping()
                except ComponentLost:
                    continue
                self.dead.pop(worker.name, None)
                return [worker]
            time.sleep(1.0)
        raise RolloutError(f"no rollout worker came back within {WORKER_RESTART_WAIT_S:.0f} s")
