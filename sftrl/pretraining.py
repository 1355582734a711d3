"""DDPM pretraining of the initial sampler, and the cache of pretrained samplers.

A sampler checkpoint is a dict of tensors and plain values (loadable with
``torch.load(weights_only=True)``): ``format``, ``state_dict``, ``model`` (what builds the
network), ``pretrain`` (the settings it was trained with) and ``final_eps_mse``.

``model.checkpoint`` may name such a file or, for the U-Net sampler, a public DDPM/DDIM release
(a plain EMA state dict, or the DDIM training list whose last dict is the EMA state dict; see
:func:`sftrl.models.unet.load_ddim_checkpoint`). The two are told apart by the ``format`` entry.
It may also name a diffusers ``UNet2DModel`` folder (:mod:`sftrl.models.diffusers_unet`), whose
settings the config took when it was loaded (:mod:`sftrl.checkpoint_settings`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sftrl.config import Config, pretrain_key
from sftrl.configtools import to_dict
from sftrl.data import RealData
from sftrl.data.store import ImageStore
from sftrl.diffusion.betas import alphas_cumprod, make_betas
from sftrl.diffusion.pretrain import eps_mse
from sftrl.files import torch_save_atomic
from sftrl.models.unet import CheckpointMismatchError, UNet, load_ddim_checkpoint
from sftrl.progress import Progress

SAMPLER_FORMAT = "sftrl-sampler-v1"
DDIM_FORMAT = "ddim"  # what ``load_or_pretrain`` reports for a public DDPM/DDIM release
DIFFUSERS_FORMAT = "diffusers"  # ... and for a diffusers UNet2DModel folder
# Keys of each kind a one-line checkpoint-mismatch error names before summarising the rest.
MAX_KEYS_IN_ERROR = 5
# The U-Net keeps an exponential moving average of its weights and ends pretraining with it, as
# the DDPM/DDIM releases do (they sample with EMA weights, decay 0.9999 over ~800K steps). Runs
# here are a few thousand steps, so the average is shorter. Measured on configs/digits.yaml
# (FastDPM T' = 10, digits-CNN FID): the raw weights' FID swung between 98 and 165 from one
# 25-epoch checkpoint to the next; the average's fell steadily, 53, 32, 25, 21 over 100 epochs.
# The toy MLP keeps the paper's recipe (no EMA).
UNET_EMA_DECAY = 0.999


class PretrainingStopped(Exception):
    """Pretraining was asked to stop (the command is exiting); nothing was cached."""


class PretrainingFailed(ValueError):
    """Pretraining had no data or diverged: a config to change (a user error); nothing was cached."""


def pretrain_sampler(
    model: nn.Module,
    data: RealData,
    betas: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    ema_decay: float | None = None,
    stop: threading.Event | None = None,
) -> dict:
    """eps-MSE training (Ho et al.) with RMSprop and gradient clipping, the paper's recipe.

    ``data`` ``(N, *D)`` (flat toy points or images ``(N, C, H, W)``: an array, held on the device
    whole, or an ``ImageStore``, converted a batch at a time, flipped where it flips); ``betas``
    ``(T,)``. An epoch is one shuffled pass over the data. With ``ema_decay`` the model ends with the exponential
    moving average of its weights (decay ``min(ema_decay, (1 + k) / (10 + k))`` at step k, so the
    initial weights are forgotten early). Returns ``{"epoch_loss": [...], "seconds": ...}``.
    ``stop``: checked at each epoch's start; once set, ``PretrainingStopped`` is raised.

    A function of its arguments: the batches, timesteps and noise come from a generator seeded
    with ``seed``, and the global RNG (the U-Net's dropout masks) is seeded with it too for the
    run and restored afterwards. A cached sampler is then the same on every machine and in every
    process that trains it (unseeded, dropout made each pretraining of the digits U-Net differ).
    """
    if len(data) == 0:
        raise PretrainingFailed("pretraining needs training data, and the data set holds no samples (check data.*)")
    where = torch.device(device)
    model = model.to(where).train()
    store = data if isinstance(data, ImageStore) else None
    x = None if store is not None else torch.as_tensor(data, dtype=torch.float32, device=where)
    n = len(data)
    abar = torch.as_tensor(alphas_cumprod(betas), dtype=torch.float32, device=where)
    num_train_steps = len(betas)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, foreach=True)
    generator = torch.Generator(device=where).manual_seed(seed)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if ema_decay is not None else None
    steps = 0
    history: list[float] = []
    with (torch.random.fork_rng(devices=[where] if where.type == "cuda" else []),
          Progress(epochs, "pretrain", unit="epoch", enabled=progress) as bar):
        torch.manual_seed(seed)  # the dropout masks; the caller's global RNG comes back on the way out
        for _ in range(epochs):
            if stop is not None and stop.is_set():
                raise PretrainingStopped(f"pretraining stopped after {len(history)} of {epochs} epochs")
            perm = torch.randperm(n, generator=generator, device=where)
            if x is not None:  # One draw of timesteps and noise per epoch: fewer small RNG calls per step.
                t_all = torch.randint(num_train_steps, (n,), generator=generator, device=where)
                noise_all = torch.randn(x.shape, generator=generator, device=where)
            total = torch.zeros((), device=where)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                if x is not None:
                    x_b, t_b, noise_b = x[idx], t_all[start : start + batch_size], noise_all[idx]
                else:  # images: one batch of floats at a time (CelebA as float32 is 8 GB)
                    assert store is not None
                    x_b = store.batch(idx, where, generator)  # (B, C, H, W), flipped where the set flips
                    t_b = torch.randint(num_train_steps, (len(idx),), generator=generator, device=where)
                    noise_b = torch.randn(x_b.shape, generator=generator, device=where)
                loss = eps_mse(model, x_b, abar, t_b, noise_b)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
                optimizer.step()
                if ema is not None and ema_decay is not None:
                    decay = min(ema_decay, (1 + steps) / (10 + steps))
                    for average, p in zip(ema, params):
                        average.lerp_(p.detach(), 1.0 - decay)
                steps += 1
                total += loss.detach() * len(idx)
            epoch_loss = (total / n).item()
            history.append(epoch_loss)
            if not math.isfinite(epoch_loss):
                raise PretrainingFailed(
                    f"pretraining diverged: the eps-MSE is {epoch_loss} after epoch {len(history)} of {epochs} "
                    f"(pretrain.lr = {lr:g}); nothing was cached: lower pretrain.lr or pretrain.max_grad_norm"
                )
            bar.update(1, eps_mse=epoch_loss)
        seconds = bar.elapsed
    if ema is not None:
        with torch.no_grad():
            for p, average in zip(params, ema):
                p.copy_(average)
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise PretrainingFailed(f"pretraining ended with non-finite weights (pretrain.lr = {lr:g}); nothing was cached: "
                                "lower pretrain.lr or pretrain.max_grad_norm")
    return {"epoch_loss": history, "seconds": seconds, "ema_decay": ema_decay}


def unet_architecture(cfg: Config) -> dict:
    """The ``model.unet_*`` settings that fix the U-Net's weights (dropout does not)."""
    m = cfg.model
    return {
        "ch": m.unet_ch,
        "ch_mult": list(m.unet_ch_mult),
        "num_res_blocks": m.unet_num_res_blocks,
        "attn_resolutions": list(m.unet_attn_resolutions),
    }


def model_signature(cfg: Config) -> dict:
    """What a sampler checkpoint must agree on with ``cfg`` to be loaded into its network."""
    signature: dict[str, Any] = {"sampler": cfg.model.sampler, "num_train_steps": cfg.diffusion.num_train_steps,
                 "beta_schedule": cfg.diffusion.beta_schedule}  # the noise levels its eps-prediction learned
    if cfg.model.sampler == "unet":
        signature["unet"] = unet_architecture(cfg)
    else:
        signature["hidden"] = cfg.model.hidden
    return signature


def sampler_checkpoint(model: nn.Module, cfg: Config, info: dict) -> dict:
    return sampler_checkpoint_of_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg, info)


def sampler_checkpoint_of_state(state_dict: dict[str, torch.Tensor], cfg: Config, info: dict) -> dict:
    """An sftrl sampler checkpoint (``SAMPLER_FORMAT``) of a network's CPU tensors."""
    return {
        "format": SAMPLER_FORMAT,
        "state_dict": state_dict,
        "model": {
            **model_signature(cfg),
            "hidden": cfg.model.hidden,
            "beta_schedule": cfg.diffusion.beta_schedule,
            "data": cfg.data.name,
        },
        "pretrain": to_dict(cfg.pretrain),
        "final_eps_mse": float(info["epoch_loss"][-1]) if info.get("epoch_loss") else float("nan"),
        "seconds": float(info.get("seconds", 0.0)),
    }


class SamplerCheckpointError(ValueError):
    """A sampler checkpoint that is missing, unreadable, or of another model."""


def read_torch_file(path: Path):
    """``torch.load(weights_only=True)`` of ``path``, tensors memory-mapped where the file allows
    (a multi-GB DDIM training checkpoint is then only paged in as far as it is used)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped: read them plainly below
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise SamplerCheckpointError(
            f"sampler checkpoint '{path}' is not a readable PyTorch file ({type(err).__name__})"
        ) from None


def load_sftrl_checkpoint(path: Path, ckpt, model: nn.Module, cfg: Config) -> dict:
    """Load ``ckpt``, the sftrl sampler checkpoint read from ``path``, into ``model`` after
    checking it is one and matches ``cfg``."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != SAMPLER_FORMAT:
        raise SamplerCheckpointError(
            f"'{path}' is not an sftrl sampler checkpoint (expected format '{SAMPLER_FORMAT}')"
        )
    want = model_signature(cfg)
    have = {k: ckpt["model"].get(k) for k in want}
    if have != want:
        diff = ", ".join(f"{k}: checkpoint {have[k]!r} vs config {want[k]!r}" for k in want if have[k] != want[k])
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' is for another model ({diff})")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' does not fit the model: {str(err).splitlines()[0]}") from None
    return ckpt


def load_sampler_checkpoint(path: Path, model: nn.Module, cfg: Config) -> dict:
    """Load an sftrl sampler checkpoint into ``model`` after checking it matches ``cfg``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' not found (model.checkpoint)")
    return load_sftrl_checkpoint(path, read_torch_file(path), model, cfg)


def _one_line_mismatch(path: Path, err: CheckpointMismatchError, model: nn.Module,
                       what: str = "DDPM/DDIM checkpoint") -> str:
    """A :class:`CheckpointMismatchError` (one line per key) as one line naming the first keys."""

    def listing(what: str, items: list[str]) -> str:
        shown = "; ".join(items[:MAX_KEYS_IN_ERROR])
        more = f"; ... and {len(items) - MAX_KEYS_IN_ERROR} more" if len(items) > MAX_KEYS_IN_ERROR else ""
        return f"{len(items)} {what}{'' if len(items) == 1 else 's'}: {shown}{more}"

    kinds = [
        (err.mismatched, "mis-shaped key", [f"{k} expected {list(e)} found {list(f)}" for k, e, f in err.mismatched]),
        (err.missing, "missing key", err.missing),
        (err.unexpected, "unexpected key", err.unexpected),
    ]
    found = " | ".join(listing(what, items) for present, what, items in kinds if present)
    built = f"{model.in_channels} channels, {model.resolution}x{model.resolution}"
    return (
        f"{what} '{path}' (model.checkpoint) does not fit the U-Net built from "
        f"model.unet_* ({built}); nothing was loaded: {found}"
    )


def load_ddim_release(path: Path, model: nn.Module) -> None:
    """Load a public DDPM/DDIM U-Net checkpoint into ``model``; any failure is one-line
    :class:`SamplerCheckpointError` (keys and shapes are checked before anything is copied)."""
    try:
        load_ddim_checkpoint(path, model)
    except CheckpointMismatchError as err:
        raise SamplerCheckpointError(_one_line_mismatch(path, err, model)) from None
    except (ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamplerCheckpointError(f"model.checkpoint '{path}': {first_line}") from None


def load_initial_checkpoint(path: str | Path, model: nn.Module, cfg: Config) -> dict:
    """Initialise ``model`` from ``model.checkpoint``: an sftrl sampler checkpoint (a dict with a
    ``format`` entry) or, for the U-Net, a public DDPM/DDIM release or a diffusers folder. Returns the
    report entry."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_diffusers_folder(path, model, cfg)
    if not path.is_file():
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' not found (model.checkpoint)")
    ckpt = read_torch_file(path)
    if isinstance(ckpt, dict) and "format" in ckpt:
        load_sftrl_checkpoint(path, ckpt, model, cfg)
        return {"source": "checkpoint", "format": SAMPLER_FORMAT, "path": str(path), "seconds": 0.0}
    if cfg.model.sampler != "unet":
        raise SamplerCheckpointError(
            f"'{path}' is not an sftrl sampler checkpoint (expected format '{SAMPLER_FORMAT}'); "
            "public DDPM/DDIM checkpoints need model.sampler: unet"
        )
    del ckpt  # load_ddim_checkpoint reads the file itself
    load_ddim_release(path, model)
    return {"source": "checkpoint", "format": DDIM_FORMAT, "path": str(path), "seconds": 0.0}


def load_diffusers_folder(path: Path, model: nn.Module, cfg: Config) -> dict:
    """Load a diffusers ``UNet2DModel`` folder into the U-Net ``model``; every failure is a one-line
    :class:`SamplerCheckpointError`. Returns the report entry."""
    from sftrl.models.diffusers_unet import (
        DiffusersFormatError,
        load_diffusers_weights,
        read_layout,
        read_scheduler,
        unet_folder,
    )

    if unet_folder(path) is None:
        raise SamplerCheckpointError(
            f"model.checkpoint '{path}' is a folder but not a diffusers model folder (config.json and "
            "diffusion_pytorch_model.safetensors, or a pipeline's model_index.json with unet/); a sampler "
            "checkpoint is a file"
        )
    if cfg.model.sampler != "unet" or not isinstance(model, UNet):
        raise SamplerCheckpointError(f"model.checkpoint '{path}' is a diffusers U-Net: it needs model.sampler: unet")
    try:
        layout, scheduler = read_layout(path), read_scheduler(path)
        built = {"ch": model.ch, "ch_mult": model.ch_mult, "num_res_blocks": model.num_res_blocks,
                 "in_channels": model.in_channels, "out_ch": model.out_ch, "resolution": model.resolution,
                 "attn_resolutions": tuple(r for r in layout.level_resolutions() if r in model.attn_resolutions)}
        differ = [f"{k}: folder {getattr(layout, k)!r} vs config {v!r}" for k, v in built.items()
                  if getattr(layout, k) != v]
        if scheduler is not None and scheduler != (cfg.diffusion.num_train_steps, cfg.diffusion.beta_schedule):
            differ.append(f"base DDPM: folder T = {scheduler[0]} {scheduler[1]} betas vs config diffusion.num_train_steps "
                          f"= {cfg.diffusion.num_train_steps}, diffusion.beta_schedule = {cfg.diffusion.beta_schedule}")
        if differ:  # the config loader fills these from the folder; the data set fixes the channels
            raise SamplerCheckpointError(f"diffusers folder '{path}' (model.checkpoint) does not fit the U-Net "
                                         f"built from the config and data set ({'; '.join(differ)})")
        load_diffusers_weights(path, model)
    except CheckpointMismatchError as err:
        raise SamplerCheckpointError(_one_line_mismatch(path, err, model, what="diffusers folder")) from None
    except DiffusersFormatError as err:
        raise SamplerCheckpointError(f"model.checkpoint: {err}") from None
    return {"source": "checkpoint", "format": DIFFUSERS_FORMAT, "path": str(path), "seconds": 0.0}


def pretrain_ema_decay(cfg: Config) -> float | None:
    """``pretrain.ema_decay``, or the model's recipe when it is null: the U-Net keeps the average
    (as the DDPM checkpoints do), the toy MLP does not (the paper). 0 means none."""
    decay = cfg.pretrain.ema_decay
    if decay is None:
        return UNET_EMA_DECAY if cfg.model.sampler == "unet" else None
    return decay or None


def data_fingerprint(data: RealData) -> str:
    """A short hash of the training data's dtype, shape and values (about 1.5 GB/s): the part of
    the cache key the config cannot give, since the files at ``data.path`` may change."""
    array = np.ascontiguousarray(data.images if isinstance(data, ImageStore) else data)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.view(np.uint8).data)  # the bytes as they are, no copy
    return digest.hexdigest()[:16]


def cache_path(cfg: Config, fingerprint: str) -> Path:
    """``<pretrain.cache_dir>/<data>-T<T>-<key>.pt``: the key hashes the pretraining config
    (``pretrain_key``; the U-Net's architecture joins it) and the data's ``fingerprint``
    (:func:`data_fingerprint`)."""
    key = pretrain_key(cfg)
    if cfg.model.sampler == "unet":
        recipe = json.dumps({**unet_architecture(cfg), "ema_decay": pretrain_ema_decay(cfg)}, sort_keys=True)
        key = hashlib.sha256(f"{key}/{recipe}".encode()).hexdigest()[:16]
    key = hashlib.sha256(f"{key}/data:{fingerprint}".encode()).hexdigest()[:16]
    return Path(cfg.pretrain.cache_dir).expanduser() / f"{cfg.data.name}-T{cfg.diffusion.num_train_steps}-{key}.pt"


def load_or_pretrain(
    cfg: Config,
    model: nn.Module,
    data: RealData,
    *,
    device: str = "cpu",
    progress: bool = True,
    stop: threading.Event | None = None,
    fingerprint: str | None = None,
) -> dict:
    """Initialise ``model`` from ``model.checkpoint``, the cache, or a fresh pretraining run.

    Returns ``{"source": "checkpoint"|"cache"|"pretrained", "path": ..., "seconds": ...}`` (a
    checkpoint also says its ``format``: ``sftrl-sampler-v1``, ``ddim`` or ``diffusers``). ``fingerprint``:
    ``data_fingerprint(data)`` where the caller has it. Only a finite, trained sampler is
    cached (``PretrainingFailed`` otherwise), and a cached one with non-finite weights (cached
    by an older sftrl) is trained again.
    """
    if cfg.model.checkpoint:
        return load_initial_checkpoint(cfg.model.checkpoint, model, cfg)
    path = cache_path(cfg, fingerprint or data_fingerprint(data))
    if path.is_file():
        initial = {k: v.clone() for k, v in model.state_dict().items()}  # where pretraining starts from
        try:
            ckpt = load_sampler_checkpoint(path, model, cfg)
            if all(bool(torch.isfinite(p).all()) for p in model.state_dict().values()):
                return {"source": "cache", "path": str(path), "seconds": 0.0, "pretrain_seconds": ckpt["seconds"]}
            print(f"warning: the cached sampler '{path}' has non-finite weights; pretraining it again", file=sys.stderr)
        except SamplerCheckpointError:
            pass  # a stale or corrupt cache entry is rebuilt below
        model.load_state_dict(initial)  # a rejected entry may have been loaded in part
    start = time.monotonic()
    info = pretrain_sampler(
        model,
        data,
        make_betas(cfg.diffusion.beta_schedule, cfg.diffusion.num_train_steps),
        epochs=cfg.pretrain.epochs,
        batch_size=cfg.pretrain.batch_size,
        lr=cfg.pretrain.lr,
        max_grad_norm=cfg.pretrain.max_grad_norm,
        seed=cfg.pretrain.seed,
        device=device,
        progress=progress,
        ema_decay=pretrain_ema_decay(cfg),
        stop=stop,
    )
    torch_save_atomic(sampler_checkpoint(model, cfg, info), path)
    return {"source": "pretrained", "path": str(path), "seconds": time.monotonic() - start}
