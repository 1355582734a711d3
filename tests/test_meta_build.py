"""The preflight builds every network under ``torch.device("meta")`` (no memory, no values): a
network whose construction reads values, or makes a tensor that ignores the default device, breaks
there or differs from the real build. Every shipped config and each option that adds parameters
must build the same networks on ``meta`` as on the CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from sftrl.config import load
from sftrl.data import image_shape
from sftrl.data.toy import TOY_DATASETS
from sftrl.diffusion.variance import LOG_STD_KEY
from sftrl.models import build_networks
from sftrl.preflight import check_networks

CHANNELS = {"digits": 1, "mnist": 1, "cifar10": 3, "celeba": 3}
SMALL_UNET = ["model.unet_ch=32", "model.unet_ch_mult=[1,2]", "model.unet_num_res_blocks=1"]
OPTIONS = {
    "plain": [],
    "learned-variance": ["model.learn_variance=true"],
    "learned-variance-per-channel": ["model.learn_variance=true", "model.learn_variance_per_channel=true"],
}  # LoRA's adapters are added after the pretrained weights load, never under the preflight's meta device


def _shape(cfg) -> tuple[int, ...]:
    if cfg.data.name in TOY_DATASETS:
        return (2,)
    return image_shape(cfg, CHANNELS[cfg.data.name])


def _cases():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        images = load(path).model.sampler == "unet"
        for option in OPTIONS:
            if images or not option.endswith("per-channel"):  # toy data has no channels
                yield pytest.param(path.name, option, id=f"{path.stem}-{option}")


def _tensors(networks):
    return [(f"{i}.{name}", t) for i, net in enumerate(networks)
            for name, t in [*net.named_parameters(), *net.named_buffers()]]


def _layout(networks) -> list[tuple[str, tuple[int, ...], bool]]:
    return [(f"{i}.{name}", tuple(t.shape), getattr(t, "requires_grad", False))
            for i, net in enumerate(networks)
            for name, t in [*net.named_parameters(), *net.named_buffers()]]


@pytest.mark.parametrize(("config", "option"), list(_cases()))
def test_every_config_builds_the_same_networks_on_meta_as_on_the_cpu(config, option):
    cfg = load(REPO / "configs" / config)
    overrides = list(OPTIONS[option])
    if cfg.model.sampler == "unet" and cfg.data.name in ("cifar10", "celeba"):
        overrides += SMALL_UNET  # the layout question is the same; the full-size CPU build costs seconds
    cfg = load(REPO / "configs" / config, overrides)
    shape = _shape(cfg)
    with torch.device("meta"):
        on_meta = build_networks(cfg, shape)
    on_cpu = build_networks(cfg, shape)
    assert _layout(on_meta) == _layout(on_cpu)
    cpu_tensors = dict(_tensors(on_cpu))
    assert not any(t.is_meta for t in cpu_tensors.values())
    real = {name: t for name, t in _tensors(on_meta) if not t.is_meta}
    # a tensor the meta build computed for real (the learned stds' start, made on the CPU on purpose)
    # holds the CPU build's values: nothing reads an uninitialised meta tensor into it
    assert set(real) <= {f"0.{LOG_STD_KEY}"}, sorted(real)
    for name, t in real.items():
        assert torch.equal(t, cpu_tensors[name]), name
    assert check_networks(cfg, shape) == sum(p.numel() for net in on_cpu for p in net.parameters())
