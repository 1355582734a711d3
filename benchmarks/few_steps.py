"""Fewer steps than the paper's T' = 10: how close to the data does SFT-PG get at T' = 5 and 2?

    python benchmarks/few_steps.py [--configs swissroll-t5 swissroll-t2 gaussian-t2] [--seeds 0 1 2]
        [--variants fixed learned] [--fine-tune-candidates] [--cache-dir DIR] [--set KEY=VALUE ...]
        [--out benchmarks/results/few-steps.json]
    python benchmarks/few_steps.py --merge A.json B.json ... --out benchmarks/results/few-steps-X.json

For each config (``configs/<name>.yaml``):
- candidates: the initial SW2 of each candidate start at the config's T' (naive strided
  sub-sampling of a T = 1000 toy DDPM with the beta or the posterior variance, FastDPM's VAR
  schedules of a T = 1000 DDPM with linear betas, and a DDPM trained with T = T'), each pretrained
  with the config's own pretraining settings and scored with its evaluation protocol; with
  ``--fine-tune-candidates`` each is also fine-tuned with the config's settings (the first seed,
  the first variant), which is how the config's start was picked;
- runs: ``python -m sftrl.run configs/<name>.yaml seed=S <variant overrides>`` for every seed and
  variant, in a subprocess (Ray in-process, as a user runs it). Each run reports its initial and
  fine-tuned SW2 and the data-vs-data noise floor of the same evaluation (``sw2_floor_mean``:
  SW2 between two independent draws of the data, measured once per run), their ratio, and wall
  times. A run that fails (for example a variant whose option this sftrl lacks, or one stopped by
  hand) is recorded with its error, the SW2 curve it reached and where its folder is kept
  (``--keep-failed``, default ``runs/few-steps-failed/``), and the rest go on.
Variants are override sets: ``fixed`` (the config as written, the paper's fixed step variances),
``learned`` (``model.learn_variance=true``; where the config's schedule has a deterministic step,
with ``diffusion.final_step_std=0.001`` as its starting std, the paper's image-code value), or
``NAME=KEY=VALUE[,KEY=VALUE...]`` for another set.

The pretraining cache starts cold by default (a fresh folder under the run's temporary directory),
so the first run of each config includes its pretraining, as a user's first run would;
``--cache-dir`` reuses a cache. ``--set`` adds overrides to every run and candidate (shortened
runs: ``--set trainer.iterations=100 --set ray.backend=local``).

Writes the JSON at ``--out``, a markdown table beside it (``.md``), and for each config the
sampling paths of the initial and fine-tuned sampler of the first seed (Figure 7's picture, from
the run's own ``sampling_paths.png``) as ``few-steps-<config>-paths.png`` beside it for the
``fixed`` variant, ``few-steps-<config>-<variant>-paths.png`` for the others (``-seed<S>`` added
when the first seed is not 0). A run takes one core
(``torch_threads: 1``), so one invocation per seed can share a machine; ``--merge`` joins their
JSONs into one report (a later file's run of the same config, variant and seed replaces an earlier
one) and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("swissroll-t5", "swissroll-t2", "gaussian-t2")
# Each variant says its variances outright, whatever the config ships (swissroll-t5 learns them).
# "fixed" also clears model.variance_lr and algo.entropy_coef, which a config that learns its
# variances may set (both need learned stds).
VARIANTS: dict[str, list[str]] = {"fixed": ["model.learn_variance=false", "model.variance_lr=null", "algo.entropy_coef=0"],
                                  "learned": ["model.learn_variance=true"]}
# model.learn_variance starts each step's std at its sigma, and a deterministic step (sigma = 0:
# FastDPM's and the posterior variance's last step) at diffusion.final_step_std, which must then
# be above model.variance_floor: such configs get the paper's image-code value with it.
LEARNED_FINAL_STEP_STD = 0.001
# The target: fine-tuned SW2 at most this many times the run's own data noise floor.
TARGET_RATIO = 1.5
# Where a failed or stopped run's folder goes (it would go with the temporary directory): under the
# repository's runs/, which git ignores.
KEEP_FAILED = REPO / "runs" / "few-steps-failed"

# Candidate starts at S = T' steps: overrides on top of the config (same data, networks and
# pretraining budget). "{S}" is the config's diffusion.steps.
CANDIDATES: dict[str, list[str]] = {
    "strided, T = 1000 sigmoid, beta variance": [
        "diffusion.num_train_steps=1000", "diffusion.beta_schedule=sigmoid", "diffusion.schedule=strided",
        "diffusion.variance=beta"],
    "strided, T = 1000 sigmoid, posterior variance": [
        "diffusion.num_train_steps=1000", "diffusion.beta_schedule=sigmoid", "diffusion.schedule=strided",
        "diffusion.variance=posterior"],
    "FastDPM VAR linear, T = 1000 linear, kappa 1": [
        "diffusion.num_train_steps=1000", "diffusion.beta_schedule=linear", "diffusion.schedule=fastdpm-var-linear",
        "diffusion.kappa=1.0"],
    "FastDPM VAR quadratic, T = 1000 linear, kappa 1": [
        "diffusion.num_train_steps=1000", "diffusion.beta_schedule=linear",
        "diffusion.schedule=fastdpm-var-quadratic", "diffusion.kappa=1.0"],
    "DDPM trained with T = T'": [
        "diffusion.num_train_steps={S}", "diffusion.beta_schedule=sigmoid", "diffusion.schedule=ddpm",
        "diffusion.variance=beta"],
}


# -- the pure part: rows in, summaries and tables out -------------------------------------------


def parse_variant(spec: str, known: Mapping[str, list[str]] | None = None) -> tuple[str, list[str]]:
    """A name of ``known`` (default ``VARIANTS``: ``fixed`` / ``learned``) or
    ``NAME=KEY=VALUE[,KEY=VALUE...]``: (name, overrides). ``digits_variants`` parses its own with it."""
    known = VARIANTS if known is None else known
    if spec in known:
        return spec, list(known[spec])
    name, sep, overrides = spec.partition("=")
    if not sep or not name or not overrides:
        raise ValueError(f"variant {spec!r}: give one of {', '.join(known)} or NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, [o for o in overrides.split(",") if o]


def with_start_std(overrides: list[str], schedule_sigma: Sequence[float], final_step_std: float) -> list[str]:
    """``overrides`` plus ``diffusion.final_step_std=LEARNED_FINAL_STEP_STD`` when they learn the
    variance of a schedule with a deterministic step and the config sets no floor for it."""
    learned = "model.learn_variance=true" in [o.lower() for o in overrides]
    set_here = any(o.startswith("diffusion.final_step_std=") for o in overrides)
    if learned and not set_here and final_step_std == 0 and min(schedule_sigma) == 0:
        return [*overrides, f"diffusion.final_step_std={LEARNED_FINAL_STEP_STD}"]
    return overrides


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single value); NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def metric_curve(metrics_path: Path, key: str) -> list[tuple[int, float]]:
    """``(iteration, value of key)`` of every entry of a run's ``metrics.jsonl`` that has ``key``, in order."""
    curve = []
    for line in metrics_path.read_text().splitlines():
        entry = json.loads(line)
        if key in entry:
            curve.append((int(entry["iteration"]), float(entry[key])))
    return curve


def sw2_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """``(iteration, SW2)`` of every evaluation a run's ``metrics.jsonl`` holds, in order."""
    return metric_curve(metrics_path, "eval/sw2_mean")


def run_row(config: str, variant: str, seed: int, report: Mapping, wall_s: float,
            curve: Sequence[tuple[int, float]] | None = None) -> dict:
    """One run's numbers from its ``report.json``: the first evaluation is the initial sampler,
    the last the fine-tuned one; the floor is the run's own data-vs-data SW2. ``curve``: every
    evaluation (``sw2_curve``; default: the report's first and last)."""
    evaluations = report["evaluations"]
    initial, tuned = evaluations[0], evaluations[-1]
    floor = tuned["sw2_floor_mean"]
    return {
        "config": config, "variant": variant, "seed": seed, "ok": True,
        "initial_sw2": initial["sw2_mean"], "sw2": tuned["sw2_mean"], "sw2_std": tuned["sw2_std"],
        "floor": floor, "floor_std": tuned["sw2_floor_std"], "ratio": tuned["sw2_mean"] / floor,
        "exact_w2": tuned.get("exact_w2"), "spread_ratio": tuned.get("spread_ratio"),  # std(samples) / std(data)
        "iterations": report["iterations"], "wall_s": wall_s,
        "fine_tune_s": report["wall_s"], "pretrain": report["pretrain"],
        "curve": list(curve) if curve else [(e.get("iteration"), e["sw2_mean"]) for e in evaluations],
    }


def summarise(rows: Iterable[Mapping]) -> list[dict]:
    """Per (config, variant), in first-seen order: mean and spread over the seeds that ran, the
    seeds that failed with their errors, and whether the mean ratio meets ``TARGET_RATIO``."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["variant"]), []).append(row)
    out = []
    for (config, variant), group in groups.items():
        ok = [r for r in group if r.get("ok")]
        summary: dict = {"config": config, "variant": variant, "seeds": [r["seed"] for r in ok],
                         "failed": {str(r["seed"]): r.get("error", "") for r in group if not r.get("ok")}}
        for key in ("initial_sw2", "sw2", "floor", "ratio", "wall_s", "fine_tune_s"):
            summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std([r[key] for r in ok])
        summary["sw2_max"] = max((r["sw2"] for r in ok), default=math.nan)
        summary["ratio_max"] = max((r["ratio"] for r in ok), default=math.nan)
        summary["meets_target"] = bool(ok) and summary["ratio_mean"] <= TARGET_RATIO
        out.append(summary)
    return out


def _sig(value: float) -> str:
    """Three significant digits, never in exponent form (a Gaussian-cluster floor is 0.0250e-2)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(2 - math.floor(math.log10(abs(value))), 0)}f}"


def _pm(mean: float, std: float, scale: float = 100.0) -> str:
    """``mean ± std`` times ``scale`` (SW2 in units of 1e-2 by default) to three significant digits."""
    if math.isnan(mean):
        return "-"
    return f"{_sig(mean * scale)} ± {_sig(std * scale)}"


def _seconds(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.0f} ± {std:.0f}"


def results_table(summaries: Sequence[Mapping]) -> str:
    """The markdown table of ``summarise``'s rows (SW2 and floor in units of 1e-2)."""
    lines = ["| config | variant | seeds | initial SW2 | fine-tuned SW2 | floor | ratio (max) | wall s | fine-tune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        if not s["seeds"]:
            error = next(iter(s["failed"].values()), "").strip().splitlines()
            lines.append(f"| {s['config']} | {s['variant']} | 0 of {len(s['failed'])} | failed: "
                         f"{(error[-1] if error else '?')[:120].replace('|', '/')} | | | | | |")
            continue
        failed = f" ({len(s['failed'])} failed)" if s["failed"] else ""
        lines.append(
            f"| {s['config']} | {s['variant']} | {len(s['seeds'])}{failed} | {_pm(s['initial_sw2_mean'], s['initial_sw2_std'])} "
            f"| {_pm(s['sw2_mean'], s['sw2_std'])} | {_pm(s['floor_mean'], s['floor_std'])} "
            f"| {s['ratio_mean']:.2f} ({s['ratio_max']:.2f}) | {_seconds(s['wall_s_mean'], s['wall_s_std'])} "
            f"| {_seconds(s['fine_tune_s_mean'], s['fine_tune_s_std'])} |")
    return "\n".join(lines)


def candidates_table(candidates: Sequence[Mapping]) -> str:
    """The markdown table of candidate starts: initial SW2, and fine-tuned SW2 where measured."""
    lines = ["| config | start | initial SW2 | floor | fine-tuned SW2 (ratio) |", "|---|---|---|---|---|"]
    for c in candidates:
        if "error" in c:
            lines.append(f"| {c['config']} | {c['start']} | failed: {c['error'].strip().splitlines()[-1][:120]} | | |")
            continue
        tuned = c.get("fine_tuned")
        tuned_text = ("-" if tuned is None else f"failed: {tuned['error'].strip().splitlines()[-1][:80]}"
                      if "error" in tuned else f"{_sig(tuned['sw2'] * 100)} ({tuned['ratio']:.2f})")
        lines.append(f"| {c['config']} | {c['start']} | {_pm(c['sw2_mean'], c['sw2_std'])} "
                     f"| {_sig(c['sw2_floor_mean'] * 100)} | {tuned_text} |")
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------


def run_sftrl(config: str, overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    """``python -m sftrl.run configs/<config>.yaml <overrides>``: (report, wall seconds), or
    RuntimeError with the end of its stderr."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sftrl.run", f"configs/{config}.yaml", *overrides, "--run-dir", str(run_dir),
         "--no-progress"], cwd=REPO, capture_output=True, text=True,
    )
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"sftrl.run {config} {' '.join(overrides)} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    return json.loads((run_dir / "report.json").read_text()), wall


def keep_failed_run(run_dir: Path, keep_dir: Path,
                    curve: Callable[[Path], list[tuple[int, float]]] = sw2_curve) -> dict:
    """A failed (or stopped) run's folder moved out of the benchmark's temporary directory into
    ``keep_dir`` (its metrics, checkpoints and logs are what tells why it failed), with the curve
    it reached (``curve`` of its metrics.jsonl): ``{"kept_at", "curve"}``, or ``{}`` where the run
    made no folder."""
    if not run_dir.is_dir():
        return {}
    target, n = keep_dir / run_dir.name, 1
    while target.exists():
        n += 1
        target = keep_dir / f"{run_dir.name}-{n}"
    try:
        keep_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), target)
    except OSError as error:  # the benchmark goes on; the row says why the folder is not kept
        return {"kept_at": None, "keep_error": f"could not keep {run_dir} in {keep_dir}: {error}"}
    metrics = target / "metrics.jsonl"
    return {"kept_at": str(target), "curve": curve(metrics) if metrics.is_file() else []}


def where_kept(message: str, run_dir: Path, kept: dict) -> str:
    """``message`` (a failed run's error) with ``run_dir`` replaced by where ``keep_failed_run``
    moved it: a stopped run's "continue with: ... --run-dir DIR --resume auto" then names a
    folder that exists."""
    return message.replace(str(run_dir), kept["kept_at"]) if kept.get("kept_at") else message


def candidate_overrides(config: str, extra: Sequence[str]) -> dict[str, list[str]]:
    """Each candidate start's overrides for ``config`` (``{S}`` filled with its steps)."""
    from sftrl.config import load

    steps = load(REPO / "configs" / f"{config}.yaml", list(extra)).diffusion.steps
    return {name: [o.format(S=steps) for o in overrides] for name, overrides in CANDIDATES.items()}


def score_candidate(config: str, overrides: list[str]) -> dict:
    """Pretrain (or load from the cache) the start ``overrides`` describes and score it with the
    config's evaluation protocol (its seed, samples and draws)."""
    import torch

    from sftrl.components import fresh_sampler
    from sftrl.config import load
    from sftrl.data import fresh_data_fn, load_real_data
    from sftrl.evaluation import EvalSettings, ToyEvaluator
    from sftrl.plan import Seeds, schedule_of
    from sftrl.pretraining import load_or_pretrain

    cfg = load(REPO / "configs" / f"{config}.yaml", overrides)
    torch.set_num_threads(cfg.torch_threads)
    data = load_real_data(cfg)
    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))
    start = time.monotonic()
    info = load_or_pretrain(cfg, sampler, data, progress=False)
    t = cfg.trainer
    settings = EvalSettings(num_samples=t.eval_samples, draws=t.eval_draws, exact_w2_points=t.exact_w2_points,
                            seed=Seeds(cfg.seed).evaluation)
    result = ToyEvaluator(sampler, schedule_of(cfg), fresh_data_fn(cfg), data.shape[1:], settings).evaluate(None)
    return {"pretrain": info, "seconds": time.monotonic() - start, **result}


def run_config(config: str, seeds: Sequence[int], variants: Sequence[tuple[str, list[str]]], extra: list[str],
               cache_dir: str, workdir: Path, out_dir: Path, keep_dir: Path = KEEP_FAILED,
               ) -> tuple[list[dict], dict[str, str]]:
    """Every (variant, seed) run of ``config``; returns the rows and the pictures written. A run that
    fails keeps its folder in ``keep_dir`` (``keep_failed_run``)."""
    from sftrl.config import load
    from sftrl.plan import schedule_of

    cfg = load(REPO / "configs" / f"{config}.yaml", extra)
    sigma, floor = schedule_of(cfg).sigma.tolist(), cfg.diffusion.final_step_std
    rows: list[dict] = []
    pictures: dict[str, str] = {}
    for variant, variant_overrides in variants:
        overrides = with_start_std(variant_overrides, sigma, floor)
        for seed in seeds:
            run_dir = workdir / f"{config}-{variant}-{seed}"
            try:
                report, wall = run_sftrl(config, [f"pretrain.cache_dir={cache_dir}", f"seed={seed}", *extra, *overrides],
                                         run_dir)
                row = run_row(config, variant, seed, report, wall, sw2_curve(run_dir / "metrics.jsonl"))
                row |= {"overrides": overrides}
            except (RuntimeError, OSError, ValueError, KeyError, IndexError, ZeroDivisionError) as error:
                kept = keep_failed_run(run_dir, keep_dir)
                row = {"config": config, "variant": variant, "seed": seed, "ok": False,
                       "error": where_kept(str(error), run_dir, kept), "overrides": overrides, **kept}
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}, default=str)[:600], flush=True)
            rows.append(row)
            paths = run_dir / "sampling_paths.png"
            if seed == seeds[0] and row["ok"] and paths.is_file():
                # seed 0's under the plain name; another seed's named (one invocation per seed, side by side)
                suffix = ("" if variant == "fixed" else f"-{variant}") + (f"-seed{seed}" if seed else "")
                target = out_dir / f"few-steps-{config}{suffix}-paths.png"
                shutil.copyfile(paths, target)
                pictures[variant] = target.name
    return rows, pictures


def run_candidates(config: str, extra: list[str], cache_dir: str, fine_tune: tuple[int, list[str]] | None,
                   workdir: Path) -> list[dict]:
    """The candidate starts of ``config``: initial SW2, and with ``fine_tune`` (seed, variant
    overrides) a fine-tuning run of each with the config's settings."""
    rows: list[dict] = []
    for name, overrides in candidate_overrides(config, extra).items():
        full = [f"pretrain.cache_dir={cache_dir}", *extra, *overrides]
        row: dict = {"config": config, "start": name, "overrides": overrides}
        try:
            row |= score_candidate(config, full)
        except Exception as error:  # a start this sftrl cannot build is a row, not the end of the benchmark
            row["error"] = f"{type(error).__name__}: {error}"
        if fine_tune is not None and "error" not in row:
            seed, variant_overrides = fine_tune
            run_dir = workdir / f"{config}-candidate-{len(rows)}"
            try:
                report, wall = run_sftrl(config, [*full, f"seed={seed}", *variant_overrides], run_dir)
                row["fine_tuned"] = run_row(config, "candidate", seed, report, wall)
            except (RuntimeError, OSError, ValueError, KeyError, IndexError, ZeroDivisionError) as error:
                row["fine_tuned"] = {"error": str(error)}
        print(json.dumps({k: v for k, v in row.items() if k != "fine_tuned"}, default=str)[:600], flush=True)
        rows.append(row)
    return rows


def markdown(result: Mapping) -> str:
    summaries, candidates = result["summary"], result["candidates"]
    md = ["## Fewer steps (T' = 5 and 2)", "",
          "SW2 and floor in units of 1e-2 (POT, 100 projections, p = 2, mean ± std over the seeds of each run's "
          "mean over its evaluation draws); the floor is each run's own data-vs-data SW2; ratio = fine-tuned SW2 / "
          f"floor, mean over seeds (max); target <= {TARGET_RATIO}. Wall s: the whole `python -m sftrl.run` "
          "command (the first seed of a config pretrains when the cache is cold); fine-tune s: its iterations "
          "and evaluations.", "", results_table(summaries), ""]
    if candidates:
        md += ["### Candidate starts", "",
               "Initial SW2 of each start at the config's T' (same data, networks and pretraining budget)"
               + ("; fine-tuned with the config's settings, first seed." if result["fine_tune_candidates"] else "."),
               "", candidates_table(candidates), ""]
    if result["pictures"]:
        md += ["Sampling paths (first seed): " + ", ".join(
            f"{config} {variant}: `{name}`" for config, names in result["pictures"].items()
            for variant, name in names.items()) + ".", ""]
    if result.get("note"):
        md += [f"Note: {result['note']}", ""]
    md += [f"Seeds {' '.join(map(str, result['seeds']))}; overrides on every run: "
           f"{' '.join(result['set']) or 'none'}. Benchmark wall time: {result['benchmark_wall_s']:.0f} s"
           + (f", summed over {result['merged']} merged outputs." if result.get("merged", 1) > 1 else "."), ""]
    return "\n".join(md)


def merge(outputs: Sequence[Mapping], note: str = "") -> dict:
    """Several outputs joined into one: runs by (config, variant, seed) in first-seen order, a later
    output's run replacing an earlier one (a rerun, or a run stopped by hand and written in as a failed
    row); candidates and pictures joined; summaries recomputed; wall times summed; ``note`` or theirs."""
    rows: dict[tuple, dict] = {}
    result: dict = {"configs": [], "seeds": [], "variants": {}, "set": [], "target_ratio": TARGET_RATIO,
                    "fine_tune_candidates": False, "candidates": [], "pictures": {}, "benchmark_wall_s": 0.0,
                    "commands": []}
    for out in outputs:
        for row in out["runs"]:
            rows[(row["config"], row["variant"], row["seed"])] = row
        result["configs"] += [c for c in out["configs"] if c not in result["configs"]]
        result["seeds"] = sorted(set(result["seeds"]) | set(out["seeds"]))
        result["variants"].update(out["variants"])
        result["set"] += [s for s in out["set"] if s not in result["set"]]
        result["fine_tune_candidates"] |= bool(out.get("fine_tune_candidates"))
        result["candidates"] += out.get("candidates", [])
        for config, names in out.get("pictures", {}).items():
            result["pictures"].setdefault(config, {}).update(names)
        result["benchmark_wall_s"] += out.get("benchmark_wall_s", 0.0)
        result["commands"] += out.get("commands", [])
    result["note"] = note or " ".join(o["note"] for o in outputs if o.get("note"))
    result["runs"] = list(rows.values())
    result["summary"] = summarise(result["runs"])
    result["merged"] = len(outputs)
    return result


def read_output(path: Path) -> dict:
    """A few_steps JSON (ValueError naming the file and what it lacks)."""
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    missing = [k for k in ("runs", "configs", "seeds", "variants", "set") if not isinstance(out, dict) or k not in out]
    if missing:
        raise ValueError(f"{path}: not a few_steps output (no {', '.join(repr(k) for k in missing)})")
    return out


def write(out: Path, result: Mapping, markdown_only: bool = False) -> str:
    """The JSON at ``out`` (unless ``markdown_only``) and its markdown beside it, each written whole or
    not at all; returns the markdown."""
    from sftrl.files import write_atomic

    md = markdown(result)
    if not markdown_only:
        write_atomic(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, default=str)))
    write_atomic(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(md))
    return md


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configs/<name>.yaml to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["fixed"],
                        help="override sets: fixed, learned (model.learn_variance=true) or NAME=KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--no-candidates", action="store_true", help="skip the candidate starts")
    parser.add_argument("--fine-tune-candidates", action="store_true",
                        help="also fine-tune every candidate start (first seed, first variant)")
    parser.add_argument("--cache-dir", default=None, help="pretrained-sampler cache (default: a cold one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run and candidate (repeatable)")
    parser.add_argument("--out", default="benchmarks/results/few-steps.json")
    parser.add_argument("--note", default="", help="a sentence for the table: what these runs are")
    parser.add_argument("--markdown-only", action="store_true",
                        help="run nothing: write the markdown table of the JSON already at --out")
    parser.add_argument("--keep-failed", default=str(KEEP_FAILED), metavar="DIR",
                        help="where a failed or stopped run's folder is kept (default: runs/few-steps-failed)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: join these outputs (e.g. one per seed, run side by side) into --out")
    args = parser.parse_args(argv)
    command = "python benchmarks/few_steps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for path in (Path(args.out), Path(args.out).with_suffix(".md")):  # before hours of runs, not after
        if path.is_dir():
            parser.error(f"--out {args.out}: {path} is a directory; give the path of a .json file to write")
    if args.merge:
        try:
            result = merge([read_output(path) for path in args.merge], args.note)
        except ValueError as error:
            parser.error(f"--merge {error}")
        except (KeyError, TypeError, AttributeError) as error:  # a row or field of the wrong shape
            parser.error(f"--merge: a file's runs are not few_steps rows ({type(error).__name__}: {error})")
        result["commands"].append(command)
        print(write(Path(args.out), result))
        return 0
    if args.markdown_only:
        try:
            result = read_output(Path(args.out))
        except ValueError as error:
            parser.error(f"--markdown-only {error}")
        print(write(Path(args.out), result, markdown_only=True))
        return 0
    try:
        variants = [parse_variant(spec) for spec in args.variants]
    except ValueError as error:
        parser.error(str(error))
    unknown = [c for c in args.configs if not (REPO / "configs" / f"{c}.yaml").is_file()]
    if unknown:
        parser.error(f"no configs/<name>.yaml for {', '.join(unknown)}")
    start = time.monotonic()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    candidates: list[dict] = []
    pictures: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cache_dir = args.cache_dir or str(workdir / "cold-cache")
        for config in args.configs:
            config_rows, pictures[config] = run_config(config, args.seeds, variants, args.set, cache_dir, workdir,
                                                       out.parent, Path(args.keep_failed))
            rows += config_rows
            if not args.no_candidates:
                fine_tune = (args.seeds[0], variants[0][1]) if args.fine_tune_candidates else None
                candidates += run_candidates(config, args.set, cache_dir, fine_tune, workdir)
    result = {"note": args.note, "configs": args.configs, "seeds": args.seeds, "variants": dict(variants), "set": args.set,
              "target_ratio": TARGET_RATIO, "fine_tune_candidates": args.fine_tune_candidates,
              "summary": summarise(rows), "runs": rows, "candidates": candidates,
              "pictures": {c: p for c, p in pictures.items() if p},
              "benchmark_wall_s": time.monotonic() - start, "commands": [command]}
    print(write(out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
