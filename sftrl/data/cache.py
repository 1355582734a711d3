"""Decoded images cached as one ``uint8`` ``.npy`` file, built once, then memory-mapped.

The first run over a folder of JPEGs decodes every image once (with a progress bar) into
``<cache>/<set>-<N>x<shape>-<key>.u8.npy``; every later process (the driver, the critic actor,
``sftrl eval``) maps that file read-only, so a node holds one copy of the images in its page
cache however many processes read them. The key hashes the decode recipe and every file's
name, size and modification time: changed files make a new cache. Building is atomic (a
temporary file, then a rename) and locked, so two processes never build the same cache twice
and a build that fails (a bad file) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sftrl.data.images import DecodePlan
from sftrl.files import DiskFull, fsync_dir, out_of_space
from sftrl.progress import Progress


def cache_file(plan: DecodePlan, cache_dir: Path) -> Path:
    listing = [(f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in plan.files]
    key = hashlib.sha256(json.dumps([plan.recipe, str(plan.files[0].parent) if plan.files else "", listing]).encode())
    shape = "x".join(map(str, plan.shape))
    return cache_dir / f"{plan.name}-{len(plan.files)}x{shape}-{key.hexdigest()[:16]}.u8.npy"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a second builder waits for the first, then maps its file
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def cached_images(plan: DecodePlan, cache_dir: Path, *, progress: bool = True) -> np.ndarray:
    """``plan``'s images ``(N, *shape)`` ``uint8``, memory-mapped read-only from the cache (built
    first if missing)."""
    path = cache_file(plan, cache_dir)
    if not path.is_file():
        with _locked(path):
            if not path.is_file():
                _build(plan, path, progress)
    return np.load(path, mmap_mode="r")


def _build(plan: DecodePlan, path: Path, progress: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(plan.files), *plan.shape))
        with Progress(len(plan.files), f"decode {plan.name} (once)", unit="image", enabled=progress) as bar:
            plan.decode_all(out, on_image=bar.update)
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if out_of_space(err):
            raise DiskFull(path, err) from err
        raise
