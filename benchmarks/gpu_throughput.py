"""Throughput on one GPU, all in one run so the ratios are honest; writes JSON and markdown.

    python benchmarks/gpu_throughput.py [--out benchmarks/results/gpu-throughput.json]
    python benchmarks/gpu_throughput.py --small --device cpu --out /tmp/t.json   # the same paths, tiny

Parts (``--only`` picks some; each is timed and recorded even when another fails):

- ``unet``: the bare U-Net's images per second (NFE/s) for the CIFAR-10 (35.7M) and CelebA-64
  (78.7M) configs, batch 512, 3 warm-ups then the mean of 10 calls: eager fp32, bf16 autocast,
  and compiled bf16 with channels_last (``sftrl.perf.runner``: what the rollouts run);
- ``worker``: a rollout worker's NFE/s (chains x steps / seconds of ``collect``) for the CIFAR-10
  U-Net with the same settings, in this process and as a Ray actor, and its ratio to the bare
  compiled U-Net measured above (the issue's target: >= 0.9);
- ``runs``: ``configs/cifar10.yaml`` and ``configs/celeba.yaml`` at full size (random weights in
  the DDIM release's format, generated images, FID off), sync and async, through Ray on one
  GPU: seconds per iteration, chains per second, and where an iteration's time goes
  (``time/rollout_s``, ``time/critic_s``, ``time/learner_s``, measured inside the components;
  the rest is transfers, waiting and the driver), with the bytes it moves;
- ``scaling``: the swiss-roll config's rollout phase with 1, 2, 4 and 8 CPU rollout workers
  (chains per second of the rollout phase, and of the whole iteration beside it).

The numbers the issue asks for are only meaningful on a GPU machine; ``--small --device cpu``
checks the script (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

TINY_UNET = ["model.unet_ch=32", "model.unet_ch_mult=[1,2]", "model.unet_num_res_blocks=1",
             "model.unet_attn_resolutions=[]", "model.critic_channels=[8,16,32]", "model.baseline_hidden=[32,32]"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmups: int, repeats: int, device: torch.device) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls after ``warmups``."""
    for _ in range(warmups):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def image_cfg(name: str, small: bool, extra: list[str] = ()):
    from sftrl.config import load

    size = [*TINY_UNET, "data.image_size=16", "algo.batch_size=4", "algo.n_generator=2"] if small else []
    return load(REPO / "configs" / f"{name}.yaml", [*size, "data.path=unused", *extra])


def part_unet(device: torch.device, small: bool) -> dict:
    from sftrl import perf
    from sftrl.config import PerfConfig
    from sftrl.models import build_unet

    batch, warmups, repeats = (8, 1, 2) if small else (512, 3, 10)
    modes = {"eager fp32": PerfConfig(), "bf16": PerfConfig(precision="bf16"),
             "compiled bf16 channels_last": PerfConfig(precision="bf16", compile=True, channels_last=True)}
    out = {}
    for name in ("cifar10", "celeba"):
        cfg = image_cfg(name, small)
        side = 16 if small else (32 if name == "cifar10" else 64)
        model = build_unet(cfg, (3, side, side)).to(device).eval()
        x, t = torch.randn(batch, 3, side, side, device=device), torch.rand(batch, device=device) * 999
        row = {"parameters": sum(p.numel() for p in model.parameters()), "batch": batch}
        for mode, settings in modes.items():
            run = perf.runner(model, settings, device)
            with torch.no_grad():
                seconds = timed(lambda run=run, x=x, t=t: run(x, t), warmups, repeats, device)
            row[mode] = batch / seconds
        out[name] = row
    return out


def part_worker(device: torch.device, small: bool, bare: dict | None) -> dict:
    import ray

    from sftrl.components import InitState, make_critic_learner, make_learner, make_rollout_worker
    from sftrl.distributed import RayHandle
    from sftrl.distributed.system import ComponentActor
    from sftrl.rollout import RolloutWorker

    # What the rollouts would run on a GPU (--small: not compiled, which test_perf covers; two
    # compiles of a U-Net on 2 CPU cores take a minute).
    extra = ["perf.precision=bf16", f"perf.compile={str(not small).lower()}", "perf.channels_last=true"]
    cfg = image_cfg("cifar10", small, [*extra, f"device={device.type}"])
    side = 16 if small else 32
    chains = 8 if small else 512
    shape = (3, side, side)
    from sftrl.models import build_unet

    init = InitState({k: v.numpy() for k, v in build_unet(cfg, shape).state_dict().items()}, shape)
    learner = make_learner(cfg, init)
    critic = make_critic_learner(cfg, init, torch.zeros((8, *shape)).numpy())
    policy, critic_weights = learner.get_weights(), critic.get_weights()
    nfe = chains * cfg.diffusion.steps
    worker = make_rollout_worker(cfg, init, 0)
    seconds = timed(lambda: worker.collect(policy, critic_weights, ["b"], chains), 1, 2 if small else 5, device)
    out = {"chains": chains, "steps": cfg.diffusion.steps, "in_process_nfe_per_s": nfe / seconds}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(ComponentActor).options(num_cpus=0, num_gpus=1 if device.type == "cuda" else 0).remote(
            __import__("sftrl.components", fromlist=["make_rollout_worker"]).make_rollout_worker, cfg, init, 0)
        handle = RayHandle(actor, "worker-0")
        policy_ref, critic_ref = ray.put(policy), ray.put(critic_weights)

        def collect() -> None:
            handle.resolve(handle.call(RolloutWorker.collect, policy_ref, critic_ref, ["b"], chains, num_returns=2)[-1])

        out["ray_actor_nfe_per_s"] = nfe / timed(collect, 1, 2 if small else 5, device)
        ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    compiled = (bare or {}).get("cifar10", {}).get("compiled bf16 channels_last")
    if compiled:
        out["ray_actor_vs_bare_compiled"] = out["ray_actor_nfe_per_s"] / compiled
    return out


def run_config(name: str, device: torch.device, small: bool, work: Path, lag: int) -> dict:
    from test_image_e2e import write_celeba_jpegs, write_cifar_batches

    from sftrl.models import build_networks

    gpu = (["device=cuda", "rollout.num_gpus_per_worker=0.25", "ray.learner_num_gpus=0.25",
            "ray.critic_num_gpus=0.25"] if device.type == "cuda" else
           ["device=cpu", "rollout.num_gpus_per_worker=0", "ray.learner_num_gpus=0", "ray.critic_num_gpus=0"])
    size = [*TINY_UNET, "data.image_size=16", "algo.batch_size=4", "algo.n_generator=2"] if small else []
    cfg = image_cfg(name, small)
    side = cfg.data.image_size or (32 if name == "cifar10" else 64)
    checkpoint, data = work / f"{name}-random.pth", work / f"{name}-images"
    if not checkpoint.exists():  # made once per config, for its sync and async runs
        sampler, _, _ = build_networks(cfg, (3, side, side))
        state = {f"module.{k}": v for k, v in sampler.state_dict().items()}
        torch.save([state, {}, 0, 0, state], checkpoint)  # the DDIM release's training-list format
        if name == "celeba":
            write_celeba_jpegs(data, 16 if small else 512)
        else:
            write_cifar_batches(data, per_batch=4 if small else 512)
    from conftest import run_cli

    run_dir = work / f"{name}-lag{lag}"
    iterations = 3 if small else 8
    result = run_cli(["sftrl.run", f"configs/{name}.yaml", *size, f"data.path={data}", f"model.checkpoint={checkpoint}",
                      f"trainer.iterations={iterations}", "trainer.eval_every=0", "trainer.log_every=1",
                      "trainer.checkpoint_every=0", f"rollout.max_lag={lag}", *gpu, "--run-dir", str(run_dir),
                      "--no-progress"], timeout=900, env={"TORCH_HOME": str(work / "torch-home")})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    # the run's own medians of its logged time/ and bytes/ metrics, the first iteration left out
    out = dict(json.loads((run_dir / "report.json").read_text())["time_split"])
    chains = cfg.algo.n_critic * cfg.algo.batch_size
    out["chains_per_s"] = chains / out["time/iteration_s"]
    out["config_hours"] = load_iterations(name) * out["time/iteration_s"] / 3600
    return out


def load_iterations(name: str) -> int:
    from sftrl.config import load

    return load(REPO / "configs" / f"{name}.yaml", ["data.path=unused"]).trainer.iterations


def part_runs(device: torch.device, small: bool, work: Path) -> dict:
    """Each config sync and async (``--small``: CIFAR-10 sync and CelebA async, the same paths)."""
    runs = [("cifar10", 0), ("celeba", 1)] if small else [(n, lag) for n in ("cifar10", "celeba") for lag in (0, 1)]
    return {f"{name} {'sync' if lag == 0 else f'async lag {lag}'}": run_config(name, device, small, work, lag)
            for name, lag in runs}


def part_scaling(small: bool, work: Path) -> dict:
    """Rollout phase chains/s of the swiss-roll config with K CPU workers (one Ray session)."""
    import ray

    from sftrl.components import InitState, fresh_sampler
    from sftrl.config import load
    from sftrl.distributed import build_ray_system
    from sftrl.trainer import Trainer
    from sftrl.weights import to_numpy_state

    counts = (1, 2) if small else (1, 2, 4, 8)
    out: dict = {"workers": {}}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(counts))
    try:
        for k in counts:
            # Enough blocks per worker that the rollout phase, not the per-call overhead, is timed.
            cfg = load(REPO / "configs" / "swissroll.yaml", [f"rollout.num_workers={k}", "rollout.num_cpus_per_worker=1",
                                                            f"algo.n_critic={8 * max(counts)}", "device=cpu"])
            init = InitState(to_numpy_state(fresh_sampler(cfg, (2,))), (2,))
            system = build_ray_system(cfg, init)
            trainer = Trainer(cfg, system, work / f"scaling-{k}", progress=False)
            metrics = [trainer.step() for _ in range(3 if small else 12)][2:]
            system.shutdown()
            chains = cfg.algo.n_critic * cfg.algo.batch_size
            rollout = statistics.median(m["time/rollout_s"] for m in metrics)
            iteration = statistics.median(m["time/iteration_s"] for m in metrics)
            # time/rollout_s is the slowest call; with K workers each makes 1/K of the chains
            out["workers"][k] = {"rollout_chains_per_s": chains / rollout, "iteration_chains_per_s": chains / iteration}
    finally:
        ray.shutdown()
    one = out["workers"][counts[0]]
    for row in out["workers"].values():
        row["rollout_speedup"] = row["rollout_chains_per_s"] / one["rollout_chains_per_s"]
        row["iteration_speedup"] = row["iteration_chains_per_s"] / one["iteration_chains_per_s"]
    return out


def markdown(result: dict) -> str:
    lines = [f"Device: {result['facts']['device']} ({result['facts'].get('gpu') or 'CPU'}), torch {result['facts']['torch']}"]
    unet = result["parts"].get("unet", {})
    if unet.get("ok"):
        lines += ["", "| U-Net NFE/s | eager fp32 | bf16 | compiled bf16 channels_last |", "|---|---|---|---|"]
        for name in ("cifar10", "celeba"):
            r = unet[name]
            lines.append(f"| {name} ({r['parameters'] / 1e6:.1f}M, batch {r['batch']}) | {r['eager fp32']:.0f} | "
                         f"{r['bf16']:.0f} | {r['compiled bf16 channels_last']:.0f} |")
    worker = result["parts"].get("worker", {})
    if worker.get("ok"):
        lines += ["", f"Rollout worker NFE/s: {worker['in_process_nfe_per_s']:.0f} in process, "
                      f"{worker['ray_actor_nfe_per_s']:.0f} as a Ray actor"
                  + (f" ({worker['ray_actor_vs_bare_compiled']:.2f}x the bare compiled U-Net)"
                     if "ray_actor_vs_bare_compiled" in worker else "")]
    runs = result["parts"].get("runs", {})
    if runs.get("ok"):
        lines += ["", "| run | s/iteration | chains/s | rollout s | critic s | learner s | learner's gather s | "
                      "MB blocks | MB policy batch | hours for the config |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {r['time/iteration_s']:.3f} | {r['chains_per_s']:.0f} | "
                             f"{r['time/rollout_s']:.3f} | {r['time/critic_s']:.3f} | {r['time/learner_s']:.3f} | "
                             f"{r.get('time/learner_gather_s', float('nan')):.3f} | "
                             f"{r['bytes/rollout_blocks'] / 1e6:.1f} | {r['bytes/policy_batch'] / 1e6:.1f} | "
                             f"{r['config_hours']:.1f} |")
    scaling = result["parts"].get("scaling", {})
    if scaling.get("ok"):
        lines += ["", "| rollout workers | rollout chains/s | speed-up | iteration chains/s | speed-up |",
                  "|---|---|---|---|---|"]
        for k, r in scaling["workers"].items():
            lines.append(f"| {k} | {r['rollout_chains_per_s']:.0f} | {r['rollout_speedup']:.2f} | "
                         f"{r['iteration_chains_per_s']:.0f} | {r['iteration_speedup']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu-throughput.json"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny settings (to check the script on a CPU)")
    parser.add_argument("--only", default="unet,worker,runs,scaling")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    device = torch.device(args.device)
    facts = {"device": args.device, "small": args.small, "torch": torch.__version__,
             "python": platform.python_version(), "cpus": os.cpu_count(),
             "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result: dict = {"facts": facts, "parts": {}}
    from sftrl.files import write_atomic

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="sftrl-throughput-") as tmp:
        work = Path(tmp)
        parts = {
            "unet": lambda: part_unet(device, args.small),
            "worker": lambda: part_worker(device, args.small, result["parts"].get("unet")),
            "runs": lambda: part_runs(device, args.small, work),
            "scaling": lambda: part_scaling(args.small, work),
        }
        for name in args.only.split(","):
            start = time.monotonic()
            try:
                outcome = {"ok": True, **parts[name]()}
            except Exception as err:  # record and go on: one part failing must not cost the others
                outcome = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            outcome["wall_s"] = time.monotonic() - start
            result["parts"][name] = outcome
            print(f"{name}: {'ok' if outcome['ok'] else 'FAILED ' + outcome['error'][:500]} ({outcome['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            result["markdown"] = markdown(result)
            write_atomic(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, default=str)))
    print(result["markdown"])


if __name__ == "__main__":
    main()
