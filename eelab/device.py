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
    """The model itself at fp32; at bf16 a copy cast once to bfloat16 and channels_last (the caller's is kept).

    Casting the weights once, not autocast on every call, which would re-cast them each time.
    """
    if precision == "fp32":
        return model
    return copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)


def cast_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A prepared float32 batch [B, ch, H, W] in the precision (and, for bf16, memory layout) of the model."""
    if precision == "fp32":
        return x
    return x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
