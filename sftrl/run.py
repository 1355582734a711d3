"""``python -m sftrl.run CONFIG [key=value ...]``: pretrain (or load) the sampler, fine-tune it
with Algorithm 1 on Ray (or in-process), evaluate, and write a run directory.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``report.json``,
``report.md``, pictures, ``tensorboard/``. The command goes through four stages, each in the
module named after it: ``prepare`` (the config, the run directory and what to resume:
``sftrl.preflight``, ``sftrl.rundir``, ``sftrl.resume``), the start (``sftrl.launch``: Ray and the
actors while the sampler pretrains), fine-tuning (``sftrl.trainer``) and the report. Signals
are handled as ``sftrl.signals`` says. User mistakes end with a one-line error and exit code 2
before anything is written; ``sftrl run`` is this same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sftrl.checkpoint import latest_checkpoint
from sftrl.components import InitState
from sftrl.config import Config, load
from sftrl.configtools import dump_yaml
from sftrl.data import RealData, load_real_data
from sftrl.errors import EXIT_USER_ERROR, USER_ERRORS, OneLineParser, UsageError
from sftrl.files import out_of_space, quiet_disk_full_in_threads
from sftrl.launch import Launch
from sftrl.preflight import (
    check_cache_dir,
    check_can_write,
    check_fid_weights,
    check_networks,
    resolve_config_path,
    warn_if_average_lags,
    warn_if_in_a_job_copy,
    warn_if_settings_unused,
)
from sftrl.resume import resume_state
from sftrl.rundir import RunDirectory, check_fresh, checkpoint_run_dir
from sftrl.signals import StopOnSignal, sigterm_held

__all__ = ["UsageError", "main", "warn_if_in_a_job_copy"]

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")  # `key.sub=value`, not a path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m sftrl.run",
        description="Fine-tune a diffusion sampler with SFT-PG (Algorithm 1) and write a run directory.",
    )
    parser.add_argument("config", nargs="?",
                        help="experiment YAML, e.g. configs/swissroll.yaml (with --resume: the run's own by default)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.iterations=200")
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>-<timestamp>/)")
    parser.add_argument("--resume", help="'auto' (the run directory's latest checkpoint) or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    # Overrides may come before or after the options (`CONFIG --run-dir D key=value`).
    args = parser.parse_intermixed_args(argv)
    if args.config is not None and OVERRIDE.match(args.config) and not Path(args.config).is_file():
        args.overrides.insert(0, args.config)  # `--run-dir D --resume auto key=value`: no config given
        args.config = None
    return args


@dataclasses.dataclass
class Job:
    """One command's fine-tuning: what ``prepare`` settles, then what the start makes."""

    cfg: Config
    run: RunDirectory  # claimed: this command alone writes there
    resume_state: dict[str, Any] | None
    progress: bool
    started: float  # time.monotonic() as the command began, pretraining included
    data: RealData | None = None
    init: InitState | None = None
    pretrain_info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.run.path


def prepare(args: argparse.Namespace, started: float) -> Job:
    """Everything that can fail on user input, before anything is written: the config, the run
    directory (claimed for this command) and the checkpoint to resume."""
    run_dir_arg = args.run_dir
    if args.resume not in (None, "auto") and not run_dir_arg:
        owner = checkpoint_run_dir(Path(args.resume))  # --resume RUN/checkpoints/iter-N: that run
        if owner is None:
            raise UsageError(f"--resume '{args.resume}' is not a run's checkpoint (RUN/checkpoints/iter-N); "
                             "give the checkpoint directory of a run, or --run-dir DIR --resume auto")
        run_dir_arg = str(owner)
    if args.config is None:
        saved = Path(run_dir_arg) / "config.yaml" if run_dir_arg else None
        if args.resume and saved is not None and not saved.is_file():
            raise UsageError(f"--run-dir '{run_dir_arg}' holds no run (no config.yaml): give the directory of an "
                             "existing run, or a config file to start one")
        if not (args.resume and saved is not None):
            raise UsageError("give a config file (e.g. configs/swissroll.yaml), or continue a run with its own "
                             "config: --run-dir DIR --resume auto")
        config_path = saved
    else:
        config_path = resolve_config_path(args.config)
    cfg = load(config_path, args.overrides)
    run_dir = Path(run_dir_arg) if run_dir_arg else Path("runs") / (
        f"{cfg.name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    check_can_write(run_dir, "--run-dir", directory=True)
    run = RunDirectory(run_dir).claim()  # before reading what is there: no other command changes it now
    try:
        state = resume_state(args.resume, cfg, run_dir, args.overrides) if args.resume else None
        if state is None:
            check_fresh(run_dir)
            if (run_dir / "metrics.jsonl").exists():
                if latest_checkpoint(run_dir) is None:
                    raise UsageError(f"run directory '{run_dir}' holds a run stopped before its first checkpoint: "
                                     f"choose another --run-dir (or delete '{run_dir}')")
                raise UsageError(f"run directory '{run_dir}' already holds a run: pass --resume auto to continue it")
        warn_if_in_a_job_copy(run_dir)
        warn_if_average_lags(cfg)
        warn_if_settings_unused(cfg)
    except BaseException:
        run.release()
        raise
    return Job(cfg, run, state, progress=not args.no_progress, started=started)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for a user mistake, 1 for a fatal fault, 128 + signal when stopped."""
    with sigterm_held():  # until Ray has started (sftrl.signals)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    quiet_disk_full_in_threads()
    try:
        job = prepare(args, started)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return start_and_fine_tune(job)
    finally:
        job.run.release()


def start_and_fine_tune(job: Job) -> int:
    """Load the data, start Ray and the actors while the sampler pretrains, then fine-tune."""
    from sftrl.components import resolve_device
    from sftrl.pretraining import data_fingerprint

    cfg = job.cfg
    try:
        torch.set_num_threads(cfg.torch_threads)
        resolve_device(cfg)  # a GPU asked for where there is none: said before anything starts
        job.data = data = load_real_data(cfg, progress=job.progress)
        check_networks(cfg, tuple(data.shape[1:]))
        check_fid_weights(cfg)
        fingerprint = None if cfg.model.checkpoint else data_fingerprint(data)
        check_cache_dir(cfg, fingerprint)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    launch = Launch(cfg, fingerprint)
    try:
        job.init, job.pretrain_info = launch.start_while_pretraining(data, job.progress)
    except USER_ERRORS as err:
        launch.abandon()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as err:
        launch.abandon()
        print("interrupted before fine-tuning: nothing was cached or written", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    except BaseException:
        launch.abandon()
        raise
    try:
        return fine_tune(job, launch)
    except KeyboardInterrupt as err:  # a second signal (Ray's get may re-raise it bare): stop at once
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"second {signal.Signals(signum).name}: stopped at once; {how_to_go_on(job.run_dir)}", file=sys.stderr)
        return 128 + signum


def how_to_go_on(run_dir: Path) -> str:
    """What a stopped run's last line says: its last checkpoint and the command that resumes it."""
    last = latest_checkpoint(run_dir)
    if last is None:
        return "no checkpoint was written: start again in a new run directory"
    return f"last checkpoint: {last} (resume with: python -m sftrl.run --run-dir {run_dir} --resume auto)"


def close_quietly(tensorboard) -> None:
    """Close the TensorBoard writer; a failure (a full disk) is a warning, metrics.jsonl keeps
    every record."""
    try:
        tensorboard.close()
    except OSError as err:
        print(f"warning: TensorBoard's event file may miss its last records ({err}); metrics.jsonl has them",
              file=sys.stderr)


def fine_tune(job: Job, launch: Launch) -> int:
    """Fine-tune and report into the job's run directory. Returns 0, 128 + signal when stopped by
    a signal, 1 on a fatal fault. ``launch``: what started the actors (it takes them down)."""
    from sftrl.evaluation import build_evaluator
    from sftrl.handles import ComponentLost
    from sftrl.report import make_pictures, placement_summary, write_report
    from sftrl.rollout_pool import RolloutError
    from sftrl.tensorboard import TensorBoardLogger
    from sftrl.trainer import DivergedError, NonFiniteError, Trainer

    cfg, run_dir = job.cfg, job.run_dir
    assert job.init is not None and job.data is not None, "start_and_fine_tune starts the job first"
    system = tensorboard = None
    try:
        system = launch.system(job.init, job.data)
        job.run.mark_written()  # only once the components exist: a bad ask writes nothing
        placement = system.placement()
        print(f"placement: {placement_summary(placement)}", file=sys.stderr, flush=True)
        evaluator = build_evaluator(cfg, job.init, job.data)
        tensorboard = TensorBoardLogger(run_dir / "tensorboard")
        trainer = Trainer(cfg, system, run_dir, evaluator.evaluate if evaluator else None, progress=job.progress,
                          log_sinks=(tensorboard,), started=job.started)
        if job.resume_state is not None:
            trainer.restore(job.resume_state)
        first_iteration = trainer.iteration
        dump_yaml(cfg, run_dir / "config.yaml", header="resolved sftrl config")  # once the resume worked
        start = time.monotonic()
        with StopOnSignal(trainer) as stop:  # through the pictures and report: a second signal stops them
            trainer.fit()
            wall_s = time.monotonic() - start
            pictures = make_pictures(run_dir, cfg, job.init, trainer, job.data, tensorboard)
            report = write_report(run_dir, cfg, trainer, job.pretrain_info, wall_s, pictures, placement, first_iteration)
        if report["best"] and report["best"]["file"]:
            best = report["best"]
            print(f"best sampler: iteration {best['iteration']}, {best['metric']} {best['value']:.4g} "
                  f"({run_dir / best['file']}; sftrl sample/export/eval --best use it)", file=sys.stderr)
        if stop.signum is not None:
            print(f"stopped at iteration {trainer.iteration}; continue with: python -m sftrl.run --run-dir {run_dir} "
                  "--resume auto", file=sys.stderr)
            return 128 + stop.signum
    except (NonFiniteError, DivergedError, ComponentLost, RolloutError) as err:
        print(f"error: {err}; {how_to_go_on(run_dir)}", file=sys.stderr)
        return 1
    except OSError as err:
        if not out_of_space(err):
            raise
        print(f"error: the disk is full ({err}); free space, then go on: {how_to_go_on(run_dir)}", file=sys.stderr)
        return 1
    finally:
        if tensorboard is not None:
            close_quietly(tensorboard)
        if system is not None:
            system.shutdown()
        elif launch.actors is not None:
            launch.actors.shutdown()
        launch.shutdown_ray()
    print(f"run directory: {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
