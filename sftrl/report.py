"""``report.json`` and ``report.md``: the evaluation table of a run (initial vs fine-tuned)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from sftrl.best import BEST_FILE
from sftrl.config import Config
from sftrl.configtools import to_dict
from sftrl.files import write_text_atomic

SCALE = 1e-2  # Table 1 reports W2 in units of 1e-2


def _fmt(value: float | None, scale: float = SCALE) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value / scale:.2f}"


def report_is_complete(run_dir: Path, iteration: int) -> bool:
    """Whether the run directory's report and pictures were written for ``iteration`` (a full
    disk may have stopped a finished run before them: resuming it writes them)."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict) or report.get("iterations") != iteration:
        return False
    pictures = report.get("pictures") or {}
    return (run_dir / "report.md").is_file() and all((run_dir / str(name)).is_file() for name in pictures.values())


def evaluation_rows(evaluations: list[dict]) -> list[dict]:
    """The first evaluation is the initial sampler, the last the fine-tuned one."""
    if not evaluations:
        return []
    rows = [{"sampler": "initial (pretrained)", **evaluations[0]}]
    if len(evaluations) > 1:
        rows.append({"sampler": "fine-tuned", **evaluations[-1]})
    return rows


def best_evaluation(run_dir: Path, cfg: Config, evaluations: list[dict]) -> dict | None:
    """The evaluation that scored lowest (``sftrl.best``): iteration, metric, value, and the file
    holding its sampler (None where ``trainer.keep_best`` is off)."""
    from sftrl.best import best_of, read_best, score_of
    from sftrl.pretraining import SamplerCheckpointError

    best = best_of(evaluations)
    if best is None:
        return None
    metric, value = score_of(best) or ("", float("nan"))
    try:
        entry = read_best(run_dir) if cfg.trainer.keep_best else None
    except SamplerCheckpointError:
        entry = None
    kept = entry is not None and entry.get("iteration") == best["iteration"]  # the file holds this very sampler
    return {"iteration": best["iteration"], "metric": metric, "value": value, "file": BEST_FILE if kept else None}


def best_line(best: dict, run_dir: Path, keep_best: bool = True) -> str:
    """The report's sentence on the best evaluation."""
    value = f"{best['value'] / SCALE:.2f} (x1e-2)" if best["metric"] == "sw2_mean" else f"{best['value']:.2f}"
    name = "SW2" if best["metric"] == "sw2_mean" else best["metric"].upper()
    where = (f"its sampler is kept in `{best['file']}` (`sftrl sample {run_dir} --best`)" if best["file"]
             else "its sampler was not kept (trainer.keep_best: false)" if not keep_best
             else f"its sampler could not be written to `{BEST_FILE}` (see Events)")
    return f"Best evaluation: iteration {best['iteration']}, {name} {value}; {where}."


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sampler | iteration | SW2 (x1e-2) mean ± std | min-max | noise floor (x1e-2) | exact W2 (x1e-2) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['iteration']} | {_fmt(r.get('sw2_mean'))} ± {_fmt(r.get('sw2_std'))} "
            f"| {_fmt(r.get('sw2_min'))}-{_fmt(r.get('sw2_max'))} "
            f"| {_fmt(r.get('sw2_floor_mean'))} ± {_fmt(r.get('sw2_floor_std'))} | {_fmt(r.get('exact_w2'))} |"
        )
    return "\n".join(lines)


def image_table(rows: list[dict]) -> str:
    """FID/KID rows of an image run, with the feature extractor named (never passed off as Inception)."""
    if "fid_skipped" in rows[0]:
        return rows[0]["fid_skipped"] + "."
    lines = ["| sampler | iteration | FID | KID mean ± std | samples | real images |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['iteration']} | {r['fid']:.2f} | {r['kid_mean']:.4g} ± {r['kid_std']:.2g} "
            f"| {r['num_fake']} | {r['num_real']} |"
        )
    return "\n".join([*lines, "", f"Feature extractor: {rows[0]['extractor']}."])


def placement_summary(placement: dict[str, dict]) -> str:
    """One line: ``worker-0 cuda:0 (GPU 0) on 10.0.0.5, learner ...`` (``local`` without Ray)."""
    parts = []
    for name, where in placement.items():
        gpus = f" (GPU {','.join(where['gpu_ids'])})" if where.get("gpu_ids") else ""
        node = where.get("ip") or where.get("node", "?")
        pid = f" (pid {where['pid']})" if where.get("pid") else ""
        parts.append(f"{name} {where.get('device', '-')}{gpus} on {node}{pid}")
    return ", ".join(parts)


PICTURE_SAMPLES = 2000  # points per scatter panel
PATH_CHAINS = 64  # chains drawn in the sampling-path figure (Figure 7)
GRID_IMAGES = 16  # images per row of the before/after grid
PICTURE_SEED = 20230131  # the same seeds for the initial and the fine-tuned sampler


def make_pictures(run_dir: Path, cfg: Config, init, trainer, data, tensorboard=None) -> dict[str, str]:
    """Training curves, and samples of the initial vs the fine-tuned sampler from the same seeds:
    scatter over the data and the whole sampling paths (Figure 7) for 2-D data, grids for images.
    Returns ``{caption: file name}``; each picture also goes to TensorBoard when a logger is given."""
    import numpy as np
    import torch

    from sftrl import pictures
    from sftrl.components import resolve_device
    from sftrl.diffusion.step import rollout
    from sftrl.models import build_networks
    from sftrl.plan import schedule_of
    from sftrl.weights import load_numpy_state

    out: dict[str, str] = {}
    out["training curves"] = pictures.training_curves(trainer.log.read(), run_dir / "curves.png").name
    device = resolve_device(cfg)  # a U-Net's chains take minutes on a CPU, seconds on a GPU
    tables = schedule_of(cfg).tables(device)
    tuned_state = trainer.system.learner.resolve(trainer.system.learner.get_sampler_weights()).state

    def chains(state, n):
        sampler, _, _ = build_networks(cfg, init.data_shape)
        load_numpy_state(sampler, state)
        generator = torch.Generator(device=device).manual_seed(PICTURE_SEED)
        x_start = torch.randn((n, *init.data_shape), generator=generator, device=device)
        with torch.no_grad():
            return rollout(sampler.to(device).eval(), tables, x_start, generator=generator).xs.cpu().numpy()

    if len(init.data_shape) == 1 and init.data_shape[0] == 2:
        before, after = chains(init.sampler_state, PICTURE_SAMPLES), chains(tuned_state, PICTURE_SAMPLES)
        real = np.asarray(data)[:PICTURE_SAMPLES]
        out["samples vs data, initial and fine-tuned"] = pictures.before_after_scatter(
            before[-1], after[-1], real, run_dir / "samples.png").name
        out["sampling paths from the same seeds (Figure 7)"] = pictures.sampling_paths(
            before[:, :PATH_CHAINS], after[:, :PATH_CHAINS], real, run_dir / "sampling_paths.png").name
    elif len(init.data_shape) == 3:
        before, after = chains(init.sampler_state, GRID_IMAGES), chains(tuned_state, GRID_IMAGES)
        out["samples from the same seeds: initial (top) and fine-tuned (bottom)"] = pictures.before_after_grid(
            before[-1], after[-1], run_dir / "samples.png", nrow=GRID_IMAGES).name
    if tensorboard is not None:
        for name in out.values():
            tensorboard.image(f"pictures/{Path(name).stem}", str(run_dir / name), trainer.iteration)
    return out


# What an iteration's metrics line says of where its time went and what it moved (sftrl.trainer).
TIME_SPLIT = ("time/iteration_s", "time/rollout_s", "time/critic_s", "time/learner_s", "time/learner_gather_s",
              "bytes/rollout_blocks", "bytes/policy_batch")


def time_split(lines: list[dict]) -> dict[str, float] | None:
    """The median of each of ``TIME_SPLIT`` over the metrics lines of iterations (the first one
    left out, when there are others: it warms up), or None when none was logged."""
    timed = [x for x in lines if "time/iteration_s" in x]
    timed = timed[1:] if len(timed) > 1 else timed
    if not timed:
        return None
    return {key: statistics.median(x[key] for x in timed if key in x) for key in TIME_SPLIT
            if any(key in x for x in timed)} | {"iterations_timed": len(timed)}


def time_split_line(split: dict[str, float]) -> str:
    """The report's line on where an iteration's time went (``time_split``)."""
    def ms(key: str) -> str:
        return f"{split[key] * 1e3:.1f} ms" if key in split else "n/a"

    return (f"- an iteration, median of {split['iterations_timed']} logged: {ms('time/iteration_s')}; rollout call "
            f"{ms('time/rollout_s')} (asked for ahead: it runs beside the rest), critic {ms('time/critic_s')}, "
            f"learner {ms('time/learner_s')} plus {ms('time/learner_gather_s')} gathering its transitions; the rest "
            f"is transfers, waiting and the driver. Rollout blocks {_size(split.get('bytes/rollout_blocks', 0))}, the "
            f"learner's transitions {_size(split.get('bytes/policy_batch', 0))}")


def _size(nbytes: float) -> str:
    if nbytes < 1e3:
        return f"{nbytes:.0f} bytes"
    return next(f"{nbytes / scale:.1f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if nbytes >= scale)


def command_history(run_dir: Path, first_iteration: int, iterations: int, wall_s: float) -> list[dict]:
    """The run directory's fine-tuning commands so far, oldest first: ``{from_iteration,
    to_iteration, wall_s}`` each. A resumed run carries over those of the report it finds that
    ended by the checkpoint it resumed from."""
    earlier: list[dict] = []
    if first_iteration:
        try:
            previous = json.loads((run_dir / "report.json").read_text())
        except (OSError, ValueError):
            previous = {}
        earlier = previous.get("commands") or (
            [{"from_iteration": previous.get("resumed_from_iteration", 0), "to_iteration": previous["iterations"],
              "wall_s": previous["wall_s"]}] if {"iterations", "wall_s"} <= previous.keys() else [])
        earlier = [c for c in earlier if c["to_iteration"] <= first_iteration]
    return [*earlier, {"from_iteration": first_iteration, "to_iteration": iterations, "wall_s": wall_s}]


def write_report(
    run_dir: Path,
    cfg: Config,
    trainer,
    pretrain_info: dict,
    wall_s: float,
    pictures: dict[str, str] | None = None,
    placement: dict[str, dict] | None = None,
    first_iteration: int = 0,
) -> dict:
    """``wall_s``: this command's fine-tuning time, which ran iterations ``first_iteration`` (the
    checkpoint it resumed from, else 0) to ``trainer.iteration``; speeds are over those."""
    rows = evaluation_rows(trainer.evaluations)
    iterations = trainer.iteration
    ran = iterations - first_iteration  # in this command
    chains_ran = ran * trainer.plan.chains_per_iteration
    commands = command_history(run_dir, first_iteration, iterations, wall_s)
    split = time_split(trainer.log.read())
    report = {
        "name": cfg.name,
        "algorithm": cfg.algo.name,
        "critic_regulariser": cfg.algo.critic_regulariser,
        "backend": trainer.system.backend,
        "iterations": iterations,
        "iterations_planned": cfg.trainer.iterations,  # more than "iterations" when stopped early
        "resumed_from_iteration": first_iteration,
        "wall_s": wall_s,
        "seconds_per_iteration": wall_s / ran if ran else None,
        "time_split": split,  # medians of the logged iterations' time/ and bytes/ metrics
        "commands": commands,
        "pretrain": pretrain_info,
        "counters": trainer.counters,
        "events": trainer.events,  # faults met and survived: lost or hung workers, failed evaluations
        "placement": placement or {},
        "evaluations": rows,
        "best": best_evaluation(run_dir, cfg, trainer.evaluations),
        "pictures": pictures or {},
        "config": to_dict(cfg),
    }
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=2, default=str))
    chains = trainer.counters.get("chains", 0)
    md = [
        f"# sftrl run: {cfg.name}",
        "",
        f"Algorithm `{cfg.algo.name}` with critic regulariser `{cfg.algo.critic_regulariser}`, "
        f"schedule `{cfg.diffusion.schedule}` (S = {cfg.diffusion.steps}, T = {cfg.diffusion.num_train_steps}), "
        f"backend `{trainer.system.backend}`, {cfg.rollout.num_workers} rollout worker(s), "
        + (f"async mode (rollouts up to {cfg.rollout.max_lag} weights version(s) behind)." if cfg.rollout.max_lag
           else "sync mode."),
        *([] if iterations >= cfg.trainer.iterations else [
            "", f"**Stopped early** at iteration {iterations} of {cfg.trainer.iterations}: continue with "
            f"`python -m sftrl.run --run-dir {run_dir} --resume auto`."]),
        "",
        "## Evaluation",
        "",
        ((markdown_table(rows) if cfg.is_toy else image_table(rows)) if rows else "(no evaluation for this data set)"),
        "",
        (
            "SW2 is POT's sliced 2-Wasserstein (100 projections, p = 2) between "
            f"{cfg.trainer.eval_samples} samples and as many fresh data points, over {cfg.trainer.eval_draws} draws; "
            "the noise floor is the same statistic between two independent data draws."
            if cfg.is_toy
            else f"FID and KID (torchmetrics) of {cfg.trainer.eval_samples} samples from a fixed seed against the "
            "training images (at most 50,000)."
        ),
        "",
        *([best_line(report["best"], run_dir, cfg.trainer.keep_best), ""] if report["best"] else []),
        "## Run",
        "",
        f"- iterations: {iterations}"
        + (f" ({ran} in this command, resumed at {first_iteration})" if first_iteration else "")
        + f", wall time {wall_s:.1f} s"
        + (f" ({wall_s / ran * 1e3:.1f} ms per iteration)" if ran else ""),
        f"- rollout chains: {chains}"
        + (f" ({chains_ran / wall_s:.0f} per second{' in this command' if first_iteration else ''})"
           if ran and wall_s > 0 else ""),
        *([time_split_line(split)] if split else []),
        *(["- commands: " + "; ".join(f"iterations {c['from_iteration']}-{c['to_iteration']} in {c['wall_s']:.1f} s"
                                       for c in commands)] if len(commands) > 1 else []),
        f"- initial sampler: {pretrain_info.get('source')} ({pretrain_info.get('path')}), "
        f"{pretrain_info.get('seconds', 0.0):.1f} s",
        *([f"- placement: {placement_summary(placement)}"] if placement else []),
        "",
        *(["## Events", "", "Faults the run met and went on from:", "",
            *[f"- iteration {e['iteration']}: {e['event']} ({e.get('detail', '')})" for e in trainer.events], ""]
          if trainer.events else []),
        "## Pictures",
        "",
        *[f"![{caption}]({name})" for caption, name in (pictures or {}).items()],
        "",
        "## Config",
        "",
        "The resolved config (also in `config.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    write_text_atomic(run_dir / "report.md", "\n".join(md))
    return report
