"""Low-rank adapters (LoRA, Hu et al. 2021) on the sampler network, through the peft library.

``model.lora_rank > 0`` fine-tunes adapters instead of the whole network, as DDPO and DPOK do:
each adapted layer's weight ``W`` (frozen) gains a trainable low-rank update,

    W' = W + (alpha / r) B A        B: (out, r), A: (r, in * k * k); B starts at 0, so W' = W at first

(peft's ``get_delta_weight``; for a conv, A is an r-channel conv of the layer's kernel and B a 1x1
conv). The optimiser, the weights publication and the moving average then carry the adapters
(and any other trainable tensor, e.g. ``step_log_std``) instead of the 35.7M-78.7M U-Net weights.

Code name -> paper symbol: ``rank`` r, ``alpha`` alpha, ``lora_A`` A, ``lora_B`` B,
``base_layer`` W.

What is adapted (``lora_targets``): every convolution of the DDPM U-Net (3x3 convs, 1x1 shortcuts,
the attention's q, k, v and proj_out, which are 1x1 convs there) and every linear layer of the toy
MLP. peft is imported only here, and only when adapters are asked for; a merged network
(``merged_state``) is a plain state dict that loads without peft.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from sftrl.configtools import ConfigError

PEFT_INSTALL = "pip install 'sftrl[lora]'"
ADAPTER = "default"  # peft's adapter name: the one adapter a sampler has
BASE_LAYER = "base_layer"  # where peft keeps an adapted layer's frozen module (its state-dict infix)


def peft_installed() -> bool:
    """Whether peft can be imported (found without importing it: the import takes seconds)."""
    try:
        return importlib.util.find_spec("peft") is not None
    except ValueError:  # a module set to None in sys.modules (blocked): not importable
        return False


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(f"model.lora_rank > 0 needs the peft library, which is not installed: {PEFT_INSTALL}",
                          key="model.lora_rank") from None
    return peft


def lora_targets(model: nn.Module) -> list[str]:
    """The names of the modules LoRA adapts in ``model``: the U-Net's ``nn.Conv2d`` layers (its
    attention projections are 1x1 convs), the toy sampler's ``nn.Linear`` layers."""
    from sftrl.models import ToySampler, UNet

    kinds: type[nn.Module]
    if isinstance(model, UNet):
        kinds = nn.Conv2d
    elif isinstance(model, ToySampler):
        kinds = nn.Linear
    else:
        raise ValueError(f"LoRA adapts the U-Net or the toy MLP sampler, not a {type(model).__name__}")
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def apply_adapters(model: nn.Module, rank: int, alpha: float, *, keep_trainable: Collection[str] = ()) -> nn.Module:
    """Inject rank-``rank`` adapters into ``model``'s ``lora_targets`` (in place; returned).

    Every parameter of ``model`` is frozen but the adapters and those named in ``keep_trainable``
    (tensors attached for fine-tuning, not pretrained weights). The adapted model computes exactly
    what ``model`` did (B starts at 0). A's init draws from torch's global generator."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(model), lora_dropout=0.0,
                             bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = dict(model.named_parameters())
    unknown = sorted(set(keep_trainable) - set(params))
    if unknown:
        raise ValueError(f"keep_trainable names parameters the model does not have: {unknown}")
    for name in keep_trainable:
        params[name].requires_grad_(True)
    return model


def adapted_layers(model: nn.Module) -> dict[str, Any]:
    """``{name: peft LoRA layer}`` of ``model`` (empty for a plain network; peft is not imported
    for one: a model cannot hold peft's layers unless peft was imported)."""
    if sys.modules.get("peft") is None:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def is_adapted(model: nn.Module) -> bool:
    return bool(adapted_layers(model))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own tensors (A and B of every adapted layer), by state-dict key."""
    layers = adapted_layers(model)
    return {k: v for k, v in model.state_dict().items() if _split(k, layers)[1] == "adapter"}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``adapter_state`` of an adapted model of the same shape into ``model``: exactly its
    adapter keys, every shape checked (the frozen base is left as it is)."""
    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def _split(key: str, layers: dict[str, Any]) -> tuple[str | None, str]:
    """``(layer, kind)`` of a state-dict key: the adapted layer it belongs to (None: none) and
    whether it is that layer's frozen ``base`` tensor, an ``adapter`` tensor, or ``plain``."""
    for name in layers:
        if key.startswith(f"{name}."):
            return name, "base" if key.startswith(f"{name}.{BASE_LAYER}.") else "adapter"
    return None, "plain"


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain network's state dict of an adapted ``model``: each adapted layer's weight is
    ``W + (alpha / r) B A`` (peft's ``get_delta_weight``), the adapters' tensors are dropped and
    every other tensor is kept, under the keys of the network before adapters were applied.
    ``model`` is not changed. A plain ``model``'s own state dict for a model without adapters."""
    layers = adapted_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        layer, kind = _split(key, layers)
        if kind == "plain":
            out[key] = value.detach().clone()
        elif kind == "base":  # "<layer>.base_layer.<tensor>" -> "<layer>.<tensor>"
            out[key.replace(f"{layer}.{BASE_LAYER}.", f"{layer}.", 1)] = value.detach().clone()
    for name, layer_module in layers.items():
        weight = f"{name}.weight"
        out[weight] = out[weight] + layer_module.get_delta_weight(ADAPTER).to(out[weight].dtype)
    return out


def merge_into(adapted: nn.Module, plain: nn.Module) -> nn.Module:
    """Load ``merged_state(adapted)`` into ``plain``, the same network without adapters (strict);
    returns ``plain``, which runs without peft."""
    plain.load_state_dict(merged_state(adapted))
    return plain
