"""GPU checks: run by hand on a machine with a CUDA GPU; writes JSON (each check as it ends).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check.json

Checks, each in its own subprocess or try block (one failing does not stop the others):
- ``env``: the batched ``sftrl/DenoisingChain-v0`` on ``cuda`` against the same env on the CPU,
  from the same start states and actions (rewards must agree), and its step time;
- ``swissroll-gpu``: the default ``configs/swissroll.yaml`` run through ``python -m sftrl.run``
  with every actor on the GPU (fractional ``num_gpus``: 0.25 each), from a cold pretraining
  cache; its placement (each actor's device and Ray GPU ids), time to SW2 1.0e-2 and final SW2;
- ``swissroll-cpu``: the same run's first iterations with ``device=cpu`` on the same machine,
  for the per-iteration comparison (the toy MLPs are launch-bound on a GPU);
- ``celeba``: ``configs/celeba.yaml`` at full size (the 78.7M-parameter U-Net, batch 64, S = 10)
  from a randomly initialised checkpoint in the DDIM release's format and generated 64x64 JPEGs,
  through Ray with fractional GPUs: seconds per iteration, the number the config's 50,000
  iterations scale from. The weights are random, so no quality is measured.
- ``swissroll-gpu-async`` and ``celeba-async``: the same two runs in async mode
  (``rollout.max_lag=1``: the rollouts one weights version behind, so the worker's collect
  overlaps the critic and the learner on the shared GPU); the swiss roll reuses the sync run's
  pretrained sampler when that ran first.

``--device cpu --small`` runs the same script on a CPU machine with tiny settings (to check the
script itself before spending GPU time).
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
import threading
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET_SW2 = 1.0e-2


def run_sftrl(config: str, overrides: list[str], run_dir: Path, timeout: float, env: dict | None = None) -> dict:
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftrl.run", config, *overrides, "--run-dir", str(run_dir)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )
    # Each line of the command's stderr (progress lines included) with its time since the start:
    # where the seconds outside the training loop go.
    timeline, stderr = [], []
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            stderr.append(line)
            if "Warning" not in line and "as_tensor" not in line:
                timeline.append(f"{time.monotonic() - start:7.1f} {line.rstrip()[:160]}")
        returncode = proc.wait()
    finally:
        watchdog.cancel()
    wall = time.monotonic() - start
    if returncode != 0:
        raise RuntimeError(f"sftrl.run {config} exited {returncode} after {wall:.0f} s:\n" + "\n".join(timeline[-40:]))
    report = json.loads((run_dir / "report.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_iteration = [r["time/iteration_s"] for r in lines if "time/iteration_s" in r]
    evals = sorted((r for r in lines if "eval/sw2_mean" in r), key=lambda r: r["iteration"])
    return {
        "command_wall_s": wall,
        "report_wall_s": report["wall_s"],
        "pretrain": report["pretrain"],
        "placement": report["placement"],
        "iteration_s_median": statistics.median(per_iteration[5:] or per_iteration) if per_iteration else None,
        "iteration_s_all": per_iteration,
        "evaluations": [
            {k: r[k] for k in ("iteration", "eval/sw2_mean", "eval/sw2_floor_mean", "eval/elapsed_s") if k in r}
            for r in evals
        ],
        "time_to_target_s": next((r["eval/elapsed_s"] for r in evals if r["eval/sw2_mean"] <= TARGET_SW2), None),
        "timeline": timeline[-60:],
    }


def check_env(device: str, small: bool) -> dict:
    import gymnasium

    import sftrl  # noqa: F401  (registers the env)

    n, shape = (256 if small else 65536), (2,)
    make = lambda dev: gymnasium.make_vec(  # noqa: E731
        "sftrl/DenoisingChain-v0", num_envs=n, vectorization_mode="vector_entry_point", device=dev, data_shape=shape
    )
    envs = {"cpu": make("cpu"), device: make(device)}
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((n, *shape), generator=gen)
    actions = [torch.randn((n, *shape), generator=gen) for _ in range(10)]
    out = {}
    for name, env in envs.items():
        on_device = [action.to(name) for action in actions]
        for _ in range(2):  # the first pass warms up (CUDA context, kernels); the second is timed
            obs, _ = env.reset(options={"x": x0})
            assert obs["x"].device.type == torch.device(name).type, (obs["x"].device, name)
            if name != "cpu":
                torch.cuda.synchronize()
            rewards, start = [], time.perf_counter()
            for action in on_device:
                obs, reward, terminated, truncated, _ = env.step(action)
                rewards.append(reward)
            if name != "cpu":
                torch.cuda.synchronize()
            rewards = [reward.cpu() for reward in rewards]
        out[name] = {"step_ms": (time.perf_counter() - start) / len(actions) * 1e3, "rewards": torch.stack(rewards)}
        assert bool(terminated.all()), "the chain must terminate at n = 0 after S steps"
    diff = (out[device]["rewards"] - out["cpu"]["rewards"]).abs().max().item()
    assert diff <= 1e-4 * max(1.0, out["cpu"]["rewards"].abs().max().item()), f"rewards differ by {diff}"
    return {"num_envs": n, "max_reward_diff": diff, **{f"{k}_step_ms": v["step_ms"] for k, v in out.items()}}


def gpu_overrides(device: str) -> list[str]:
    if device == "cpu":
        return ["device=cpu", "rollout.num_gpus_per_worker=0", "ray.learner_num_gpus=0", "ray.critic_num_gpus=0"]
    return ["device=cuda", "rollout.num_gpus_per_worker=0.25", "ray.learner_num_gpus=0.25", "ray.critic_num_gpus=0.25"]


def check_swissroll(device: str, small: bool, work: Path, name: str, extra: tuple[str, ...] = ()) -> dict:
    overrides = [f"pretrain.cache_dir={work / 'cache-swissroll-gpu'}", "trainer.eval_every=250", *gpu_overrides(device),
                 *extra]
    if small:
        overrides += ["trainer.iterations=20", "pretrain.epochs=2", "trainer.eval_every=10", "trainer.eval_samples=2000",
                      "trainer.exact_w2_points=200"]
    result = run_sftrl("configs/swissroll.yaml", overrides, work / name, timeout=240)
    if device != "cpu":
        for component in ("worker-0", "learner", "critic"):
            where = result["placement"][component]
            assert where["device"].startswith("cuda") and where["gpu_ids"], (component, where)
    return result


def check_swissroll_cpu(small: bool, work: Path) -> dict:
    """The first 150 iterations on this machine's CPU (same config otherwise): the comparison."""
    overrides = [f"pretrain.cache_dir={work / 'cache-swissroll-gpu'}", "device=cpu", "trainer.eval_every=0",
                 "trainer.iterations=" + ("10" if small else "150"), "trainer.log_every=1", "trainer.exact_w2_points=0"]
    if small:
        overrides += ["pretrain.epochs=2", "trainer.eval_samples=2000"]
    return run_sftrl("configs/swissroll.yaml", overrides, work / "swissroll-cpu", timeout=100)


def check_celeba(device: str, small: bool, work: Path, name: str = "celeba", extra: tuple[str, ...] = ()) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from test_image_e2e import write_celeba_jpegs  # the tests' generated aligned-CelebA folder

    from sftrl.config import load
    from sftrl.models import build_networks

    size = ["model.unet_ch=32", "model.unet_ch_mult=[1,2]", "model.unet_num_res_blocks=1",
            "model.unet_attn_resolutions=[]", "data.image_size=16", "algo.batch_size=4", "algo.n_generator=2",
            "model.critic_channels=[8,16,32]", "model.baseline_hidden=[32,32]"] if small else []
    cfg = load(REPO / "configs" / "celeba.yaml", size)
    sampler, _, _ = build_networks(cfg, (3, cfg.data.image_size, cfg.data.image_size))
    state = {f"module.{k}": v for k, v in sampler.state_dict().items()}  # DataParallel keys, as released
    checkpoint = work / f"ddim_celeba_random_{name}.pth"
    torch.save([state, {}, 0, 0, state], checkpoint)  # [model, optimizer, epoch, step, ema]
    folder = write_celeba_jpegs(work / f"{name}-images", 16 if small else 512)
    overrides = [*size, f"data.path={folder}", f"model.checkpoint={checkpoint}", "trainer.iterations=4",
                 "trainer.eval_every=0", "trainer.eval_samples=64", "trainer.log_every=1", "trainer.checkpoint_every=0",
                 *gpu_overrides(device), *extra]
    result = run_sftrl("configs/celeba.yaml", overrides, work / f"{name}-run", timeout=240,
                       env={"TORCH_HOME": str(work / "torch-home")})  # no Inception weights: FID skipped
    result["parameters"] = sum(p.numel() for p in sampler.parameters())
    result["iteration_s_median"] = statistics.median(result["iteration_s_all"][1:])  # the first one warms up
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu-check.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny settings (to check the script on a CPU)")
    parser.add_argument("--only", default="env,celeba,swissroll-gpu,swissroll-cpu,swissroll-gpu-async,celeba-async")
    args = parser.parse_args()
    out = Path(args.out)
    facts = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    results: dict = {"facts": facts, "checks": {}}
    checks = {
        "env": lambda work: check_env(args.device, args.small),
        "swissroll-gpu": lambda work: check_swissroll(args.device, args.small, work, "swissroll-gpu"),
        "swissroll-cpu": lambda work: check_swissroll_cpu(args.small, work),
        "celeba": lambda work: check_celeba(args.device, args.small, work),
        "swissroll-gpu-async": lambda work: check_swissroll(args.device, args.small, work, "swissroll-gpu-async",
                                                            ("rollout.max_lag=1",)),
        "celeba-async": lambda work: check_celeba(args.device, args.small, work, "celeba-async", ("rollout.max_lag=1",)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            start = time.monotonic()
            try:
                outcome = {"ok": True, **checks[name](Path(tmp))}
            except Exception as err:  # noqa: BLE001 - record and go on to the next check
                outcome = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            outcome["check_wall_s"] = time.monotonic() - start
            results["checks"][name] = outcome
            print(f"{name}: {'ok' if outcome['ok'] else 'FAILED ' + outcome['error'][:2000]} "
                  f"({outcome['check_wall_s']:.0f} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
