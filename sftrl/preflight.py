"""Checks a command makes before any work: on places to write, the config file, the cache, and
what the config alone cannot tell (the networks, the memory).

Each raises a ``UsageError`` (or another ``ValueError``) with a one-line message naming what to
change; the commands turn it into ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch

import sftrl
from sftrl.config import Config
from sftrl.errors import UsageError

EMA_START_SHARE_WARN = 0.05  # warn_if_average_lags: the starting weights' share of the average at the end
NAME_MAX = 255  # bytes in one file or directory name (Linux, macOS)
# Bytes a float32 parameter costs while training, summed over the copies a run keeps: the
# weights, their gradient, Adam's two moments, the moving average, and the published copies.
BYTES_PER_PARAMETER = 4 * 8


def resolve_config_path(path: str) -> Path:
    """``path`` as given, else relative to the installed package's ``configs/`` (for
    ``ray job submit -- python -m sftrl.run configs/x.yaml`` from any working directory)."""
    given = Path(path)
    if given.is_file():
        return given
    if given.is_dir():
        raise UsageError(f"config '{path}' is a directory: give a YAML file in it, e.g. {given / 'swissroll.yaml'}")
    packaged = Path(sftrl.__file__).resolve().parent / "configs"  # in the source tree, a link to configs/
    candidate = packaged / given.name
    if candidate.is_file():
        return candidate
    raise UsageError(f"config file '{path}' not found (looked in the working directory and in {packaged})")


def check_not_under_a_file(path: Path, flag: str) -> None:
    """No file stands where ``path``'s parent directories would go."""
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag} '{path}': '{parent}' is a file, not a directory")


def check_can_write(path: Path, flag: str, *, directory: bool) -> None:
    """``path`` (a ``directory`` to use, else a file to write) is of that kind if it exists and can
    be made where it is asked for. The nearest existing directory is tried with a probe directory,
    removed at once (permissions alone say nothing for root, nor for /proc or a read-only mount)."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{flag} '{str(path)[:60]}...': the name '{part[:40]}...' is {len(os.fsencode(part))} "
                             f"bytes long, more than the {NAME_MAX} file systems take")
    if directory and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} '{path}' is a file, not a directory")
    if not directory and path.is_dir():
        raise UsageError(f"{flag} '{path}' is a directory: give a file path")
    check_not_under_a_file(path, flag)
    place = next(p for p in [path, *path.parents] if p.is_dir())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sftrl-probe-", dir=place))
    except OSError as err:
        raise UsageError(f"{flag} '{path}': cannot write in '{place}' ({err.strerror or err})") from None


def check_cache_dir(cfg: Config, fingerprint: str | None) -> None:
    """Where a sampler will be pretrained, its cache must take it (a cached one is only read).
    ``fingerprint``: the data's (``data_fingerprint``), None when ``model.checkpoint`` is set."""
    from sftrl.pretraining import cache_path

    if fingerprint is not None and not cache_path(cfg, fingerprint).is_file():
        check_can_write(Path(cfg.pretrain.cache_dir).expanduser(), "pretrain.cache_dir", directory=True)


def check_fid_weights(cfg: Config) -> None:
    """A ``trainer.fid_weights`` given for an image run must be the FID Inception's weights
    (loaded once here, so a wrong file is said before anything starts)."""
    if cfg.trainer.fid_weights is None or cfg.is_toy:
        return
    from sftrl.evaluation import choose_extractor

    choose_extractor(cfg, (3, 8, 8))  # raises ValueError naming the file and what is wrong


def warn_if_in_a_job_copy(run_dir: Path) -> None:
    """``ray job submit --working-dir .`` runs the command in Ray's unpacked copy of that
    directory, which goes with the Ray session: a relative run directory would go with it."""
    cwd = Path.cwd()
    if not run_dir.is_absolute() and "working_dir_files" in cwd.parts:  # .../runtime_resources/working_dir_files/_ray_pkg_*
        print(f"warning: this job runs in Ray's copy of its --working-dir ({cwd}); the run directory '{run_dir}' "
              "goes with the Ray session: pass --run-dir with an absolute path to keep it", file=sys.stderr)


def warn_if_average_lags(cfg: Config) -> None:
    """``algo.ema_decay`` is applied once per iteration: a decay whose span (about 1 / (1 - decay)
    iterations) is long against the run leaves the evaluated and sampled weights close to the
    pretrained ones at its end (0.995 over 150 iterations: 47% theta_0)."""
    decay, iterations = cfg.algo.ema_decay, cfg.trainer.iterations
    start_share = decay ** iterations if decay > 0 else 0.0
    if start_share > EMA_START_SHARE_WARN:
        hint = (f"algo.ema_decay={1 - 10 / iterations:.3g} averages about the last {iterations // 10}"
                if iterations >= 100 else "a run this short needs no average (algo.ema_decay=0)")
        print(f"warning: algo.ema_decay = {decay:g} averages about the last {1 / (1 - decay):.0f} iterations "
              f"(it is updated once per iteration), against trainer.iterations = {iterations}: at the end the "
              f"evaluated and sampled weights are still {start_share:.0%} the starting ones; {hint}", file=sys.stderr)


# ``algo`` keys that one algorithm alone reads, by that algorithm's name
ALGORITHM_KEYS = {"ppo_clip": "ppo", "ppo_epochs": "ppo"}


def unused_algorithm_settings(cfg: Config) -> list[tuple[str, str]]:
    """The ``algo`` settings the run's algorithm does not read, as ``(the algorithm that reads it,
    "key = value")``: another algorithm's section (``algo.<name>.*``), and the keys of
    ``ALGORITHM_KEYS`` set away from their defaults for another algorithm. Set, they look used;
    ignored, they change nothing."""
    a, defaults = cfg.algo, type(cfg.algo)()
    unused = [(owner, f"algo.{key} = {getattr(a, key)!r}") for key, owner in ALGORITHM_KEYS.items()
              if a.name != owner and getattr(a, key) != getattr(defaults, key)]
    for name, section in a.sections.items():
        if name != a.name:  # the values set away from the section's defaults; else the section itself
            default = type(section)()
            changed = [f"algo.{name}.{f.name} = {getattr(section, f.name)!r}" for f in dataclasses.fields(section)
                       if getattr(section, f.name) != getattr(default, f.name)]
            unused += [(name, text) for text in changed or [f"algo.{name}.* (its defaults)"]]
    return unused


def warn_if_settings_unused(cfg: Config) -> None:
    """A setting of another algorithm than ``algo.name`` (``unused_algorithm_settings``) is most
    likely a forgotten ``algo.name``: said before the run starts, which goes on."""
    unused = unused_algorithm_settings(cfg)
    if unused:
        owners = list(dict.fromkeys(owner for owner, _ in unused))
        fix = (f"read by algorithm '{owners[0]}'); set algo.name={owners[0]} to use them" if len(owners) == 1 else
               f"read by algorithms {', '.join(repr(o) for o in owners)}); set algo.name to the one you meant")
        print(f"warning: {'; '.join(text for _, text in unused)}: not used, since algo.name is '{cfg.algo.name}' "
              f"({fix}, or remove them", file=sys.stderr)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def check_networks(cfg: Config, data_shape: tuple[int, ...]) -> int:
    """Build the sampler, critic and baseline on the ``meta`` device (no memory, milliseconds):
    a ``model.*`` setting the networks cannot take, or networks too big for this machine, is an
    error now rather than a crash in an actor minutes later. Returns their parameter count."""
    from sftrl.models import build_networks

    try:
        with torch.device("meta"):
            networks = build_networks(cfg, tuple(data_shape))
    except ValueError as err:
        raise UsageError(f"model.*: the networks cannot be built for data of shape {tuple(data_shape)}: {err}") from None
    count = sum(p.numel() for net in networks for p in net.parameters())
    have = physical_memory_bytes()
    if have is not None and count * BYTES_PER_PARAMETER > have:
        raise UsageError(
            f"model.*: the sampler, critic and baseline have {count:,} parameters, about "
            f"{count * BYTES_PER_PARAMETER / 2**30:.0f} GiB to train, more than this machine's "
            f"{have / 2**30:.0f} GiB: lower model.hidden, the widths or the U-Net's channels"
        )
    return count
