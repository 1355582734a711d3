"""What a run counts and the faults it met: kept with every checkpoint, shown in the report."""

from __future__ import annotations

import dataclasses
from typing import Any

COUNTER_NAMES = (
    "blocks",  # rollout blocks collected (each block id once)
    "chains",
    "transitions",
    "nonfinite_total",  # updates skipped (and rollout blocks dropped) for non-finite numbers
    "nonfinite_streak_critic",
    "nonfinite_streak_policy",
    "nonfinite_streak_rollout",
    "worker_failures",  # rollout worker deaths (a death counts once, whatever it failed)
)


@dataclasses.dataclass
class RunLedger:
    """``counters`` by name and ``events``: ``{"iteration", "event", "detail"}`` dicts, oldest first
    (``worker_lost``, ``worker_hung``, ``blocks_lost``, ``evaluation_failed``)."""

    counters: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def event(self, iteration: int, kind: str, detail: str) -> None:
        self.events.append({"iteration": iteration, "event": kind, "detail": detail})
