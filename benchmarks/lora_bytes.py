"""Bytes of one weights publication: full fine-tuning against LoRA at several ranks.

    python benchmarks/lora_bytes.py [--out benchmarks/results/lora-bytes.json] [--ranks 1 2 4 8 16]

For the U-Nets of configs/cifar10.yaml (35.7M parameters) and configs/celeba.yaml (78.7M), built
from the config with random weights (the sizes do not depend on the values; no data is read), it
builds the learner as a run does (``sftrl.components.make_learner``, ``model.lora_rank`` set) and
measures what it publishes every policy version, ``Learner.get_weights()``: the pickled size
(protocol 5, as Ray serialises it) and the arrays' own bytes. With LoRA it also measures the
frozen base the rollout workers get once (``Learner.get_base_weights()``). The issue's target:
a LoRA publication of at most 5% of full fine-tuning's bytes on the CIFAR-10 U-Net.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"cifar10": "configs/cifar10.yaml", "celeba": "configs/celeba.yaml"}
TARGET_FRACTION = 0.05  # the target on the CIFAR-10 U-Net


def pickled_bytes(obj) -> int:
    return len(pickle.dumps(obj, protocol=5))


def measure(config: str, rank: int) -> dict:
    """One learner of ``config`` with ``model.lora_rank = rank`` (0: full fine-tuning)."""
    from sftrl.components import InitState, make_learner
    from sftrl.config import load
    from sftrl.data import image_shape

    cfg = load(REPO / config, [f"model.lora_rank={rank}", "ray.backend=local", "device=cpu", "model.checkpoint=null"])
    learner = make_learner(cfg, InitState(None, image_shape(cfg, 3)))
    weights = learner.get_weights()
    base = learner.get_base_weights()
    row = {
        "rank": rank,
        "parameters": sum(p.numel() for p in learner.policy.parameters()),
        "trainable_parameters": sum(p.numel() for p in learner.policy.parameters() if p.requires_grad),
        "published_tensors": len(weights.state),
        "publication_bytes": pickled_bytes(weights),
        "publication_array_bytes": sum(a.nbytes for a in weights.state.values()),
        "base_bytes_once_per_worker": pickled_bytes(base) if base is not None else 0,
    }
    return row


def run(ranks: list[int]) -> dict:
    results: dict = {}
    for name, config in CONFIGS.items():
        rows = []
        for rank in [0, *ranks]:
            start = time.perf_counter()
            row = measure(config, rank)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps({"unet": name, **row}), flush=True)
        full = rows[0]["publication_bytes"]
        for row in rows:
            row["fraction_of_full"] = row["publication_bytes"] / full
        results[name] = {"config": config, "rows": rows}
    return results


def markdown(results: dict) -> str:
    lines = ["| U-Net | fine-tuned | trainable parameters | bytes per publication | of full fine-tuning |",
             "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        size = r["rows"][0]["parameters"]  # full fine-tuning's row: the U-Net without adapters
        for row in r["rows"]:
            what = "full" if row["rank"] == 0 else f"LoRA r={row['rank']}"
            lines.append(f"| {name} ({size / 1e6:.1f}M) | {what} | {row['trainable_parameters']:,} | "
                         f"{row['publication_bytes']:,} | {100 * row['fraction_of_full']:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lora-bytes.json"))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    import peft
    import torch

    results = run(args.ranks)
    cifar = {row["rank"]: row["fraction_of_full"] for row in results["cifar10"]["rows"]}
    report = {
        "what": "pickled bytes (protocol 5) of Learner.get_weights(): one weights publication",
        "target": f"LoRA publication <= {TARGET_FRACTION:.0%} of full fine-tuning's on the CIFAR-10 U-Net",
        "target_met_at_ranks": [r for r, f in cifar.items() if r > 0 and f <= TARGET_FRACTION],
        "results": results,
        "markdown": markdown(results),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "command": f"python benchmarks/lora_bytes.py --ranks {' '.join(map(str, args.ranks))}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
