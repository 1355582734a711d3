"""DDPM pretraining of the initial sampler, and the cache of pretrained samplers.

A sampler checkpoint is a dict of tensors and plain values (loadable with
``torch.load(weights_only=True)``): ``format``, ``state_dict``, ``model`` (what builds the
network), ``pretrain`` (the settings it was trained with) and ``final_eps_mse``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sftrl.config import Config, pretrain_key
from sftrl.configtools import to_dict
from sftrl.diffusion.betas import alphas_cumprod, make_betas
from sftrl.progress import Progress

SAMPLER_FORMAT = "sftrl-sampler-v1"


def pretrain_sampler(
    model: nn.Module,
    data: np.ndarray,
    betas: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """eps-MSE training (Ho et al.) with RMSprop and gradient clipping, the paper's recipe.

    ``data`` ``(N, *D)``; ``betas`` ``(T,)``. An epoch is one shuffled pass over the data.
    Returns ``{"epoch_loss": [...], "seconds": ...}``.
    """
    device = torch.device(device)
    model = model.to(device).train()
    x = torch.as_tensor(data, dtype=torch.float32, device=device)
    abar = torch.as_tensor(alphas_cumprod(betas), dtype=torch.float32, device=device)
    num_train_steps = len(betas)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    params = list(model.parameters())
    history = []
    with Progress(epochs, "pretrain", unit="epoch", enabled=progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=generator, device=device)
            # One draw of timesteps and noise per epoch: fewer small RNG calls per step.
            t_all = torch.randint(num_train_steps, (len(x),), generator=generator, device=device)
            noise_all = torch.randn(x.shape, generator=generator, device=device)
            total = torch.zeros((), device=device)
            for start in range(0, len(x), batch_size):
                idx = perm[start : start + batch_size]
                loss, _ = _eps_mse(model, x[idx], abar, t_all[start : start + batch_size], noise_all[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                total += loss.detach() * len(idx)
            epoch_loss = (total / len(x)).item()
            history.append(epoch_loss)
            bar.update(1, eps_mse=epoch_loss)
        seconds = bar.elapsed
    return {"epoch_loss": history, "seconds": seconds}


def _eps_mse(model, x_0, abar, t, noise):
    # eps_mse_loss's metrics call .item() (a sync per step); pretraining only needs the loss.
    from sftrl.diffusion.pretrain import q_sample

    x_t = q_sample(x_0, abar, t, noise)
    return (model(x_t, t.to(x_0.dtype)) - noise).pow(2).mean(), None


def sampler_checkpoint(model: nn.Module, cfg: Config, info: dict) -> dict:
    return {
        "format": SAMPLER_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": {
            "sampler": cfg.model.sampler,
            "hidden": cfg.model.hidden,
            "num_train_steps": cfg.diffusion.num_train_steps,
            "beta_schedule": cfg.diffusion.beta_schedule,
            "data": cfg.data.name,
        },
        "pretrain": to_dict(cfg.pretrain),
        "final_eps_mse": float(info["epoch_loss"][-1]) if info.get("epoch_loss") else float("nan"),
        "seconds": float(info.get("seconds", 0.0)),
    }


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class SamplerCheckpointError(ValueError):
    """A sampler checkpoint that is missing, unreadable, or of another model."""


def load_sampler_checkpoint(path: Path, model: nn.Module, cfg: Config) -> dict:
    """Load a sampler checkpoint into ``model`` after checking it matches ``cfg``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' not found (model.checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise SamplerCheckpointError(
            f"sampler checkpoint '{path}' is not a readable PyTorch file ({type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != SAMPLER_FORMAT:
        raise SamplerCheckpointError(
            f"'{path}' is not an sftrl sampler checkpoint (expected format '{SAMPLER_FORMAT}')"
        )
    want = {"sampler": cfg.model.sampler, "hidden": cfg.model.hidden, "num_train_steps": cfg.diffusion.num_train_steps}
    have = {k: ckpt["model"].get(k) for k in want}
    if have != want:
        diff = ", ".join(f"{k}: checkpoint {have[k]!r} vs config {want[k]!r}" for k in want if have[k] != want[k])
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' is for another model ({diff})")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise SamplerCheckpointError(f"sampler checkpoint '{path}' does not fit the model: {str(err).splitlines()[0]}") from None
    return ckpt


def cache_path(cfg: Config) -> Path:
    return Path(cfg.pretrain.cache_dir).expanduser() / f"{cfg.data.name}-T{cfg.diffusion.num_train_steps}-{pretrain_key(cfg)}.pt"


def load_or_pretrain(cfg: Config, model: nn.Module, data: np.ndarray, *, device: str = "cpu", progress: bool = True) -> dict:
    """Initialise ``model`` from ``model.checkpoint``, the cache, or a fresh pretraining run.

    Returns ``{"source": "checkpoint"|"cache"|"pretrained", "path": ..., "seconds": ...}``.
    """
    if cfg.model.checkpoint:
        load_sampler_checkpoint(Path(cfg.model.checkpoint), model, cfg)
        return {"source": "checkpoint", "path": str(cfg.model.checkpoint), "seconds": 0.0}
    path = cache_path(cfg)
    if path.is_file():
        try:
            ckpt = load_sampler_checkpoint(path, model, cfg)
            return {"source": "cache", "path": str(path), "seconds": 0.0, "pretrain_seconds": ckpt["seconds"]}
        except SamplerCheckpointError:
            pass  # a stale or corrupt cache entry is rebuilt below
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
    )
    save_atomic(sampler_checkpoint(model, cfg, info), path)
    return {"source": "pretrained", "path": str(path), "seconds": time.monotonic() - start}
