"""The run's best sampler: the evaluated weights with the lowest score so far, kept beside the
checkpoints as ``RUN/best-sampler.pt`` (``trainer.keep_best``).

A fine-tuned sampler can drift back after its best evaluation (digits, seed 0: FID 5.4 at
iteration 200, 7.8 at 250); the last checkpoint then holds a worse sampler than the run has seen.
The file is an sftrl sampler checkpoint (``sftrl.pretraining.SAMPLER_FORMAT``) with a ``best``
entry (the iteration, the metric and its value), so ``sftrl sample / export / eval RUN --best``
read it and ``model.checkpoint=RUN/best-sampler.pt`` starts another run from it. The score is the
FID where an evaluation has one, else the mean SW2; lower is better for both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

BEST_FILE = "best-sampler.pt"
METRICS = ("fid", "sw2_mean")  # the first an evaluation holds is its score


def score_of(result: dict[str, Any]) -> tuple[str, float] | None:
    """``(metric, value)`` an evaluation is ranked by (lower is better), or None when it has no
    finite one (FID skipped for want of the Inception weights, a NaN)."""
    for metric in METRICS:
        value = result.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return metric, float(value)
    return None


def best_of(evaluations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation with the lowest score (the earliest of equals), or None."""
    scored = [(score[1], i) for i, e in enumerate(evaluations) if (score := score_of(e)) is not None]
    return evaluations[min(scored)[1]] if scored else None


def is_new_best(result: dict[str, Any], before: list[dict[str, Any]]) -> bool:
    """Whether ``result`` scores below every evaluation in ``before`` (a run scores all its
    evaluations by one metric)."""
    score, best = score_of(result), best_of(before)
    best_score = score_of(best) if best is not None else None
    return score is not None and (best_score is None or score[1] < best_score[1])


def best_entry(result: dict[str, Any]) -> dict[str, Any]:
    """The ``best`` entry of the file: the iteration, weights version, metric and value."""
    score = score_of(result)
    assert score is not None, "only a scored evaluation is kept"
    return {"iteration": int(result["iteration"]), "policy_version": int(result.get("policy_version", -1)),
            "metric": score[0], "value": score[1]}


def save_best(run_dir: Path, state: dict[str, Any], cfg, entry: dict[str, Any]) -> Path:
    """Write the evaluated sampler weights ``state`` (name -> array or tensor) as the run's best
    sampler, atomically: the file is the old best or the new one, never a part."""
    from sftrl.files import torch_save_atomic
    from sftrl.pretraining import sampler_checkpoint_of_state

    tensors = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
               for k, v in state.items()}
    ckpt = sampler_checkpoint_of_state(tensors, cfg, {})
    ckpt["best"] = dict(entry)
    return torch_save_atomic(ckpt, Path(run_dir) / BEST_FILE)


def load_best(run_dir: Path) -> dict[str, Any] | None:
    """``RUN/best-sampler.pt`` as read (tensors memory-mapped), None where there is no such file;
    an unreadable file, or one without a ``best`` entry, raises
    :class:`sftrl.pretraining.SamplerCheckpointError` naming it."""
    from sftrl.pretraining import SAMPLER_FORMAT, SamplerCheckpointError, read_torch_file

    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != SAMPLER_FORMAT or not isinstance(ckpt.get("best"), dict):
        raise SamplerCheckpointError(f"'{path}' is not a best sampler of an sftrl run (expected format "
                                     f"'{SAMPLER_FORMAT}' with a 'best' entry)")
    return ckpt


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The ``best`` entry of ``RUN/best-sampler.pt`` (None where there is no such file)."""
    ckpt = load_best(run_dir)
    return dict(ckpt["best"]) if ckpt is not None else None
