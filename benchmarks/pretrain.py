"""Pretrain the toy DDPM sampler for the paper's budget and measure its SW2 (Table 1's DDPM rows).

    python benchmarks/pretrain.py --T 10 [--epochs 2000] [--out benchmarks/results/pretrain-T10.json]

Writes JSON with the wall time, the final eps-MSE, and SW2 (x1e-2, mean +- std over 5 draws of
10K samples against fresh swiss rolls) with the data-vs-data noise floor beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sftrl.components import fresh_sampler
from sftrl.config import load
from sftrl.data import fresh_data_fn, load_real_data
from sftrl.diffusion.betas import make_betas
from sftrl.evaluation import EvalSettings, ToyEvaluator
from sftrl.plan import schedule_of
from sftrl.pretraining import pretrain_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/swissroll.yaml")
    parser.add_argument("--T", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load(
        args.config,
        [
            f"diffusion.num_train_steps={args.T}",
            f"diffusion.steps={args.T}",
            "diffusion.schedule=ddpm",
            f"pretrain.epochs={args.epochs}",
            f"pretrain.batch_size={args.batch_size}",
            f"pretrain.lr={args.lr}",
        ],
    )
    data = load_real_data(cfg)
    sampler = fresh_sampler(cfg, tuple(data.shape[1:]))
    start = time.monotonic()
    info = pretrain_sampler(
        sampler,
        data,
        make_betas(cfg.diffusion.beta_schedule, args.T),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_grad_norm=cfg.pretrain.max_grad_norm,
        seed=cfg.pretrain.seed,
    )
    seconds = time.monotonic() - start
    evaluator = ToyEvaluator(sampler, schedule_of(cfg), fresh_data_fn(cfg), data.shape[1:], EvalSettings())
    result = evaluator.evaluate(None)
    out = {
        "T": args.T,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pretrain_seconds": seconds,
        "final_eps_mse": info["epoch_loss"][-1],
        "eval": result,
        "sw2_x1e2": f"{result['sw2_mean'] * 100:.2f} +- {result['sw2_std'] * 100:.2f} "
        f"(floor {result['sw2_floor_mean'] * 100:.2f})",
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    print(json.dumps(out, indent=2))
    path = Path(args.out or f"benchmarks/results/pretrain-T{args.T}-e{args.epochs}-b{args.batch_size}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
