"""Peak memory of ``sftrl sample`` against the number of samples: one batch of float images at a time.

    python benchmarks/sample_memory.py [--out benchmarks/results/sample-memory.json] [-n 50000]

Makes a tiny CIFAR-10 run (generated batches, a small U-Net, one iteration, 2 sampling steps: the
sampler's size and step count set the time, not the memory held across batches), then runs
``sftrl sample`` on it for real, as separate processes:

- ``-n 1000`` and ``-n N`` (default 50,000) with ``--batch-size 500``, for ``--format png`` and
  ``--format npz``;
- ``-n N`` with ``--batch-size 2000``.

The figure is each process's peak resident memory (``ru_maxrss`` from ``wait4``). If the command
held every sample as float32 the peak would grow by ``(N - 1000) * 3 * 32 * 32 * 4`` bytes (602 MB
at N = 50,000) from the first run to the second; holding one batch, it grows by about nothing,
and it grows with the batch size instead. The samples of the two formats are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLOAT_IMAGE = 3 * 32 * 32 * 4
TINY = [
    "model.unet_ch=32",
    "model.unet_ch_mult=[1,2]",
    "model.unet_num_res_blocks=1",
    "model.unet_attn_resolutions=[]",
    "model.critic_channels=[8,16,32]",
    "model.baseline_hidden=[32,32]",
    "algo.n_critic=1",
    "algo.n_generator=1",
    "algo.batch_size=4",
    "trainer.iterations=1",
    "trainer.eval_every=0",
    "trainer.eval_samples=8",
    "trainer.checkpoint_every=0",
    "diffusion.steps=2",
    "ray.backend=local",
    "rollout.num_gpus_per_worker=0",
    "ray.learner_num_gpus=0",
    "ray.critic_num_gpus=0",
    "device=cpu",
]


def write_cifar(root: Path, per_batch: int = 8) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": [0] * per_batch}, f)
    return root


def make_run(work: Path) -> Path:
    import torch

    from sftrl.models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(out_ch=3, in_channels=3, resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0)
    torch.save(unet.state_dict(), work / "ddpm.pt")
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "sftrl.run", "configs/cifar10.yaml", *TINY, f"data.path={write_cifar(work / 'cifar')}",
           f"model.checkpoint={work / 'ddpm.pt'}", f"pretrain.cache_dir={work / 'cache'}", "--run-dir", str(run_dir),
           "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the tiny CIFAR-10 run failed:\n{done.stderr[-3000:]}")
    return run_dir


def sample(run_dir: Path, out: Path, n: int, fmt: str, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "sftrl.cli", "sample", str(run_dir), "-n", str(n), "--format", fmt,
           "--batch-size", str(batch_size), "--device", "cpu", "--out", str(out), "--no-progress"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"sftrl sample failed:\n{stderr[-3000:]}")
    row = {"n": n, "format": fmt, "batch_size": batch_size, "seconds": round(time.monotonic() - start, 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sample-memory.json"))
    p.add_argument("-n", type=int, default=50_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_dir = make_run(work)
        rows = [
            sample(run_dir, work / "small-png", 1000, "png", 500),
            sample(run_dir, work / "big-png", args.n, "png", 500),
            sample(run_dir, work / "small.npz", 1000, "npz", 500),
            sample(run_dir, work / "big.npz", args.n, "npz", 500),
            sample(run_dir, work / "big-wide.npz", args.n, "npz", 2000),
        ]
        from PIL import Image

        from sftrl.pictures import to_uint8

        with np.load(work / "big.npz") as z:
            key = next(iter(z.files))
            arr = z[key]
            pngs = sorted((work / "big-png").glob("*.png"))
            same_count = len(pngs) == args.n == len(arr)
            first_png = np.asarray(Image.open(pngs[0]))
            same_first = bool((first_png == to_uint8(arr[:1])[0].transpose(1, 2, 0)).all())  # npz: floats in [-1, 1]
    by = {(r["n"], r["format"], r["batch_size"]): r["peak_rss_bytes"] for r in rows}
    float_all = (args.n - 1000) * FLOAT_IMAGE
    summary = {
        "float_samples_bytes_if_held": args.n * FLOAT_IMAGE,
        "growth_png_bytes": by[(args.n, "png", 500)] - by[(1000, "png", 500)],
        "growth_npz_bytes": by[(args.n, "npz", 500)] - by[(1000, "npz", 500)],
        "growth_if_all_held_bytes": float_all,
        "growth_from_batch_500_to_2000_bytes": by[(args.n, "npz", 2000)] - by[(args.n, "npz", 500)],
        "float_batch_500_bytes": 500 * FLOAT_IMAGE,
        "npz_and_png_counts_match": same_count,
        "first_png_matches_npz": same_first,
    }
    summary["holds_one_batch"] = max(summary["growth_png_bytes"], summary["growth_npz_bytes"]) < 0.1 * float_all
    out = {
        "what": "peak RSS of `sftrl sample` (tiny CIFAR-10 U-Net, CPU) vs the number of samples and the batch size",
        "command": "python benchmarks/sample_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
