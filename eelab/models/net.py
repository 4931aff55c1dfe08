"""MultiExitNet: a backbone cut into K stages with an exit head after each, and the exit heads themselves."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EelabError


class MultiExitNet(nn.Module):
    """A backbone cut into K stages with an exit head after each (torchvision-style features/head split).

    forward(x [B, ch, H, W]) -> logits [B, K, C], always; learned per-exit confidences (EENets branches) come
    from forward_with_confidences. The plain network is stages 0..K-1 plus heads[K-1].
    """

    def __init__(self, stages: list[nn.Module], heads: list[nn.Module],
                 confidences: list[nn.Module] | None = None):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(f"need one head per stage, got {len(stages)} stages and {len(heads)} heads")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        # optional EENets-style confidence branches h_k, one per exit (None: a plain multi-exit net)
        self.confidences = nn.ModuleList(confidences) if confidences else None

    @property
    def num_exits(self) -> int:
        """K, the number of exits."""
        return len(self.stages)

    @property
    def has_confidence(self) -> bool:
        """Whether each exit has a learned confidence branch."""
        return self.confidences is not None

    def forward_stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Backbone stage k: features after stage k-1 (or the input) -> features after stage k."""
        return self.stages[k](h)

    def forward_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Exit head k: features after stage k -> logits [B, C]."""
        return self.heads[k](h)

    def forward_confidence(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Confidence branch k: features after stage k -> h_k [B] in (0, 1), fp32."""
        return torch.sigmoid(self.confidences[k](h).float()).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All exits: x [B, ch, H, W] -> logits [B, K, C] (always a tensor; see forward_with_confidences)."""
        return self.forward_with_confidences(x)[0]

    def forward_with_confidences(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All exits in one pass: x [B, ch, H, W] -> (logits [B, K, C], learned confidences [B, K] fp32, or
        None without confidence branches)."""
        outs, confs = [], []
        h = x
        for k in range(self.num_exits):
            h = self.forward_stage(k, h)
            outs.append(self.forward_head(k, h))
            if self.has_confidence:
                confs.append(self.forward_confidence(k, h))
        return torch.stack(outs, dim=1), (torch.stack(confs, dim=1) if confs else None)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every stage, only the last head -> logits [B, C]."""
        h = x
        for stage in self.stages:
            h = stage(h)
        return self.heads[-1](h)


@torch.no_grad()
def add_confidence_branches(model: MultiExitNet, in_channels: int) -> MultiExitNet:
    """Give every exit an EENets confidence branch: average pool + Linear(ch_k, 1) + sigmoid (Demir & Akbas).

    ch_k, the channels after stage k, is read off one small dummy forward pass.
    """
    was_training = model.training
    model.eval()
    branches, h = [], None
    for size in (32, 64, 224):  # the smallest input every stage accepts
        try:
            h = torch.zeros(1, in_channels, size, size, device=next(model.parameters()).device)
            chans = []
            for k in range(model.num_exits):
                h = model.forward_stage(k, h)
                chans.append(h.shape[1])
            break
        except RuntimeError:
            chans = []
    if not chans:
        raise EelabError("could not run the backbone on a 32, 64 or 224 pixel input to size its confidence branches")
    for ch in chans:
        branches.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 1)))
    model.confidences = nn.ModuleList(branches).to(next(model.parameters()).device)
    model.train(was_training)
    return model


HEADS = ("linear", "mlp", "conv")


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
    raise EelabError(f"unknown head kind {kind!r}; use one of {', '.join(HEADS)}")


