"""Where and at which precision the network runs: the CPU's native bf16, the default device, inference casts.

The bottom layer (imports no other eelab module but errors), so training, records and inference share one
answer to "does this CPU have native bf16?".
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .errors import EelabError

INFERENCE_PRECISIONS = ("fp32", "bf16", "auto")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bfloat16 instruction sets among amx_bf16 and avx512_bf16.

    Read from the flags of `cpuinfo` (a /proc/cpuinfo text); without it, from this machine's /proc/cpuinfo,
    plus amx_bf16 when torch reports AMX. Either set makes bf16 convolutions and matmuls faster than fp32
    (AMX: Sapphire Rapids and later Xeons; AVX512-BF16: Cooper Lake, AMD Zen 4 and 5). Without them torch
    emulates bf16 and it is slower than fp32.
    """
    live = cpuinfo is None
    if live:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    if live:
        try:
            if torch.backends.cpu.get_cpu_capability().upper().startswith("AMX"):
                flags.add("amx_bf16")
        except Exception:
            pass
    return [name for name in ("amx_bf16", "avx512_bf16") if name in flags]


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_precision(requested: str, device: str | torch.device = "cpu",
                        bf16_flags: list[str] | None = None) -> str:
    """The precision inference runs at, 'fp32' or 'bf16', for a requested one in INFERENCE_PRECISIONS.

    auto: bf16 only on a CPU with native bf16 (cpu_bf16_flags); fp32 elsewhere (emulated bf16 was slower).
    """
    if requested not in INFERENCE_PRECISIONS:
        raise EelabError(f"unknown precision {requested!r}; choose one of {', '.join(INFERENCE_PRECISIONS)}")
    if requested != "auto":
        return requested
    native = cpu_bf16_flags() if bf16_flags is None else bf16_flags
    return "bf16" if torch.device(device).type == "cpu" and native else "fp32"


def cast_for_inference(model: nn.Module, precision: str) -> nn.Module:
    """The model itself at fp32; at bf16 a copy (the caller's is kept) with its batch norms folded into the convs
    before them in fp32 (fold_batch_norms), cast once to bfloat16 and channels_last.

    Casting the weights once, not autocast on every call, which would re-cast them each time. In a multi-exit
    network (a module with `stages` and `heads`) the heads and confidence branches stay fp32 (they are cheap,
    and their outputs decide where an image stops): on the EE-CNN reference, folding and fp32 heads took the
    exits agreeing with fp32 from 99.24 % to 99.70 % of test images.
    """
    if precision == "fp32":
        return model
    net = fold_batch_norms(copy.deepcopy(model).eval())
    stages, heads = getattr(net, "stages", None), getattr(net, "heads", None)
    if not (isinstance(stages, nn.ModuleList) and isinstance(heads, nn.ModuleList)):
        return net.to(torch.bfloat16).to(memory_format=torch.channels_last)
    stages.to(torch.bfloat16).to(memory_format=torch.channels_last)
    for branches in (heads, getattr(net, "confidences", None)):
        if isinstance(branches, nn.ModuleList):
            for i, branch in enumerate(branches):
                branches[i] = _Float32(branch)
    return net


class _Float32(nn.Module):
    """Runs its module in fp32 on an input of any float type (a head of a bf16 network)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float())


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d into the Conv2d before it in the same nn.Sequential, in place; returns model.

    A batch norm directly after a conv, or after a conv and max-pools when all its scales are positive (a
    positive per-channel affine map commutes with max), becomes the conv's scaled weights and a bias, computed in
    fp32, and is replaced by Identity. The outputs stay the same up to rounding; at bf16 one rounding step and one
    pass over the activations are gone.
    """
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        items = list(seq._modules.items())
        for i, (_, conv) in enumerate(items):
            if not isinstance(conv, nn.Conv2d) or conv.weight.dtype != torch.float32:
                continue
            j = i + 1
            while j < len(items) and isinstance(items[j][1], nn.MaxPool2d):
                j += 1
            if j == len(items) or not isinstance(items[j][1], nn.BatchNorm2d):
                continue
            name, bn = items[j]
            if bn.training or bn.running_mean is None or bn.num_features != conv.out_channels:
                continue
            scale = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(
                bn.running_var + bn.eps)
            if j > i + 1 and not bool((scale > 0).all()):
                continue
            shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            folded = (bias - bn.running_mean) * scale + shift
            if conv.bias is None:
                conv.bias = nn.Parameter(folded, requires_grad=False)
            else:
                conv.bias.copy_(folded)
            seq._modules[name] = nn.Identity()
    return model


def cast_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A prepared float32 batch [B, ch, H, W] in the precision (and, for bf16, memory layout) of the model."""
    if precision == "fp32":
        return x
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
