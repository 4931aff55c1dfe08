"""Static exit: every sample leaves at the same exit (the baselines every comparison needs)."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import EelabError
from ..records import ExitRecord
from .base import Param, Policy, State


class StaticPolicy(Policy):
    """Always exit at `exit` (-1 means the last exit, the full multi-exit network)."""

    name = "static"
    PARAMS = {"exit": Param(-1, "int", "the exit every sample leaves at; -1 is the last", lo=-1, hi=1000)}

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        if self.params["exit"] >= num_exits:
            raise EelabError(f"policy static got exit={self.params['exit']} but the record has K={num_exits} "
                             f"exits; choose exit in [0, {num_exits - 1}] or -1 for the last")

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return torch.full((logits_k.shape[0],), k == self.params["exit"], dtype=torch.bool), state

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Every exit, 0..K-1."""
        return [{"exit": k} for k in range(cal.k)]
