"""The one place where "local object or Ray actor" is decided.

Every component is reached through a ``Handle``: ``call(Class.method, *args)`` runs that method of
the component and returns a future, ``resolve(futures)`` waits for them. The method is named by
the function itself (``Learner.update_and_publish``), never by a string, so every call can be
followed to its code; the typed clients of ``sftrl.clients`` make those calls. A
``LocalHandle`` runs the method at once on a plain object (its futures are the values);
``sftrl.distributed`` provides the Ray handle, whose futures are object references that can be
passed straight into other calls without a copy through the driver.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol


class ComponentLost(RuntimeError):
    """A remote component died (its process or node went away) while a call was pending."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name} was lost: {detail}")
        self.name = name


class ResourceError(ValueError):
    """The actors ask for more CPUs or GPUs than a Ray cluster of fixed size has."""


class Handle(Protocol):
    name: str

    def call(self, method: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any: ...

    def resolve(self, futures: Any) -> Any: ...

    def ping(self) -> None: ...

    def available(self, futures: list[Any]) -> list[bool]: ...

    def probe(self) -> Any: ...

    def done(self, future: Any) -> bool: ...

    def wait(self, future: Any, timeout: float) -> bool: ...

    def restart(self) -> None: ...

    def placement(self) -> dict[str, Any]: ...


def component_device(obj: Any) -> str:
    """The torch device a component computes on ("-" for one that holds no tensors' device)."""
    device = getattr(obj, "device", None)
    return str(device) if device is not None else "-"


class LocalHandle:
    """Runs methods in this process; futures are plain values."""

    def __init__(self, obj: Any, name: str):
        self.obj = obj
        self.name = name

    def call(self, method: Callable[..., Any], *args: Any, num_returns: int = 1) -> Any:
        result = getattr(self.obj, method.__name__)(*args)  # by name: a subclass's override runs
        if num_returns != 1:
            result = list(result)
            if len(result) != num_returns:
                raise RuntimeError(f"{self.name}.{method.__name__} returned {len(result)} values, expected {num_returns}")
        return result

    def resolve(self, futures: Any) -> Any:
        return futures

    def ping(self) -> None:
        """Raise ComponentLost if the component is gone (a local object never is)."""

    def available(self, futures: list[Any]) -> list[bool]:
        """Whether each future's value can still be read (a value held here always can)."""
        return [True] * len(futures)

    def probe(self) -> Any:
        """A future that resolves once the component answers (``ping`` without waiting)."""
        return None

    def done(self, future: Any) -> bool:
        """Whether ``resolve(future)`` would return (or raise) at once."""
        return True

    def wait(self, future: Any, timeout: float) -> bool:
        """Whether ``future`` is ready within ``timeout`` seconds (a local call was done at once)."""
        return True

    def restart(self) -> None:
        """Restart a hung component, failing its pending calls (a local object cannot hang apart
        from the driver: nothing to do)."""

    def placement(self) -> dict[str, Any]:
        """Where the component runs: ``{"node": ..., "device": ..., "gpu_ids": [...], "pid": ...}``."""
        return {"node": "local", "device": component_device(self.obj), "gpu_ids": [], "pid": os.getpid()}
