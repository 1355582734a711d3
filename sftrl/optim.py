"""One guarded optimiser step, shared by every learner.

Optimisers and clipping here use ``foreach=True``: on CPU torch otherwise loops over the
parameters in Python, and the toy networks' steps are dominated by that per-tensor overhead
(a pretraining step: 2.07 -> 1.84 ms on one core). On GPU it is torch's default already.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

GRAD_NORM = "grad_norm"
SKIPPED = "skipped_nonfinite"


def gradient_step(
    loss: torch.Tensor,
    optimizers: Iterable[torch.optim.Optimizer],
    parameters: list[torch.nn.Parameter],
    max_grad_norm: float | None,
    reduce: Callable[[list[torch.nn.Parameter]], None] | None = None,
) -> dict[str, float]:
    """Backward, clip the joint gradient norm at ``max_grad_norm`` (None: no clipping), step.

    A non-finite loss or gradient skips the update entirely (no optimiser moves) and reports
    ``skipped_nonfinite = 1`` so the caller can count and stop after too many in a row.

    ``reduce`` (learners that share each batch, ``sftrl.algos.base.Shard``) combines every
    learner's gradients before the clip: each then holds the whole batch's gradient. A learner
    whose loss is non-finite still takes part (its NaN reaches every learner, which all skip).
    """
    optimizers = list(optimizers)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if reduce is None and not torch.isfinite(loss):
        return {GRAD_NORM: float("nan"), SKIPPED: 1.0}
    loss.backward()
    if reduce is not None:
        reduce(parameters)
    norm = torch.nn.utils.clip_grad_norm_(
        parameters, max_grad_norm if max_grad_norm is not None else math.inf, foreach=True
    )
    if not torch.isfinite(norm):
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return {GRAD_NORM: float("nan"), SKIPPED: 1.0}
    for opt in optimizers:
        opt.step()
    return {GRAD_NORM: norm.item(), SKIPPED: 0.0}
