"""The ``sftrl`` command: ``run | pretrain | sample | eval | schedule``.

Every user mistake ends with a one-line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sftrl.errors import EXIT_USER_ERROR, USER_ERRORS, OneLineParser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= 1")
    return value


def _kappa(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:  # NaN fails the comparison
        raise argparse.ArgumentTypeError(f"{text} is invalid: must be a finite number >= 0 and at most 1")
    return value


def _check_out(out: str) -> Path:
    """``--out``: a file that can be written (checked before any work)."""
    from sftrl.preflight import check_can_write

    path = Path(out)
    check_can_write(path, "--out", directory=False)
    return path


def _schedule(args: argparse.Namespace) -> int:
    from sftrl.diffusion.schedules import make_schedule

    schedule = make_schedule(
        args.name,
        args.steps,
        num_train_steps=args.T,
        beta_schedule=args.beta_schedule,
        kappa=args.kappa,
        variance=args.variance,
    )
    if args.json:
        print(json.dumps({"name": schedule.name, "steps": schedule.rows()}, indent=2))
        return 0
    cols = ("n", "tau", "gamma_bar", "gamma_bar_next", "sigma", "coef_x", "coef_eps")
    print(f"{schedule.name}: S = {schedule.num_steps} steps of a T = {args.T} DDPM ({args.beta_schedule} betas)")
    print("".join(f"{c:>16}" for c in cols))
    for row in schedule.rows():
        print("".join(f"{row[c]:>16d}" if c == "n" else f"{row[c]:>16.6g}" for c in cols))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from sftrl.components import fresh_sampler
    from sftrl.config import load
    from sftrl.data import load_real_data
    from sftrl.files import torch_save_atomic
    from sftrl.preflight import check_cache_dir, resolve_config_path
    from sftrl.pretraining import data_fingerprint, load_or_pretrain, sampler_checkpoint

    cfg = load(resolve_config_path(args.config), args.overrides)
    out = _check_out(args.out) if args.out else None
    torch.set_num_threads(cfg.torch_threads)
    data = load_real_data(cfg)
    fingerprint = None if cfg.model.checkpoint else data_fingerprint(data)
    check_cache_dir(cfg, fingerprint)
    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))
    info = load_or_pretrain(cfg, sampler, data, progress=not args.no_progress, fingerprint=fingerprint)
    if out is not None:
        torch_save_atomic(sampler_checkpoint(sampler, cfg, {"seconds": info["seconds"]}), out)
    print(json.dumps({**info, **({"out": str(out)} if out is not None else {})}))
    return 0


def _load_run(run_dir: str, checkpoint: str | None):
    """(cfg, sampler with the run's fine-tuned weights, data shape) of a run directory."""
    import torch

    from sftrl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from sftrl.config import load
    from sftrl.learner import sampler_state_dict
    from sftrl.models import build_networks
    from sftrl.rundir import check_checkpoint_belongs

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"'{run}' is not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml")
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if checkpoint and path is not None:
        check_checkpoint_belongs(path, run, flag="--checkpoint")
    if path is None:
        raise CheckpointError(f"run directory '{run}' has no checkpoint yet")
    state = load_checkpoint(path)
    policy = sampler_state_dict(state["learner"])
    data_shape = _data_shape(cfg, policy)
    sampler, _, _ = build_networks(cfg, data_shape)
    try:
        sampler.load_state_dict(policy)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit the sampler of run '{run}' "
                              f"({str(err).splitlines()[0]})") from None
    torch.set_num_threads(cfg.torch_threads)
    return cfg, sampler, data_shape


def _data_shape(cfg, policy_state) -> tuple[int, ...]:
    """The shape of one sample, from the weights and the config: the data set is never read."""
    if cfg.model.sampler == "toy-mlp":
        return (int(policy_state["out.weight"].shape[0]),)
    from sftrl.data import image_shape

    return image_shape(cfg, int(policy_state["conv_in.weight"].shape[1]))


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sftrl.checkpoint import CheckpointError
    from sftrl.diffusion.step import sample
    from sftrl.evaluation import NonFiniteSamples, check_finite
    from sftrl.files import write_atomic
    from sftrl.plan import schedule_of
    from sftrl.progress import Progress

    out = _check_out(args.out)
    cfg, sampler, data_shape = _load_run(args.run_dir, args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    with Progress(args.n, "sample", unit="sample") as bar:
        x = sample(sampler.eval(), schedule_of(cfg).tables(), args.n, data_shape, generator=generator,
                   batch_size=args.batch_size, on_batch=bar.update).numpy()
    try:
        check_finite(x)
    except NonFiniteSamples as err:
        raise CheckpointError(f"the sampler of run '{args.run_dir}' draws non-finite samples ({err}); nothing was "
                              "written") from None
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, x=x)

    write_atomic(out, write)
    print(f"wrote {len(x)} samples of shape {tuple(x.shape[1:])} to {out}", file=sys.stderr)
    if len(data_shape) == 3:  # images: a PNG grid beside the arrays
        from sftrl.pictures import image_grid

        grid = image_grid(x[:64], out.with_suffix(".png"), nrow=8)
        print(f"wrote a grid of the first {min(64, len(x))} to {grid}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sftrl.components import InitState
    from sftrl.evaluation import build_evaluator
    from sftrl.progress import Progress
    from sftrl.weights import to_numpy_state

    cfg, sampler, data_shape = _load_run(args.run_dir, args.checkpoint)
    evaluator = build_evaluator(cfg, InitState(None, data_shape))
    if evaluator is None:
        raise ValueError(f"no evaluation metric is configured for data set {cfg.data.name!r}")
    with Progress(1, "evaluate", unit="eval") as bar:
        result = evaluator.evaluate(to_numpy_state(sampler))
        bar.update(1)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> OneLineParser:
    from sftrl.diffusion.schedules import SCHEDULE_NAMES

    parser = OneLineParser(prog="sftrl", description="Shortcut fine-tuning of diffusion samplers (SFT-PG) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,pretrain,sample,eval,schedule}")

    run = sub.add_parser("run", help="fine-tune from a config (same as python -m sftrl.run)", add_help=False)
    run.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG [key=value ...] [--run-dir DIR] [--resume auto|PATH]")

    pre = sub.add_parser("pretrain", help="pretrain (or fetch from the cache) the config's initial DDPM sampler")
    pre.add_argument("config", help="experiment YAML")
    pre.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.epochs=100")
    pre.add_argument("--out", help="also write the sampler checkpoint here (usable as model.checkpoint)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")

    samp = sub.add_parser("sample", help="draw samples from a run's fine-tuned sampler")
    samp.add_argument("run_dir", help="a run directory written by sftrl run")
    samp.add_argument("-n", type=_positive_int, default=10_000, help="number of samples (default 10000)")
    samp.add_argument("--out", default="samples.npz",
                      help="output .npz with array x of shape (N, *data_shape) (default ./samples.npz)")
    samp.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    samp.add_argument("--seed", type=int, default=0, help="sampling seed")
    samp.add_argument("--batch-size", type=_positive_int, default=1000, help="chains sampled at once (default 1000)")

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint with the configured metric (SW2, exact W2)")
    ev.add_argument("run_dir", help="a run directory written by sftrl run")
    ev.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")

    sch = sub.add_parser("schedule", help="print a sampling schedule's table")
    sch.add_argument("name", choices=SCHEDULE_NAMES, help="schedule name")
    sch.add_argument("--steps", type=_positive_int, required=True, help="S, number of sampling steps")
    sch.add_argument("--T", type=_positive_int, default=1000, help="T of the base DDPM (default 1000)")
    sch.add_argument("--kappa", type=_kappa, default=1.0, help="FastDPM noise scale in [0, 1] (default 1.0)")
    sch.add_argument("--beta-schedule", default="linear", choices=("linear", "sigmoid"), help="base betas (default linear)")
    sch.add_argument("--variance", default="beta", choices=("beta", "posterior"), help="ddpm/strided variance (default beta)")
    sch.add_argument("--json", action="store_true", help="print JSON: {name, steps: [{n, tau, gamma_bar, ...}]}")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from sftrl.run import main as run_main

        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    handlers = {"pretrain": _pretrain, "sample": _sample, "eval": _eval, "schedule": _schedule}
    from sftrl.files import out_of_space

    try:
        return handlers[args.command](args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `sftrl schedule ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: sftrl {args.command} stopped; nothing half-written was left (files are written "
              "whole or not at all)", file=sys.stderr)
        return 130
    except OSError as err:
        if not out_of_space(err):
            raise
        print(f"error: the disk is full ({err}); nothing half-written was left", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
