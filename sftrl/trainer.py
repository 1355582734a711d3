"""The driver: Algorithm 1 (SFT-PG) as a loop over component handles, with evaluation,
metrics and checkpoints. The same loop runs local objects or Ray actors (``sftrl.handles``)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from sftrl.algos import ALGORITHMS
from sftrl.buffer import BlockMeta
from sftrl.checkpoint import save_checkpoint
from sftrl.config import Config
from sftrl.configtools import to_dict
from sftrl.handles import ComponentLost, Handle, LocalHandle
from sftrl.optim import SKIPPED
from sftrl.progress import Progress
from sftrl.runlog import MetricsLog


@dataclasses.dataclass
class System:
    """Handles to the components of one run, local or remote."""

    workers: list[Handle]
    buffer: Handle
    learner: Handle
    critic: Handle
    backend: str
    shutdown: Callable[[], None] = lambda: None

    def placement(self) -> dict[str, dict[str, Any]]:
        """Where each component runs, by name: node, torch device and the GPUs Ray gave it."""
        return {h.name: h.placement() for h in [*self.workers, self.buffer, self.learner, self.critic]}


def build_local_system(cfg: Config, init, real_data=None) -> System:
    """Every component in this process (``ray.backend: local``): no Ray at all."""
    from sftrl import components

    return System(
        workers=[
            LocalHandle(components.make_rollout_worker(cfg, init, i), f"worker-{i}")
            for i in range(cfg.rollout.num_workers)
        ],
        buffer=LocalHandle(components.make_replay_buffer(), "buffer"),
        learner=LocalHandle(components.make_learner(cfg, init), "learner"),
        critic=LocalHandle(components.make_critic_learner(cfg, init, real_data), "critic"),
        backend="local",
    )


# How long to wait for Ray to restart a rollout worker when none is left (a restart re-imports
# torch and rebuilds the networks: seconds on an idle machine, much longer on a loaded one).
WORKER_RESTART_WAIT_S = 120.0
# Rollout calls whose durations set how long the next may take before its worker counts as hung.
RECENT_CALLS = 20


class RolloutCall(NamedTuple):
    """One ``collect`` call: its worker, the block ids it makes, its futures (the blocks, then a
    summary) and its number among the calls made to that worker (``seq``, from 1)."""

    worker: Handle
    ids: list[str]
    out: Any
    seq: int


@dataclasses.dataclass
class Rollouts:
    """One critic phase's rollout requests: block ids (fixed per iteration), the weights they run
    (``version``: theta's version, known before the weights exist) and pending calls."""

    ids: list[str]
    policy_weights: Any
    critic_weights: Any
    version: int
    calls: list[RolloutCall] = dataclasses.field(default_factory=list)

    def blocks(self) -> list[Any]:
        """Block futures in id order."""
        by_id = {i: block for call in self.calls for i, block in zip(call.ids, call.out[:-1])}
        return [by_id[i] for i in self.ids]


@dataclasses.dataclass
class Pending:
    """A submitted component call that returns its metrics and its newly published weights."""

    handle: Handle
    metrics: Any
    weights: Any


class RolloutError(RuntimeError):
    """Rollouts failed on every retry."""


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row: the run stops with its last good checkpoint."""


def mean_metrics(entries: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """Average each metric over a phase's steps, NaNs ignored; keys become ``prefix/name``."""
    out: dict[str, float] = {}
    for key in {k for e in entries for k in e}:
        values = [e[key] for e in entries if key in e and not math.isnan(e[key])]
        out[f"{prefix}/{key}"] = sum(values) / len(values) if values else float("nan")
    return out


class Trainer:
    """Algorithm 1 over handles. ``fit()`` runs ``trainer.iterations`` iterations.

    Evaluations run in a background thread of the driver while training goes on (the driver
    mostly waits on the components; an evaluation is seconds of sampling and POT or FID). Each
    is logged when it finishes, with the iteration and weights version it scored.
    """

    def __init__(
        self,
        cfg: Config,
        system: System,
        run_dir: Path,
        evaluate: Callable[[Any], dict[str, float]] | None = None,
        *,
        progress: bool = True,
        log_sinks: tuple = (),
        started: float | None = None,
    ):
        """``started``: the ``time.monotonic()`` the command began at (pretraining included);
        every evaluation records the seconds since then as ``elapsed_s``."""
        self.started = time.monotonic() if started is None else started
        self.cfg = cfg
        self.system = system
        self.run_dir = Path(run_dir)
        self.evaluate_weights = evaluate
        self.progress = progress
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", log_sinks)
        self.data_need = ALGORITHMS[cfg.algo.name].data
        self.iteration = 0
        self.counters = {
            "blocks": 0,
            "chains": 0,
            "transitions": 0,
            "nonfinite_total": 0,
            "nonfinite_streak_critic": 0,
            "nonfinite_streak_policy": 0,
            "nonfinite_streak_rollout": 0,
            "worker_failures": 0,
        }
        self.events: list[dict[str, Any]] = []
        self.stop_requested = False
        self._rollout_reward = float("nan")
        self._weights_lag = 0
        self._policy_weights = None  # theta's latest published version (a future)
        self._ahead: dict[int, Rollouts] = {}  # later iterations' rollouts, asked for ahead
        self._previous_end: float | None = None  # perf_counter() at the end of the last step
        self._calls_made: dict[str, int] = {}  # collect calls made per worker
        self._deaths_seen: dict[str, int] = {}  # per worker: the calls made when its last death was seen
        self._dead: dict[str, Any] = {}  # workers seen dead, by name: a probe that resolves once one is back
        self._call_seconds: collections.deque[float] = collections.deque(maxlen=RECENT_CALLS)  # rollout call times
        self.evaluations: list[dict[str, Any]] = []
        self._evaluating: list[tuple[int, int, Future]] = []  # (iteration, version, result), in order
        self._evaluation_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftrl-eval")
        self._last_evaluated = -1  # the iteration of the last evaluation started
        self._critic_weights = system.critic.call("get_weights")
        self._trainable_steps = None
        self._saved: tuple | None = None  # (iteration, evaluations, events) of the last checkpoint

    # -- Algorithm 1, one iteration ------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One iteration: publish theta, roll out, critic phase (it publishes the critic), generator
        phase. The buffer's clear (step 5) opens the next iteration's ``refill``: one buffer call
        per iteration.

        ``time/iteration_s`` is the wall time since the previous iteration ended (what an
        iteration costs, the driver's logging and checkpoints between iterations included)."""
        start = time.perf_counter()
        rollouts = self._ahead.pop(self.iteration, None)
        if rollouts is None:
            rollouts = self.collect_rollouts(self.publish_weights(), self._critic_weights, self.iteration,
                                             version=self.iteration)
        self._fill_pipeline()
        critic_metrics, policy_metrics = self.update_critic_then_policy(rollouts)
        self.iteration += 1
        end = time.perf_counter()
        seconds = end - (self._previous_end if self._previous_end is not None else start)
        self._previous_end = end
        chains = self.cfg.algo.n_critic * self.cfg.algo.batch_size
        return {
            **mean_metrics(critic_metrics, "critic"),
            **mean_metrics(policy_metrics, "policy"),
            "rollout/reward_mean": self._rollout_reward,
            "rollout/weights_lag": self._weights_lag,
            "time/iteration_s": seconds,
            "throughput/rollout_chains_per_s": chains / seconds,
            "throughput/policy_transitions_per_s": len(policy_metrics) * self.cfg.algo.batch_size / seconds,
        }

    def publish_weights(self) -> Any:
        """The learner's current theta as one object per version: the one its last update
        returned (or, before the first update and after a restore, asked for)."""
        if self._policy_weights is None:
            self._policy_weights = self.system.learner.call("get_weights")
        return self._policy_weights

    def collect_rollouts(self, policy_weights: Any, critic_weights: Any, iteration: int, *, version: int) -> Rollouts:
        """Ask the workers for iteration ``iteration``'s n_critic blocks of m chains, run with
        theta's version ``version`` (not waited for: the critic's call takes the block references
        directly)."""
        a = self.cfg.algo
        rollouts = Rollouts(ids=[f"it{iteration}/b{k}" for k in range(a.n_critic)], policy_weights=policy_weights,
                            critic_weights=critic_weights, version=version)
        self._submit(rollouts, rollouts.ids, self._usable_workers() or self._wait_for_a_worker(self.system.workers))
        return rollouts

    def _usable_workers(self) -> list[Handle]:
        """The rollout workers to ask: all but those seen dead and not back yet. A dead worker's
        probe (an answer it gives once Ray has restarted it) is checked without waiting; a worker
        Ray will not restart keeps failing its probe and is never asked again."""
        for worker in self.system.workers:
            if worker.name in self._dead and worker.done(self._dead[worker.name]):
                try:
                    worker.resolve(self._dead.pop(worker.name))
                except ComponentLost:
                    self._dead[worker.name] = worker.probe()  # still gone: ask again
        return [w for w in self.system.workers if w.name not in self._dead]

    def _may_roll_ahead(self, iteration: int) -> bool:
        """Whether iteration ``iteration``'s rollouts may be asked for during this step.

        Sync mode (``rollout.max_lag = 0``) asks for the next iteration's with theta's next version
        as a future, so Ray starts them the moment the learner publishes it, while the driver logs
        this iteration (Algorithm 1 unchanged: the same weights, asked for earlier). Async mode
        asks ``max_lag`` iterations further ahead. Never across a checkpoint, which keeps only the
        current theta: the pipeline restarts from it, so a resumed async run repeats an
        uninterrupted one bit for bit (sync mode keeps the same rule: one iteration without
        overlap per checkpoint). Nor past the last iteration or after a stop request.
        """
        t = self.cfg.trainer
        every = t.checkpoint_every
        checkpoint_between = every and (iteration // every) * every > self.iteration  # one in (now, iteration]
        return iteration < t.iterations and not self.stop_requested and not checkpoint_between

    def _fill_pipeline(self) -> None:
        """Async mode, where the pipeline (re)starts (the first iteration, after a checkpoint or a
        resume): ask for the next ``max_lag`` iterations' rollouts with the current theta. In the
        steady state each step asks for one more (``update_critic_then_policy``), so iteration j's
        rollouts run theta's version j - max_lag; the lag is logged as ``rollout/weights_lag``."""
        for iteration in range(self.iteration + 1, self.iteration + 1 + self.cfg.rollout.max_lag):
            if not self._may_roll_ahead(iteration):
                break
            if iteration not in self._ahead:
                self._ahead[iteration] = self.collect_rollouts(self.publish_weights(), self._critic_weights, iteration,
                                                               version=self.iteration)

    def _submit(self, rollouts: Rollouts, ids: list[str], workers: list[Handle]) -> None:
        a = self.cfg.algo
        for i, worker in enumerate(workers):
            worker_ids = ids[i :: len(workers)]
            if worker_ids:
                out = worker.call("collect", rollouts.policy_weights, rollouts.critic_weights, worker_ids, a.batch_size,
                                  num_returns=len(worker_ids) + 1)
                self._calls_made[worker.name] = seq = self._calls_made.get(worker.name, 0) + 1
                rollouts.calls.append(RolloutCall(worker, worker_ids, out, seq))

    def _recover(self, rollouts: Rollouts, policy: Pending) -> None:
        """After a failed critic call: name a dead learner or critic, else find the rollout calls
        whose worker died and hand their block ids to the workers that delivered (then the other
        live ones; a dead worker is asked again only once it answers).

        The learner's call of this attempt failed with the critic's (its input) and never ran;
        the buffer forgets this attempt's blocks, which are added again with the retry. Block ids
        are fixed per iteration, so a block is never counted twice nor silently dropped.

        ``worker_failures`` counts deaths, not failed calls: the calls a worker had queued when
        it died (async mode queues several iterations' calls) fail in their own iterations and
        are recovered there, without counting that death again.
        """
        self.system.learner.ping()  # raises ComponentLost naming the learner if it is gone
        self.system.critic.ping()
        try:
            policy.handle.resolve(policy.metrics)
        except ComponentLost:
            pass  # expected: its critic weights never came
        else:
            raise RolloutError("the critic update failed but the policy update it feeds succeeded")
        if self.data_need != "none":
            self.system.buffer.resolve(self.system.buffer.call("discard", rollouts.ids))
        delivered, failed, lost = [], [], []
        for call in rollouts.calls:
            try:
                call.worker.resolve(call.out[-1])
            except ComponentLost as err:
                failed.extend(call.ids)
                lost.append(call.worker)
                if call.worker.name not in self._dead:
                    self._dead[call.worker.name] = call.worker.probe()
                if call.seq > self._deaths_seen.get(call.worker.name, 0):  # made before this death was seen
                    self.counters["worker_failures"] += 1
                    self.events.append({"iteration": self.iteration, "event": "worker_lost", "detail": str(err)})
                    self._deaths_seen[call.worker.name] = self._calls_made[call.worker.name]
                continue
            try:  # the summary lives with the driver, the blocks on the worker's node: a lost node takes them
                call.worker.resolve(list(call.out[:-1]))
                delivered.append(call)
            except ComponentLost as err:
                failed.extend(call.ids)
                self.events.append({"iteration": self.iteration, "event": "blocks_lost", "detail": str(err)})
        if not failed:
            raise RolloutError("the critic update failed but every rollout call succeeded")
        # A worker that delivered one call and then died is lost: its delivered blocks are kept.
        healthy = [w for w in dict.fromkeys(call.worker for call in delivered) if w not in lost]
        workers = healthy + [w for w in self._usable_workers() if w not in healthy and w not in lost]
        if not workers:
            workers = self._wait_for_a_worker(list(dict.fromkeys(lost)))
        rollouts.calls = delivered
        self._submit(rollouts, failed, workers)

    def call_timeout(self) -> float:
        """How long a rollout call may take before its worker counts as hung (see
        ``rollout.call_timeout_multiple``): a multiple of the recent calls' median, floored."""
        r = self.cfg.rollout
        if not self._call_seconds:
            return r.call_timeout_multiple * r.call_timeout_floor_s
        return max(r.call_timeout_floor_s, r.call_timeout_multiple * statistics.median(self._call_seconds))

    def _watch_for_hung_workers(self, rollouts: Rollouts) -> None:
        """Wait for this iteration's rollout calls up to ``call_timeout()``; a worker whose call is
        not back by then is hung (alive, so Ray would wait on it forever): it is restarted, which
        fails its calls, and the recovery collects its blocks elsewhere.

        The wait starts when the driver needs the blocks, and a worker runs its calls in order,
        so by then it is at most one call into this one."""
        if not self.cfg.rollout.call_timeout_multiple:
            return
        limit = self.call_timeout()
        deadline = time.monotonic() + limit
        for call in rollouts.calls:
            if call.worker.wait(call.out[-1], max(0.0, deadline - time.monotonic())):
                continue
            detail = (f"{call.worker.name} did not return its rollout call (blocks {', '.join(call.ids)}) within "
                      f"{limit:.0f} s (rollout.call_timeout_multiple x the recent calls, at least "
                      "rollout.call_timeout_floor_s)")
            print(f"warning: {detail}; restarting it and collecting its blocks elsewhere", file=sys.stderr, flush=True)
            self.events.append({"iteration": self.iteration, "event": "worker_hung", "detail": detail})
            call.worker.restart()

    def _wait_for_a_worker(self, workers: list[Handle]) -> list[Handle]:
        """No worker is usable: wait (bounded) until Ray has restarted one of them."""
        deadline = time.monotonic() + WORKER_RESTART_WAIT_S
        while time.monotonic() < deadline:
            for worker in workers:
                try:
                    worker.ping()
                except ComponentLost:
                    continue
                self._dead.pop(worker.name, None)
                return [worker]
            time.sleep(1.0)
        raise RolloutError(f"no rollout worker came back within {WORKER_RESTART_WAIT_S:.0f} s")

    def update_critic_then_policy(self, rollouts: Rollouts) -> tuple[list[dict], list[dict]]:
        """The critic phase (one critic + baseline update per block), the critic's publication,
        and the generator phase with rewards relabelled by the just-published critic.

        Both calls are submitted at once: with Ray the learner starts as soon as the critic's
        weights exist, without a round trip through the driver. A lost rollout worker fails
        the critic's call before the critic moves, and with it the learner's, which then never
        runs; the lost blocks are collected again (up to ``rollout.max_restarts`` times).
        """
        for _attempt in range(self.cfg.rollout.max_restarts + 1):
            critic = self.update_critic(rollouts)
            policy = self.update_policy(rollouts, critic.weights)
            self._watch_for_hung_workers(rollouts)
            try:
                critic_metrics = critic.handle.resolve(critic.metrics)
            except ComponentLost:
                self._recover(rollouts, policy)
                continue
            ahead = self.iteration + 1 + self.cfg.rollout.max_lag
            if self._may_roll_ahead(ahead):
                self._ahead[ahead] = self.collect_rollouts(policy.weights, critic.weights, ahead,
                                                           version=self.iteration + 1)
            try:
                policy_metrics = policy.handle.resolve(policy.metrics)
            except ComponentLost:
                self.system.buffer.ping()  # name a lost buffer rather than the learner it fed
                raise
            break
        else:
            raise RolloutError(
                f"rollout blocks failed {self.cfg.rollout.max_restarts + 1} times (rollout.max_restarts); "
                "the workers keep dying"
            )
        self._critic_weights, self._policy_weights = critic.weights, policy.weights
        self._count_rollouts(rollouts)  # first: non-finite samples make both updates non-finite too
        self._count_nonfinite(critic_metrics, "critic")
        self._count_nonfinite(policy_metrics, "policy")
        return critic_metrics, policy_metrics

    def update_critic(self, rollouts: Rollouts) -> Pending:
        """Submit one critic + baseline update per block (Eq. 23 or Eq. 22); the call returns the
        metrics and the critic's new weights (its publication)."""
        critic = self.system.critic
        metrics, weights = critic.call("update_and_publish", *rollouts.blocks(), num_returns=2)
        return Pending(critic, metrics, weights)

    def update_policy(self, rollouts: Rollouts, critic_weights: Any) -> Pending:
        """Submit the generator phase: the blocks replace the last iteration's in the buffer, the
        learner takes n_generator policy steps on buffer samples with rewards relabelled by
        ``critic_weights`` and returns its metrics and theta's next version."""
        a = self.cfg.algo
        data = None
        if self.data_need != "none":
            metas = [self._meta(block_id, rollouts.version) for block_id in rollouts.ids]
            data = self.system.buffer.call("refill", rollouts.blocks(), metas, self.data_need, a.n_generator,
                                           a.batch_size, self.cfg.seed * 1_000_003 + self.iteration)
        learner = self.system.learner
        metrics, weights = learner.call("update_and_publish", data, critic_weights, num_returns=2)
        return Pending(learner, metrics, weights)

    def _count_rollouts(self, rollouts: Rollouts) -> None:
        a = self.cfg.algo
        self.counters["blocks"] += len(rollouts.ids)
        self.counters["chains"] += len(rollouts.ids) * a.batch_size
        self.counters["transitions"] += len(rollouts.ids) * a.batch_size * len(self._steps())
        summaries = [call.worker.resolve(call.out[-1]) for call in rollouts.calls]  # done by now
        self._call_seconds.extend(s["seconds"] for s in summaries if "seconds" in s)
        # A block with a non-finite chain counts like a non-finite update: one per block, as the critic's.
        self._count_nonfinite([{SKIPPED: float(n > 0)} for s in summaries for n in s.get("nonfinite_chains", [])],
                              "rollout")
        self._rollout_reward = sum(s["reward_mean"] for s in summaries) / len(summaries)
        # Versions the rollouts ran behind the learner (0 in sync mode; the metric to watch in async).
        self._weights_lag = self.iteration - min(s["policy_version"] for s in summaries)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _steps(self) -> tuple[int, ...]:
        if self._trainable_steps is None:
            from sftrl.components import schedule_of

            schedule = schedule_of(self.cfg)
            floor = self.cfg.diffusion.final_step_std
            self._trainable_steps = tuple(k for k, s in enumerate(schedule.sigma) if s > 0 or floor > 0)
        return self._trainable_steps

    def _meta(self, block_id: str, version: int) -> BlockMeta:
        return BlockMeta(block_id, version, self.cfg.algo.batch_size, self._steps())

    def _count_nonfinite(self, metrics: list[dict[str, float]], component: str) -> None:
        """Count skipped (non-finite) updates, or rollout blocks holding a non-finite chain
        (``component`` "rollout"); K in a row for one component stops the run."""
        key = f"nonfinite_streak_{component}"
        for m in metrics:
            if m.get(SKIPPED, 0.0):
                self.counters["nonfinite_total"] += 1
                self.counters[key] = self.counters.get(key, 0) + 1
            else:
                self.counters[key] = 0
        limit = self.cfg.trainer.max_nonfinite_updates
        if self.counters[key] >= limit:
            what = ("rollout blocks with non-finite chains" if component == "rollout"
                    else f"non-finite {component} updates")
            raise NonFiniteError(
                f"{self.counters[key]} {what} in a row (limit trainer.max_nonfinite_updates = {limit}); the last "
                "good checkpoint is kept. Lower the learning rates, set algo.max_grad_norm, or check the data for NaNs."
            )

    def evaluate(self) -> None:
        """Start scoring the learner's sampler weights (the EMA when kept) in the background;
        ``collect_evaluations`` logs the result."""
        if self.evaluate_weights is None:
            return
        learner = self.system.learner
        version, weights = learner.resolve(learner.call("get_sampler_weights"))
        future = self._evaluation_pool.submit(self._timed_evaluation, weights)
        self._evaluating.append((self.iteration, version, future))
        self._last_evaluated = self.iteration

    def _timed_evaluation(self, weights: Any) -> dict[str, Any]:
        result = dict(self.evaluate_weights(weights))
        result["elapsed_s"] = time.monotonic() - self.started  # time-to-quality, evaluation included
        return result

    def collect_evaluations(self, *, wait: bool = False) -> list[dict[str, Any]]:
        """Log the evaluations that have finished (all of them with ``wait``), in order. An
        evaluation that failed (non-finite samples, a metric's error) is an ``evaluation_failed``
        event and a warning: the run goes on, and checkpoints."""
        done = []
        while self._evaluating and (wait or self._evaluating[0][2].done()):
            iteration, version, future = self._evaluating.pop(0)
            try:
                result = {"iteration": iteration, "policy_version": version, **future.result()}
            except Exception as err:  # any metric's failure: the run's weights are not at stake
                detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"warning: the evaluation at iteration {iteration} failed ({detail})", file=sys.stderr)
                self.events.append({"iteration": iteration, "event": "evaluation_failed", "detail": detail})
                self.log.write({"iteration": iteration, "event": "evaluation_failed", "detail": detail})
                continue
            self.evaluations.append(result)
            self.log.write({"iteration": iteration, **{f"eval/{k}": v for k, v in result.items() if k != "iteration"}})
            done.append(result)
        return done

    def state(self) -> dict[str, Any]:
        """Everything needed to resume (loaded with weights_only=True). Evaluations still running
        are not in it (the curve of a run resumed after a crash may miss them). Workers keep no
        random state (a block's noise follows its id). Rollouts asked for ahead before a stop
        request may be in flight at a stop's checkpoint: in sync mode the resumed run collects
        the same blocks again; in async mode they ran older weights, which the checkpoint does
        not keep, so the resumed run's pipeline restarts (sound, but not bit for bit)."""
        self.collect_evaluations()
        s = self.system
        learner_state = s.learner.call("state_dict")
        critic_state = s.critic.call("state_dict")
        buffer_state = s.buffer.call("state")
        return {
            "iteration": self.iteration,
            "config": to_dict(self.cfg),
            "learner": s.learner.resolve(learner_state),
            "critic": s.critic.resolve(critic_state),
            "buffer": s.buffer.resolve(buffer_state),
            "counters": dict(self.counters),
            "evaluations": json.dumps(self.evaluations),
            "events": json.dumps(self.events),
        }

    def restore(self, state: dict[str, Any]) -> None:
        s = self.system
        futures = [s.learner.call("load_state_dict", state["learner"]), s.critic.call("load_state_dict", state["critic"])]
        for handle, future in zip([s.learner, s.critic], futures):
            handle.resolve(future)
        self.iteration = int(state["iteration"])
        self.counters.update(state["counters"])
        self.evaluations = json.loads(state["evaluations"])
        self._last_evaluated = self.evaluations[-1]["iteration"] if self.evaluations else -1
        self.events = json.loads(state.get("events", "[]"))
        self._critic_weights = s.critic.call("get_weights")
        self._policy_weights = None
        self._ahead = {}
        self._saved = (self.iteration, len(self.evaluations), len(self.events))  # what it was restored from
        for note in self.log.repair(self.iteration):
            print(f"note: {note}", file=sys.stderr)

    def checkpoint(self) -> Path | None:
        """Save the state as the current iteration's checkpoint; None when that checkpoint exists
        and nothing it records has changed since (a stop right after a scheduled checkpoint)."""
        self.collect_evaluations()
        mark = (self.iteration, len(self.evaluations), len(self.events))
        if mark == self._saved:
            return None
        path = save_checkpoint(self.run_dir, self.iteration, self.state(), self.cfg.trainer.keep_checkpoints)
        self._saved = mark
        return path

    def log_iteration(self, metrics: dict[str, float]) -> None:
        """One metrics line: the iteration, ``step()``'s metrics and the counters."""
        self.log.write({"iteration": self.iteration, **metrics, **{f"counters/{k}": v for k, v in self.counters.items()}})

    def fit(self, *, on_iteration: Callable[[Trainer], None] | None = None) -> None:
        """Run to ``trainer.iterations``, evaluating, logging and checkpointing on schedule."""
        t = self.cfg.trainer
        if self.iteration == 0 and not self.evaluations:
            self.evaluate()
        postfix: dict[str, float] = {}
        with Progress(t.iterations, "fine-tune", enabled=self.progress, initial=self.iteration) as bar:
            while self.iteration < t.iterations:
                metrics = self.step()
                if self.iteration % t.log_every == 0 or self.iteration == t.iterations:
                    self.log_iteration(metrics)
                postfix["ipm"] = metrics.get("critic/ipm_gap", float("nan"))
                if t.eval_every and self.iteration % t.eval_every == 0 and self.iteration < t.iterations:
                    self.evaluate()
                for result in self.collect_evaluations():  # the latest finished score stays shown
                    postfix["sw2" if "sw2_mean" in result else "fid"] = result.get("sw2_mean", result.get("fid", float("nan")))
                if t.checkpoint_every and self.iteration % t.checkpoint_every == 0 and self.iteration < t.iterations:
                    self.checkpoint()
                bar.update(1, **postfix)
                if on_iteration is not None:
                    on_iteration(self)
                if self.stop_requested:
                    break
        if not self.stop_requested and self._last_evaluated != self.iteration:
            self.evaluate()  # the final evaluation (skipped on a signal stop, which keeps the state)
        self.collect_evaluations(wait=True)
        self.checkpoint()
