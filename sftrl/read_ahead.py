"""Rollouts asked for before their iteration: sync mode's one-step overlap, async mode's lag.

Sync mode (``rollout.max_lag = 0``) asks for iteration j+1's rollouts as soon as iteration j's
critic update is in, with theta's next version as a future: Ray starts them the moment the
learner publishes it, while the driver logs (Algorithm 1 unchanged: the same weights, asked for
earlier). Async mode asks ``max_lag`` iterations further ahead, so iteration j's rollouts run
theta's version j - max_lag.

Never across a checkpoint, which keeps only the current theta: the pipeline restarts from it, so
a resumed run repeats an uninterrupted one bit for bit (sync mode keeps the same rule: one
iteration without overlap per checkpoint). Nor past the last iteration or after a stop request.
"""

from __future__ import annotations

from typing import Protocol

from sftrl.clients import Future
from sftrl.rollout_pool import Rollouts


class Request(Protocol):
    """``Trainer.collect_rollouts``: ask for one iteration's blocks, run with theta's ``version``."""

    def __call__(self, policy: Future, critic: Future, iteration: int, /, *, version: int) -> Rollouts: ...


class ReadAhead:
    """Later iterations' ``Rollouts`` by iteration, asked for with ``request``."""

    def __init__(self, request: Request, *, iterations: int, checkpoint_every: int, max_lag: int):
        self.request = request
        self.iterations = iterations
        self.checkpoint_every = checkpoint_every
        self.max_lag = max_lag
        self.ahead: dict[int, Rollouts] = {}

    def take(self, iteration: int) -> Rollouts | None:
        """The rollouts asked for ``iteration`` ahead of time, if any."""
        return self.ahead.pop(iteration, None)

    def may_ask(self, iteration: int, now: int, stop_requested: bool) -> bool:
        """Whether ``iteration``'s rollouts may be asked for during iteration ``now``."""
        every = self.checkpoint_every
        checkpoint_between = every and (iteration // every) * every > now  # a checkpoint in (now, iteration]
        return iteration < self.iterations and not stop_requested and not checkpoint_between

    def ask(self, iteration: int, policy: Future, critic: Future, version: int, *, now: int,
            stop_requested: bool) -> None:
        """Ask for ``iteration``'s rollouts now, with theta's ``version``, where the rules allow."""
        if iteration not in self.ahead and self.may_ask(iteration, now, stop_requested):
            self.ahead[iteration] = self.request(policy, critic, iteration, version=version)

    def fill(self, now: int, policy: Future, critic: Future, *, stop_requested: bool) -> None:
        """Async mode, where the pipeline (re)starts (the first iteration, after a checkpoint or a
        resume): ask for the next ``max_lag`` iterations' rollouts with the current theta. In the
        steady state each iteration asks for one more, the ``max_lag``-th ahead."""
        for iteration in range(now + 1, now + 1 + self.max_lag):
            if not self.may_ask(iteration, now, stop_requested):
                break
            self.ask(iteration, policy, critic, now, now=now, stop_requested=stop_requested)

    def clear(self) -> None:
        self.ahead.clear()
