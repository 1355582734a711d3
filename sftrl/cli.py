"""The ``sftrl`` command: ``run | pretrain | sample | export | eval | weights | schedule``.

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


def _load_run(run_dir: str, checkpoint: str | None, best: bool = False):
    """(cfg, sampler with the run's fine-tuned weights, data shape, checkpoint path) of a run
    directory; with ``best``, its best evaluated sampler (``RUN/best-sampler.pt``) instead."""
    import torch

    from sftrl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from sftrl.components import adapt_sampler
    from sftrl.config import load
    from sftrl.learner import sampler_state_dict
    from sftrl.lora import merge_into
    from sftrl.models import build_networks
    from sftrl.rundir import check_checkpoint_belongs

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"'{run}' is not a run directory (no config.yaml)")
    cfg = load(run / "config.yaml")
    if best:
        return _load_best(run, cfg, checkpoint)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if checkpoint and path is not None:
        check_checkpoint_belongs(path, run, flag="--checkpoint")
    if path is None:
        raise CheckpointError(f"run directory '{run}' has no checkpoint yet")
    state = load_checkpoint(path)
    policy = sampler_state_dict(state["learner"])
    data_shape = _data_shape(cfg, policy)
    sampler, _, _ = build_networks(cfg, data_shape)
    # A LoRA run's checkpoint holds the adapted network: load it so, then merge it into the plain one.
    adapted = adapt_sampler(cfg, build_networks(cfg, data_shape)[0]) if cfg.model.lora_rank else sampler
    try:
        adapted.load_state_dict(policy)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit the sampler of run '{run}' "
                              f"({str(err).splitlines()[0]})") from None
    if adapted is not sampler:
        merge_into(adapted, sampler)
    torch.set_num_threads(cfg.torch_threads)
    return cfg, sampler, data_shape, path


def _load_best(run: Path, cfg, checkpoint: str | None):
    """``_load_run`` of ``--best``: the sampler in ``RUN/best-sampler.pt`` (adapters merged)."""
    import torch

    from sftrl.best import BEST_FILE, load_best
    from sftrl.checkpoint import CheckpointError
    from sftrl.models import build_networks
    from sftrl.pretraining import load_sftrl_checkpoint

    if checkpoint:
        raise ValueError("--best and --checkpoint each name the sampler to use: give one of them")
    path = run / BEST_FILE
    ckpt = load_best(run)  # read once
    if ckpt is None:
        raise CheckpointError(f"run '{run}' has no best sampler ({path} is not there): a run writes it at its first "
                              "scored evaluation when trainer.keep_best is on (the default); drop --best to use "
                              "the run's latest checkpoint")
    entry = ckpt["best"]
    data_shape = _data_shape(cfg, ckpt["state_dict"])
    sampler, _, _ = build_networks(cfg, data_shape)
    load_sftrl_checkpoint(path, ckpt, sampler, cfg)
    print(f"the best sampler of run '{run}': iteration {entry.get('iteration')}, {entry.get('metric')} "
          f"{entry.get('value', float('nan')):.4g} ({path})", file=sys.stderr)
    torch.set_num_threads(cfg.torch_threads)
    return cfg, sampler, data_shape, path


def _data_shape(cfg, policy_state) -> tuple[int, ...]:
    """The shape of one sample, from the weights and the config: the data set is never read."""
    from sftrl.lora import BASE_LAYER

    def weight(layer: str):  # a plain layer's, or a LoRA-adapted one's frozen weight
        key = f"{layer}.weight"
        return policy_state[key] if key in policy_state else policy_state[f"{layer}.{BASE_LAYER}.weight"]

    if cfg.model.sampler == "toy-mlp":
        return (int(weight("out").shape[0]),)
    from sftrl.data import image_shape

    return image_shape(cfg, int(weight("conv_in").shape[1]))


def _device(text: str) -> str:
    """``--device``: auto (a GPU where torch sees one), cpu, cuda or cuda:N, checked here."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text[5:]) if ":" in text else 0
        if index >= count:
            raise ValueError(f"--device {text}: torch sees {count} GPU(s) on this machine; valid here: auto, cpu"
                             + "".join(f", cuda:{i}" for i in range(count)))
        return text
    raise ValueError(f"--device {text!r} is not a device; valid: auto, cpu, cuda, cuda:N")


def _check_new_folder(out: str) -> Path:
    """``--out`` of ``--format png``: a folder not there yet, in a place that can be written."""
    from sftrl.preflight import check_can_write

    path = Path(out)
    if path.exists():
        raise ValueError(f"--out '{path}' already exists; sftrl sample --format png writes a new folder "
                         "(name one that is not there, or move the old one away)")
    check_can_write(path, "--out", directory=False)
    return path


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from sftrl.checkpoint import CheckpointError
    from sftrl.diffusion.step import sample_batches
    from sftrl.pictures import image_grid
    from sftrl.plan import schedule_of
    from sftrl.progress import Progress
    from sftrl.samples import NpzWriter, PngFolderWriter

    out = _check_new_folder(args.out) if args.format == "png" else _check_out(args.out)
    device = _device(args.device)
    cfg, sampler, data_shape, _ = _load_run(args.run_dir, args.checkpoint, args.best)
    if args.format == "png" and len(data_shape) != 3:
        raise ValueError(f"--format png needs an image run; run '{args.run_dir}' samples {data_shape} points "
                         "(use --format npz)")
    writer = PngFolderWriter(out, args.n) if args.format == "png" else NpzWriter(out, args.n, data_shape)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    batches = sample_batches(sampler.to(device).eval(), schedule_of(cfg).tables(device), args.n, data_shape,
                             generator=generator, device=device, batch_size=args.batch_size)
    first: list[np.ndarray] = []  # the first 64, for the grid
    with writer, Progress(args.n, "sample", unit="sample", enabled=not args.no_progress) as bar:
        k = 0  # not enumerate(): its reused result tuple would hold the last batch while the next is drawn
        for x in batches:  # one batch of float samples held at a time
            k += 1
            batch = x.cpu().numpy()
            bad = int((~np.isfinite(batch.reshape(len(batch), -1))).any(axis=1).sum())
            if bad:
                raise CheckpointError(f"the sampler of run '{args.run_dir}' draws non-finite samples ({bad} of "
                                      f"{len(batch)} samples in batch {k} are NaN or infinite); nothing was written")
            writer.add(batch)
            if sum(map(len, first)) < 64:
                first.append(batch[: 64 - sum(map(len, first))].copy())  # a copy: the batch itself is let go
            bar.update(len(batch))
            del x, batch  # let it go before the next batch is drawn
    print(f"wrote {args.n} samples of shape {data_shape} to {out}"
          + (" (one PNG each)" if args.format == "png" else ""), file=sys.stderr)
    if len(data_shape) == 3:  # images: a PNG grid beside them
        grid_path = out.with_name(out.name + "-grid.png") if args.format == "png" else out.with_suffix(".png")
        grid = image_grid(np.concatenate(first), grid_path, nrow=8)
        print(f"wrote a grid of the first {min(64, args.n)} to {grid}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from sftrl.export import check_export_folder, export_diffusers
    from sftrl.preflight import check_can_write

    out = Path(args.out)
    check_export_folder(out)
    check_can_write(out, "--out", directory=True)
    cfg, sampler, _, path = _load_run(args.run_dir, args.checkpoint, args.best)
    if cfg.model.sampler != "unet":
        raise ValueError(f"--format diffusers writes a U-Net; run '{args.run_dir}' fine-tuned model.sampler "
                         f"{cfg.model.sampler!r}")
    export_diffusers(sampler, cfg, out, run_dir=Path(args.run_dir), checkpoint=path)
    print(f"wrote the sampler of '{path}' as a diffusers folder to {out} (UNet2DModel.from_pretrained loads it; "
          f"its README.md states the {cfg.diffusion.steps}-step schedule it was tuned for)", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sftrl.components import InitState
    from sftrl.evaluation import build_evaluator
    from sftrl.progress import Progress
    from sftrl.weights import to_numpy_state

    cfg, sampler, data_shape, path = _load_run(args.run_dir, args.checkpoint, args.best)
    evaluator = build_evaluator(cfg, InitState(None, data_shape))
    if evaluator is None:
        raise ValueError(f"no evaluation metric is configured for data set {cfg.data.name!r}")
    with Progress(1, "evaluate", unit="eval") as bar:
        result = evaluator.evaluate(to_numpy_state(sampler))
        bar.update(1)
    for name, grid in result.pop("pictures", {}).items():  # images: the evaluation's sample grid
        from sftrl.pictures import save_png

        png = save_png(grid, Path(args.run_dir) / "samples" / f"{name}-eval-{path.stem if path.is_file() else path.name}.png")
        print(f"wrote the evaluation's sample grid to {png}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def _weights(args: argparse.Namespace) -> int:
    from sftrl.metrics.weights_fetch import fetch_inception

    path = fetch_inception(Path(args.cache_dir).expanduser(), url=args.url)
    print(f"the FID Inception weights are at {path}; image runs find them there (trainer.fid_weights: null)")
    return 0


BEST_HELP = ("the run's best evaluated sampler (RUN/best-sampler.pt, the lowest FID or SW2 it scored) instead of a "
             "checkpoint's")


def build_parser() -> OneLineParser:
    from sftrl.diffusion.schedules import SCHEDULE_NAMES

    parser = OneLineParser(prog="sftrl", description="Shortcut fine-tuning of diffusion samplers (SFT-PG) on Ray.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{run,pretrain,sample,export,eval,weights,schedule}")

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
    samp.add_argument("--out", default=None,
                      help="npz: a file with array x (N, *data_shape) float32 (default ./samples.npz); png: a new "
                           "folder of 000000.png ... (default ./samples)")
    samp.add_argument("--format", choices=("npz", "png"), default="npz",
                      help="npz (default) or png: one 8-bit PNG per image, for FID tools")
    samp.add_argument("--device", default="auto", help="auto (default: a GPU where there is one), cpu, cuda, cuda:N")
    samp.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    samp.add_argument("--best", action="store_true", help=BEST_HELP)
    samp.add_argument("--seed", type=int, default=0, help="sampling seed")
    samp.add_argument("--batch-size", type=_positive_int, default=1000,
                      help="chains sampled at once, the float samples held at once (default 1000)")
    samp.add_argument("--no-progress", action="store_true", help="no progress bar")

    exp = sub.add_parser("export", help="write a run's fine-tuned U-Net as a diffusers UNet2DModel folder")
    exp.add_argument("run_dir", help="a run directory written by sftrl run (an image run: the U-Net sampler)")
    exp.add_argument("--format", choices=("diffusers",), required=True,
                     help="diffusers: config.json + diffusion_pytorch_model.safetensors, a DDPMScheduler config, "
                          "and README.md / sftrl_schedule.json with the few-step schedule it was tuned for")
    exp.add_argument("--out", required=True, help="a new folder (or an empty one)")
    exp.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    exp.add_argument("--best", action="store_true", help=BEST_HELP)

    wts = sub.add_parser("weights", help="fetch network weights that a run never downloads by itself")
    wts.add_argument("name", choices=("inception",), help="inception: the standard FID Inception (about 92 MB)")
    wts.add_argument("--url", help="fetch from here instead (a mirror, or file:///path of a copy you have)")
    wts.add_argument("--cache-dir", default="~/.cache/sftrl/weights",
                     help="where to put them (default ~/.cache/sftrl/weights, where runs look)")

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint with the configured metric (SW2, exact W2)")
    ev.add_argument("run_dir", help="a run directory written by sftrl run")
    ev.add_argument("--checkpoint", help="a checkpoint directory (default: the run's latest)")
    ev.add_argument("--best", action="store_true", help=BEST_HELP)

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
    if args.command == "sample" and args.out is None:
        args.out = "samples" if args.format == "png" else "samples.npz"
    handlers = {"pretrain": _pretrain, "sample": _sample, "export": _export, "eval": _eval, "schedule": _schedule,
                "weights": _weights}
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
