"""MultiExitNet (backbone stages + one exit head per stage), its factories, and measured exit costs."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import EelabError


class MultiExitNet(nn.Module):
    """A backbone cut into K stages with an exit head after each (torchvision-style features/head split).

    forward(x [B, ch, H, W]) -> logits [B, K, C]; the plain network is stages 0..K-1 plus heads[K-1].
    """

    def __init__(self, stages: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(f"need one head per stage, got {len(stages)} stages and {len(heads)} heads")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        """K, the number of exits."""
        return len(self.stages)

    def forward_stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Backbone stage k: features after stage k-1 (or the input) -> features after stage k."""
        return self.stages[k](h)

    def forward_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Exit head k: features after stage k -> logits [B, C]."""
        return self.heads[k](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All exits: x [B, ch, H, W] -> logits [B, K, C]."""
        outs = []
        h = x
        for k in range(self.num_exits):
            h = self.forward_stage(k, h)
            outs.append(self.forward_head(k, h))
        return torch.stack(outs, dim=1)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every stage, only the last head -> logits [B, C]."""
        h = x
        for stage in self.stages:
            h = stage(h)
        return self.heads[-1](h)


# ----------------------------------------------------------------------------- costs

def _count_macs(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """MACs (= FLOPs / 2, conv and matmul as torch.utils.flop_counter counts them) of one call."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops() // 2, out


@torch.no_grad()
def measure_costs(model: MultiExitNet, input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, float]:
    """Exit costs [K] and full_cost in MACs for one sample of `input_shape` (ch, H, W).

    costs[k] = stages 0..k + heads 0..k, each counted on its real input; full_cost = all stages + last head.
    """
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    stage_macs, head_macs = [], []
    for k in range(model.num_exits):
        m, h = _count_macs(lambda: model.forward_stage(k, h))
        stage_macs.append(m)
        m, _ = _count_macs(lambda: model.forward_head(k, h))
        head_macs.append(m)
    model.train(was_training)
    stage = torch.tensor(stage_macs, dtype=torch.float64)
    head = torch.tensor(head_macs, dtype=torch.float64)
    costs = stage.cumsum(0) + head.cumsum(0)
    full = float(stage.sum() + head[-1])
    return costs, full


# ----------------------------------------------------------------------------- heads

def make_head(kind: str, in_ch: int, num_classes: int, hidden: int = 256, dropout: float = 0.2) -> nn.Module:
    """An exit head on features [B, in_ch, h, w] -> logits [B, C].

    kind: "linear" = global average pool + Linear;
          "mlp" = average pool to 2x2 + Linear(4 in_ch, hidden) + ReLU + Dropout + Linear(hidden, C);
          "conv" = conv3x3(in_ch, hidden)-BN-ReLU + global average pool + Linear(hidden, C)
                   (a learned feature layer: better early exits for more MACs).
    """
    if kind == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * in_ch, hidden),
                             nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    raise EelabError(f"unknown head kind {kind!r}; use one of linear, mlp, conv")


# ----------------------------------------------------------------------------- factories

@dataclass(frozen=True)
class ModelConfig:
    """Arguments of a model factory; stored in config.json so a checkpoint rebuilds its own network."""

    name: str = "ee_cnn"
    num_classes: int = 10
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512)
    head: str = "mlp"
    head_hidden: int = 256
    dropout: float = 0.1

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise EelabError(f"model config has unknown field(s) {sorted(extra)}; this checkpoint was written "
                             f"by a newer eelab: upgrade eelab")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def ee_cnn(cfg: ModelConfig) -> MultiExitNet:
    """EE-CNN of the public early-exit-cnn project (S. Pandey): four blocks, an exit after each.

    Each block: two conv3x3-BN-ReLU then 2x2 max-pool and dropout (the last block pooled globally),
    widths 64-128-256-512. At 32x32 it has about 209 M backbone MACs with exits near 19/46/73/100 %.
    """
    stages, heads = [], []
    cin = cfg.in_channels
    for i, w in enumerate(cfg.widths):
        last = i == len(cfg.widths) - 1
        pool = nn.AdaptiveMaxPool2d(1) if last else nn.MaxPool2d(2)
        stages.append(nn.Sequential(*_conv_bn_relu(cin, w), *_conv_bn_relu(w, w), pool, nn.Dropout(cfg.dropout)))
        heads.append(make_head(cfg.head, w, cfg.num_classes, cfg.head_hidden))
        cin = w
    return MultiExitNet(stages, heads)


def tiny_cnn(cfg: ModelConfig) -> MultiExitNet:
    """A two-exit toy network for tests and smoke runs: conv-BN-ReLU-pool stages of cfg.widths[:2]."""
    stages, heads = [], []
    cin = cfg.in_channels
    for w in cfg.widths[:2]:
        stages.append(nn.Sequential(*_conv_bn_relu(cin, w), nn.MaxPool2d(2)))
        heads.append(make_head(cfg.head, w, cfg.num_classes, cfg.head_hidden))
        cin = w
    return MultiExitNet(stages, heads)


# Literal registry: factory name -> builder. A different architecture gets a different name.
FACTORIES: dict[str, Callable[[ModelConfig], MultiExitNet]] = {
    "ee_cnn": ee_cnn,
    "tiny_cnn": tiny_cnn,
}


def build_model(cfg: ModelConfig) -> MultiExitNet:
    """Build the network a ModelConfig names."""
    if cfg.name not in FACTORIES:
        raise EelabError(f"unknown model {cfg.name!r}; choose one of {', '.join(FACTORIES)}")
    return FACTORIES[cfg.name](cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
