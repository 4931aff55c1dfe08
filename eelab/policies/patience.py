"""Patience (PABEE, Zhou et al. 2020, "BERT Loses Patience: Fast and Robust Inference with Early Exit")."""
from __future__ import annotations

from typing import Any

import torch

from ..records import ExitRecord
from .base import Param, Policy, State


class PatiencePolicy(Policy):
    """Exit at the first k where exits k-p+1..k all predict the same class (p = patience).

    PABEE counts agreements with the previous exit and stops when the count reaches t; its t is p - 1
    here, so patience=1 always exits at exit 0.
    """

    name = "patience"
    PARAMS = {"patience": Param(2, "int", "consecutive exits that must predict the same class", lo=1, hi=1000)}

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        pred = logits_k.argmax(dim=-1)
        if state is None:
            count = torch.ones_like(pred)
        else:
            count = torch.where(pred == state["pred"], state["count"] + 1, torch.ones_like(pred))
        return count >= self.params["patience"], {"pred": pred, "count": count}

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Patience 1..K (K never exits early)."""
        return [{"patience": p} for p in range(1, cal.k + 1)]
