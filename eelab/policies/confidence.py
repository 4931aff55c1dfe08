"""Learned confidence: exit at the first k whose EENets confidence branch h_k reaches a threshold.

The branches are trained with the network (`eelab train --objective eenet --cost-weight WEIGHT`), so the
record carries `confidences` [N, K]; the policy reads them through INPUTS and learns nothing itself. The
branches' MACs are already in the record's costs (measure_costs counts them on the way to each exit).
"""
from __future__ import annotations

from typing import Any

import torch

from ..records import ExitRecord
from .base import Param, Policy, State


class ConfidencePolicy(Policy):
    """Exit at the first k with h_k >= threshold (EENets, Demir and Akbas: 0.5 by default)."""

    name = "confidence"
    PARAMS = {"threshold": Param(0.5, "float", "threshold on the learned confidence h_k", lo=0, hi=1)}
    INPUTS = ("confidences",)

    def step(self, k: int, logits_k: torch.Tensor, state: State,
             confidences: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        return confidences >= self.params["threshold"], state

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Thresholds 0, 0.02, ..., 1 (0.5 is the EENets rule)."""
        return [{"threshold": round(t, 4)} for t in torch.linspace(0, 1, 51).tolist()]
