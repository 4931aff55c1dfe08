"""Oracle: each sample at its earliest correct exit. It reads the labels, so it is a bound, not a policy
you can deploy: it decides on records only, and `step` (live inference) raises an EelabError."""
from __future__ import annotations

import torch

from ..errors import EelabError
from ..metrics import oracle_exits
from ..records import ExitRecord
from .base import Policy, State


class OraclePolicy(Policy):
    """Each sample at its earliest correct exit, exit 0 if none is right (record-only: needs labels).

    `decide(record)` uses the record's labels; `step` raises, because live inference has no labels.
    """

    name = "oracle"

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise EelabError("the oracle policy needs labels, so it only decides on exit records "
                         "(decide(record), eelab evaluate); use another policy for live inference")

    def decide(self, record: ExitRecord) -> torch.Tensor:
        self.check_exits(record.k)
        return oracle_exits(record)
