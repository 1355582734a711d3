"""Faults and bad inputs, injected into real runs: what survives, what the user sees, what is lost.

    python benchmarks/faults.py [--out benchmarks/results/faults.json] [--only faults|inputs] [--tries 4]

**Faults.** Each class is made for real in ``python -m sftrl.run configs/smoke.yaml`` subprocesses:
kill -9 of the driver while it checkpoints every iteration, SIGTERM, kill -9 and SIGSTOP of a
Ray rollout worker, a full disk (a tmpfs filled mid-run; needs root), a torn and a hand-damaged
metrics line, a corrupt latest checkpoint, a second command on a running run directory, a
poisoned sampler cache and a code-carrying CIFAR-10 pickle. A fault is *survived* when the run
ends as promised (exit code, one line) and resumes; *lost* lists what did not hold: an iteration
missing or repeated in metrics.jsonl, a checkpoint that does not load, a file of the user's
changed, code run from a data file.

**Bad inputs.** Each is one command a careless user (or an attacker) could type: bad values,
files, data, flags and places. The promise: exit 2, exactly one ``error:`` line, no traceback,
in seconds, and the run directory not made (or not changed).

Prints a markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


# --------------------------------------------------------------------------- running commands


def sftrl(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftrl.run", SMOKE, *overrides, "--run-dir", str(run_dir),
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the run did not get there in time")
        time.sleep(0.2)


def lines_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def training_iterations(run_dir: Path) -> list[int]:
    return [r["iteration"] for r in lines_of(run_dir) if "critic/ipm_gap" in r]


def logged(run_dir: Path, n: int) -> Callable[[], bool]:
    return lambda: len(training_iterations(run_dir)) >= n


def resume(run_dir: Path, iterations: int, *more: str) -> subprocess.CompletedProcess:
    return sftrl(["sftrl.run", "--run-dir", str(run_dir), "--resume", "auto", f"trainer.iterations={iterations}",
                  "--no-progress", *more])


def last_iteration(run_dir: Path) -> int:
    from sftrl.checkpoint import latest_checkpoint, load_checkpoint

    return int(load_checkpoint(latest_checkpoint(run_dir))["iteration"])


def check_continuous(run_dir: Path, end: int) -> list[str]:
    """What the run log lost: iterations missing or repeated up to ``end``."""
    seen = training_iterations(run_dir)
    lost = []
    if sorted(set(seen)) != list(range(1, end + 1)):
        lost.append(f"iterations missing: {sorted(set(range(1, end + 1)) - set(seen))[:10]}")
    if len(seen) != len(set(seen)):
        lost.append("iterations logged twice")
    return lost


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error")]


def one_line(stderr: str) -> bool:
    return len(error_lines(stderr)) == 1 and "Traceback" not in stderr


# --------------------------------------------------------------------------- faults


def fault_kill9_while_checkpointing(work: Path, cache: str, tries: int) -> dict:
    """kill -9 of the driver at a random moment while it checkpoints every iteration."""
    lost, kills = [], []
    for k in range(tries):
        run_dir = work / f"kill9-{k}"
        proc = start(run_dir, ["ray.backend=local", "trainer.iterations=100000", "trainer.log_every=1",
                               "trainer.eval_every=0", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2",
                               f"pretrain.cache_dir={cache}"])
        wait_for(proc, logged(run_dir, 5))
        time.sleep(random.Random(k).uniform(0.0, 0.5))
        proc.kill()
        proc.communicate()
        kills.append(len(training_iterations(run_dir)))
        stopped = last_iteration(run_dir)
        result = resume(run_dir, stopped + 3, "ray.backend=local")
        if result.returncode != 0:
            lost.append(f"try {k}: resume failed: {error_lines(result.stderr)}")
            continue
        lost += [f"try {k}: {x}" for x in check_continuous(run_dir, stopped + 3)]
    return {"tries": tries, "survived": tries - len({x.split(':')[0] for x in lost}), "lost": lost,
            "detail": f"killed after {kills} logged iterations; each resumed to its checkpoint + 3"}


def fault_sigterm(work: Path, cache: str, tries: int) -> dict:
    run_dir = work / "sigterm"
    proc = start(run_dir, ["trainer.iterations=100000", "trainer.log_every=1", "trainer.eval_every=0",
                           f"pretrain.cache_dir={cache}"])
    wait_for(proc, logged(run_dir, 5))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lost = [] if proc.returncode == 128 + signal.SIGTERM else [f"exit {proc.returncode}"]
    stopped = last_iteration(run_dir)
    result = resume(run_dir, stopped + 3, "ray.backend=local")
    lost += [] if result.returncode == 0 else ["resume failed"]
    lost += check_continuous(run_dir, stopped + 3)
    return {"tries": 1, "survived": int(not lost), "lost": lost, "detail": f"exit {proc.returncode}, stopped at {stopped}"}


def worker_pid(stderr_lines: list[str]) -> int | None:
    for line in stderr_lines:
        found = re.search(r"worker-0 \S+ on \S+ \(pid (\d+)\)", line)
        if found:
            return int(found.group(1))
    return None


def _worker_fault(work: Path, cache: str, name: str, sig: int, extra: list[str]) -> dict:
    import threading

    run_dir = work / name
    iterations = 60
    proc = start(run_dir, [f"trainer.iterations={iterations}", "trainer.log_every=1", "trainer.eval_every=0",
                           "rollout.num_workers=2", "algo.n_critic=4", f"pretrain.cache_dir={cache}", *extra])
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    wait_for(proc, lambda: worker_pid(stderr) is not None and len(training_iterations(run_dir)) >= 5)
    pid = worker_pid(stderr)
    os.kill(pid, sig)
    start_s = time.monotonic()
    proc.wait(timeout=600)
    reader.join(timeout=10)
    seconds = time.monotonic() - start_s
    lost = [] if proc.returncode == 0 else [f"exit {proc.returncode}: {error_lines(''.join(stderr))}"]
    report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").exists() else {}
    counters = report.get("counters", {})
    if counters.get("blocks") != iterations * 4:
        lost.append(f"blocks {counters.get('blocks')} != {iterations * 4}")
    lost += check_continuous(run_dir, iterations)
    events = sorted({e["event"] for e in report.get("events", [])})
    return {"tries": 1, "survived": int(not lost), "lost": lost,
            "detail": f"worker_failures {counters.get('worker_failures')}, finished {seconds:.0f} s after the fault"
                      + (f", events {events}" if events else "")}


def fault_worker_kill9(work: Path, cache: str, tries: int) -> dict:
    return _worker_fault(work, cache, "worker-kill9", signal.SIGKILL, [])


def fault_worker_hang(work: Path, cache: str, tries: int) -> dict:
    out = _worker_fault(work, cache, "worker-hang", signal.SIGSTOP, ["rollout.call_timeout_floor_s=5"])
    if "worker_hung" not in out["detail"]:
        out["lost"].append("no worker_hung event")
        out["survived"] = 0
    return out


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fault_disk_full(work: Path, cache: str, tries: int) -> dict:
    lost, details = [], []
    with tmpfs(work / "disk", "8m") as mounted:
        if not mounted:
            return {"tries": 0, "survived": 0, "lost": [], "detail": "not run: mounting a tmpfs needs root"}
        for k in range(tries):
            run_dir = work / "disk" / f"run-{k}"
            proc = start(run_dir, ["ray.backend=local", "trainer.iterations=100000", "trainer.log_every=1",
                                   "trainer.eval_every=0", "trainer.checkpoint_every=5", f"pretrain.cache_dir={cache}"])
            wait_for(proc, logged(run_dir, 8 + 4 * k))
            filler = work / "disk" / "filler"
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
            for _ in range(1000):
                if (free := os.statvfs(work / "disk").f_bavail * os.statvfs(work / "disk").f_frsize) == 0:
                    break
                with contextlib.suppress(OSError):  # the run writes meanwhile: take what is left
                    os.posix_fallocate(fd, os.fstat(fd).st_size, free)
            os.close(fd)
            _, err = proc.communicate(timeout=120)
            said = error_lines(err)
            if proc.returncode != 1 or not one_line(err) or "resume with" not in said[0]:
                lost.append(f"try {k}: exit {proc.returncode}, {said or err[-300:]}")
            details.append(said[0].split(" while writing ")[-1].split("'")[1].rsplit("/", 2)[-1] if said else "?")
            filler.unlink()
            stopped = last_iteration(run_dir)
            result = resume(run_dir, stopped + 3, "ray.backend=local")
            if result.returncode != 0:
                lost.append(f"try {k}: resume failed {error_lines(result.stderr)}")
            lost += [f"try {k}: {x}" for x in check_continuous(run_dir, stopped + 3)]
            shutil.rmtree(run_dir)
    return {"tries": tries, "survived": tries - len({x.split(':')[0] for x in lost}), "lost": lost,
            "detail": f"the write that met the full disk: {details}"}


def _finished_run(work: Path, cache: str, name: str, iterations: int = 6) -> Path:
    run_dir = work / name
    result = sftrl(["sftrl.run", SMOKE, "ray.backend=local", f"trainer.iterations={iterations}", "trainer.log_every=1",
                    "trainer.eval_every=0", "trainer.checkpoint_every=3", f"pretrain.cache_dir={cache}",
                    "--run-dir", str(run_dir), "--no-progress"])
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return run_dir


def fault_damaged_log(work: Path, cache: str, tries: int) -> dict:
    run_dir = _finished_run(work, cache, "damaged-log")
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text().splitlines()
    text[2] = text[2][: len(text[2]) // 2]
    metrics.write_text("\n".join(text) + '\n{"iteration": 7, "crit')
    result = resume(run_dir, 8, "ray.backend=local")
    said = [line for line in result.stderr.splitlines() if line.startswith("note")]
    lost = [] if result.returncode == 0 else [f"resume failed {error_lines(result.stderr)}"]
    kept = (run_dir / "metrics.jsonl.dropped").read_text() if (run_dir / "metrics.jsonl.dropped").exists() else ""
    lost += [] if '"crit' in kept and text[2] in kept else ["the damaged lines were not kept aside"]
    return {"tries": 1, "survived": int(not lost), "lost": lost, "detail": " / ".join(s[:90] for s in said[:2])}


def fault_corrupt_checkpoint(work: Path, cache: str, tries: int) -> dict:
    from sftrl.checkpoint import latest_checkpoint

    run_dir = _finished_run(work, cache, "corrupt-checkpoint")
    (latest_checkpoint(run_dir) / "state.pt").write_bytes(b"torn")
    result = resume(run_dir, 8, "ray.backend=local")
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    lost = [] if result.returncode == 0 and warned else [f"exit {result.returncode}, warned {warned}"]
    lost += check_continuous(run_dir, 8)
    return {"tries": 1, "survived": int(not lost), "lost": lost, "detail": warned[-1][:120] if warned else ""}


def fault_second_command(work: Path, cache: str, tries: int) -> dict:
    run_dir = work / "second"
    proc = start(run_dir, ["trainer.iterations=100000", "trainer.log_every=1", "trainer.eval_every=0",
                           f"pretrain.cache_dir={cache}"])
    wait_for(proc, logged(run_dir, 3))
    config = (run_dir / "config.yaml").read_bytes()
    results = [sftrl(["sftrl.run", *argv, "--run-dir", str(run_dir), "--no-progress"])
               for argv in (["--resume", "auto"], [SMOKE, "seed=1"])]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    lost = [f"second command: exit {r.returncode} {error_lines(r.stderr)}" for r in results
            if r.returncode != 2 or "in use by another sftrl command" not in r.stderr]
    lost += [] if (run_dir / "config.yaml").read_bytes() == config else ["config.yaml changed"]
    return {"tries": 2, "survived": 2 - len(lost[:2]), "lost": lost, "detail": error_lines(results[0].stderr)[0][:120]}


def fault_poisoned_cache(work: Path, cache: str, tries: int) -> dict:
    import numpy as np
    import torch

    from sftrl.components import fresh_sampler
    from sftrl.config import load
    from sftrl.data import load_real_data
    from sftrl.pretraining import cache_path, data_fingerprint, sampler_checkpoint

    own_cache = work / "poisoned-cache"
    cfg = load(SMOKE, [f"pretrain.cache_dir={own_cache}"])
    data = load_real_data(cfg)
    poisoned = fresh_sampler(cfg, tuple(data.shape[1:]))
    with torch.no_grad():
        next(poisoned.parameters()).fill_(float("nan"))
    path = cache_path(cfg, data_fingerprint(data))
    path.parent.mkdir(parents=True)
    torch.save(sampler_checkpoint(poisoned, cfg, {"epoch_loss": [float("nan")]}), path)
    result = sftrl(["sftrl.run", SMOKE, "ray.backend=local", "trainer.iterations=3", f"pretrain.cache_dir={own_cache}",
                    "--run-dir", str(work / "poisoned-run"), "--no-progress"])
    report = json.loads((work / "poisoned-run" / "report.json").read_text()) if result.returncode == 0 else {}
    fine = report.get("evaluations", [{}])[-1].get("sw2_mean", float("nan"))
    lost = [] if result.returncode == 0 and "non-finite weights" in result.stderr and np.isfinite(fine) else [
        f"exit {result.returncode}"]
    return {"tries": 1, "survived": int(not lost), "lost": lost, "detail": f"pretrained again; final SW2 {fine:.4f}"}


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def fault_crafted_pickle(work: Path, cache: str, tries: int) -> dict:
    folder = work / "crafted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = work / "crafted" / "code-ran"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _RunsCode(str(marker))}, f, protocol=2)
    result = sftrl(["sftrl.run", str(REPO / "configs" / "cifar10.yaml"), f"data.path={folder.parent}",
                    "--run-dir", str(work / "crafted" / "run")])
    lost = ["code ran from the data file"] if marker.exists() else []
    lost += [] if result.returncode == 2 and one_line(result.stderr) else [f"exit {result.returncode}"]
    said = " ".join(error_lines(result.stderr))
    return {"tries": 1, "survived": int(not lost), "lost": lost, "detail": said[said.find("refused"):][:100]}


FAULTS = {
    "kill -9 of the driver while checkpointing": fault_kill9_while_checkpointing,
    "SIGTERM during fine-tuning": fault_sigterm,
    "kill -9 of a rollout worker (Ray)": fault_worker_kill9,
    "a hung rollout worker (SIGSTOP, Ray)": fault_worker_hang,
    "the disk fills up mid-run (tmpfs)": fault_disk_full,
    "a torn and a damaged metrics line": fault_damaged_log,
    "a corrupt latest checkpoint": fault_corrupt_checkpoint,
    "a second command on a running run directory": fault_second_command,
    "a poisoned pretrained-sampler cache": fault_poisoned_cache,
    "a CIFAR-10 batch that carries code": fault_crafted_pickle,
}


# --------------------------------------------------------------------------- bad inputs


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
            + chunk(b"IEND", b""))


def bad_inputs(files: Path, finished: Path, other: Path) -> list[tuple[str, list[str]]]:
    """(name, argv after ``python -m``) of each bad input; ``files`` is a scratch folder, ``finished``
    a finished smoke run, ``other`` another with a different model."""
    def write(name: str, content: str | bytes) -> str:
        path = files / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    bomb = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    bomb += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    run = ["sftrl.run", SMOKE]
    overrides = [
        "algo.policy_lr=inf", "algo.policy_lr=-1", "algo.critic_lr=nan", "diffusion.kappa=inf", "diffusion.kappa=5",
        "diffusion.kappa=-0.1", "diffusion.final_step_std=-1", "model.hidden=0", "model.hidden=10000000",
        "model.critic_hidden=[]", "model.critic_hidden=[64,-3]", "model.baseline_hidden=[0]", "seed=-1",
        "seed=1e20", "data.seed=99999999999", "pretrain.seed=-5", "trainer.iterations=0", "trainer.iterations=-4",
        "trainer.eval_samples=1000000000", "trainer.exact_w2_points=100000", "algo.batch_size=0",
        "algo.n_critic=0", "algo.ema_decay=1", "pretrain.epochs=0", "pretrain.lr=1e999", "rollout.num_workers=0",
        "rollout.max_lag=-1", "rollout.call_timeout_multiple=0.5", "torch_threads=0", "name=../escape",
        "name=" + "n" * 250, "algo.name=nope", "algo.bogus=1", "trainer.iterations=many", "data.name=cifar10",
        "data.name=mnist", "diffusion.steps=11", "model.checkpoint=/nonexistent.pt", "ray.address=127.0.0.1:1",
        "rollout.num_gpus_per_worker=4", "device=cuda", "pretrain.cache_dir=/proc/nope",
    ]
    cases: list[tuple[str, list[str]]] = [(o[:48], [*run, o]) for o in overrides]
    cases += [
        ("config file missing", ["sftrl.run", "configs/nope.yaml"]),
        ("config is a directory", ["sftrl.run", "configs"]),
        ("YAML syntax error", ["sftrl.run", write("syntax.yaml", "algo:\n  n_critic: [1, 2\n")]),
        ("YAML duplicate key", ["sftrl.run", write("dup.yaml", "seed: 1\nseed: 2\n")]),
        ("YAML alias bomb (436 bytes)", ["sftrl.run", write("bomb.yaml", "\n".join(bomb) + "\n")]),
        ("YAML nested 5000 deep", ["sftrl.run", write("deep.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n")]),
        ("override nested 3000 deep", [*run, "model.critic_hidden=" + "[" * 3000 + "]" * 3000]),
        ("config not UTF-8", ["sftrl.run", write("latin1.yaml", b"name: caf\xe9\n")]),
        ("config top level a list", ["sftrl.run", write("list.yaml", "- 1\n- 2\n")]),
        ("sampler checkpoint is junk", [*run, "model.checkpoint=" + write("junk.pt", b"not torch")]),
        ("sampler checkpoint of another shape", [*run,
                                                 f"model.checkpoint={latest_pretrained(other)}"]),
        ("image folder empty", [*run, "data.name=folder", "model.sampler=unet", "data.image_size=16",
                                f"data.path={Path(write('empty/notes.txt', 'no images here')).parent}"]),
        ("image file corrupt", [*run, "data.name=folder", "model.sampler=unet", "data.image_size=16",
                                f"data.path={Path(write('corrupt/x.png', b'not a png')).parent}"]),
        ("PNG header claims 30000x30000", [*run, "data.name=folder", "model.sampler=unet", "data.image_size=16",
                                           f"data.path={Path(write('bomb/x.png', _png_claiming(30000, 30000))).parent}"]),
        ("MNIST images of 0x0 pixels", [*run, "data.name=mnist", "model.sampler=unet",
                                        f"data.path={Path(write('mnist0/train-images-idx3-ubyte', struct.pack('>IIII', 2051, 5, 0, 0))).parent}"]),
        ("MNIST file truncated", [*run, "data.name=mnist", "model.sampler=unet",
                                  f"data.path={Path(write('mnistt/train-images-idx3-ubyte', struct.pack('>IIII', 2051, 5, 28, 28) + bytes(100))).parent}"]),
        ("CIFAR-10 batch malformed", [*run, "data.name=cifar10", "model.sampler=unet",
                                      f"data.path={Path(write('cifar/data_batch_1', pickle.dumps({b'data': [1, 2]}))).parent}"]),
        ("unknown flag", ["sftrl.run", "--bogus"]),
        ("no config", ["sftrl.run"]),
        ("--run-dir under a file", [*run, "--run-dir", write("afile", "") + "/run"]),
        ("--run-dir name of 300 bytes", [*run, "--run-dir", str(files / ("x" * 300))]),
        ("--run-dir on /proc", [*run, "--run-dir", "/proc/sftrl-run"]),
        ("--run-dir is a folder of the user's", [*run, "--run-dir", str(Path(write("mine/report.md", "notes")).parent)]),
        ("--resume auto with no checkpoint", ["sftrl.run", SMOKE, "--run-dir", str(files / "none"), "--resume", "auto"]),
        ("--resume of another run's checkpoint", ["sftrl.run", "--run-dir", str(finished), "--resume",
                                                 str(next((other / "checkpoints").glob("iter-*")))]),
        ("--resume of a finished run", ["sftrl.run", "--run-dir", str(finished), "--resume", "auto"]),
        ("--resume with another data set", ["sftrl.run", str(REPO / "configs" / "moons.yaml"), "--run-dir",
                                            str(finished), "--resume", "auto"]),
        ("new run in a run's directory", [*run, "--run-dir", str(finished)]),
        ("sftrl sample of a non-run folder", ["sftrl.cli", "sample", str(files)]),
        ("sftrl sample -n 0", ["sftrl.cli", "sample", str(finished), "-n", "0"]),
        ("sftrl sample --out on /proc", ["sftrl.cli", "sample", str(finished), "--out", "/proc/x.npz"]),
        ("sftrl sample --checkpoint of another run", ["sftrl.cli", "sample", str(finished), "--checkpoint",
                                                     str(next((other / "checkpoints").glob("iter-*")))]),
        ("sftrl eval --checkpoint of another run", ["sftrl.cli", "eval", str(finished), "--checkpoint",
                                                   str(next((other / "checkpoints").glob("iter-*")))]),
        ("sftrl schedule --T 0", ["sftrl.cli", "schedule", "ddpm", "--steps", "10", "--T", "0"]),
        ("sftrl schedule --kappa 5", ["sftrl.cli", "schedule", "fastdpm-var-linear", "--steps", "5", "--kappa", "5"]),
        ("sftrl pretrain of a missing config", ["sftrl.cli", "pretrain", "nope.yaml"]),
        ("sftrl with no command", ["sftrl.cli"]),
    ]
    return cases


def latest_pretrained(run_dir: Path) -> str:
    return json.loads((run_dir / "report.json").read_text())["pretrain"]["path"]


def try_input(name: str, argv: list[str], run_dir: Path) -> dict:
    """Run one bad input; ``run_dir`` is where a run would go unless the input names one."""
    if "--run-dir" in argv:
        run_dir = Path(argv[argv.index("--run-dir") + 1])
    before = snapshot(run_dir)
    full = [*argv, "--run-dir", str(run_dir)] if argv[0] == "sftrl.run" and "--run-dir" not in argv else argv
    start_s = time.monotonic()
    try:
        result = sftrl(full, timeout=120)
        code, err = result.returncode, result.stderr
    except subprocess.TimeoutExpired:
        code, err = None, "timed out after 120 s"
    seconds = time.monotonic() - start_s
    problems = []
    if code != 2:
        problems.append(f"exit {code}")
    if not one_line(err):
        problems.append(f"{len(error_lines(err))} error lines" + (", a traceback" if "Traceback" in err else ""))
    if snapshot(run_dir) != before:
        problems.append("the run directory changed")
    said = error_lines(err)
    return {"input": name, "exit": code, "seconds": round(seconds, 1), "problems": problems,
            "said": said[0][:300] if said else err.strip()[-300:]}


def snapshot(folder: Path) -> dict[str, bytes] | None:
    try:
        if not folder.exists():
            return None
    except OSError:  # a name the file system cannot take
        return None
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_inputs(work: Path, cache: str) -> list[dict]:
    finished = _finished_run(work, cache, "finished", iterations=3)
    other = work / "other"
    result = sftrl(["sftrl.run", SMOKE, "ray.backend=local", "model.hidden=32", "trainer.iterations=2",
                    f"pretrain.cache_dir={cache}", "--run-dir", str(other), "--no-progress"])
    assert result.returncode == 0, result.stderr[-2000:]
    files = work / "inputs"
    files.mkdir()
    cases = bad_inputs(files, finished, other)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(try_input, name, argv, work / "input-runs" / f"run-{i}")
                   for i, (name, argv) in enumerate(cases)]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = []
    if result.get("faults"):
        lines += ["| fault | tries | survived | lost | what happened |", "|---|---|---|---|---|"]
        for name, row in result["faults"].items():
            lost = "; ".join(row["lost"]) if row["lost"] else "nothing"
            lines.append(f"| {name} | {row['tries']} | {row['survived']} | {lost} | {row['detail']} |")
    if result.get("inputs"):
        rows = result["inputs"]
        ok = [r for r in rows if not r["problems"]]
        lines += ["", f"Bad inputs: {len(ok)} of {len(rows)} gave one `error:` line and exit 2 with nothing written "
                      f"(median {sorted(r['seconds'] for r in rows)[len(rows) // 2]:.1f} s, slowest "
                      f"{max(r['seconds'] for r in rows):.1f} s).", ""]
        bad = [r for r in rows if r["problems"]]
        if bad:
            lines += ["| bad input | problems | said |", "|---|---|---|"]
            lines += [f"| {r['input']} | {', '.join(r['problems'])} | {r['said'][:160]} |" for r in bad]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults.json"))
    parser.add_argument("--only", choices=("faults", "inputs"))
    parser.add_argument("--tries", type=int, default=4, help="tries of the kill -9 and full-disk faults")
    args = parser.parse_args()
    result: dict = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sftrl-faults-") as tmp:
        work = Path(tmp)
        cache = str(work / "cache")
        warm = sftrl(["sftrl.cli", "pretrain", SMOKE, f"pretrain.cache_dir={cache}", "--no-progress"])
        if warm.returncode != 0:
            raise SystemExit(warm.stderr[-2000:])
        if args.only != "inputs":
            result["faults"] = {}
            for name, fault in FAULTS.items():
                print(f"fault: {name}", file=sys.stderr, flush=True)
                try:
                    result["faults"][name] = fault(work, cache, args.tries)
                except Exception as err:  # a harness failure is a finding too, not a crash of the table
                    result["faults"][name] = {"tries": 1, "survived": 0, "lost": [f"harness: {err!r}"[:300]],
                                              "detail": ""}
                print(f"  {result['faults'][name]}", file=sys.stderr, flush=True)
        if args.only != "faults":
            print("bad inputs ...", file=sys.stderr, flush=True)
            result["inputs"] = run_inputs(work, cache)
        result = json.loads(json.dumps(result, default=str).replace(str(work), "<tmp>"))
    result["wall_s"] = time.monotonic() - begin
    table = markdown(result)
    result["markdown"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table)
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
