"""The driver: Algorithm 1 over the components' clients, with evaluation, the run log and
checkpoints. The same loop runs local objects or Ray actors (``sftrl.handles``).

The loop's helpers each live in a file named after them: the rollout workers and their faults
(``rollout_pool``), rollouts asked for ahead (``read_ahead``), evaluations in the background
(``background_evaluation``), the run log (``runlog``), counters and events (``ledger``), and
what the config derives (``plan``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftrl.background_evaluation import BackgroundEvaluation, Evaluate, Finished
from sftrl.best import BEST_FILE, best_entry, best_of, is_new_best, read_best, save_best, score_of
from sftrl.buffer import BlockMeta
from sftrl.checkpoint import save_checkpoint
from sftrl.clients import Future, Metrics
from sftrl.config import Config
from sftrl.configtools import to_dict
from sftrl.critic import UPDATE_S
from sftrl.handles import ComponentLost
from sftrl.learner import DATA_BYTES, GATHER_S, PHASE_S
from sftrl.ledger import RunLedger
from sftrl.optim import SKIPPED
from sftrl.plan import RunPlan
from sftrl.pretraining import SamplerCheckpointError
from sftrl.progress import Progress
from sftrl.read_ahead import ReadAhead
from sftrl.rollout_pool import RolloutError, RolloutPool, Rollouts
from sftrl.runlog import MetricsLog
from sftrl.system import System


@dataclasses.dataclass(frozen=True)
class Pending:
    """A submitted update: its metrics and the weights it publishes (futures)."""

    metrics: Future
    weights: Future


class NonFiniteError(RuntimeError):
    """Too many non-finite updates (or rollout blocks) in a row: the run stops with its last good
    checkpoint."""


class DivergedError(RuntimeError):
    """An evaluation scored above ``trainer.stop_above_best`` times the run's best: the run stops
    with its last checkpoint and its best sampler (``sftrl.best``) kept."""


# What the components measure of themselves: summed into time/ and bytes/ lines, not averaged.
OWN_MEASURES = (UPDATE_S, PHASE_S, DATA_BYTES, GATHER_S)


def mean_metrics(entries: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """Average each metric over a phase's steps, NaNs ignored; keys become ``prefix/name``."""
    out: dict[str, float] = {}
    for key in {k for e in entries for k in e} - set(OWN_MEASURES):
        values = [e[key] for e in entries if key in e and not math.isnan(e[key])]
        out[f"{prefix}/{key}"] = sum(values) / len(values) if values else float("nan")
    return out


class Trainer:
    """Algorithm 1 over a ``System``: ``step()`` is one iteration, ``fit()`` runs
    ``trainer.iterations`` of them, evaluating, logging and checkpointing on schedule."""

    def __init__(
        self,
        cfg: Config,
        system: System,
        run_dir: Path,
        evaluate: Evaluate | None = None,
        *,
        progress: bool = True,
        log_sinks: tuple = (),
        started: float | None = None,
    ):
        """``evaluate(weights) -> dict`` scores sampler weights (None: no evaluation);
        ``started``: the ``time.monotonic()`` the command began at (pretraining included), from
        which every evaluation's ``elapsed_s`` counts."""
        self.cfg = cfg
        self.plan = RunPlan.of(cfg)
        self.system = system
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", log_sinks)
        self.ledger = RunLedger()
        # a lost block is told from a present one by the critic, which reads the blocks next
        self.pool = RolloutPool(system.workers, cfg.rollout, self.plan.batch_size, self.ledger, system.critic.available)
        self.read_ahead = ReadAhead(self.collect_rollouts, iterations=cfg.trainer.iterations,
                                    checkpoint_every=cfg.trainer.checkpoint_every, max_lag=cfg.rollout.max_lag)
        started = time.monotonic() if started is None else started
        self.background = BackgroundEvaluation(evaluate, started) if evaluate is not None else None
        self.iteration = 0
        self.evaluations: list[dict[str, Any]] = []
        self.stop_requested = False
        self._last_evaluated = -1  # the iteration of the last evaluation started
        self._critic_weights: Future = system.critic.get_weights()
        self._policy_weights: Future | None = None  # theta's latest published version
        self._rollout_reward = float("nan")
        self._rollout_s = self._rollout_bytes = 0.0
        self._weights_lag = 0
        self._previous_end: float | None = None  # perf_counter() at the end of the last step
        self._saved: tuple | None = None  # (iteration, evaluations, events) of the last checkpoint
        self.diverged: str | None = None  # why the run stops on its score (trainer.stop_above_best)
        self._said_unscored = False  # warned that an unscored run's best-following reference cannot move

    @property
    def counters(self) -> dict[str, int]:
        return self.ledger.counters

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.ledger.events

    # -- Algorithm 1 ---------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One iteration of Algorithm 1:

        1. publish theta (the learner's last update returned it);
        2. n_critic blocks of m chains roll out with it (asked for ahead where ``read_ahead`` may);
        3. the critic phase: one critic + baseline update per block, then (alpha, omega) published;
        4. the generator phase: n_generator policy steps on buffer samples relabelled by them;
        5. the buffer is cleared (its next refill does it: one buffer call per iteration).
        """
        start = time.perf_counter()
        theta = self.publish_weights()  # 1
        rollouts = self.read_ahead.take(self.iteration) or self.collect_rollouts(  # 2
            theta, self._critic_weights, self.iteration, version=self.iteration)
        self.read_ahead.fill(self.iteration, theta, self._critic_weights, stop_requested=self.stop_requested)
        critic_metrics, policy_metrics = self.update_critic_then_policy(rollouts)  # 3, 4, 5
        self.iteration += 1
        return self.iteration_metrics(critic_metrics, policy_metrics, start)

    def publish_weights(self) -> Future:
        """theta as one object per version: what the learner's last update returned (before the
        first update and after a restore, asked for, with LoRA's frozen base for the workers)."""
        if self._policy_weights is None:
            self._policy_weights = self.system.learner.get_weights()
            if self.cfg.model.lora_rank:  # publications hold the adapters: the workers' base comes once
                self.pool.base = self.system.learner.get_base_weights()
        return self._policy_weights

    def collect_rollouts(self, policy_weights: Future, critic_weights: Future, iteration: int, *,
                         version: int) -> Rollouts:
        """Ask the workers for ``iteration``'s blocks, run with theta's ``version`` (not waited
        for: the critic's call takes the block references directly)."""
        return self.pool.request(self.plan.block_ids(iteration), policy_weights, critic_weights, version)

    def update_critic_then_policy(self, rollouts: Rollouts) -> tuple[Metrics, Metrics]:
        """Steps 3 to 5. Both updates are submitted at once: with Ray the learner starts as soon
        as the critic's weights exist, without a round trip through the driver. A lost rollout
        worker fails the critic's call before the critic moves, and with it the learner's, which
        then never runs; the lost blocks are collected again (up to ``rollout.max_restarts`` times).
        """
        for _attempt in range(self.cfg.rollout.max_restarts + 1):
            critic = self.update_critic(rollouts)
            policy = self.update_policy(rollouts, critic.weights)
            self.pool.watch(rollouts, self.iteration)
            try:
                critic_metrics = self.system.critic.resolve(critic.metrics)
            except ComponentLost:
                self.recover(rollouts, policy)
                continue
            self.read_ahead.ask(self.iteration + 1 + self.cfg.rollout.max_lag, policy.weights, critic.weights,
                                self.iteration + 1, now=self.iteration, stop_requested=self.stop_requested)
            try:
                policy_metrics = self.system.learner.metrics(policy.metrics)
            except ComponentLost:
                self.system.buffer.ping()  # name a lost buffer rather than the learner it fed
                raise
            break
        else:
            raise RolloutError(f"rollout blocks failed {self.cfg.rollout.max_restarts + 1} times "
                               "(rollout.max_restarts); the workers keep dying")
        self._critic_weights, self._policy_weights = critic.weights, policy.weights
        self.count(rollouts, critic_metrics, policy_metrics)
        return critic_metrics, policy_metrics

    def update_critic(self, rollouts: Rollouts) -> Pending:
        """Submit one critic + baseline update per block (Eq. 23 or Eq. 22); the call returns the
        metrics and the critic's new weights (its publication)."""
        return Pending(*self.system.critic.update_and_publish(rollouts.blocks()))

    def update_policy(self, rollouts: Rollouts, critic_weights: Future) -> Pending:
        """Submit the generator phase: the blocks replace the last iteration's in the buffer, the
        learner takes n_generator policy steps on buffer samples with rewards relabelled by
        ``critic_weights``, and returns its metrics and theta's next version."""
        p = self.plan
        if p.data_need == "none":
            return Pending(*self.system.learner.update_and_publish(None, critic_weights))
        metas = [BlockMeta(block_id, rollouts.version, p.batch_size, p.trainable_steps) for block_id in rollouts.ids]
        draw = self.system.buffer.refill(rollouts.blocks(), metas, p.data_need, p.n_generator, p.batch_size,
                                         p.seeds.buffer_draw(self.iteration))
        # The learner gathers the drawn transitions from the blocks themselves: with Ray its node
        # fetches them while the critic works on them, and neither the buffer nor the driver does.
        return Pending(*self.system.learner.update_and_publish(draw, critic_weights, rollouts.blocks()))

    def recover(self, rollouts: Rollouts, policy: Pending) -> None:
        """After a failed critic call: name a dead learner or critic, else have the pool collect
        the lost blocks again. The learner's call of this attempt failed with the critic's (its
        input) and never ran; the buffer forgets this attempt's blocks, added again on the retry."""
        s = self.system
        s.learner.ping()  # raises ComponentLost naming the learner if it is gone
        s.critic.ping()
        try:
            s.learner.metrics(policy.metrics)
        except ComponentLost:
            pass  # expected: its critic weights never came
        else:
            raise RolloutError("the critic update failed but the policy update it feeds succeeded")
        if self.plan.data_need != "none":
            s.buffer.resolve(s.buffer.discard(rollouts.ids))
        self.pool.recover(rollouts, self.iteration)

    # -- counting --------------------------------------------------------------------------------

    def count(self, rollouts: Rollouts, critic_metrics: Metrics, policy_metrics: Metrics) -> None:
        """Counters, the rollouts' reward and lag, and the non-finite guard: rollout blocks first
        (non-finite samples make both updates non-finite too), then the two updates."""
        summaries = self.pool.summaries(rollouts)
        blocks = len(rollouts.ids)
        self.counters["blocks"] += blocks
        self.counters["chains"] += blocks * self.plan.batch_size
        self.counters["transitions"] += blocks * self.plan.transitions_per_block
        self._rollout_reward = sum(s["reward_mean"] for s in summaries) / len(summaries)
        self._rollout_s = max(s.get("seconds", 0.0) for s in summaries)
        self._rollout_bytes = float(sum(s.get("bytes", 0) for s in summaries))
        # Versions the rollouts ran behind the learner (0 in sync mode; the metric to watch in async).
        self._weights_lag = self.iteration - min(s["policy_version"] for s in summaries)
        self._count_nonfinite([{SKIPPED: float(n > 0)} for s in summaries for n in s.get("nonfinite_chains", [])],
                              "rollout")
        self._count_nonfinite(critic_metrics, "critic")
        self._count_nonfinite(policy_metrics, "policy")

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

    def iteration_metrics(self, critic_metrics: Metrics, policy_metrics: Metrics, start: float) -> dict[str, float]:
        """What ``step`` returns. ``time/iteration_s`` is the wall time since the previous
        iteration ended (what an iteration costs, the driver's logging and checkpoints included)."""
        end = time.perf_counter()
        seconds = end - (self._previous_end if self._previous_end is not None else start)
        self._previous_end = end
        return {
            **mean_metrics(critic_metrics, "critic"),
            **mean_metrics(policy_metrics, "policy"),
            "rollout/reward_mean": self._rollout_reward,
            "rollout/weights_lag": self._weights_lag,
            "time/iteration_s": seconds,
            # Where it went: the slowest rollout call, the critic's updates, the generator phase
            # (each measured inside its component; the rest is transfers, waiting and the driver).
            "time/rollout_s": self._rollout_s,
            "time/critic_s": sum(m.get(UPDATE_S, 0.0) for m in critic_metrics),
            "time/learner_s": sum(m.get(PHASE_S, 0.0) for m in policy_metrics),
            "time/learner_gather_s": sum(m.get(GATHER_S, 0.0) for m in policy_metrics),
            "bytes/rollout_blocks": self._rollout_bytes,
            "bytes/policy_batch": sum(m.get(DATA_BYTES, 0.0) for m in policy_metrics),
            "throughput/rollout_chains_per_s": self.plan.chains_per_iteration / seconds,
            "throughput/policy_transitions_per_s": len(policy_metrics) * self.plan.batch_size / seconds,
        }

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Start scoring the learner's sampler weights (the EMA when kept) in the background;
        ``collect_evaluations`` logs the result."""
        if self.background is None:
            return
        weights = self.system.learner.resolve(self.system.learner.get_sampler_weights())
        self.background.start(self.iteration, weights.version, weights.state)
        self._last_evaluated = self.iteration
        if self.plan.reference_follows_best:  # scored before the next update: the same anchor in every run
            self.collect_evaluations(wait=True)

    def collect_evaluations(self, *, wait: bool = False) -> list[dict[str, Any]]:
        """Log the evaluations that have finished (all of them with ``wait``), in order. One that
        failed (non-finite samples, a metric's error) is an ``evaluation_failed`` event and a
        warning: the run goes on, and checkpoints."""
        done = []
        for finished in self.background.finished(wait=wait) if self.background else []:
            if finished.result is None:
                print(f"warning: the evaluation at iteration {finished.iteration} failed ({finished.error})",
                      file=sys.stderr)
                self.ledger.event(finished.iteration, "evaluation_failed", finished.error or "")
                self.log.write({"iteration": finished.iteration, "event": "evaluation_failed",
                                "detail": finished.error})
                continue
            result = {"iteration": finished.iteration, "policy_version": finished.version, **finished.result}
            drawn = result.pop("pictures", None)  # arrays, not metrics
            self.evaluations.append(result)
            self.log.write({"iteration": finished.iteration,
                            **{f"eval/{k}": v for k, v in result.items() if k != "iteration"}})
            if drawn:
                self.save_pictures(finished.iteration, drawn)
            if self.plan.reference_follows_best and score_of(result) is None:
                self.warn_unscored_reference(result)
            if finished.weights is not None and is_new_best(result, self.evaluations[:-1]):
                if self.cfg.trainer.keep_best:
                    self.keep_best(finished, result)
                if self.plan.reference_follows_best:
                    self.move_reference(finished)
            self.diverged = self.diverged or self.divergence(result)
            done.append(result)
        return done

    def warn_unscored_reference(self, result: dict[str, Any]) -> None:
        """Once per run (its evaluations are all alike): a reference that follows the best cannot
        move when the evaluations have no score, so the KL stays anchored at theta_0."""
        if self._said_unscored:
            return
        self._said_unscored = True
        why = "the FID is skipped, as said above" if result.get("fid_skipped") else "no FID or SW2"
        print(f"warning: algo.{self.cfg.algo.name}.reference is 'best', but this run's evaluations have no score "
              f"({why}), so the KL stays anchored at the pretrained sampler; make the FID available "
              "(`sftrl weights inception` or trainer.fid_weights=FILE), or use 'pretrained'", file=sys.stderr)

    def keep_best(self, finished: Finished, result: dict[str, Any]) -> None:
        """Save the scored weights of a new best evaluation as ``RUN/best-sampler.pt``
        (``trainer.keep_best``)."""
        try:
            save_best(self.run_dir, finished.weights, self.cfg, best_entry(result))
        except OSError as err:  # a copy beside the run's state: its loss must not stop the training
            detail = f"{self.run_dir / BEST_FILE} not written ({type(err).__name__}: {err}); the previous one, if any, is kept"
            print(f"warning: the best sampler (iteration {finished.iteration}): {detail}; the run goes on", file=sys.stderr)
            self.ledger.event(finished.iteration, "best_sampler_not_saved", detail)
            self.log.write({"iteration": finished.iteration, "event": "best_sampler_not_saved", "detail": detail})

    def move_reference(self, finished: Finished) -> None:
        """Move the learner's reference (an algorithm's KL anchor) to the scored weights of a new
        best evaluation (``PolicyAlgorithm.reference_follows_best``)."""
        learner = self.system.learner
        learner.resolve(learner.set_reference(finished.weights, finished.iteration))
        self.log.write({"iteration": finished.iteration, "event": "reference_moved",
                        "detail": f"the KL's reference is the sampler of iteration {finished.iteration}"})

    def divergence(self, result: dict[str, Any]) -> str | None:
        """Why the run stops (``trainer.stop_above_best``): the evaluation scored above that
        multiple of the run's best; else None."""
        limit = self.cfg.trainer.stop_above_best
        score, best = score_of(result), best_of(self.evaluations)
        best_score = score_of(best) if best is not None else None
        if (not limit or score is None or best is None or best_score is None or best_score[1] <= 0
                or score[1] <= limit * best_score[1]):
            return None  # (a best of 0 has no multiple to exceed)
        metric, value = score
        kept = (f"the best sampler is kept in {self.run_dir / BEST_FILE}" if self.cfg.trainer.keep_best
                else "trainer.keep_best is off, so no best sampler was kept")
        return (f"the evaluation at iteration {result['iteration']} scored {metric} {value:.4g}, "
                f"{value / best_score[1]:.3g}x the run's best ({best_score[1]:.4g} at iteration {best['iteration']}; "
                f"limit trainer.stop_above_best = {limit:g}): the run has diverged and stops; {kept}. "
                "Lower algo.policy_lr, or raise trainer.stop_above_best (0: never stop on the score)")

    def save_pictures(self, iteration: int, drawn: dict[str, Any]) -> None:
        """An evaluation's pictures (``{"samples": uint8 grid}``) as
        ``<run>/samples/<name>-<iteration>.png`` and TensorBoard images (``eval/<name>``), and
        ``curves.png`` drawn again with the new evaluation in it."""
        from sftrl import pictures

        for name, grid in drawn.items():
            pictures.save_png(grid, self.run_dir / "samples" / f"{name}-{iteration:06d}.png")
            for sink in self.log.sinks:
                if hasattr(sink, "image"):
                    sink.image(f"eval/{name}", grid, iteration, dataformats="HWC" if grid.ndim == 3 else "HW")
        pictures.training_curves(self.log.read(), self.run_dir / "curves.png")

    # -- saving and restoring --------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything needed to resume (loaded with weights_only=True). Evaluations still running
        are not in it (the curve of a run resumed after a crash may miss them). Workers keep no
        random state (a block's noise follows its id). Rollouts asked for ahead before a stop
        request may be in flight at a stop's checkpoint: in sync mode the resumed run collects
        the same blocks again; in async mode they ran older weights, which the checkpoint does
        not keep, so the resumed run's pipeline restarts (sound, but not bit for bit)."""
        self.collect_evaluations()
        s = self.system
        learner, critic, buffer = s.learner.state_dict(), s.critic.state_dict(), s.buffer.state()
        return {
            "iteration": self.iteration,
            "config": to_dict(self.cfg),
            "learner": s.learner.resolve(learner),
            "critic": s.critic.resolve(critic),
            "buffer": s.buffer.resolve(buffer),
            "counters": dict(self.counters),
            "evaluations": json.dumps(self.evaluations),
            "events": json.dumps(self.events),
        }

    def restore(self, state: dict[str, Any]) -> None:
        s = self.system
        loads = [s.learner.load_state_dict(state["learner"]), s.critic.load_state_dict(state["critic"])]
        s.learner.resolve(loads[0])
        s.critic.resolve(loads[1])
        self.iteration = int(state["iteration"])
        self.counters.update(state["counters"])
        self.evaluations = json.loads(state["evaluations"])
        self._last_evaluated = self.evaluations[-1]["iteration"] if self.evaluations else -1
        self.ledger.events[:] = json.loads(state.get("events", "[]"))
        self._critic_weights = s.critic.get_weights()
        self._policy_weights = None
        self.read_ahead.clear()
        self._saved = (self.iteration, len(self.evaluations), len(self.events))  # what it was restored from
        for note in self.log.repair(self.iteration):
            print(f"note: {note}", file=sys.stderr)
        try:
            kept = read_best(self.run_dir) if self.cfg.trainer.keep_best else None
        except SamplerCheckpointError as err:
            print(f"warning: {err}; the resumed run writes a new one at its next best evaluation", file=sys.stderr)
            kept = None
        if kept and kept.get("iteration", -1) > self.iteration:
            print(f"note: {BEST_FILE} holds the sampler of iteration {kept['iteration']}, after the checkpoint this "
                  f"run resumes from (iteration {self.iteration}); the resumed run's own evaluations replace it "
                  "where they score better than the best before that checkpoint", file=sys.stderr)

    def checkpoint(self) -> Path | None:
        """Save the state as the current iteration's checkpoint; None when that checkpoint exists
        and nothing it records has changed since (a stop right after a scheduled checkpoint), or
        when the run has diverged (``trainer.stop_above_best``)."""
        self.collect_evaluations()
        mark = (self.iteration, len(self.evaluations), len(self.events))
        if mark == self._saved or self.diverged:  # a diverged state is not saved over good checkpoints
            return None
        path = save_checkpoint(self.run_dir, self.iteration, self.state(), self.cfg.trainer.keep_checkpoints)
        self._saved = mark
        return path

    # -- the run ---------------------------------------------------------------------------------

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
                if self.diverged:
                    raise DivergedError(self.diverged)
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
        if self.diverged:  # the final evaluation: its state is not saved over the good checkpoints
            raise DivergedError(self.diverged)
        self.checkpoint()
