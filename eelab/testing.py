"""Synthetic records and tiny nets for tests and benchmarks: seeded, small, hand-checkable.

random_record builds a random exit record whose later exits are more often right; TINY_P and STAIRS_P are
hand-made probability tables (their right/wrong patterns are written beside them) for hand-computed answers;
tiny_net is a cheap, seeded 8x8 conv multi-exit network whose exits disagree.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .models import MultiExitNet, measure_costs
from .records import ExitRecord

# 4 samples x 3 exits x 3 classes as softmax probabilities; labels TINY_LABELS. Max prob / right:
#   s0: 0.95 T    0.90 T    0.99 T      s1: 0.5005 F  0.70 T  0.85 T
#   s2: 0.41 F    0.6005 F  0.50 T      s3: 0.70 T    0.45 F  0.70 F
# -> exit accuracy 0.5, 0.5, 0.75
TINY_P = [
    [[0.95, 0.03, 0.02], [0.90, 0.05, 0.05], [0.99, 0.005, 0.005]],
    [[0.5005, 0.2995, 0.2], [0.2, 0.7, 0.1], [0.1, 0.85, 0.05]],
    [[0.41, 0.35, 0.24], [0.6005, 0.2995, 0.1], [0.3, 0.2, 0.5]],
    [[0.7, 0.2, 0.1], [0.35, 0.45, 0.2], [0.2, 0.1, 0.7]],
]
TINY_LABELS = (0, 1, 2, 0)

# 3 samples x 3 exits x 3 classes; labels STAIRS_LABELS. Sample i is first right at exit i (a staircase):
#   s0: T T T (max 0.8, 0.7, 0.9)   s1: F T T (0.6, 0.7, 0.8)   s2: F F T (0.5, 0.4, 0.7)
STAIRS_P = [
    [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.9, 0.05, 0.05]],
    [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]],
    [[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.2, 0.1, 0.7]],
]
STAIRS_LABELS = (0, 1, 2)


def record_from_probs(probs: Sequence, labels: Sequence[int], costs: Sequence[float] | None = None,
                      full_cost: float | None = None, meta: dict[str, Any] | None = None) -> ExitRecord:
    """A record whose logits are log(probs) [N, K, C]; costs [K] default to 1..K MACs and full_cost to K."""
    n, k = len(probs), len(probs[0])
    return ExitRecord(logits=torch.tensor(probs).log(), labels=torch.tensor(labels), indices=torch.arange(n),
                      costs=(torch.arange(1, k + 1, dtype=torch.float64) if costs is None
                             else torch.tensor(costs, dtype=torch.float64)),
                      full_cost=float(k if full_cost is None else full_cost), meta=dict(meta or {}))


def tiny_record(labels: Sequence[int] = TINY_LABELS, *, costs: Sequence[float] = (1.0, 2.0, 4.0),
                full_cost: float = 3.5, meta: dict[str, Any] | None = None) -> ExitRecord:
    """TINY_P as a record (4 x 3 x 3); costs 1, 2, 4 MACs, full network 3.5, unless given."""
    return record_from_probs(TINY_P, labels, costs, full_cost, meta)


def stairs_record(*, costs: Sequence[float] = (1.0, 2.0, 4.0), full_cost: float = 3.5) -> ExitRecord:
    """STAIRS_P as a record (3 x 3 x 3), labels 0, 1, 2; costs 1, 2, 4 MACs, full network 3.5, unless given."""
    return record_from_probs(STAIRS_P, STAIRS_LABELS, costs, full_cost)


def random_record(n: int = 300, k: int = 4, c: int = 5, seed: int | torch.Generator = 0, *,
                  meta: dict[str, Any] | None = None, sha: str | None = None, confidences: bool = False,
                  ties: bool = False, last_boost: float = 0.0, scale: float = 1.5,
                  boost: tuple[float, float] = (0.0, 2.5), noise_decimals: int | None = None,
                  difficulty: bool = False, costs: Sequence[float] | torch.Tensor | None = None,
                  full_cost: float = 1e6) -> ExitRecord:
    """A seeded random record [N, K, C] whose later exits are more often right.

    Logits are scale * N(0, 1) noise, rounded to noise_decimals if given (score ties), plus
    linspace(*boost, K) on the true class at exits 0..K-1, plus last_boost at the last exit.
    difficulty: each sample draws u ~ U(0, 1) and its boost becomes 1.5 (1.1 - u) linspace(*boost, K) plus
    N(0, 0.7^2) per exit, so confidence tracks accuracy and the exits' mistakes are partly shared.
    ties: round the logits (and any confidences to quarters) to make equal scores.
    confidences [N, K] ~ U(0, 1) are drawn last, so the logits do not depend on whether they are asked for.
    costs: MACs [K], default linspace(0.3, 1.1, K) * full_cost. sha sets meta["checkpoint_sha256"].
    seed: an int, or a generator to draw consecutive records from one stream.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    labels = torch.randint(c, (n,), generator=gen)
    u = torch.rand(n, generator=gen) if difficulty else None
    logits = scale * torch.randn(n, k, c, generator=gen)
    if noise_decimals is not None:
        logits = logits.round(decimals=noise_decimals)
    rise = torch.linspace(*boost, k)
    if u is not None:
        rise = 1.5 * rise.unsqueeze(0) * (1.1 - u.unsqueeze(1)) + 0.7 * torch.randn(n, k, generator=gen)
    logits[torch.arange(n), :, labels] += rise
    if last_boost:
        logits[torch.arange(n), -1, labels] += last_boost
    if ties:
        logits = logits.round()
    conf = torch.rand(n, k, generator=gen) if confidences else None
    if conf is not None and ties:
        conf = conf.mul(4).round().div(4)
    costs = (torch.linspace(0.3, 1.1, k, dtype=torch.float64) * full_cost if costs is None
             else torch.as_tensor(costs, dtype=torch.float64))
    meta = {**({"checkpoint_sha256": sha} if sha else {}), **(meta or {})}
    return ExitRecord(logits=logits, labels=labels, indices=torch.arange(n), costs=costs, full_cost=float(full_cost),
                      meta=meta, confidences=conf)


def tiny_net(num_exits: int = 4, num_classes: int = 5, in_channels: int = 3, width: int = 4,
             seed: int = 0) -> MultiExitNet:
    """A seeded conv multi-exit net for x [B, in_channels, 8, 8] -> logits [B, K, C], in eval mode.

    Stage k is conv3x3 (stride 2 after the first) + tanh with width * 2^k channels, so later stages hold more;
    head k is average pool + Linear. Zero-mean features and no biases keep the logits sample-dependent; each
    head is scaled on seeded N(0, 1) inputs to a logit spread of 1 + k, so max softmax probabilities spread over
    (1/C, 1), later exits are surer, and the exits disagree: policies stop random inputs at different exits.
    No batch norm or dropout; the global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stages, heads, cin = [], [], in_channels
        for k in range(num_exits):
            w = width * 2 ** k
            stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, stride=1 if k == 0 else 2, padding=1, bias=False),
                                        nn.Tanh()))
            heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, num_classes, bias=False)))
            cin = w
    net = MultiExitNet(stages, heads).eval()
    with torch.no_grad():
        spread = net(tiny_inputs(256, in_channels, seed)).std(dim=(0, 2))  # [K]
        for k, head in enumerate(net.heads):
            head[-1].weight.mul_((1.0 + k) / spread[k])
    return net


def tiny_inputs(n: int = 64, in_channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Seeded random inputs x [n, in_channels, 8, 8] ~ N(0, 1) for tiny_net."""
    return torch.randn(n, in_channels, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def tiny_record_of(net: MultiExitNet, x: torch.Tensor, labels: torch.Tensor | None = None,
                   meta: dict[str, Any] | None = None) -> ExitRecord:
    """The exit record of net on x [N, ch, H, W] (float, already prepared): logits [N, K, C] fp32, costs
    measured in MACs; labels [N] default to the last exit's predictions."""
    logits = net(x).float()
    costs, full_cost = measure_costs(net, tuple(x.shape[1:]))
    return ExitRecord(logits=logits, labels=logits[:, -1].argmax(-1) if labels is None else labels.long(),
                      indices=torch.arange(x.shape[0]), costs=costs, full_cost=full_cost, meta=dict(meta or {}))
