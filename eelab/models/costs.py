"""The one MAC counter: torch.utils.flop_counter on each stage and head's real input (MACs = FLOPs / 2)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .net import MultiExitNet


def count_macs(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(MACs, output) of one call of fn(): conv and matmul as torch.utils.flop_counter counts them, FLOPs / 2."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops() // 2, out


@torch.no_grad()
def measure_costs(model: MultiExitNet, input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, float]:
    """Exit costs [K] and full_cost in MACs for one sample of `input_shape` (ch, H, W).

    costs[k] = stages 0..k + heads 0..k (and confidence branches 0..k), each counted on its real input;
    full_cost = all stages + last head (the plain network has no confidence branch).
    """
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    stage_macs, head_macs = [], []
    for k in range(model.num_exits):
        m, h = count_macs(lambda: model.forward_stage(k, h))
        stage_macs.append(m)
        m, _ = count_macs(lambda: model.forward_head(k, h))
        if model.has_confidence:
            m += count_macs(lambda: model.forward_confidence(k, h))[0]
        head_macs.append(m)
    model.train(was_training)
    stage = torch.tensor(stage_macs, dtype=torch.float64)
    head = torch.tensor(head_macs, dtype=torch.float64)
    costs = stage.cumsum(0) + head.cumsum(0)
    last_head, _ = count_macs(lambda: model.forward_head(model.num_exits - 1, h))
    full = float(stage.sum() + last_head)
    return costs, full

