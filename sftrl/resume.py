"""Continuing a run: which checkpoint, and whether this command's config may continue it.

``--resume auto`` takes the run directory's newest checkpoint that loads (saying so for each
newer one that does not); ``--resume PATH`` one of the run's own checkpoints. The config must
continue the checkpoint's experiment: it may run longer, log and checkpoint differently, and run
elsewhere (``RESUMABLE_CHANGES``), nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sftrl.checkpoint import latest_checkpoint, load_checkpoint, load_latest_intact
from sftrl.config import Config
from sftrl.configtools import flat_dict, override_key, to_dict
from sftrl.errors import UsageError
from sftrl.rundir import check_checkpoint_belongs

# Keys a resumed run may change: how long it runs, what it logs, where and on what it runs. Any
# other difference from the checkpoint's config would continue a different experiment.
RESUMABLE_CHANGES = ("name", "device", "torch_threads", "trainer.", "ray.", "rollout.num_workers",
                     "rollout.num_cpus_per_worker", "rollout.num_gpus_per_worker", "rollout.max_restarts",
                     "rollout.call_timeout_", "perf.", "pretrain.cache_dir", "data.path")


def resume_state(resume: str, cfg: Config, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """The checkpoint ``--resume`` names (``auto`` or a path), loaded and checked against ``cfg``."""
    if resume == "auto":
        if latest_checkpoint(run_dir) is None:
            if (run_dir / "metrics.jsonl").exists():
                raise UsageError(f"--resume auto: the run in '{run_dir}' stopped before its first checkpoint; start "
                                 f"again in a new --run-dir (or delete '{run_dir}')")
            raise UsageError(f"--resume auto: no checkpoint in '{run_dir / 'checkpoints'}' (give --run-dir of the run)")
        path, state, skipped = load_latest_intact(run_dir)
        for warning in skipped:
            print(f"warning: {warning}", file=sys.stderr)
        if skipped:
            print(f"warning: resuming from '{path}', the newest checkpoint that loads", file=sys.stderr)
    else:
        path = Path(resume)
        check_checkpoint_belongs(path, run_dir)
        state = load_checkpoint(path)
    check_resumable(cfg, state, path, overrides, run_dir)
    return state


def check_resumable(cfg: Config, state: dict, checkpoint: Path, overrides: list[str], run_dir: Path) -> None:
    """The config must continue the checkpoint's experiment, and for at least as many iterations
    (as many only to finish the pictures and the report of a run stopped while writing them)."""
    from sftrl.report import report_is_complete

    before, now = flat_dict(state.get("config", {})), flat_dict(to_dict(cfg))
    fixed = [k for k in now if not k.startswith(RESUMABLE_CHANGES)]
    if cfg.algo.policy_lr_decay == "linear":
        fixed.append("trainer.iterations")  # the decay's length: the rate would jump back up
    changed = [k for k in fixed if k in before and before[k] != now[k]]
    if changed:
        first = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:])})" if len(changed) > 1 else ""
        given = [o for o in overrides if override_key(o) in changed]
        fix = (f"drop {' '.join(given)}" if given and len(given) == len(changed) else
               f"resume with the run's own config: python -m sftrl.run --run-dir {run_dir} --resume auto")
        raise UsageError(
            f"--resume: checkpoint '{checkpoint}' continues a run with {first} = {before[first]!r}, this command "
            f"gives {now[first]!r}{more}; {fix}, or start a new run directory"
        )
    done = int(state["iteration"])
    if cfg.trainer.iterations < done:
        raise UsageError(
            f"--resume: trainer.iterations = {cfg.trainer.iterations} is below the checkpoint's iteration {done}; "
            f"give trainer.iterations >= {done} to continue the run"
        )
    if cfg.trainer.iterations == done and report_is_complete(run_dir, done):
        more = ("its learning-rate decay (algo.policy_lr_decay=linear) ends there, so it cannot be lengthened"
                if cfg.algo.policy_lr_decay == "linear" else f"give trainer.iterations above {done} to continue it")
        raise UsageError(f"--resume: the run already reached trainer.iterations = {done} (checkpoint "
                         f"'{checkpoint}'); {more}")
