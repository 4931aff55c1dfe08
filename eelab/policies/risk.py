"""Risk-controlled thresholds after Jazbec et al. 2024 ("Fast yet Safe: Early-Exiting with Risk Control")
and CALM (Schuster et al. 2022, "Confident Adaptive Language Modeling").

One shared max-prob threshold lambda; a sample's loss is l_i(lambda) = max(0, 1[last exit right] -
1[prediction at its lambda exit right]) in {0, 1}: accuracy lost to leaving early. Risk R(lambda) = E l.
  mode "ltt": Learn-then-Test (Angelopoulos et al. 2021) - fixed-sequence testing of H_lambda: R > epsilon
    from the conservative end (lambda = 1 downwards) with Hoeffding-Bentkus p-values; stop at the first
    lambda not rejected. Every rejected lambda has P(R(lambda) > epsilon) <= delta over cal draws.
  mode "crc": conformal risk control (Angelopoulos et al. 2022) on the monotonised loss
    sup_{lambda' >= lambda} l_i(lambda') (any real lambda'), which bounds l_i and never grows with lambda;
    E[monotonised risk at lambda_hat] <= epsilon over cal and test draws, so E[R(lambda_hat)] <= epsilon.
Both return the cheapest (smallest) valid lambda on a grid of 1001 values in [0, 1]; lambda = inf (no
early exit, zero loss) when none is valid.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from scipy.stats import binom

from ..errors import EelabError
from ..metrics import sum_at_shared_threshold
from ..records import ExitRecord
from .base import Param, Policy, State
from .threshold import score_logits

MODES = ("ltt", "crc")


def lambda_grid() -> torch.Tensor:
    """Candidate thresholds from the conservative end: 1.0, 0.999, ..., 0.0, float32 [1001]."""
    return torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)


def risk_curves(record: ExitRecord, lambdas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical risk and monotonised risk of a shared max-prob threshold: lambdas [L] -> two float64 [L].

    risk(lambda) = mean_i l_i(lambda); the monotonised loss sup_{lambda' >= lambda} l_i(lambda') is
    1[lambda <= lambda*_i], lambda*_i being the largest score at which some threshold sends sample i to a
    wrong early exit while its last exit is right (-inf if none), so its mean is a count over sorted lambda*.
    """
    scores = torch.stack([score_logits(record.logits[:, k].contiguous(), "max_prob") for k in range(record.k)], 1)
    correct = record.logits.argmax(dim=-1) == record.labels.unsqueeze(1)  # [N, K]
    loss = (correct[:, -1:] & ~correct).double().unsqueeze(-1)  # [N, K, 1]: l_i if it exits at k
    n = max(record.n, 1)
    risk = sum_at_shared_threshold(scores, loss, lambdas)[:, 0] / n
    # exit k is chosen for some lambda iff its score beats every earlier one (then lambda = score works)
    earlier = torch.cat([torch.full_like(scores[:, :1], float("-inf")), scores.cummax(dim=1).values[:, :-1]], 1)
    harmful = (scores > earlier) & (loss[..., 0] > 0)
    harmful[:, -1] = False
    star = torch.where(harmful, scores, torch.full_like(scores, float("-inf"))).amax(dim=1).sort().values
    above = star.numel() - torch.searchsorted(star, lambdas.to(star.dtype), side="left")  # lambda*_i >= lambda
    return risk, above.double() / n


def hoeffding_bentkus_pvalue(loss_sum: torch.Tensor, n: int, epsilon: float) -> torch.Tensor:
    """Hoeffding-Bentkus p-value of H: R > epsilon, from n losses in [0, 1] summing to loss_sum [L] -> [L].

    p = min(exp(-n h(min(R_hat, eps), eps)), e * P(Binomial(n, eps) <= ceil(n R_hat))), capped at 1, with
    h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)) (Bates et al. 2021, Angelopoulos et al. 2021).
    """
    loss_sum = loss_sum.double()
    a = torch.clamp(loss_sum / n, max=epsilon)
    h = torch.xlogy(a, a / epsilon) + torch.xlogy(1 - a, (1 - a) / (1 - epsilon))
    p_hoeffding = torch.exp(-n * h)
    p_bentkus = math.e * torch.from_numpy(binom.cdf(torch.ceil(loss_sum - 1e-9).numpy(), n, epsilon))
    return torch.minimum(torch.minimum(p_hoeffding, p_bentkus), torch.ones_like(p_hoeffding))


class RiskPolicy(Policy):
    """A shared max-prob threshold lambda fitted on cal with a distribution-free risk guarantee."""

    name = "risk"
    PARAMS = {
        "epsilon": Param(0.05, "float", "risk level: tolerated accuracy loss versus the last exit", lo=0, hi=1,
                         open_lo=True, open_hi=True),
        "delta": Param(0.1, "float", "ltt only: allowed probability that the risk exceeds epsilon", lo=0,
                       hi=1, open_lo=True, open_hi=True),
        "mode": Param("ltt", "str", "ltt: P(risk > epsilon) <= delta; crc: E[risk] <= epsilon", choices=MODES),
    }
    FITTED = ("lambda",)
    INFINITE_OK = ("lambda",)  # inf: no sample exits early there

    def _fit(self, cal: ExitRecord) -> dict[str, torch.Tensor]:
        eps, delta, mode = self.params["epsilon"], self.params["delta"], self.params["mode"]
        lambdas, n = lambda_grid(), cal.n
        if n == 0:
            raise EelabError("policy risk needs a non-empty cal record; record the cal split")
        risk, mono = risk_curves(cal, lambdas)  # lambdas decreasing
        if mode == "ltt":
            ok = hoeffding_bentkus_pvalue(torch.round(risk * n), n, eps) <= delta
        else:
            ok = n / (n + 1) * mono + 1 / (n + 1) <= eps
        # fixed sequence (ltt) / monotone risk (crc): the valid lambdas are the prefix before the first failure
        n_ok = int(ok.long().cumprod(0).sum())
        lam = lambdas[n_ok - 1] if n_ok else torch.tensor(float("inf"))
        cal_risk = float(risk[n_ok - 1]) if n_ok else 0.0
        statement = (f"P(risk > {eps:g}) <= {delta:g}" if mode == "ltt" else f"E[risk] <= {eps:g}")
        self.info.update(lambda_=float(lam), cal_risk=cal_risk, guarantee=statement)
        return {"lambda": lam.reshape(())}

    @property
    def lambda_(self) -> float:
        """The fitted threshold (inf: no sample exits early)."""
        if "lambda" not in self.fitted:
            raise EelabError("policy risk is not fitted yet: call fit(cal_record)")
        return float(self.fitted["lambda"])

    def guarantee(self) -> str:
        """The guarantee the fitted lambda carries, e.g. 'P(risk > 0.05) <= 0.1 (ltt, lambda=0.83, n_cal=5000)'."""
        return (f"{self.info.get('guarantee')} ({self.params['mode']}, lambda={self.lambda_:.4g}, "
                f"n_cal={self.info.get('n_cal')})")

    def summary(self) -> dict[str, float]:
        return {"lambda": self.lambda_} if "lambda" in self.fitted else {}

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return score_logits(logits_k, "max_prob") >= self.lambda_, state

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Risk levels epsilon from 0.01 to 0.5 (delta and mode at their defaults); the large ones reach the
        cheap end of the frontier, so areas under frontiers compare over the whole range."""
        return [{"epsilon": e} for e in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15,
                                         0.2, 0.25, 0.3, 0.4, 0.5)]
