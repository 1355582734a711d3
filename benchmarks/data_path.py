"""The generator phase's data path at full image size, through Ray on this machine's CPUs:
the buffer gathering the drawn transitions and shipping them (before), against the buffer
naming them (a ``Draw``) and the learner gathering them from the blocks (now). One Ray session,
the two alternated, so the ratio is honest; writes JSON and markdown.

    python benchmarks/data_path.py [--out benchmarks/results/data-path.json] [--repeats 10]
    python benchmarks/data_path.py --small --out /tmp/d.json   # the same paths, tiny

For each image config (``cifar10``, ``celeba``: its n_critic blocks of batch_size chains of
S + 1 states, and its n_generator x batch_size draw) one rollout actor makes the blocks, then the
timer runs from submitting the buffer's call to the learner-side actor holding the batch as torch
tensors. Measured: seconds (median, and the ratio), and the bytes each path puts in the object
store beside the blocks (the object's size as Ray records it). The components are the real ones
(``ReplayBuffer`` in a ``ComponentActor``, ``sftrl.buffer.gather``, ``TransitionBatch.to_torch``);
the learner-side actor does nothing else, so the numbers are the data path alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # name: (n_critic, batch_size, n_generator, steps, data shape), from configs/<name>.yaml
    "cifar10": (5, 128, 10, 10, (3, 32, 32)),
    "celeba": (5, 64, 10, 10, (3, 64, 64)),
}
SMALL = {"cifar10": (2, 8, 2, 4, (3, 8, 8)), "celeba": (2, 4, 2, 4, (3, 8, 8))}


def make_blocks(iteration: int, n_critic: int, chains: int, steps: int, shape: tuple) -> tuple:
    """The rollout actor's work: ``n_critic`` blocks of random states (one return each)."""
    from sftrl.buffer import TrajectoryBlock

    rng = np.random.default_rng(iteration)
    blocks = [TrajectoryBlock(xs=rng.standard_normal((steps + 1, chains, *shape), dtype=np.float32),
                              log_probs=rng.standard_normal((steps, chains), dtype=np.float32),
                              ns=np.arange(steps, 0, -1), stds=np.full(steps, 0.1, np.float32),
                              rewards=np.zeros(chains, np.float32), version=iteration,
                              block_id=f"it{iteration}/b{b}") for b in range(n_critic)]
    return tuple(blocks)


class Producer:
    def blocks(self, *args):
        return make_blocks(*args)


class BufferGathering:
    """The buffer as it was: it fetches the blocks a draw uses and ships the gathered batch."""

    def __init__(self):
        import ray

        from sftrl.buffer import ReplayBuffer

        self.buffer = ReplayBuffer(resolve=ray.get)

    def refill(self, *args):
        return self.buffer.refill(*args)

    def refill_and_gather(self, handles, metas, num_batches, batch_size, seed):
        draw = self.buffer.refill(handles, metas, "samples", num_batches, batch_size, seed)
        return self.buffer._gather(draw)


class LearnerSide:
    """What the learner does with its data before the algorithm: hold it as torch tensors."""

    def take_batch(self, batch) -> int:
        return len(batch.to_torch())

    def take_draw(self, draw, *blocks) -> int:
        from sftrl.buffer import gather

        return len(gather(draw, blocks).to_torch())


def object_size(ref) -> int:
    import ray

    info = ray.experimental.get_object_locations([ref]).get(ref, {})
    return int(info.get("object_size") or 0)


def measure(name: str, size: tuple, repeats: int) -> dict:
    import ray

    n_critic, chains, n_generator, steps, shape = size
    producer, buffer, learner = (ray.remote(cls).options(num_cpus=0).remote()
                                 for cls in (Producer, BufferGathering, LearnerSide))
    seconds: dict[str, list[float]] = {"buffer gathers": [], "learner gathers": []}
    put: dict[str, list[int]] = {"buffer gathers": [], "learner gathers": []}
    block_bytes = 0
    for rep in range(2 * repeats + 2):  # the first pair warms up
        path = ("buffer gathers", "learner gathers")[rep % 2]
        refs = producer.blocks.options(num_returns=n_critic).remote(rep, n_critic, chains, steps, shape)
        refs = [refs] if n_critic == 1 else list(refs)
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        from sftrl.buffer import BlockMeta

        metas = [BlockMeta(f"it{rep}/b{b}", rep, chains, tuple(range(steps))) for b in range(n_critic)]
        start = time.perf_counter()
        if path == "buffer gathers":
            shipped = buffer.refill_and_gather.remote(refs, metas, n_generator, chains, rep)
            rows = ray.get(learner.take_batch.remote(shipped))
        else:
            shipped = buffer.refill.remote(refs, metas, "samples", n_generator, chains, rep)
            rows = ray.get(learner.take_draw.remote(shipped, *refs))
        elapsed = time.perf_counter() - start
        assert rows == n_generator * chains, rows
        if rep >= 2:
            seconds[path].append(elapsed)
            put[path].append(object_size(shipped))
        block_bytes = sum(object_size(r) for r in refs)
        del refs, shipped
    for actor in (producer, buffer, learner):
        ray.kill(actor)
    med = {path: statistics.median(s) for path, s in seconds.items()}
    return {
        "n_critic": n_critic, "chains_per_block": chains, "transitions_drawn": n_generator * chains,
        "block_bytes_per_iteration": block_bytes,
        "seconds_median": med,
        "seconds_all": seconds,
        "object_store_bytes_beside_the_blocks": {path: statistics.median(b) for path, b in put.items()},
        "ratio_learner_over_buffer": med["learner gathers"] / med["buffer gathers"],
    }


def markdown(result: dict) -> str:
    rows = ["| config | blocks per iteration | drawn | buffer gathers: s | learner gathers: s | ratio | "
            "object store beside the blocks: before | now |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["configs"].items():
        s, b = r["seconds_median"], r["object_store_bytes_beside_the_blocks"]
        rows.append(f"| {name} | {r['block_bytes_per_iteration'] / 1e6:.1f} MB | {r['transitions_drawn']} | "
                    f"{s['buffer gathers']:.4f} | {s['learner gathers']:.4f} | {r['ratio_learner_over_buffer']:.2f} | "
                    f"{b['buffer gathers'] / 1e6:.2f} MB | {b['learner gathers'] / 1e3:.1f} kB |")
    f = result["facts"]
    return "\n".join([f"Data path, {f['cpus']} CPUs, Ray {f['ray']}, {result['repeats']} alternated repeats "
                      "(medians):", "", *rows, ""])


def positive_int(text: str) -> int:
    """``--repeats``: a whole number of at least 1 (a median needs one measurement)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data-path.json"))
    parser.add_argument("--repeats", type=positive_int, default=10, help="measurements per path and config (>= 1)")
    parser.add_argument("--small", action="store_true", help="tiny sizes (to check the script)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sftrl.files import write_atomic

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        facts = {"cpus": os.cpu_count(), "ray": ray.__version__, "python": platform.python_version(),
                 "small": args.small}
        result = {"facts": facts, "repeats": args.repeats,
                  "configs": {name: measure(name, size, args.repeats)
                              for name, size in (SMALL if args.small else SIZES).items()}}
    finally:
        ray.shutdown()
    result["markdown"] = markdown(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    write_atomic(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(result["markdown"]))
    print(result["markdown"])


if __name__ == "__main__":
    main()
