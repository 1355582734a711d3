"""Trajectory blocks and the replay buffer (Algorithm 1's B).

A *block* is a batch of whole chains from one rollout call, stored as numpy arrays (they cross
process boundaries; numpy moves through Ray's object store far faster than torch tensors).
The buffer hands out uniformly sampled *transitions* (x_n, x_{n-1}, n, x_0, behaviour log-prob,
policy version). Rewards are not stored: the learner relabels them with the current critic.

The buffer holds block *handles* and decides which transitions a generator phase learns from: a
``Draw`` names them by (block, step, chain), a few bytes per transition. The learner gathers them
itself (``gather``) from the blocks it is handed beside the draw, so the transitions' states never
travel through the buffer: with Ray the blocks reach the learner's node once, while the critic
works on them, and the buffer's node never fetches one. ``sample`` and ``all_transitions`` gather
in the buffer's own process with its ``resolve`` function from a list of handles to their blocks
(locally a handle is the block itself; through Ray, ``ray.get``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sftrl.diffusion.step import trainable_steps
from sftrl.weights import tensor_view


@dataclasses.dataclass(frozen=True)
class TrajectoryBlock:
    """``B`` chains of one policy version.

    ``xs`` ``(S + 1, B, *D)`` (xs[0] = x_S ... xs[S] = x_0); ``log_probs`` ``(S, B)`` behaviour
    log-probs; ``ns`` ``(S,)`` step numbers; ``stds`` ``(S,)`` step stds (0: deterministic step,
    not a trainable transition); ``rewards`` ``(B,)`` c(x_0) when collected (for logs only).
    """

    xs: np.ndarray
    log_probs: np.ndarray
    ns: np.ndarray
    stds: np.ndarray
    rewards: np.ndarray
    version: int
    block_id: str

    @property
    def num_chains(self) -> int:
        return self.xs.shape[1]

    @property
    def trainable_steps(self) -> np.ndarray:
        """Indices k (into the S steps) of stochastic transitions (``step.trainable_steps``)."""
        return np.asarray(trainable_steps(self.stds), dtype=np.int64)

    @property
    def num_transitions(self) -> int:
        return len(self.trainable_steps) * self.num_chains

    def meta(self) -> BlockMeta:
        return BlockMeta(self.block_id, self.version, self.num_chains, tuple(self.trainable_steps.tolist()))

    @property
    def nbytes(self) -> int:
        return self.xs.nbytes + self.log_probs.nbytes + self.rewards.nbytes + self.ns.nbytes + self.stds.nbytes

    def nonfinite_chains(self) -> int:
        """Chains with a NaN or infinite state anywhere along them."""
        finite = np.isfinite(self.xs.reshape(self.xs.shape[0], self.num_chains, -1)).all(axis=(0, 2))  # (B,)
        return int((~finite).sum())


@dataclasses.dataclass(frozen=True)
class BlockMeta:
    """What the buffer needs to know of a block without fetching it."""

    block_id: str
    version: int
    num_chains: int
    trainable_steps: tuple[int, ...]

    @property
    def num_transitions(self) -> int:
        return len(self.trainable_steps) * self.num_chains


@dataclasses.dataclass(frozen=True)
class TransitionBatch:
    """``B`` transitions: ``x_n``, ``x_prev``, ``x_0`` ``(B, *D)``; ``n``, ``log_prob``, ``version`` ``(B,)``."""

    x_n: Any
    x_prev: Any
    x_0: Any
    n: Any
    log_prob: Any
    version: Any

    def __len__(self) -> int:
        return len(self.n)

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(self, f.name).nbytes) for f in dataclasses.fields(self))

    def to_torch(self, device: torch.device | str = "cpu") -> TransitionBatch:
        def t(a):
            return tensor_view(a, device)

        return TransitionBatch(
            x_n=t(self.x_n).float(),
            x_prev=t(self.x_prev).float(),
            x_0=t(self.x_0).float(),
            n=t(self.n).long(),
            log_prob=t(self.log_prob).float(),
            version=t(self.version).long(),
        )

    def select(self, index) -> TransitionBatch:
        return TransitionBatch(
            *(getattr(self, f.name)[index] for f in dataclasses.fields(self))
        )


@dataclasses.dataclass(frozen=True)
class Draw:
    """Which transitions a generator phase learns from, in order: row r is step ``step[r]`` of
    chain ``chain[r]`` of the block ``block_ids[block[r]]``. ``gather`` makes the
    ``TransitionBatch`` of it from the blocks themselves."""

    block_ids: tuple[str, ...]
    block: np.ndarray  # (R,) int64 index into block_ids
    step: np.ndarray  # (R,) int64 index k into the block's S steps
    chain: np.ndarray  # (R,) int64 chain of the block

    def __len__(self) -> int:
        return len(self.block)

    @property
    def nbytes(self) -> int:
        return self.block.nbytes + self.step.nbytes + self.chain.nbytes


def gather(draw: Draw, blocks: Sequence[TrajectoryBlock]) -> TransitionBatch:
    """The transitions of ``draw`` from ``blocks`` (which hold every block the draw takes rows
    from, in any order; others are ignored), copied out of them row by row in the draw's order."""
    if len(draw) == 0:
        raise ValueError("an empty draw: no transitions to gather")
    by_id = {block.block_id: block for block in blocks}
    used = np.unique(draw.block)
    missing = [draw.block_ids[index] for index in used if draw.block_ids[index] not in by_id]
    if missing:
        raise ValueError(f"the draw names blocks {missing[:3]} that were not handed over with it "
                         f"(given: {sorted(by_id)[:3]}...)")
    first = by_id[draw.block_ids[used[0]]]
    shape = first.xs.shape[2:]
    rows = len(draw)
    out = TransitionBatch(
        x_n=np.empty((rows, *shape), first.xs.dtype),
        x_prev=np.empty((rows, *shape), first.xs.dtype),
        x_0=np.empty((rows, *shape), first.xs.dtype),
        n=np.empty(rows, first.ns.dtype),
        log_prob=np.empty(rows, first.log_probs.dtype),
        version=np.empty(rows, np.int64),
    )
    for index in used:
        block = by_id[draw.block_ids[index]]
        mine = np.nonzero(draw.block == index)[0]
        steps, chains = draw.step[mine], draw.chain[mine]
        out.x_n[mine] = block.xs[steps, chains]
        out.x_prev[mine] = block.xs[steps + 1, chains]
        out.x_0[mine] = block.xs[-1, chains]
        out.n[mine] = block.ns[steps]
        out.log_prob[mine] = block.log_probs[steps, chains]
        out.version[mine] = block.version
    return out


def block_transitions(block: TrajectoryBlock) -> TransitionBatch:
    """Every trainable transition of a block, step-major."""
    steps = np.repeat(block.trainable_steps, block.num_chains)
    chains = np.tile(np.arange(block.num_chains), len(block.trainable_steps))
    return gather(Draw((block.block_id,), np.zeros(len(steps), np.int64), steps, chains), [block])


def _identity(handles: list[Any]) -> list[TrajectoryBlock]:
    return list(handles)


class ReplayBuffer:
    """Blocks in, uniform transition batches out; cleared, or trimmed by weights version."""

    def __init__(self, resolve: Callable[[list[Any]], list[TrajectoryBlock]] = _identity):
        self._resolve = resolve
        self._entries: list[tuple[Any, BlockMeta]] = []
        self._seen: set[str] = set()
        self.blocks_added = 0
        self.transitions_added = 0

    def add(self, handle: Any, meta: BlockMeta) -> None:
        """Store one block; a block id seen before is refused (no double counting)."""
        if meta.block_id in self._seen:
            raise ValueError(f"block {meta.block_id!r} was already added to the buffer")
        self._seen.add(meta.block_id)
        self._entries.append((handle, meta))
        self.blocks_added += 1
        self.transitions_added += meta.num_transitions

    def add_many(self, handles: Sequence[Any], metas: Sequence[BlockMeta]) -> None:
        for handle, meta in zip(handles, metas, strict=True):
            self.add(handle, meta)

    def discard(self, block_ids: Sequence[str]) -> int:
        """Forget blocks whose rollouts were lost before they were used: they are not counted as
        added and may be added again once collected anew. Returns how many were dropped."""
        drop = set(block_ids)
        keep = [(h, m) for h, m in self._entries if m.block_id not in drop]
        for _, meta in self._entries:
            if meta.block_id in drop:
                self._seen.discard(meta.block_id)
                self.blocks_added -= 1
                self.transitions_added -= meta.num_transitions
        dropped = len(self._entries) - len(keep)
        self._entries = keep
        return dropped

    def add_blocks(self, blocks: Sequence[TrajectoryBlock]) -> None:
        for block in blocks:
            self.add(block, block.meta())

    @property
    def num_transitions(self) -> int:
        return sum(meta.num_transitions for _, meta in self._entries)

    @property
    def num_blocks(self) -> int:
        return len(self._entries)

    def versions(self) -> list[int]:
        return sorted({meta.version for _, meta in self._entries})

    def draw(self, num_batches: int, batch_size: int, seed: int) -> Draw:
        """``num_batches * batch_size`` transitions; each batch uniform without replacement.

        (With replacement when the buffer holds fewer transitions than ``batch_size``.)
        """
        total = self.num_transitions
        if total == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        rng = np.random.default_rng(seed)
        picks = np.concatenate(
            [rng.choice(total, size=batch_size, replace=batch_size > total) for _ in range(num_batches)]
        )
        return self._draw(picks)

    def draw_all(self) -> Draw:
        """Every transition, block by block, step-major within a block."""
        if self.num_transitions == 0:
            raise RuntimeError("the replay buffer is empty: no transitions to hand out")
        return self._draw(np.arange(self.num_transitions))

    def sample(self, num_batches: int, batch_size: int, seed: int) -> TransitionBatch:
        """``draw``'s transitions, gathered here."""
        return self._gather(self.draw(num_batches, batch_size, seed))

    def all_transitions(self) -> TransitionBatch:
        return self._gather(self.draw_all())

    def _draw(self, picks: np.ndarray) -> Draw:
        """The transitions at global indices ``picks`` (block by block, then step-major), in that order."""
        sizes = np.array([meta.num_transitions for _, meta in self._entries])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        entry = np.searchsorted(offsets, picks, side="right") - 1
        local = picks - offsets[entry]
        chains_of = np.array([meta.num_chains for _, meta in self._entries])[entry]
        step = np.empty(len(picks), np.int64)
        for e in np.unique(entry):  # the k-th trainable step of the block, as an index into its S steps
            rows = entry == e
            step[rows] = np.asarray(self._entries[e][1].trainable_steps)[local[rows] // chains_of[rows]]
        block_ids = tuple(meta.block_id for _, meta in self._entries)
        return Draw(block_ids, entry.astype(np.int64), step, (local % chains_of).astype(np.int64))

    def _gather(self, draw: Draw) -> TransitionBatch:
        """``gather`` in this process: the blocks the draw uses, fetched in one call."""
        blocks = self._resolve([self._entries[e][0] for e in np.unique(draw.block)])  # one fetch for all of them
        return gather(draw, blocks)

    def refill(
        self,
        handles: Sequence[Any],
        metas: Sequence[BlockMeta],
        draw: str,
        num_batches: int = 0,
        batch_size: int = 0,
        seed: int = 0,
    ) -> Draw:
        """Sync mode's buffer work for one iteration of Algorithm 1 in one call: drop the previous
        iteration's blocks (its step 5, "clear the buffer"), add this iteration's and say which
        transitions the generator phase learns from: ``draw="samples"`` is
        ``draw(num_batches, batch_size, seed)``, ``draw="all"`` is ``draw_all()``. The learner
        gathers them from the blocks (``gather``): the buffer never fetches one.

        One call rather than three because every actor call costs CPU in several processes
        (about 1.75 ms on a 2-core machine), taken from the critic computing beside it.

        Async mode clears too: trimming by staleness (``trim``) at its bound would keep the same
        blocks, since iteration j's blocks are ``rollout.max_lag`` versions behind and the last
        iteration's one version more; and blocks from before a checkpoint must not outlive it
        (a resumed run starts with an empty buffer).
        """
        if draw not in ("samples", "all"):
            raise ValueError(f"draw must be 'samples' or 'all', not {draw!r}")
        self.clear()
        self.add_many(handles, metas)
        return self.draw(num_batches, batch_size, seed) if draw == "samples" else self.draw_all()

    def clear(self) -> int:
        """Drop every block (sync mode: ``refill`` does it for each new iteration); returns how many
        were dropped."""
        dropped = len(self._entries)
        self._entries.clear()
        return dropped

    def trim(self, min_version: int) -> int:
        """Drop blocks older than ``min_version`` (async mode); returns how many were dropped."""
        keep = [(h, m) for h, m in self._entries if m.version >= min_version]
        dropped = len(self._entries) - len(keep)
        self._entries = keep
        return dropped

    def state(self) -> dict[str, Any]:
        """Counters for checkpoints and logs (the blocks themselves are not checkpointed)."""
        return {
            "blocks_added": self.blocks_added,
            "transitions_added": self.transitions_added,
            "num_blocks": self.num_blocks,
            "versions": self.versions(),
        }
