"""Confidence thresholds: exit at the first k whose score reaches its threshold.

Scores, all in [0, 1] and higher meaning more confident: max_prob (the largest softmax probability),
entropy (1 - H(p) / log C, so 1 is a one-hot prediction), margin (top-1 minus top-2 probability).
Optional per-exit temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks")
is fitted on cal by negative log-likelihood before scoring.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import EelabError
from ..metrics import exit_values, sum_at_exits, sum_at_shared_threshold
from ..records import ExitRecord
from .base import Param, Policy, State

SCORES = ("max_prob", "entropy", "margin")


def score_logits(logits: torch.Tensor, score: str) -> torch.Tensor:
    """Confidence score of each prediction: logits [..., C] -> score [...] in [0, 1] (see module doc)."""
    p = torch.softmax(logits.float(), dim=-1)
    if score == "max_prob":
        return p.amax(dim=-1)
    if score == "entropy":
        c = logits.shape[-1]
        h = torch.special.entr(p).sum(dim=-1)  # entr(0) = 0, so saturated softmax gives no NaN
        return 1.0 - h / torch.log(torch.tensor(float(max(c, 2))))
    if score == "margin":
        top = p.topk(2, dim=-1).values if logits.shape[-1] > 1 else torch.cat([p, torch.zeros_like(p)], -1)
        return top[..., 0] - top[..., 1]
    raise EelabError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


def fit_temperatures(logits: torch.Tensor, labels: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Per-exit temperature minimising the NLL of softmax(logits / T) on cal: logits [N, K, C] -> T [K].

    The NLL is convex in beta = 1/T, so its derivative mean(E_p[z] - z_y) is increasing in beta and a
    bisection on log beta over [1e-2, 1e2] finds the minimum; T is clamped to [0.01, 100].
    """
    z = logits.double()
    z_y = z.gather(2, labels.view(-1, 1, 1).expand(-1, z.shape[1], 1)).squeeze(2)  # [N, K]
    lo = torch.full((z.shape[1],), -4.605170185988091, dtype=torch.float64)  # log 1e-2
    hi = -lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = torch.softmax(z * mid.exp().view(1, -1, 1), dim=-1)
        grad = ((p * z).sum(-1) - z_y).mean(0)  # d NLL / d beta, [K]
        lo, hi = torch.where(grad < 0, mid, lo), torch.where(grad < 0, hi, mid)
    return (-(lo + hi) / 2).exp().float()


def first_exits(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """First exit whose score reaches its threshold, for many threshold vectors at once.

    scores [N, K], thresholds [T, K] -> exits int64 [T, N]; the last exit is taken when none is reached
    (its threshold is ignored). Equals run_policy with `stop = score_k >= threshold_k`, vectorised.
    """
    t, (n, k) = thresholds.shape[0], scores.shape
    exits = torch.full((t, n), k - 1, dtype=torch.long)
    thresholds = thresholds.to(scores.dtype)  # step compares in the scores' dtype too
    for j in range(k - 2, -1, -1):  # backwards, so the earliest reached exit is written last
        exits.masked_fill_(scores[:, j].unsqueeze(0) >= thresholds[:, j].unsqueeze(1), j)
    return exits


class ThresholdPolicy(Policy):
    """Exit at the first k with score_k >= threshold_k (one shared threshold, or one per exit)."""

    name = "threshold"
    PARAMS = {
        "threshold": Param(0.9, "float", "shared threshold on the score, for every exit but the last", lo=0, hi=1),
        "thresholds": Param(None, "floats", "one threshold per exit (K-1 or K values; the last is ignored)",
                            lo=0, hi=1),
        "score": Param("max_prob", "str", "confidence score", choices=SCORES),
        "temperature": Param(False, "bool", "fit a per-exit temperature on cal by NLL before scoring"),
    }
    FITTED = ("temperatures",)

    def _check_params(self) -> None:
        if "threshold" in self.given and "thresholds" in self.given:
            raise EelabError("give policy threshold either threshold= (shared) or thresholds= (per exit), not both")

    def needs_fit(self) -> bool:
        return bool(self.params["temperature"])

    def _fit(self, cal: ExitRecord) -> dict[str, torch.Tensor]:
        if not self.params["temperature"]:
            return {}
        return {"temperatures": fit_temperatures(cal.logits, cal.labels)}

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        self.exit_thresholds(num_exits)

    def exit_thresholds(self, num_exits: int) -> torch.Tensor:
        """Threshold of each exit [K] (the last one never matters: every sample stops there)."""
        per_exit = self.params["thresholds"]
        if per_exit is None:
            return torch.full((num_exits,), self.params["threshold"])
        if len(per_exit) not in (num_exits - 1, num_exits):
            raise EelabError(f"policy threshold got {len(per_exit)} thresholds for K={num_exits} exits; "
                             f"give {num_exits - 1} (or {num_exits}) comma-separated values")
        return torch.tensor(list(per_exit) + [1.0] * (num_exits - len(per_exit)))

    def score_exit(self, k: int, logits_k: torch.Tensor) -> torch.Tensor:
        """Score of exit k's predictions, after its fitted temperature: logits_k [B, C] -> [B]."""
        if self.params["temperature"]:
            logits_k = logits_k / self.fitted["temperatures"][k]
        return score_logits(logits_k, self.params["score"])

    def score_record(self, record: ExitRecord) -> torch.Tensor:
        """Scores of every exit of a record [N, K], computed exit by exit exactly as `step` does."""
        return torch.stack([self.score_exit(k, record.logits[:, k].contiguous()) for k in range(record.k)], 1)

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        thr = self.params["threshold"] if self.params["thresholds"] is None else self.params["thresholds"][k]
        return self.score_exit(k, logits_k) >= thr, state  # a Python float compares in the scores' dtype

    @classmethod
    def sweep_sums(cls, points: list[dict[str, Any]], cal: ExitRecord,
                   test: ExitRecord) -> tuple[torch.Tensor, list[dict[str, float]]]:
        # Scores depend only on (score, temperature): compute them once per pair; shared thresholds then
        # cost one sort and a searchsorted (what keeps a slider live), per-exit ones a [T, N] comparison.
        policies = [cls(**point) for point in points]
        values = exit_values(test)
        sums = torch.zeros(len(points), values.shape[-1], dtype=torch.float64)
        groups: dict[tuple[str, bool, bool], list[int]] = {}
        for i, policy in enumerate(policies):
            key = (policy.params["score"], policy.params["temperature"], policy.params["thresholds"] is None)
            groups.setdefault(key, []).append(i)
        for (_, _, shared), idx in groups.items():
            scores = policies[idx[0]].fit(cal).score_record(test)
            if shared:
                thresholds = torch.tensor([policies[i].params["threshold"] for i in idx])
                sums[idx] = sum_at_shared_threshold(scores, values, thresholds)
            else:
                thresholds = torch.stack([policies[i].exit_thresholds(test.k) for i in idx])
                sums[idx] = sum_at_exits(values, first_exits(scores, thresholds))
        return sums, [{} for _ in points]

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """200 shared max-prob thresholds at quantiles of the cal scores of the early exits, plus 0 and 1."""
        scores = score_logits(cal.logits[:, :-1], "max_prob").reshape(-1) if cal.k > 1 else torch.ones(1)
        q = torch.quantile(scores.double()[:1_000_000], torch.linspace(0, 1, 198, dtype=torch.float64))
        values = torch.unique(torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), q]).clamp(0, 1))
        return [{"threshold": float(v)} for v in values]
