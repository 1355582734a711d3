"""Memory of ``sftrl sample`` against the number of samples: one batch of float images at a time.

    python benchmarks/sample_memory.py [--out benchmarks/results/sample-memory.json] [-n 50000]

Makes a tiny CIFAR-10 run (generated batches, a small U-Net, one iteration, 2 sampling steps: the
sampler's size and step count set the time, not the memory held across batches), then runs
``sftrl sample`` on it for real, as separate processes:

- ``-n 1000`` and ``-n N`` (default 50,000) with ``--batch-size 500``, for ``--format png`` and
  ``--format npz``;
- ``-n N / 5`` with ``--batch-size 2000`` (the batch's own working memory).

Two figures per process. Its peak resident memory (``ru_maxrss`` from ``wait4``): the U-Net's
working memory for a batch comes and goes with every batch, so the peak of a long run is the
highest of many such swings and sits a few hundred MB above a short run's even when nothing is
kept. And the trend: the resident memory polled every 0.5 s, fitted by least squares against
time after the first 10% of the run (start-up), times the fitted span. If the command held every
sample as float32 the trend of the ``-n N`` runs would be about ``N * 3 * 32 * 32 * 4`` bytes
(614 MB at N = 50,000); holding one batch, it is about nothing. The samples of the two formats
are checked equal.
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


def resident_bytes(pid: int) -> int | None:
    """VmRSS of a running process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def trend(series: list[tuple[float, int]], skip: float = 0.1) -> dict:
    """Least-squares line through ``(seconds, rss)`` after the first ``skip`` of the run:
    ``trend_bytes`` = slope x the fitted span (what the process gained over it, start-up and the
    per-batch swings aside), with the fit's standard error."""
    if len(series) < 10:
        return {"trend_bytes": None, "trend_stderr_bytes": None, "rss_samples": len(series)}
    t = np.array([s[0] for s in series], dtype=np.float64)
    r = np.array([s[1] for s in series], dtype=np.float64)
    keep = t >= t[0] + skip * (t[-1] - t[0])
    t, r = t[keep], r[keep]
    slope, intercept = np.polyfit(t, r, 1)
    residual = r - (slope * t + intercept)
    stderr = float(np.sqrt((residual**2).sum() / max(len(t) - 2, 1) / ((t - t.mean()) ** 2).sum()))
    span = float(t[-1] - t[0])
    return {"trend_bytes": int(slope * span), "trend_stderr_bytes": int(stderr * span), "rss_samples": len(series),
            "rss_min_bytes": int(r.min()), "rss_median_bytes": int(np.median(r))}


def sample(run_dir: Path, out: Path, n: int, fmt: str, batch_size: int) -> dict:
    cmd = [sys.executable, "-m", "sftrl.cli", "sample", str(run_dir), "-n", str(n), "--format", fmt,
           "--batch-size", str(batch_size), "--device", "cpu", "--out", str(out), "--no-progress"]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as stderr_file:  # a pipe could fill while we poll
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr_file, text=True)
        series: list[tuple[float, int]] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = resident_bytes(proc.pid)
            if rss is not None:
                series.append((time.monotonic() - start, rss))
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr_file.seek(0)
        stderr = stderr_file.read()
    if proc.returncode != 0:
        raise SystemExit(f"sftrl sample failed:\n{stderr[-3000:]}")
    row = {"n": n, "format": fmt, "batch_size": batch_size, "seconds": round(time.monotonic() - start, 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024, **trend(series)}
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict], n: int) -> dict:
    """The figures the issue asks about, from the runs' rows (see the module doc)."""
    by = {(r["n"], r["format"], r["batch_size"]): r for r in rows}
    wide = next(r for r in rows if r["batch_size"] == 2000)
    trends = {fmt: by[(n, fmt, 500)]["trend_bytes"] for fmt in ("png", "npz")}
    summary = {
        "float_samples_bytes_if_held": n * FLOAT_IMAGE,
        "trend_png_bytes": trends["png"],
        "trend_npz_bytes": trends["npz"],
        "peak_growth_png_bytes": by[(n, "png", 500)]["peak_rss_bytes"] - by[(1000, "png", 500)]["peak_rss_bytes"],
        "peak_growth_npz_bytes": by[(n, "npz", 500)]["peak_rss_bytes"] - by[(1000, "npz", 500)]["peak_rss_bytes"],
        "peak_from_batch_500_to_2000_bytes": wide["peak_rss_bytes"] - by[(n, "npz", 500)]["peak_rss_bytes"],
        "float_batch_500_bytes": 500 * FLOAT_IMAGE,
    }
    # Holding every sample would show as a trend of about all of them; one batch, as about none.
    summary["holds_one_batch"] = all(t is not None and t < 0.1 * n * FLOAT_IMAGE for t in trends.values())
    return summary


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
            sample(run_dir, work / "big-wide.npz", args.n // 5, "npz", 2000),
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
    summary = summarise(rows, args.n)
    summary |= {"npz_and_png_counts_match": same_count, "first_png_matches_npz": same_first}
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
