"""The CPU image benchmark: SFT-PG (B) on scikit-learn's 8x8 digits, a small Table 3.

    python benchmarks/digits.py [--out benchmarks/results/digits.json] [--full-samples N] [--with-t10]

Rows (FID and KID of N samples against the 1797 training digits, all with the same seed):
- DDPM strided T' = 10: the pretrained T = 1000 model sub-sampled naively (Table 3's "DDPM" row);
- initial T' = 10: the same model with the config's schedule (FastDPM VAR quadratic), the sampler
  fine-tuning starts from;
- SFT-PG (B) T' = 10: ``configs/digits.yaml`` run through ``python -m sftrl.run`` in a subprocess,
  scored from its final checkpoint;
- DDPM T = 1000: the pretrained model with all 1000 steps (``--full-samples`` samples: the slow row);
- with ``--with-t10``: a DDPM *trained* with T = 10 (the paper's "Case 1" start, as on MNIST).
The feature network is the digits CNN (``sftrl.metrics.fid.digits_extractor``), named in every
row: these FIDs compare samplers on digits and are not comparable with published Inception FIDs.
The data-vs-data floor (two halves of the training set) is reported beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sftrl.checkpoint import latest_checkpoint, load_checkpoint
from sftrl.config import Config, load
from sftrl.data import load_real_data
from sftrl.diffusion.schedules import make_schedule
from sftrl.evaluation import ImageEvalSettings, ImageEvaluator, extractor_cache_dir
from sftrl.learner import sampler_state_dict
from sftrl.metrics.fid import digits_extractor, fid_kid
from sftrl.models import build_unet
from sftrl.plan import Seeds, schedule_of
from sftrl.pretraining import load_or_pretrain

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits.yaml"


def run_sftrl(overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sftrl.run", str(CONFIG), *overrides, "--run-dir", str(run_dir), "--no-progress"],
        cwd=REPO, capture_output=True, text=True,
    )
    wall = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"sftrl.run {CONFIG.name} {overrides} failed:\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "report.json").read_text()), wall


def pretrained(cfg: Config, data: np.ndarray) -> tuple[torch.nn.Module, dict, float]:
    sampler = build_unet(cfg, tuple(data.shape[1:]))
    start = time.monotonic()
    info = load_or_pretrain(cfg, sampler, data, progress=True)
    return sampler.eval(), info, time.monotonic() - start


GRIDS: dict[str, np.ndarray] = {}  # method -> its evaluation's sample grid (the first 64, same seed)


def score(method: str, sampler, schedule, real, extractor, num_samples: int, seed: int) -> dict:
    evaluator = ImageEvaluator(sampler, schedule, real, extractor, ImageEvalSettings(num_samples=num_samples, seed=seed))
    start = time.monotonic()
    result = evaluator.evaluate(None)
    GRIDS[method] = result.pop("pictures")["samples"]
    row = {"method": method, "steps": schedule.num_steps, "schedule": schedule.name, **result,
           "eval_seconds": time.monotonic() - start}
    print(json.dumps(row), flush=True)
    return row


def fmt(row: dict, before: dict[str, float]) -> str:
    was = f"{before[row['method']]:.2f}" if row["method"] in before else "-"
    return (f"| {row['method']} | {row['steps']} | {row['fid']:.2f} | {was} | {row['kid_mean']:.4g} ± "
            f"{row['kid_std']:.2g} | {row['num_fake']} | {row['eval_seconds']:.0f} |")


def previous_fids(path: Path) -> dict[str, float]:
    """FID by method of the results this run replaces (the table's "before" column)."""
    try:
        return {row["method"]: row["fid"] for row in json.loads(path.read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/digits.json")
    parser.add_argument("--cache-dir", default="~/.cache/sftrl/pretrained")
    parser.add_argument("--full-samples", type=int, default=None,
                        help="samples for the 1000-step row (default: trainer.eval_samples; each costs 1000 U-Net calls)")
    parser.add_argument("--with-t10", action="store_true", help="also pretrain and score a DDPM trained with T = 10")
    parser.add_argument("--what-changed", default="", help="a sentence for the table: what changed since the "
                        "previous results at --out (their FIDs are the \"FID before\" column)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for configs/digits.yaml (e.g. algo.policy_lr=3e-5)")
    args = parser.parse_args()
    start = time.monotonic()
    overrides = [f"pretrain.cache_dir={args.cache_dir}", *args.overrides]
    cfg = load(CONFIG, overrides)
    torch.set_num_threads(cfg.torch_threads)
    real = load_real_data(cfg)  # (1797, 1, 8, 8) in [-1, 1]
    extractor = digits_extractor(extractor_cache_dir(cfg), image_size=real.shape[-1])
    n, seed = cfg.trainer.eval_samples, Seeds(cfg.seed).evaluation  # the run's own evaluation protocol
    T = cfg.diffusion.num_train_steps

    half = np.random.default_rng(0).permutation(len(real))
    floor = fid_kid(real[half[: len(real) // 2]], real[half[len(real) // 2 :]], extractor).to_dict()

    sampler, pretrain_info, pretrain_s = pretrained(cfg, real)
    rows = [
        score(f"DDPM strided T' = {cfg.diffusion.steps}", sampler,
              make_schedule("strided", cfg.diffusion.steps, num_train_steps=T, beta_schedule=cfg.diffusion.beta_schedule),
              real, extractor, n, seed),
        score(f"initial ({cfg.diffusion.schedule}) T' = {cfg.diffusion.steps}", sampler, schedule_of(cfg), real, extractor, n, seed),
    ]
    initial_state = {k: v.clone() for k, v in sampler.state_dict().items()}

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "digits"
        report, run_wall = run_sftrl(overrides, run_dir)
        state = load_checkpoint(latest_checkpoint(run_dir))
    sampler.load_state_dict(sampler_state_dict(state["learner"]))
    tuned = score(f"SFT-PG (B) T' = {cfg.diffusion.steps}", sampler, schedule_of(cfg), real, extractor, n, seed)
    tuned |= {"iterations": report["iterations"], "run_wall_s": run_wall, "fine_tune_wall_s": report["wall_s"],
              "run_report_evaluations": report["evaluations"]}
    rows.append(tuned)

    sampler.load_state_dict(initial_state)
    full = make_schedule("ddpm", T, num_train_steps=T, beta_schedule=cfg.diffusion.beta_schedule)
    rows.append(score(f"DDPM T = {T}", sampler, full, real, extractor, args.full_samples or n, seed))

    t10_info = None
    if args.with_t10:
        cfg10 = load(CONFIG, [*overrides, "diffusion.num_train_steps=10", "diffusion.steps=10", "diffusion.schedule=ddpm"])
        sampler10, t10_info, _ = pretrained(cfg10, real)
        rows.append(score("DDPM trained with T = 10", sampler10, schedule_of(cfg10), real, extractor, n, seed))

    result = {
        "config": str(CONFIG.relative_to(REPO)),
        "overrides": args.overrides,
        "what_changed": args.what_changed,
        "image_init": cfg.model.image_init,
        "extractor": extractor.name,
        "extractor_heldout_accuracy": extractor.heldout_accuracy,
        "data_floor_half_vs_half": floor,
        "pretrain": {**pretrain_info, "wall_s": pretrain_s, "epochs": cfg.pretrain.epochs},
        "pretrain_t10": t10_info,
        "fine_tune": dataclasses.asdict(cfg.algo) | {"iterations": cfg.trainer.iterations},
        "rows": rows,
        "improvement_fid": rows[1]["fid"] - tuned["fid"],
        "benchmark_wall_s": time.monotonic() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = previous_fids(out)
    result["previous_fid"] = before
    out.write_text(json.dumps(result, indent=2, default=str))
    from sftrl.data import flips
    from sftrl.pictures import save_png

    grid_names = {}
    for i, (method, grid) in enumerate(GRIDS.items()):
        grid_names[method] = save_png(grid, out.with_name(f"{out.stem}-samples-{i}.png")).name
    md = [
        "## Digits (8x8, scikit-learn), T' = 10",
        "",
        f"FID / KID of samples against the {len(real)} training digits; extractor: {extractor.name} "
        f"(held-out accuracy {extractor.heldout_accuracy:.3f}). Data-vs-data floor (two halves): "
        f"FID {floor['fid']:.2f}.",
        "",
        "| sampler | steps | FID | FID before | KID (feature units) | samples | eval s |",
        "|---|---|---|---|---|---|---|",
        *(fmt(row, before) for row in rows),
        "",
        "\"FID before\": the previous results at this path. "
        + (f"What changed since: {args.what_changed} " if args.what_changed else "")
        + f"This run: critic and baseline init `model.image_init: {cfg.model.image_init}`; real digits "
        f"{'flipped' if flips(cfg) else 'not flipped'} (`data.flip` is on by default for CIFAR-10 and CelebA only).",
        "",
        "Samples (the first 64 of each row's draw, same seed): "
        + ", ".join(f"{method}: `{name}`" for method, name in grid_names.items()) + ".",
        "",
        f"Fine-tuning: {report['iterations']} iterations of `{CONFIG.name}` "
        f"({' '.join(args.overrides) or 'no overrides'}), {tuned['fine_tune_wall_s']:.0f} s "
        f"({run_wall:.0f} s with start-up and the run's own evaluations). Pretraining "
        f"({cfg.pretrain.epochs} epochs, T = {T}): {pretrain_info['source']}, {pretrain_s:.0f} s here. "
        f"Benchmark wall time: {result['benchmark_wall_s']:.0f} s.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
