"""``python -m sftrl.run CONFIG [key=value ...]``: pretrain (or load) the sampler, fine-tune it
with Algorithm 1 on Ray (or in-process), evaluate, and write a run directory.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``report.json``,
``report.md``. User mistakes (config, paths, checkpoints) end with a one-line error and exit
code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sftrl
from sftrl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from sftrl.config import Config, load
from sftrl.configtools import ConfigError, dump_yaml
from sftrl.data import load_real_data
from sftrl.pretraining import SamplerCheckpointError

EXIT_USER_ERROR = 2


class UsageError(Exception):
    """A user mistake: reported in one line, exit code 2, nothing written."""


def resolve_config_path(path: str) -> Path:
    """``path`` as given, else relative to the installed package's ``configs/`` (for
    ``ray job submit -- python -m sftrl.run configs/x.yaml`` from any working directory)."""
    given = Path(path)
    if given.is_file():
        return given
    package_root = Path(sftrl.__file__).resolve().parent
    for base in (package_root / "configs", package_root.parent / "configs"):
        candidate = base / given.name
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"config file '{path}' not found (looked in the working directory and in {package_root.parent / 'configs'})"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sftrl.run",
        description="Fine-tune a diffusion sampler with SFT-PG (Algorithm 1) and write a run directory.",
    )
    parser.add_argument("config", help="experiment YAML, e.g. configs/swissroll.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.iterations=200")
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>-<timestamp>/)")
    parser.add_argument("--resume", help="'auto' (the run directory's latest checkpoint) or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    # Overrides may come before or after the options (`CONFIG --run-dir D key=value`).
    return parser.parse_intermixed_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Config, Path, dict | None]:
    """Everything that can fail on user input, before anything is written."""
    cfg = load(resolve_config_path(args.config), args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / (
        f"{cfg.name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    resume_state = None
    if args.resume:
        path = latest_checkpoint(run_dir) if args.resume == "auto" else Path(args.resume)
        if path is None:
            raise UsageError(f"--resume auto: no checkpoint in '{run_dir / 'checkpoints'}' (give --run-dir of the run)")
        resume_state = load_checkpoint(path)
    elif (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"run directory '{run_dir}' already holds a run: pass --resume auto to continue it")
    return cfg, run_dir, resume_state


def build_initial_sampler(cfg: Config, data: np.ndarray, progress: bool):
    from sftrl.components import InitState, fresh_sampler, resolve_device
    from sftrl.pretraining import load_or_pretrain
    from sftrl.weights import to_numpy_state

    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))
    info = load_or_pretrain(cfg, sampler, data, device=resolve_device(cfg), progress=progress)
    return InitState(to_numpy_state(sampler.cpu()), tuple(data.shape[1:])), info


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    try:
        cfg, run_dir, resume_state = prepare(args)
        torch.set_num_threads(cfg.torch_threads)
        data = load_real_data(cfg)
        init, pretrain_info = build_initial_sampler(cfg, data, not args.no_progress)
    except (ConfigError, UsageError, CheckpointError, SamplerCheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return train(cfg, run_dir, init, pretrain_info, data, resume_state, progress=not args.no_progress, started=started)


class StopOnSignal:
    """SIGINT/SIGTERM: the first asks the trainer to checkpoint after the current iteration and
    stop; a second exits at once (through ``finally`` blocks, so Ray is still shut down)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.signum = signum
        self.trainer.stop_requested = True
        print(
            f"\n{signal.Signals(signum).name}: checkpointing after this iteration, then stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def train(
    cfg: Config, run_dir: Path, init, pretrain_info: dict, data, resume_state, *, progress: bool, started: float | None = None
) -> int:
    """Fine-tune and report. Returns 0, 128 + signal when stopped by a signal, 1 on a fatal fault."""
    from sftrl.evaluation import build_evaluator
    from sftrl.handles import ComponentLost
    from sftrl.report import make_pictures, write_report
    from sftrl.tensorboard import TensorBoardLogger
    from sftrl.trainer import NonFiniteError, RolloutError, Trainer, build_local_system

    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml", header="resolved sftrl config")
    started_ray = False
    system = tensorboard = None
    try:
        if cfg.ray.backend == "ray":
            from sftrl.distributed import build_ray_system, init_ray

            started_ray = init_ray(cfg)
            system = build_ray_system(cfg, init)
        else:
            system = build_local_system(cfg, init, data)
        evaluator = build_evaluator(cfg, init)
        tensorboard = TensorBoardLogger(run_dir / "tensorboard")
        trainer = Trainer(
            cfg,
            system,
            run_dir,
            evaluator.evaluate if evaluator else None,
            progress=progress,
            log_sinks=(tensorboard,),
            started=started,
        )
        start = time.monotonic()
        with StopOnSignal(trainer) as stop:
            if resume_state is not None:
                trainer.restore(resume_state)
            trainer.fit()
        wall_s = time.monotonic() - start
        pictures = make_pictures(run_dir, cfg, init, trainer, data, tensorboard)
        write_report(run_dir, cfg, trainer, pretrain_info, wall_s, pictures)
        if stop.signum is not None:
            print(f"stopped at iteration {trainer.iteration}; continue with --run-dir {run_dir} --resume auto", file=sys.stderr)
            return 128 + stop.signum
    except (NonFiniteError, ComponentLost, RolloutError) as err:
        last = latest_checkpoint(run_dir)
        print(f"error: {err}; last checkpoint: {last or 'none'} (resume with --run-dir {run_dir} --resume auto)", file=sys.stderr)
        return 1
    finally:
        if tensorboard is not None:
            tensorboard.close()
        if system is not None:
            system.shutdown()
        if started_ray:
            import ray

            ray.shutdown()
    print(f"run directory: {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
