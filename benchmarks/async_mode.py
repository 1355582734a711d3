"""Async mode against sync mode on the default swiss-roll run: wall time, time per iteration and
the SW2 it ends at.

    python benchmarks/async_mode.py [--rounds 2] [--lag 1] [--out benchmarks/results/async-swissroll.json]

Each round runs ``python -m sftrl.run configs/swissroll.yaml`` twice through Ray in-process, once
in sync mode (``rollout.max_lag=0``, Algorithm 1 exactly) and once with ``rollout.max_lag=LAG``,
in alternating order (this machine's speed drifts within minutes). The pretrained sampler is
cached before the first round, so every run is fine-tuning only. Per run: the fine-tuning wall
time, the median ``time/iteration_s``, every evaluation (SW2 x1e-2, mean and std over 5 draws)
and the seconds to the first evaluation at SW2 <= 1.0e-2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from table1 import REPO, TARGET_SW2, run_sftrl, time_to_target, write_json  # noqa: E402

from sftrl.components import fresh_sampler  # noqa: E402
from sftrl.config import load  # noqa: E402
from sftrl.data import load_real_data  # noqa: E402
from sftrl.pretraining import load_or_pretrain  # noqa: E402

CONFIG = "configs/swissroll.yaml"


def one_run(mode: str, lag: int, cache_dir: str, run_dir: Path) -> dict:
    report, wall = run_sftrl(CONFIG, [f"rollout.max_lag={lag}", f"pretrain.cache_dir={cache_dir}"], run_dir)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [x for x in lines if "time/iteration_s" in x]
    final = report["evaluations"][-1]
    return {
        "mode": mode,
        "max_lag": lag,
        "command_wall_s": wall,
        "fine_tune_wall_s": report["wall_s"],
        "iteration_ms_median": statistics.median(x["time/iteration_s"] for x in iterations) * 1e3,
        "weights_lag_last": iterations[-1]["rollout/weights_lag"],
        "final_sw2_x1e2": final["sw2_mean"] * 100,
        "final_sw2_std_x1e2": final["sw2_std"] * 100,
        "floor_sw2_x1e2": final["sw2_floor_mean"] * 100,
        "time_to_target_s": time_to_target(run_dir),
        "evaluations": [{"iteration": x["iteration"], "sw2_x1e2": x["eval/sw2_mean"] * 100,
                         "sw2_std_x1e2": x["eval/sw2_std"] * 100, "elapsed_s": x["eval/elapsed_s"]}
                        for x in lines if "eval/sw2_mean" in x],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lag", type=int, default=1, help="rollout.max_lag of the async runs")
    parser.add_argument("--cache-dir", default="~/.cache/sftrl/pretrained")
    parser.add_argument("--out", default="benchmarks/results/async-swissroll.json")
    args = parser.parse_args()
    start = time.monotonic()
    cfg = load(REPO / CONFIG, [f"pretrain.cache_dir={args.cache_dir}"])
    data = load_real_data(cfg)
    load_or_pretrain(cfg, fresh_sampler(cfg, tuple(data.shape[1:])), data, progress=False)  # cached once
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [("sync", 0), ("async", args.lag)]
            for mode, lag in order if r % 2 else order[::-1]:
                runs.append(one_run(mode, lag, args.cache_dir, Path(tmp) / f"{mode}-{r}"))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "evaluations"}), flush=True)
    summary = {
        mode: {key: statistics.median(run[key] for run in runs if run["mode"] == mode)
               for key in ("fine_tune_wall_s", "iteration_ms_median", "final_sw2_x1e2")}
        for mode in ("sync", "async")
    }
    write_json(args.out, {"config": CONFIG, "target_sw2": TARGET_SW2, "summary": summary, "runs": runs,
                          "benchmark_wall_s": time.monotonic() - start})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
