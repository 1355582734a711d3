"""Progress for long work: a tqdm bar on a terminal, plain periodic lines elsewhere (CI, ray job logs)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_INTERVAL_S = 10.0  # seconds between plain progress lines when stderr is not a terminal


class Progress:
    """``with Progress(total, "pretrain") as p: p.update(1, loss=0.3)``.

    ``initial``: work already done before this process (a resumed run): counted in the total,
    not in the rate or the time left."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "it", stream=None,
                 initial: int = 0):
        self.total = total
        self.initial = initial
        self.desc = desc
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.count = initial
        self.start = time.monotonic()
        self._last_line = self.start
        self._postfix: dict[str, object] = {}
        self._bar = None
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                             initial=initial)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: object) -> None:
        self.count += n
        self._postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= PLAIN_INTERVAL_S:
            self._plain_line()

    def _plain_line(self) -> None:
        now = time.monotonic()
        self._last_line = now
        elapsed = now - self.start
        rate = (self.count - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self._postfix.items())
        print(
            f"[{self.desc}] {self.count}/{self.total} {rate:.1f} {self.unit}/s "
            f"elapsed {elapsed:.0f}s eta {eta:.0f}s {extra}".rstrip(),
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.count > self.initial:
            self._plain_line()
        self.enabled = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
