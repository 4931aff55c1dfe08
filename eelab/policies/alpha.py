"""Alpha-weighted exit gates after LEENet and afxwong/EarlyExitNet: a small gate per exit gives P(stop).

Each exit k < K-1 has a gate g_k = sigmoid(MLP_k(x_k)) reading only exit k's output through exit_features
(sorted top probabilities, entropy, margin, exit index). With the gates fired in order, a sample leaves
at exit k with probability p_k = g_k prod_{j<k} (1 - g_j), the last exit taking the rest. The gates are
fitted on a cal record, all exits jointly, to one knob alpha:

    loss = (1 - alpha) mean_i sum_k p_ik CE_ik + alpha mean_i sum_k p_ik c_k,   c_k = charged cost / full_cost

where CE_ik is exit k's cross-entropy on sample i and the charged cost includes the gates' own MACs. At
decision time a sample leaves at the first gate over 0.5. alpha = 0 asks only for accuracy, alpha = 1
only for cheapness. fit_alpha_grid fits a whole alpha grid at once (the gates of different alphas share
nothing, and Adam is elementwise, so one batched run is many separate fits, equal to them up to rounding;
the loss is not convex, so rounding can move a gate a little).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..data import MAX_SEED
from ..errors import EelabError
from ..metrics import charged_costs
from ..models import count_macs
from ..records import ExitRecord
from .base import Param, Policy, State
from .features import NUM_CONFIDENCE_FEATURES, exit_features, record_features

def exit_probabilities(gates: torch.Tensor) -> torch.Tensor:
    """P(leave at exit k) when gates fire in order: gates [..., K-1] in [0, 1] -> [..., K], rows sum to 1.

    p_k = g_k prod_{j<k} (1 - g_j) for k < K-1; the last exit takes prod_{j<K-1} (1 - g_j).
    """
    ones = torch.ones_like(gates[..., :1])
    survive = torch.cat([ones, torch.cumprod(1 - gates, dim=-1)], dim=-1)  # reaches exit k: [..., K]
    return survive * torch.cat([gates, ones], dim=-1)


def expected_loss(gates: torch.Tensor, ce: torch.Tensor, rel_costs: torch.Tensor, alpha: torch.Tensor | float
                  ) -> torch.Tensor:
    """The gates' training loss: (1 - alpha) E[CE] + alpha E[cost], mean over samples.

    gates [..., N, K-1], ce [N, K] cross-entropy of each exit, rel_costs [K] (fractions of full_cost),
    alpha a float or [...] (one per leading index) -> loss [...].
    """
    alpha = torch.as_tensor(alpha, dtype=ce.dtype)
    p = exit_probabilities(gates)
    exp_ce = (p * ce).sum(-1).mean(-1)
    exp_cost = (p * rel_costs.to(ce.dtype)).sum(-1).mean(-1)
    return (1 - alpha) * exp_ce + alpha * exp_cost


class AlphaPolicy(Policy):
    """Exit at the first gate over 0.5; gates fitted on cal to (1 - alpha) E[cross-entropy] + alpha E[cost]."""

    name = "alpha"
    PARAMS = {
        "alpha": Param(0.5, "float", "weight of expected cost against expected cross-entropy", lo=0, hi=1),
        "hidden": Param(8, "int", "hidden units of each exit's gate (one hidden layer)", lo=1, hi=4096),
        "steps": Param(200, "int", "full-batch Adam steps", lo=1, hi=100_000),
        "lr": Param(0.03, "float", "Adam learning rate", lo=0, hi=10, open_lo=True),
        "seed": Param(0, "int", "seed of the gates' initial weights", lo=0, hi=MAX_SEED),
    }
    FITTED = ("w1", "b1", "w2", "b2")

    def _fit(self, cal: ExitRecord) -> dict[str, torch.Tensor]:
        fitted, info = _fit_gates(cal, [self.params["alpha"]], self.params)
        self.info.update(info[0])
        return fitted[0]

    def overhead_macs(self, num_exits: int, num_classes: int) -> torch.Tensor:
        """MACs of exit k's gate (its feature extraction has no matmul and counts 0) at every exit but the last."""
        return _gate_macs(num_exits, self.params["hidden"])

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        if self.fitted["w2"].shape[0] != num_exits - 1:
            raise EelabError(f"policy alpha holds {self.fitted['w2'].shape[0]} gates but the record has "
                             f"K={num_exits} exits; fit it on a cal record of the same model")

    def gate_logits(self, k: int, logits_k: torch.Tensor) -> torch.Tensor:
        """Gate k's logit (the gate is sigmoid of it) for B samples: logits_k [B, C] -> [B]."""
        x = exit_features(k, logits_k, self.fitted["w2"].shape[0] + 1)
        return _gate_forward(self.fitted, k, x)

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.gate_logits(k, logits_k) > 0, state  # sigmoid(z) > 0.5 exactly when z > 0

    @classmethod
    def fit_grid(cls, points: list[dict[str, Any]], cal: ExitRecord,
                 callback: Callable[[float], None] | None = None) -> list["AlphaPolicy"]:
        """One fitted policy per point; points that differ only in alpha are fitted in one batched run
        (fit_alpha_grid), so a 21-alpha grid costs about one fit. callback(share done in [0, 1]) after each
        optimiser step, over all the runs (for a progress bar)."""
        policies = [cls(**point) for point in points]
        groups: dict[tuple, list[int]] = {}
        for i, policy in enumerate(policies):
            rest = {key: value for key, value in policy.params.items() if key != "alpha"}
            groups.setdefault(tuple(sorted(rest.items())), []).append(i)
        for g, (key, idx) in enumerate(groups.items()):
            share = None if callback is None else (lambda done, g=g: callback((g + done) / len(groups)))
            for i, fitted in zip(idx, fit_alpha_grid(cal, [policies[i].params["alpha"] for i in idx],
                                                      callback=share, **dict(key))):
                policies[i].fitted, policies[i].info = fitted.fitted, fitted.info
        return policies

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """21 alphas, 0, 0.05, ..., 1 (other parameters at their defaults)."""
        return [{"alpha": round(0.05 * i, 2)} for i in range(21)]


def fit_alpha_grid(cal: ExitRecord, alphas: list[float] | torch.Tensor,
                   callback: Callable[[float], None] | None = None, **params: Any) -> list[AlphaPolicy]:
    """Fit one AlphaPolicy per alpha on a cal record in one batched run (e.g. for an alpha slider).

    alphas [A] in [0, 1]; params: the other AlphaPolicy parameters (hidden, steps, lr, seed), shared;
    callback(share of the optimiser steps done) after each step (e.g. a progress bar).
    Each returned policy equals AlphaPolicy(alpha=a, **params).fit(cal) (same seed, same initial gates) up to
    floating-point rounding: a batched matmul may round differently from a single one.
    """
    alphas = [float(a) for a in torch.as_tensor(alphas, dtype=torch.float64).reshape(-1).tolist()]
    policies = [AlphaPolicy(alpha=a, **params) for a in alphas]
    if not policies:
        return []
    fitted, info = _fit_gates(cal, alphas, policies[0].params, callback)
    for policy, tensors, extra in zip(policies, fitted, info):
        problem = policy.fitted_problem(tensors)
        if problem:  # the same guard as Policy.fit: no policy of the grid comes back half-fitted
            raise EelabError(f"fitting policy {policy.describe()} produced {problem}; lower lr or change the "
                             "parameters")
    for policy, tensors, extra in zip(policies, fitted, info):
        policy.info = {**policy.cal_info(cal), **extra}
        policy.fitted = {key: value.detach().clone() for key, value in tensors.items()}
    return policies


# ---- helpers ------------------------------------------------------------------------------------
def _gate_forward(weights: dict[str, torch.Tensor], k: int, x: torch.Tensor) -> torch.Tensor:
    """Gate k's logit: x [B, F] -> [B]. weights w1 [K-1, F, H], b1 [K-1, H], w2 [K-1, H, 1], b2 [K-1, 1]."""
    h = torch.relu(torch.addmm(weights["b1"][k], x, weights["w1"][k]))
    return torch.addmm(weights["b2"][k], h, weights["w2"][k]).squeeze(1)


def _gate_macs(num_exits: int, hidden: int) -> torch.Tensor:
    """MACs of one sample's gate at each exit, counted on the gate's forward: float64 [K], last entry 0."""
    f = NUM_CONFIDENCE_FEATURES + num_exits
    dummy = {"w1": torch.zeros(1, f, hidden), "b1": torch.zeros(1, hidden), "w2": torch.zeros(1, hidden, 1),
             "b2": torch.zeros(1, 1)}
    macs, _ = count_macs(lambda: _gate_forward(dummy, 0, torch.zeros(1, f)))
    out = torch.full((num_exits,), macs, dtype=torch.float64)
    out[-1] = 0.0
    return out


def _init_gates(num_gates: int, f: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded initial gate weights (PyTorch's Linear init, output bias 0 so every gate starts at 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = 1 / math.sqrt(f), 1 / math.sqrt(hidden)
    return {"w1": (torch.rand(num_gates, f, hidden, generator=gen) * 2 - 1) * b1,
            "b1": (torch.rand(num_gates, hidden, generator=gen) * 2 - 1) * b1,
            "w2": (torch.rand(num_gates, hidden, 1, generator=gen) * 2 - 1) * b2,
            "b2": torch.zeros(num_gates, 1)}


def _fit_gates(cal: ExitRecord, alphas: list[float], params: dict[str, Any],
               callback: Callable[[float], None] | None = None) -> tuple[list[dict[str, torch.Tensor]],
                                                                          list[dict[str, Any]]]:
    """Fit the gates for every alpha at once by full-batch Adam: per alpha, its fitted tensors and info;
    callback(share of the steps done) after each step."""
    if cal.n == 0:
        raise EelabError("policy alpha needs a non-empty cal record; record the cal split")
    start = time.perf_counter()
    k, hidden, a = cal.k, params["hidden"], len(alphas)
    f = NUM_CONFIDENCE_FEATURES + k
    init = _init_gates(k - 1, f, hidden, params["seed"])
    if k == 1:  # one exit: nothing to decide, no gate
        return [dict(init) for _ in alphas], [{"cal_loss": float("nan"), "fit_seconds": 0.0} for _ in alphas]
    # A weight sets of K-1 gates, folded into one batch dim of A (K-1) so each step is a few batched matmuls
    weights = {key: value.repeat(a, *([1] * (value.ndim - 1))).requires_grad_() for key, value in init.items()}
    x = record_features(cal)[:, :-1].transpose(0, 1)  # [K-1, N, F]: exits with a gate
    # Standardised inputs condition the fit far better (confidences bunch near 1); a gate's one-hot columns are
    # constant and left as they are. The affine map is folded into the first layer afterwards, so deciding
    # reads raw features with no extra step.
    mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True)
    std = torch.where(std > 1e-6, std.clamp_min(1e-2), torch.ones_like(std))  # constant columns stay put
    x = ((x - mean) / std).repeat(a, 1, 1)  # [A (K-1), N, F]
    ce = torch.nn.functional.cross_entropy(cal.logits.float().transpose(1, 2), cal.labels.unsqueeze(1).expand(-1, k),
                                           reduction="none")  # [N, K]
    rel = (charged_costs(cal.costs, _gate_macs(k, hidden)) / cal.full_cost).float()
    alpha = torch.tensor(alphas, dtype=torch.float32)
    optimizer = torch.optim.Adam(list(weights.values()), lr=params["lr"])
    steps = params["steps"]
    for step in range(steps):
        optimizer.zero_grad()
        loss = expected_loss(_all_gates(weights, x, a), ce, rel, alpha)  # [A]
        loss.sum().backward()  # the alphas share no weights: each gets its own gradient
        optimizer.step()
        if callback is not None:
            callback((step + 1) / steps)
    with torch.no_grad():
        loss = expected_loss(_all_gates(weights, x, a), ce, rel, alpha)
    seconds = (time.perf_counter() - start) / max(a, 1)
    with torch.no_grad():  # fold the standardisation in: ((x - m) / s) W + b = x (W / s) + (b - (m / s) W)
        w1 = weights["w1"].reshape(a, k - 1, f, hidden)
        folded = {"w1": w1 / std.transpose(1, 2).unsqueeze(0),
                  "b1": weights["b1"].reshape(a, k - 1, hidden) - ((mean / std).unsqueeze(0) @ w1).squeeze(2),
                  "w2": weights["w2"].reshape(a, k - 1, hidden, 1), "b2": weights["b2"].reshape(a, k - 1, 1)}
    fitted = [{key: value[i].clone() for key, value in folded.items()} for i in range(a)]
    info = [{"cal_loss": float(loss[i]), "fit_seconds": seconds} for i in range(a)]
    return fitted, info


def _all_gates(weights: dict[str, torch.Tensor], x: torch.Tensor, a: int) -> torch.Tensor:
    """Every gate on every sample for A weight sets: x [A (K-1), N, F] -> gates [A, N, K-1] in (0, 1)."""
    h = torch.relu(torch.baddbmm(weights["b1"].unsqueeze(1), x, weights["w1"]))  # [A (K-1), N, H]
    z = torch.baddbmm(weights["b2"].unsqueeze(1), h, weights["w2"]).squeeze(-1)  # [A (K-1), N]
    return torch.sigmoid(z).reshape(a, -1, z.shape[-1]).transpose(1, 2)
