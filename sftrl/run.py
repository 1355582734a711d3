"""``python -m sftrl.run CONFIG [key=value ...]``: pretrain (or load) the sampler, fine-tune it
with Algorithm 1 on Ray (or in-process), evaluate, and write a run directory.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``report.json``,
``report.md``. User mistakes (config, paths, checkpoints) end with a one-line error and exit
code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import sftrl
from sftrl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_latest_intact
from sftrl.config import Config, load
from sftrl.configtools import ConfigError, dump_yaml
from sftrl.data import load_real_data
from sftrl.files import out_of_space, quiet_disk_full_in_threads
from sftrl.pretraining import SamplerCheckpointError
from sftrl.rundir import RunDirectory, check_checkpoint_belongs, check_fresh, checkpoint_run_dir

EXIT_USER_ERROR = 2
NAME_MAX = 255  # bytes in one file or directory name (Linux, macOS)


class UsageError(Exception):
    """A user mistake: reported in one line, exit code 2, nothing written."""


# User mistakes: a one-line error and exit code 2 (ResourceError is a ValueError).
USER_ERRORS = (ConfigError, UsageError, CheckpointError, SamplerCheckpointError, ValueError, FileNotFoundError)


def resolve_config_path(path: str) -> Path:
    """``path`` as given, else relative to the installed package's ``configs/`` (for
    ``ray job submit -- python -m sftrl.run configs/x.yaml`` from any working directory)."""
    given = Path(path)
    if given.is_file():
        return given
    if given.is_dir():
        raise UsageError(f"config '{path}' is a directory: give a YAML file in it, e.g. {given / 'swissroll.yaml'}")
    packaged = Path(sftrl.__file__).resolve().parent / "configs"  # in the source tree, a link to configs/
    candidate = packaged / given.name
    if candidate.is_file():
        return candidate
    raise UsageError(f"config file '{path}' not found (looked in the working directory and in {packaged})")


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")  # `key.sub=value`, not a path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sftrl.cli import OneLineParser

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


# Keys a resumed run may change: how long it runs, what it logs, where and on what it runs. Any
# other difference from the checkpoint's config would continue a different experiment.
RESUMABLE_CHANGES = ("name", "device", "torch_threads", "trainer.", "ray.", "rollout.num_workers",
                     "rollout.num_cpus_per_worker", "rollout.num_gpus_per_worker", "rollout.max_restarts", "rollout.call_timeout_",
                     "pretrain.cache_dir", "data.path")


def check_resumable(cfg: Config, state: dict, checkpoint: Path, overrides: list[str], run_dir: Path) -> None:
    """The config must continue the checkpoint's experiment, and for at least as many iterations
    (as many only to finish the pictures and the report of a run stopped while writing them)."""
    from sftrl.configtools import flat_dict, override_key, to_dict
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


def check_not_under_a_file(path: Path, flag: str) -> None:
    """No file stands where ``path``'s parent directories would go (a user error, said before any work)."""
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag} '{path}': '{parent}' is a file, not a directory")


def check_can_write(path: Path, flag: str, *, directory: bool) -> None:
    """``path`` (a ``directory`` to use, else a file to write) is of that kind if it exists and can
    be made where it is asked for: said before any work. The nearest existing directory is tried
    with a probe directory, removed at once (permissions alone say nothing for root, nor for /proc
    or a read-only mount)."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{flag} '{str(path)[:60]}...': the name '{part[:40]}...' is {len(os.fsencode(part))} "
                             f"bytes long, more than the {NAME_MAX} file systems take")
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} '{path}' is a file, not a directory")
    if not directory and path.is_dir():
        raise UsageError(f"{flag} '{path}' is a directory: give a file path")
    check_not_under_a_file(path, flag)
    place = next(p for p in [path, *path.parents] if p.is_dir())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sftrl-probe-", dir=place))
    except OSError as err:
        raise UsageError(f"{flag} '{path}': cannot write in '{place}' ({err.strerror or err})") from None


def check_cache_dir(cfg: Config, fingerprint: str | None) -> None:
    """Where a sampler will be pretrained, its cache must take it (a cached one is only read).
    ``fingerprint``: the data's (``data_fingerprint``), None when ``model.checkpoint`` is set."""
    from sftrl.pretraining import cache_path

    if fingerprint is not None and not cache_path(cfg, fingerprint).is_file():
        check_can_write(Path(cfg.pretrain.cache_dir).expanduser(), "pretrain.cache_dir", directory=True)


def prepare(args: argparse.Namespace) -> tuple[Config, Path, dict | None, RunDirectory]:
    """Everything that can fail on user input, before anything is written. Returns the run
    directory claimed for this command (``release()`` it when done)."""
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
    hold = RunDirectory(run_dir).claim()  # before reading what is there: no other command changes it now
    try:
        resume_state = _resume_state(args, cfg, run_dir) if args.resume else None
        if resume_state is None:
            check_fresh(run_dir)
            if (run_dir / "metrics.jsonl").exists():
                if latest_checkpoint(run_dir) is None:
                    raise UsageError(f"run directory '{run_dir}' holds a run stopped before its first checkpoint: "
                                     f"choose another --run-dir (or delete '{run_dir}')")
                raise UsageError(f"run directory '{run_dir}' already holds a run: pass --resume auto to continue it")
        warn_if_in_a_job_copy(run_dir)
    except BaseException:
        hold.release()
        raise
    return cfg, run_dir, resume_state, hold


def _resume_state(args: argparse.Namespace, cfg: Config, run_dir: Path) -> dict:
    """The checkpoint ``--resume`` names, loaded and checked against the config. ``auto``
    takes the newest one that loads, and says so for each newer one that does not."""
    if args.resume == "auto":
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
        path = Path(args.resume)
        check_checkpoint_belongs(path, run_dir)
        state = load_checkpoint(path)
    check_resumable(cfg, state, path, args.overrides, run_dir)
    return state


def warn_if_in_a_job_copy(run_dir: Path) -> None:
    """``ray job submit --working-dir .`` runs the command in Ray's unpacked copy of that
    directory, which goes with the Ray session: a relative run directory would go with it."""
    cwd = Path.cwd()
    if not run_dir.is_absolute() and "working_dir_files" in cwd.parts:  # .../runtime_resources/working_dir_files/_ray_pkg_*
        print(f"warning: this job runs in Ray's copy of its --working-dir ({cwd}); the run directory '{run_dir}' "
              "goes with the Ray session: pass --run-dir with an absolute path to keep it", file=sys.stderr)


def build_initial_sampler(cfg: Config, data: np.ndarray, progress: bool, stop: threading.Event | None = None,
                          fingerprint: str | None = None):
    from sftrl.components import InitState, fresh_sampler, resolve_device
    from sftrl.pretraining import load_or_pretrain
    from sftrl.weights import to_numpy_state

    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))
    info = load_or_pretrain(cfg, sampler, data, device=resolve_device(cfg), progress=progress, stop=stop,
                            fingerprint=fingerprint)
    return InitState(to_numpy_state(sampler.cpu()), tuple(data.shape[1:])), info


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for a user mistake, 1 for a fatal fault, 128 + signal when stopped.

    SIGTERM is held until Ray has started: Ray's start installs a handler that aborts the
    process with a stack dump, and threads started meanwhile (Ray's, the pretraining's) keep it
    blocked, so a SIGTERM reaches the main thread and ends the command like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    handler = signal.getsignal(signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _main(argv: list[str] | None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    quiet_disk_full_in_threads()
    try:
        cfg, run_dir, resume_state, hold = prepare(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return _run_in(hold, cfg, resume_state, args, started)
    finally:
        hold.release()


def how_to_go_on(run_dir: Path) -> str:
    """What a stopped run's last line says: its last checkpoint and the command that resumes it."""
    last = latest_checkpoint(run_dir)
    if last is None:
        return "no checkpoint was written: start again in a new run directory"
    return f"last checkpoint: {last} (resume with: python -m sftrl.run --run-dir {run_dir} --resume auto)"


def _run_in(hold: RunDirectory, cfg: Config, resume_state, args, started: float) -> int:
    from sftrl.components import resolve_device
    from sftrl.preflight import check_networks
    from sftrl.pretraining import data_fingerprint

    try:
        torch.set_num_threads(cfg.torch_threads)
        resolve_device(cfg)  # a GPU asked for where there is none: said before anything starts
        data = load_real_data(cfg)
        check_networks(cfg, tuple(data.shape[1:]))
        fingerprint = None if cfg.model.checkpoint else data_fingerprint(data)
        check_cache_dir(cfg, fingerprint)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    launch = Launch(cfg, fingerprint)
    try:
        init, pretrain_info = launch.start_while_pretraining(data, not args.no_progress)
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
        return train(cfg, hold, init, pretrain_info, data, resume_state, progress=not args.no_progress,
                     started=started, launch=launch)
    except KeyboardInterrupt as err:  # a second signal (Ray's get may re-raise it bare): stop at once
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"second {signal.Signals(signum).name}: stopped at once; {how_to_go_on(hold.path)}", file=sys.stderr)
        return 128 + signum


class Launch:
    """Ray and the actors start while the sampler is pretrained (or loaded) in a thread.

    Ray's start, the actors' processes and their imports take tens of seconds on a small
    machine; the learner's actor starts empty and is built once the pretrained weights exist.
    With ``ray.backend: local`` there is nothing to start and the thread only pretrains.
    """

    def __init__(self, cfg: Config, fingerprint: str | None = None):
        """``fingerprint``: the data's, for the pretrained-sampler cache (None with ``model.checkpoint``)."""
        self.cfg = cfg
        self.fingerprint = fingerprint
        self.started_ray = False  # this command started Ray (and shuts it down)
        self.actors = None  # a RaySystemLaunch once the actors are asked for

    def start_while_pretraining(self, data: np.ndarray, progress: bool):
        from sftrl.pretraining import cache_path

        data_shape = tuple(data.shape[1:])

        if self.fingerprint is None or cache_path(self.cfg, self.fingerprint).is_file():
            # Loading takes seconds, and a bad checkpoint is reported before anything starts.
            loaded = build_initial_sampler(self.cfg, data, progress, fingerprint=self.fingerprint)
            self.start_ray(data_shape)
            return loaded
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftrl-pretrain") as pool:
            pretraining = pool.submit(build_initial_sampler, self.cfg, data, progress, stop, self.fingerprint)
            try:
                self.start_ray(data_shape)
                return pretraining.result()
            except BaseException:
                stop.set()  # the pretraining thread ends at its next epoch (the pool waits for it)
                raise

    def start_ray(self, data_shape: tuple[int, ...]) -> None:
        if self.cfg.ray.backend != "ray" or self.actors is not None:
            interrupt_on_sigterm()
            return
        from sftrl.distributed import RaySystemLaunch, init_ray

        self.started_ray = init_ray(self.cfg)
        interrupt_on_sigterm()  # after Ray's start, which installs a handler that aborts with a stack dump
        self.actors = RaySystemLaunch(self.cfg, data_shape, fixed_size=self.started_ray)

    def system(self, init, data):
        """The components' handles: the Ray actors (started by ``start_while_pretraining``)
        finished with ``init``, else local objects."""
        from sftrl.trainer import build_local_system

        if self.cfg.ray.backend != "ray":
            return build_local_system(self.cfg, init, data)
        return self.actors.finish(init)

    def abandon(self) -> None:
        """Stop what was started (a failed start: the actors have no system to shut them down)."""
        if self.actors is not None:
            self.actors.shutdown()
        self.shutdown_ray()

    def shutdown_ray(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside fine-tuning (whose ``StopOnSignal`` checkpoints first), or a
    ``second`` one during it."""

    def __init__(self, signum: int, *, second: bool = False):
        super().__init__(("second " if second else "") + signal.Signals(signum).name)
        self.signum = signum


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM (``ray job stop``, a scheduler) ends the command like Ctrl-C: through
    ``finally`` blocks, so Ray and the actors are shut down (``main`` held it until here)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


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
            raise Interrupted(signum, second=True)
        self.signum = signum
        self.trainer.stop_requested = True
        print(
            f"\n{signal.Signals(signum).name}: checkpointing after this iteration, then stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def close_quietly(tensorboard) -> None:
    """Close the TensorBoard writer; a failure (a full disk) is a warning, metrics.jsonl keeps
    every record."""
    try:
        tensorboard.close()
    except OSError as err:
        print(f"warning: TensorBoard's event file may miss its last records ({err}); metrics.jsonl has them",
              file=sys.stderr)


def train(
    cfg: Config,
    hold: RunDirectory,
    init,
    pretrain_info: dict,
    data,
    resume_state,
    *,
    progress: bool,
    launch: Launch,
    started: float | None = None,
) -> int:
    """Fine-tune and report into the run directory ``hold`` claims. Returns 0, 128 + signal when
    stopped by a signal, 1 on a fatal fault. ``launch``: what ``Launch.start_while_pretraining``
    started."""
    from sftrl.evaluation import build_evaluator
    from sftrl.handles import ComponentLost
    from sftrl.report import make_pictures, placement_summary, write_report
    from sftrl.tensorboard import TensorBoardLogger
    from sftrl.trainer import NonFiniteError, RolloutError, Trainer

    run_dir = hold.path
    system = tensorboard = None
    try:
        system = launch.system(init, data)
        hold.mark_written()  # only once the components exist: a bad ask writes nothing
        placement = system.placement()
        print(f"placement: {placement_summary(placement)}", file=sys.stderr, flush=True)
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
        if resume_state is not None:
            trainer.restore(resume_state)
        first_iteration = trainer.iteration
        dump_yaml(cfg, run_dir / "config.yaml", header="resolved sftrl config")  # once the resume worked
        start = time.monotonic()
        with StopOnSignal(trainer) as stop:  # through the pictures and report: a second signal stops them
            trainer.fit()
            wall_s = time.monotonic() - start
            pictures = make_pictures(run_dir, cfg, init, trainer, data, tensorboard)
            write_report(run_dir, cfg, trainer, pretrain_info, wall_s, pictures, placement, first_iteration)
        if stop.signum is not None:
            print(f"stopped at iteration {trainer.iteration}; continue with: python -m sftrl.run --run-dir {run_dir} "
                  "--resume auto", file=sys.stderr)
            return 128 + stop.signum
    except (NonFiniteError, ComponentLost, RolloutError) as err:
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
