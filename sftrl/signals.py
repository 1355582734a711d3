"""What SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, a scheduler) do, in each phase of a command.

==============================  =================================================================
phase                           a signal ...
==============================  =================================================================
until Ray has started           SIGTERM is held (``sigterm_held``): Ray's start installs a handler
                                that aborts with a stack dump, and threads started meanwhile keep
                                SIGTERM blocked, so it reaches the main thread afterwards
until fine-tuning               ends the command like Ctrl-C (``interrupt_on_sigterm``): through
                                ``finally`` blocks, so Ray and the actors are shut down
fine-tuning, pictures, report   the first asks for a checkpoint after this iteration and a stop,
                                a second stops at once (``StopOnSignal``)
a checkpoint's renames          waits until they are done (``deferred``): never half a checkpoint
==============================  =================================================================

Python runs signal handlers in the main thread only; in another thread these do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside fine-tuning, or a ``second`` one during it."""

    def __init__(self, signum: int, *, second: bool = False):
        super().__init__(("second " if second else "") + signal.Signals(signum).name)
        self.signum = signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """Block SIGTERM until ``interrupt_on_sigterm`` takes it (or the block ends: the handler and
    the mask are restored)."""
    if not _in_main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM ends the command like Ctrl-C (an ``Interrupted`` raised in the main
    thread, so ``finally`` blocks shut Ray and the actors down)."""
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


class StopOnSignal:
    """During fine-tuning: the first SIGINT/SIGTERM sets ``trainer.stop_requested`` (it checkpoints
    after the current iteration and stops); a second raises ``Interrupted(second=True)``."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Interrupted(signum, second=True)
        self.signum = signum
        self.trainer.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: checkpointing after this iteration, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving in the block are recorded and raised again once it is done."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for number in caught:
            signal.raise_signal(number)
