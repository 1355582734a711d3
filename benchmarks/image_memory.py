"""Memory of a CelebA run's real images: one uint8 copy per node, whatever the number of actors.

    python benchmarks/image_memory.py [--out benchmarks/results/image-memory.json] [--sizes 4000 24000]

For each size N, writes N CelebA-format JPEGs (178x218, as ``img_align_celeba``) and runs
``python -m sftrl.run configs/celeba.yaml`` on them for real: Ray actors (a rollout worker, the
learner, the critic), 64x64 images, a tiny U-Net, a few iterations. While it runs, the run's processes (the command and
every process under it: Ray's GCS, raylet and workers) are read every 0.2 s from
``/proc/<pid>/smaps``: their proportional set size (Pss: a page shared by k processes counts
1/k to each, so the sum over processes is the memory they hold together) in all, and of the
decode cache's mapping alone. The figure is the peak.

What a run costs per image is the slope of the peak between the sizes: the Ray processes,
torch and the models cost the same at every size, and each copy of the images a process made
would add its own slope. The slope times 162,770 (the official train split) is the figure for
real CelebA; the issue's bar is 2.1 GB (the data are 2.0 GB as uint8 at 64x64; as float32 in the
driver and the critic, as before, they were 16 GB).

Before its run, each size's caches are made here, as a first run would make them: the decode
cache (the JPEGs decoded to uint8 once, with its progress lines) and the pretrained-sampler cache
entry, holding the tiny U-Net untrained (pretraining it would cost time in proportion to N and
its activations would dominate the peak; fine-tuning does not care what the U-Net learned). The
measured run finds both, as every run after the first does. It still reads every image (the
driver hashes the whole set for the pretrained sampler's cache key, so every page of the mapping
is resident in the driver), and the critic samples from the same mapping, which is the one copy a
node holds. That the run decoded nothing is checked (the cache is built once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CELEBA_TRAIN = 162_770
BAR_BYTES = 2.1e9
TINY = [
    "data.image_size=64",
    "model.unet_ch=32",
    "model.unet_ch_mult=[1,2]",
    "model.unet_num_res_blocks=1",
    "model.unet_attn_resolutions=[]",
    "model.critic_channels=[8,16,32]",
    "model.baseline_hidden=[32,32]",
    "model.checkpoint=null",
    "pretrain.epochs=1",
    "pretrain.batch_size=32",
    "algo.n_critic=2",
    "algo.n_generator=2",
    "algo.batch_size=32",
    "trainer.iterations=3",
    "trainer.eval_every=0",
    "trainer.log_every=1",
    "trainer.checkpoint_every=0",
    "ray.backend=ray",
    "rollout.num_workers=1",
    "rollout.num_gpus_per_worker=0",
    "ray.learner_num_gpus=0",
    "ray.critic_num_gpus=0",
    "device=cpu",
]


def write_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """``folder/000001.jpg ...``: 178x218 RGB faces-by-numbers (a disc on a background)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(n):
        path = folder / f"{i + 1:06d}.jpg"
        if path.exists():
            continue
        colour, radius = rng.uniform(0, 255, 3), rng.uniform(30, 60)
        noise = rng.integers(0, 24, (218, 178, 1))
        face = ((yy - 121) ** 2 + (xx - 89) ** 2 < radius**2)[..., None]
        arr = np.clip(np.where(face, colour, 255 - colour) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(path, format="JPEG", quality=90)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def pss_kib(pid: int, cache_name: str) -> tuple[int, int, int]:
    """``(Pss of the process, Pss of the cache mapping, Rss of the cache mapping)`` in KiB."""
    total = cache_pss = cache_rss = 0
    in_cache = False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0, 0
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            in_cache = line.endswith(cache_name)
        elif line.startswith("Pss:"):
            kib = int(line.split()[1])
            total += kib
            cache_pss += kib if in_cache else 0
        elif line.startswith("Rss:") and in_cache:
            cache_rss += int(line.split()[1])
    return total, cache_pss, cache_rss


class Watcher(threading.Thread):
    """Samples the run's process tree until stopped; keeps the sample with the most Pss."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.peak: dict = {"pss_bytes": 0}
        self.peak_cache: dict = {"cache_pss_bytes": 0}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = process_tree(self.root)
            rows = {pid: pss_kib(pid, ".u8.npy") for pid in pids}
            sample = {
                "processes": len(pids),
                "pss_bytes": 1024 * sum(r[0] for r in rows.values()),
                "cache_pss_bytes": 1024 * sum(r[1] for r in rows.values()),
                "cache_mappers": sum(1 for r in rows.values() if r[2] > 0),
                "cache_rss_bytes_by_process": sorted((1024 * r[2] for r in rows.values() if r[2] > 0), reverse=True),
            }
            self.samples += 1
            if sample["pss_bytes"] > self.peak["pss_bytes"]:
                self.peak = sample
            if sample["cache_pss_bytes"] > self.peak_cache["cache_pss_bytes"]:
                self.peak_cache = sample
            self.stop.wait(0.2)


def _decode_caches(work: Path) -> dict[str, tuple[int, int]]:
    """The decode caches under ``work/cache/data``: name -> (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (work / "cache" / "data").glob("*.u8.npy")}


def run_once(folder: Path, work: Path, tag: str, timeout_s: float = 1800) -> dict:
    run_dir = work / f"run-{tag}"
    cmd = [sys.executable, "-m", "sftrl.run", "configs/celeba.yaml", *TINY, f"data.path={folder}",
           f"pretrain.cache_dir={work / 'cache' / 'pretrained'}", "--run-dir", str(run_dir)]  # progress: plain lines
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    caches_before = _decode_caches(work)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watcher = Watcher(proc.pid)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # stop the run (SIGTERM: it shuts its Ray down), then say so
        proc.terminate()
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise SystemExit(f"run {tag} did not finish in {timeout_s:.0f} s (a loaded machine starves Ray's "
                         "niced workers: run it alone, or raise --timeout)") from None
    finally:
        watcher.stop.set()
        watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"run {tag} failed ({proc.returncode}):\n{stderr[-3000:]}")
    decode_lines = [line for line in stderr.splitlines() if "decode celeba" in line]
    caches_after = _decode_caches(work)
    return {
        "seconds": round(time.monotonic() - start, 1),
        # the decode cache was written by this run: a new or rewritten .u8.npy (name -> (inode, mtime))
        "decoded": any(caches_before.get(name) != stamp for name, stamp in caches_after.items()),
        "pretrained": any("[pretrain]" in line for line in stderr.splitlines()),
        "decode_progress_lines": decode_lines[:2] + decode_lines[-1:] if decode_lines else [],
        "samples": watcher.samples,
        "peak": watcher.peak,
        "peak_cache": watcher.peak_cache,
    }


def seed_caches(folder: Path, work: Path) -> dict:
    """Build the decode cache of ``folder`` and a pretrained-sampler cache entry for it (an
    untrained tiny U-Net) where the runs look for them; returns what it took."""
    from sftrl.components import fresh_sampler
    from sftrl.config import load
    from sftrl.data import load_real_data
    from sftrl.files import torch_save_atomic
    from sftrl.pretraining import cache_path, data_fingerprint, sampler_checkpoint

    cfg = load(REPO / "configs" / "celeba.yaml", [*TINY, f"data.path={folder}",
                                                  f"pretrain.cache_dir={work / 'cache' / 'pretrained'}"])
    before = _decode_caches(work)
    start = time.monotonic()
    data = load_real_data(cfg, progress=True)  # the decode cache, with its progress lines
    decoded_s = time.monotonic() - start
    path = cache_path(cfg, data_fingerprint(data))
    shape = tuple(data.shape[1:])
    del data  # the measured run maps the cache itself
    torch_save_atomic(sampler_checkpoint(fresh_sampler(cfg, shape), cfg, {"seconds": 0.0}), path)
    return {"decoded": _decode_caches(work) != before, "decode_seconds": round(decoded_s, 1),
            "pretrained_cache": path.name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "image-memory.json"))
    p.add_argument("--sizes", type=int, nargs=2, default=[4000, 24000], metavar=("SMALL", "LARGE"))
    p.add_argument("--work", help="keep the JPEGs and caches here (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = {}
        for n in args.sizes:
            folder = work / f"celeba-{n}" / "img_align_celeba"
            t = time.monotonic()
            write_jpegs(folder, n)
            print(f"{n} JPEGs written in {time.monotonic() - t:.0f} s", flush=True)
            seeded = seed_caches(folder, work)
            run = run_once(folder, work, f"{n}", args.timeout)
            results[n] = {"caches": seeded, "run": run}
            print(f"N={n}: peak Pss {run['peak']['pss_bytes'] / 1e6:.0f} MB over {run['peak']['processes']} "
                  f"processes (cache mapping {run['peak_cache']['cache_pss_bytes'] / 1e6:.1f} MB); the run "
                  f"decoded {run['decoded']}, pretrained {run['pretrained']}", flush=True)
    out = {
        "what": "peak Pss of a celeba run's process tree (driver + Ray) vs the number of images; slope per image",
        "command": "python benchmarks/image_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": {str(k): v for k, v in results.items()},
        "summary": summarise(results, *args.sizes),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))


def summarise(results: dict, small: int, large: int) -> dict:
    """Bytes per image (the slope of the peak Pss), extrapolated to the CelebA train split."""
    per_image = (results[large]["run"]["peak"]["pss_bytes"] - results[small]["run"]["peak"]["pss_bytes"]) / (large - small)
    cache_per_image = (results[large]["run"]["peak_cache"]["cache_pss_bytes"]
                       - results[small]["run"]["peak_cache"]["cache_pss_bytes"]) / (large - small)
    uint8_image = 3 * 64 * 64
    return {
        "bytes_per_image_uint8": uint8_image,
        "bytes_per_image_measured": round(per_image),
        "cache_mapping_bytes_per_image": round(cache_per_image),
        "copies_per_node": round(per_image / uint8_image, 2),
        "celeba_train_bytes_extrapolated": round(per_image * CELEBA_TRAIN),
        "bar_bytes": BAR_BYTES,
        "within_bar": per_image * CELEBA_TRAIN <= BAR_BYTES,
        "cache_built_once": all(r["caches"]["decoded"] and not r["run"]["decoded"] and not r["run"]["pretrained"]
                                for r in results.values()),
    }


if __name__ == "__main__":
    main()
