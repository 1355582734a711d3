"""Beyond the paper on digits: FID over iterations of SFT-PG and its variants, over seeds.

    python benchmarks/digits_variants.py [--variants sft-pg sft-pg-kl lora-r4 learned-variance]
        [--seeds 0 1 2] [--out benchmarks/results/digits-variants.json]
    python benchmarks/digits_variants.py --merge A.json B.json ... --out benchmarks/results/digits-variants.json

Each variant is ``configs/digits.yaml`` with a few overrides (``VARIANTS``), run through
``python -m sftrl.run`` in a subprocess per seed (``seed=S``; the pretrained sampler is the same
cached one for every run). The run's own evaluations (every ``trainer.eval_every`` = 50
iterations, 1797 samples, the digits CNN's FID) give the curve; per run the table reports the best
FID, the last one and the drift (last / best - 1: how far the sampler moved back after its best
point), and per variant their mean and spread over the seeds. LoRA's rows also say the bytes of
one weights publication (``bytes/...`` is not logged; ``benchmarks/lora_bytes.py`` measures it
for the large U-Nets).

A run that fails keeps its folder (metrics, checkpoints) in ``runs/digits-variants-failed/``, and
the variant's error names it with the FIDs it reached.

A variant is one of ``VARIANTS`` or ``NAME=KEY=VALUE[,KEY=VALUE...]`` for another override set.
The JSON is rewritten after every run, so a long invocation that stops keeps what it measured.
Runs take about 9 minutes each on an idle 2-core machine (one core each: ``torch_threads: 1``), so
two invocations can share the machine; ``--merge`` joins their JSONs into one report (a later
file's run of the same variant and seed replaces an earlier one) and runs nothing.

The questions (issue 22): does ``sft-pg-kl`` end within 10% of its best where ``sft-pg`` drifts
back, with a best no worse; does LoRA reach full fine-tuning's FID within the seed spread; do
learned variances beat fixed ones by more than the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script or as benchmarks.digits_variants
import few_steps  # noqa: E402  (beside this script: the variant syntax both benchmarks take)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.yaml"
KEEP_FAILED = REPO / "runs" / "digits-variants-failed"  # a failed run's folder (git ignores runs/)
VARIANTS: dict[str, list[str]] = {
    "sft-pg": [],
    "sft-pg-kl": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.01"],
    "sft-pg-kl-floor": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.01", "algo.sft-pg-kl.min_std=0.1"],
    # LoRA's update (alpha / r) B A starts at B = 0 and moves about 10x less per Adam step than a
    # fully fine-tuned weight at the same lr (each entry of A is about 1 / sqrt(fan_in)), so its lr is 10x.
    "lora-r4": ["model.lora_rank=4", "algo.policy_lr=1e-4"],
    # At 150 iterations it is still improving; twice the iterations (twice the time).
    "lora-r4-300": ["model.lora_rank=4", "algo.policy_lr=1e-4", "trainer.iterations=300"],
    # The log-stds at digits.yaml's policy lr (1e-5) would move by at most 0.015 in 1500 Adam steps.
    "learned-variance": ["model.learn_variance=true", "model.variance_lr=3e-4"],
    # Evaluation on the moving average of the sampler's weights (updated once per iteration: 0.95
    # averages about the last 20 of the 150), with and without the KL.
    "sft-pg-ema": ["algo.ema_decay=0.95"],
    "sft-pg-kl-ema": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.01", "algo.sft-pg-kl.min_std=0.1", "algo.ema_decay=0.95"],
    "sft-pg-kl-b0.005-ema": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.005", "algo.sft-pg-kl.min_std=0.1",
                             "algo.ema_decay=0.95"],
    "sft-pg-kl-b0.003-ema": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.003", "algo.sft-pg-kl.min_std=0.1",
                             "algo.ema_decay=0.95"],
    # The KL and the average slow the sampler down (at 150 two seeds of three are still improving):
    # the same for 250 iterations, and plain sft-pg over as many for the comparison.
    "sft-pg-kl-b0.003-ema-250": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.003", "algo.sft-pg-kl.min_std=0.1",
                                 "algo.ema_decay=0.95", "trainer.iterations=250"],
    "sft-pg-250": ["trainer.iterations=250"],
    # beta 0.005 with the average over 250 iterations: does the larger beta hold where 0.003 drifts?
    "sft-pg-kl-b0.005-ema-250": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.005", "algo.sft-pg-kl.min_std=0.1",
                                 "algo.ema_decay=0.95", "trainer.iterations=250"],
    # beta 0.003 with the average and the policy lr decayed linearly to 0 over the 250 iterations:
    # the steps after iteration 200, where seed 2 turns under every variant, are then small.
    "sft-pg-kl-b0.003-ema-decay-250": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.003", "algo.sft-pg-kl.min_std=0.1",
                                       "algo.ema_decay=0.95", "algo.policy_lr_decay=linear", "trainer.iterations=250"],
    "sft-pg-kl-b0.005-ema-decay-250": ["algo.name=sft-pg-kl", "algo.sft-pg-kl.beta=0.005", "algo.sft-pg-kl.min_std=0.1",
                                       "algo.ema_decay=0.95", "algo.policy_lr_decay=linear", "trainer.iterations=250"],
    # The KL to the run's best evaluated sampler (reference: best; benchmarks/results/
    # digits-kl-drift-seed2.json: the KL to theta_0 stays flat while seed 2 drifts), the anchor
    # moved at evaluations every 25 iterations. Beta 0.03 held at theta_0 stalls at FID 8.75; here
    # the anchor follows the sampler down.
    **{f"sft-pg-kl-best-b{beta}-ema-250": ["algo.name=sft-pg-kl", f"algo.sft-pg-kl.beta={beta}",
                                          "algo.sft-pg-kl.min_std=0.1", "algo.sft-pg-kl.reference=best",
                                          "algo.ema_decay=0.95", "trainer.eval_every=25", "trainer.iterations=250"]
       for beta in ("0.01", "0.03", "0.1")},
}


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """A ``VARIANTS`` name or ``NAME=KEY=VALUE[,KEY=VALUE...]``: (name, overrides)."""
    return few_steps.parse_variant(spec, VARIANTS)


def merge(outputs: list[dict]) -> dict:
    """The ``results`` of several outputs joined per variant: runs by seed (a later output's run of
    the same seed replaces an earlier one), summaries recomputed; a variant with no run keeps its error."""
    results: dict = {}
    for out in outputs:
        for name, r in out["results"].items():
            entry = results.setdefault(name, {"overrides": r["overrides"], "runs": {}})
            if entry["overrides"] != r["overrides"]:
                raise ValueError(f"variant {name!r} has overrides {r['overrides']} in one output and "
                                 f"{entry['overrides']} in another: give one of them another name")
            entry["runs"].update({run["seed"]: run for run in r["runs"]})
            if "error" in r:
                entry["error"] = r["error"]
    merged = {}
    for name, entry in results.items():
        runs = [entry["runs"][seed] for seed in sorted(entry["runs"])]
        merged[name] = ({"overrides": entry["overrides"], "runs": runs, "summary": variant_summary(runs)} if runs
                        else {"overrides": entry["overrides"], "runs": [], "error": entry.get("error", "no run")})
    return merged


def fid_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """``(iteration, FID)`` of every evaluation a run's ``metrics.jsonl`` holds, in order."""
    return few_steps.metric_curve(metrics_path, "eval/fid")


def run_summary(curve: list[tuple[int, float]]) -> dict:
    """Best and last FID of one run, and the drift back from the best: last / best - 1."""
    fids = [f for _, f in curve]
    best = min(fids)
    return {"curve": curve, "initial_fid": fids[0], "best_fid": best,
            "best_iteration": next(i for i, f in curve if f == best), "last_fid": fids[-1],
            "drift": fids[-1] / best - 1.0}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def variant_summary(runs: list[dict]) -> dict:
    return {key: spread([r[key] for r in runs]) for key in ("best_fid", "last_fid", "drift")}


def _cell(stat: dict, fmt: str, runs: int) -> str:
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}" if runs > 1 else f"{stat['mean']:{fmt}}"


def markdown(results: dict) -> str:
    lines = ["| variant | overrides | seeds | FID by iteration (the first seed listed) | best FID | last FID | "
             "drift (last/best - 1) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | `{' '.join(r['overrides'])}` | - | failed: {r['error'][:120]} | | | |")
            continue
        curve = ", ".join(f"{i}: {f:.2f}" for i, f in r["runs"][0]["curve"])
        cells = [_cell(r["summary"][key], fmt, len(r["runs"])) for key, fmt in
                 (("best_fid", ".2f"), ("last_fid", ".2f"), ("drift", "+.1%"))]
        seeds = [run["seed"] for run in r["runs"] if "seed" in run]
        count = f"{len(r['runs'])} ({', '.join(map(str, seeds))})" if len(seeds) == len(r["runs"]) else str(len(r["runs"]))
        lines.append(f"| {name} | `{' '.join(r['overrides']) or '(digits.yaml)'}` | {count} | {curve} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failure_line(stderr: str) -> str:
    """What a failed run said: its ``error:`` line where it printed one (Ray's worker logs may
    follow it), else its last line."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def run_one(overrides: list[str], seed: int, work: Path, cache_dir: str | None) -> dict:
    run_dir = work / f"run-{abs(hash((tuple(overrides), seed)))}"
    cmd = [sys.executable, "-m", "sftrl.run", str(CONFIG), *overrides, f"seed={seed}", "--run-dir", str(run_dir),
           "--no-progress", *([f"pretrain.cache_dir={cache_dir}"] if cache_dir else [])]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if done.returncode != 0:
        kept = few_steps.keep_failed_run(run_dir, KEEP_FAILED, fid_curve)
        curve = ", ".join(f"{i}: {fid:.2f}" for i, fid in kept.get("curve", []))
        where = ""
        if kept.get("kept_at"):
            where = f" (FID {curve or 'none yet'}; its folder: {kept['kept_at']})"
        elif kept:
            where = f" ({kept['keep_error']})"
        error = few_steps.where_kept(failure_line(done.stderr) or f"exit {done.returncode}", run_dir, kept)
        raise RuntimeError(error + where)
    return {"seed": seed, "seconds": round(time.monotonic() - start, 1), **run_summary(fid_curve(run_dir / "metrics.jsonl"))}


def write(path: Path, results: dict, command: str) -> None:
    out = {
        "what": "digits FID (digits CNN) at each evaluation of configs/digits.yaml and its variants, per seed",
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
        "markdown": markdown(results),
    }
    from sftrl.files import write_atomic

    # never a half-written report (a full disk keeps the old one)
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=2) + "\n"))
    write_atomic(path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(out["markdown"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help=f"{', '.join(VARIANTS)}, or NAME=KEY=VALUE[,KEY=VALUE...]")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--cache-dir", help="pretrain.cache_dir (default: the config's)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="join these outputs into --out; run nothing")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "digits-variants.json")
    args = p.parse_args()
    command = "python benchmarks/digits_variants.py " + " ".join(sys.argv[1:])
    for path in (args.out, args.out.with_suffix(".md")):  # before the runs, not after the first one
        if path.is_dir():
            p.error(f"--out {args.out}: {path} is a directory; give the path of a .json file to write")
    if args.merge:
        outputs = []
        for path in args.merge:
            try:
                out = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                p.error(f"--merge {path}: not a readable JSON file ({err})")
            if not isinstance(out, dict) or not isinstance(out.get("results"), dict):
                p.error(f"--merge {path}: not a digits_variants output (it has no 'results' mapping)")
            bad = [name for name, variant in out["results"].items()
                   if not (isinstance(variant, dict) and isinstance(variant.get("runs"), list)
                           and all(isinstance(run, dict) for run in variant["runs"]))]
            if bad:
                p.error(f"--merge {path}: not a digits_variants output (variant {', '.join(map(repr, bad))} has no "
                        "list of runs)")
            outputs.append(out)
        try:
            results = merge(outputs)
        except (ValueError, KeyError, TypeError) as err:
            p.error(f"--merge: {err}")
        commands = [o["command"] for o in outputs if isinstance(o.get("command"), str)]  # as each output was made
        write(args.out, results, " ; ".join([*commands, command]))
        print(markdown(results))
        return
    try:
        variants = [parse_variant(spec) for spec in args.variants]
    except ValueError as err:
        p.error(str(err))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in variants:
            runs: list[dict] = []
            try:
                for seed in args.seeds:
                    runs.append(run_one(overrides, seed, Path(tmp), args.cache_dir))
                    print(json.dumps({"variant": name, **{k: v for k, v in runs[-1].items() if k != "curve"}}), flush=True)
                    results[name] = {"overrides": overrides, "runs": runs, "summary": variant_summary(runs)}
                    write(args.out, results, command)
            except RuntimeError as err:  # a variant that cannot run (e.g. peft missing) is reported
                results[name] = {"overrides": overrides, "runs": runs, "error": str(err)}
                write(args.out, results, command)
    print(markdown(results))


if __name__ == "__main__":
    main()
