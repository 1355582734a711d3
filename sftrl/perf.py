"""How the sampler network runs in rollouts and policy steps (``perf.*``): its precision, its
compilation and its memory format, and the matmul precision of the GPU.

``runner(model, perf, device)`` returns the module to *call*; the model itself keeps its
parameters and state-dict keys (weights are loaded into it and trained through it), so a runner
never changes what a checkpoint or a weights publication holds.

The trap (issue 19): the last step's std is 0.001 and image log-probs average thousands of
pixels, so the worker and the learner must compute the same log-prob of the same transition,
or every ratio is noise. Both run the sampler through the same runner, and
``policy/rescore_log_ratio_absmax`` reports how far apart they are at each phase's first step
(0 means bit for bit). On the CPU, bfloat16 autocast gives the worker's batch and the
learner's the same bits (measured: the toy MLP and a small U-Net, every batch size tried);
float32 convolutions do not (a small U-Net: 3 of 4 batch sizes differ, by ~1e-6).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from sftrl.config import PerfConfig


class Autocast(nn.Module):
    """Calls ``module`` under bfloat16 autocast and returns float32: the matmuls and convolutions
    in bfloat16, the step's mean, log-prob and the optimiser (outside) in float32."""

    def __init__(self, module: nn.Module, device_type: str):
        super().__init__()
        self.module = module
        self.device_type = device_type

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.module(*args)
        return out.float()


class CompiledOrEager(nn.Module):
    """``torch.compile`` of ``module``, which compiles at its first call: where that fails (no C++
    compiler, an unsupported op) it says so once and runs ``module`` eagerly from then on."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.compiled: nn.Module | None = torch.compile(module, dynamic=True)  # type: ignore[assignment]

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as err:  # torch._dynamo / inductor failures have many types
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                print(f"warning: torch.compile failed here ({type(err).__name__}: {first[:200]}); running eagerly "
                      "(perf.compile=false hides this)", file=sys.stderr, flush=True)
                self.compiled = None
        return self.module(*args)


def set_matmul_precision(tf32: bool) -> None:
    """TF32 matmuls and convolutions on the GPU (``perf.tf32``): faster, 10-bit mantissas. Off by
    default: cuDNN would otherwise pick TF32 convolutions on its own, and the worker's and the
    learner's kernels could round differently."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def warm_up(run: nn.Module, data_shape: tuple[int, ...], device: torch.device, *, backward: bool) -> None:
    """Call ``run`` once on a dummy batch (and ``backward`` through it, for a learner) so that a
    compiled runner compiles now, before fine-tuning is timed. The gradients it leaves are
    cleared."""
    x = torch.zeros((2, *data_shape), device=device)
    t = torch.zeros(2, device=device)
    with torch.set_grad_enabled(backward):
        out = run(x, t)
        if backward:
            out.float().sum().backward()
    for p in run.parameters():
        p.grad = None


def runner(model: nn.Module, perf: PerfConfig, device: torch.device) -> nn.Module:
    """The module that computes ``model``'s forward as ``perf`` says (``model`` itself for the
    defaults). Compilation happens at the first call (the components warm up before timing
    starts); where it fails it says so once and runs eagerly."""
    if perf.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # in place: the parameters stay the model's
    run: nn.Module = Autocast(model, device.type) if perf.precision == "bf16" else model
    return CompiledOrEager(run) if perf.compile else run
