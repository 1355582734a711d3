"""Progress lines: what a user watching a long run (or a ``ray job logs``) reads."""

from __future__ import annotations

import io
import re

from sftrl import progress
from sftrl.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_give_rate_and_time_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = io.StringIO()
    with Progress(100, "fine-tune", stream=stream) as bar:
        for _ in range(20):
            clock.now += 1.0
            bar.update(1, sw2=0.0123)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[fine-tune] 10/100 1.0 it/s elapsed 10s eta 90s sw2=0.0123"
    assert lines[-1].startswith("[fine-tune] 20/100 1.0 it/s elapsed 20s eta 80s")


def test_a_resumed_run_counts_only_this_process_work_in_its_rate(monkeypatch):
    """A run resumed at 1000 of 1500 at 5 it/s: 100 s left, not the 4 s that counting the
    resumed iterations as this process's work would promise."""
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = io.StringIO()
    with Progress(1500, "fine-tune", stream=stream, initial=1000) as bar:
        for _ in range(50):
            clock.now += 0.2
            bar.update(1)
    first = stream.getvalue().splitlines()[0]
    count, total, rate, elapsed, eta = map(float, re.fullmatch(
        r"\[fine-tune\] (\d+)/(\d+) ([\d.]+) it/s elapsed (\d+)s eta (\d+)s", first).groups())
    assert (count, total, rate, elapsed, eta) == (1050, 1500, 5.0, 10, 90)


def test_a_resumed_run_with_nothing_left_prints_no_line():
    stream = io.StringIO()
    with Progress(10, "fine-tune", stream=stream, initial=10):
        pass
    assert stream.getvalue() == ""
