"""Evaluations in a thread of the driver while training goes on.

The driver mostly waits on the components; an evaluation is seconds of sampling and POT or FID.
Each evaluation scores the weights it was given (the iteration and weights version it started
at are kept with it) and is handed back, in order, once it has finished.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

Evaluate = Callable[[Any], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Finished:
    """One evaluation: its ``result`` (with ``elapsed_s``, seconds since the command began) or the
    ``error`` it raised, as ``"Type: first line"``."""

    iteration: int
    version: int
    result: dict[str, Any] | None
    error: str | None = None
    weights: Any = dataclasses.field(default=None, repr=False)  # what was scored (the best sampler is kept)


class BackgroundEvaluation:
    """``start`` queues an evaluation; ``finished`` returns the ones done, oldest first."""

    def __init__(self, evaluate: Evaluate, started: float):
        """``started``: the ``time.monotonic()`` the command began at (pretraining included)."""
        self.evaluate = evaluate
        self.started = started
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftrl-eval")
        self._running: list[tuple[int, int, Any, Future]] = []

    def start(self, iteration: int, version: int, weights: Any) -> None:
        self._running.append((iteration, version, weights, self._pool.submit(self._timed, weights)))

    def _timed(self, weights: Any) -> dict[str, Any]:
        result = dict(self.evaluate(weights))
        result["elapsed_s"] = time.monotonic() - self.started  # time-to-quality, evaluation included
        return result

    def finished(self, *, wait: bool = False) -> list[Finished]:
        """The evaluations that have finished (all of them with ``wait``), in the order started.
        Any error of a metric is caught here: the run's weights are not at stake."""
        done = []
        while self._running and (wait or self._running[0][3].done()):
            iteration, version, weights, future = self._running.pop(0)
            try:
                done.append(Finished(iteration, version, future.result(), weights=weights))
            except Exception as err:
                first = str(err).splitlines()[0] if str(err) else ""
                done.append(Finished(iteration, version, None, f"{type(err).__name__}: {first}"))
        return done
