"""Budgeted exits after MSDNet (Huang et al. 2018, "Multi-Scale Dense Networks for Resource Efficient
Image Classification"): fractions leaving at exit k follow q^k, with q set so the mean cost meets a budget."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import EelabError
from ..records import ExitRecord
from .base import Param, Policy, State
from .threshold import SCORES, score_logits


def solve_fractions(costs: torch.Tensor, target: float) -> tuple[torch.Tensor, float]:
    """Exit fractions f_k proportional to q^k whose mean cost sum_k f_k costs_k equals `target`.

    costs [K] in any unit (increasing), target in the same unit -> (fractions [K] float64, q). The mean
    cost grows with q, so bisection on log q finds it; a target at either end gives (nearly) one-hot f.
    """
    costs = costs.double()
    ks = torch.arange(costs.numel(), dtype=torch.float64)
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        mean = float((torch.softmax(ks * mid, 0) * costs).sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    log_q = (lo + hi) / 2
    return torch.softmax(ks * log_q, 0), math.exp(log_q)


class BudgetPolicy(Policy):
    """Per-exit thresholds fitted on cal so the fraction leaving at exit k is proportional to q^k.

    budget is the target mean cost as a fraction of full_cost (the plain network); q is solved so the
    planned fractions meet it, and each exit's threshold is the score that lets its planned share of cal
    samples out, taking the most confident of those still running. The budget is met on cal.
    """

    name = "budget"
    PARAMS = {
        "budget": Param(0.5, "float", "target mean cost as a fraction of the plain network's MACs", lo=0,
                        open_lo=True),
        "score": Param("max_prob", "str", "confidence score", choices=SCORES),
    }
    FITTED = ("thresholds",)
    INFINITE_OK = ("thresholds",)  # inf: no sample exits early there

    def _fit(self, cal: ExitRecord) -> dict[str, torch.Tensor]:
        rel = cal.costs.double() / cal.full_cost
        lo, hi = float(rel[0]), float(rel[-1])
        budget = self.params["budget"]
        if not lo - 1e-9 <= budget <= hi + 1e-9:
            raise EelabError(f"policy budget got budget={budget:g}, but this model's mean cost can only be "
                             f"between {lo:.4g} (all at exit 0) and {hi:.4g} (all at the last exit) of the plain "
                             f"network; choose budget in that range")
        fractions, q = solve_fractions(rel, min(max(budget, lo), hi))
        scores = torch.stack([score_logits(cal.logits[:, k].contiguous(), self.params["score"])
                              for k in range(cal.k)], 1)
        thresholds = torch.full((cal.k,), float("inf"))
        running = torch.ones(cal.n, dtype=torch.bool)
        planned = torch.round(fractions.cumsum(0) * cal.n).long()  # cumulative samples out by exit k
        for k in range(cal.k - 1):
            take = int(planned[k]) - int((~running).sum())
            s = scores[running, k]
            if take > 0 and s.numel():
                thresholds[k] = s.sort(descending=True).values[min(take, s.numel()) - 1]
                running &= ~(scores[:, k] >= thresholds[k])
        self.info.update(q=q, fractions=fractions.tolist())
        return {"thresholds": thresholds}

    def summary(self) -> dict[str, float]:
        return {"q": float(self.info["q"])} if "q" in self.info else {}

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        if self.fitted["thresholds"].numel() != num_exits:
            raise EelabError(f"policy budget holds {self.fitted['thresholds'].numel()} thresholds but the record "
                             f"has K={num_exits} exits; fit it on a cal record of the same model")

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return score_logits(logits_k, self.params["score"]) >= self.fitted["thresholds"][k], state

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """21 budgets evenly spaced over what the model can meet, [costs[0], costs[-1]] / full_cost."""
        lo, hi = float(cal.costs[0] / cal.full_cost), float(cal.costs[-1] / cal.full_cost)
        return [{"budget": float(b)} for b in torch.linspace(lo, hi, 21, dtype=torch.float64)]
