"""Risk control: hand-computed risks, p-values and lambdas on a tiny record, risk curves == loops, and the
two guarantees checked over 200 cal draws from a generator whose population risk is known exactly."""
from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import pytest
import torch
from scipy.stats import binom

from eelab import testing
from eelab.ensemble import fit_ensemble
from eelab.errors import EelabError
from eelab.policies import RiskPolicy, make_policy
from eelab.policies.risk import hoeffding_bentkus_pvalue, lambda_grid, risk_curves
from eelab.records import ExitRecord
from eelab.testing import TINY_LABELS, TINY_P, record_from_probs

# TINY_P (eelab.testing): 4 samples x 3 exits x 3 classes; labels 0, 1, 2, 0. Max prob / right:
#   s0: 0.95 T  0.90 T    0.99 T      s1: 0.5005 F  0.70 T  0.85 T
#   s2: 0.41 F  0.6005 F  0.50 T      s3: 0.70 T    0.45 F  0.70 F
tiny_record = partial(record_from_probs, TINY_P, TINY_LABELS)  # costs 1..K MACs, full network K
# 200 x 4 x 4, logits rounded to 0.1 before the true class's boost (0 .. 2): many equal scores
random_record = partial(testing.random_record, 200, 4, 4, boost=(0.0, 2.0), noise_decimals=1,
                        costs=(1.0, 2.0, 3.0, 4.0), full_cost=4.0)


# ---- by hand -------------------------------------------------------------------------------------------
def test_risk_curves_by_hand():
    # loss = last exit right and the lambda exit wrong; s3's last exit is wrong, so it never counts.
    # lambda 0.65: exits 0,1,2,0 (no loss); 0.55: s2 leaves at its wrong exit 1; 0.45: s1 at its wrong exit 0 too.
    # Monotonised: lambda* = 0.5005 (s1, exit 0) and 0.6005 (s2, exit 1), so 0.25 on (0.5005, 0.6005].
    risk, mono = risk_curves(tiny_record(), torch.tensor([0.97, 0.65, 0.55, 0.45]))
    assert risk.tolist() == [0.0, 0.0, 0.25, 0.5]
    assert mono.tolist() == [0.0, 0.0, 0.25, 0.5]


def test_monotonised_risk_never_falls_as_lambda_falls():
    # one sample: exit 0 right at 0.5, exit 1 wrong at 0.9, last right. Raw loss at 0.95, 0.85, 0.45: 0, 1, 0.
    rec = record_from_probs([[[0.5, 0.3, 0.2], [0.05, 0.9, 0.05], [0.8, 0.1, 0.1]]], [0])
    risk, mono = risk_curves(rec, torch.tensor([0.95, 0.85, 0.45]))
    assert risk.tolist() == [0.0, 1.0, 0.0] and mono.tolist() == [0.0, 1.0, 1.0]


def test_hoeffding_bentkus_pvalue_by_hand():
    # n = 4, epsilon = 0.5: zero losses give min((1 - 0.5)^4, e * 0.5^4) = 1/16
    h = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # one loss: R_hat = 0.25
    p = hoeffding_bentkus_pvalue(torch.tensor([0.0, 1.0, 3.0]), 4, 0.5)
    want = [1 / 16, min(math.exp(-4 * h), math.e * binom.cdf(1, 4, 0.5)), 1.0]
    assert p.tolist() == pytest.approx(want, rel=1e-12)


def test_crc_lambda_by_hand():
    # n = 4, epsilon = 0.45: valid where 4/5 mono + 1/5 <= 0.45, i.e. mono <= 0.3125, i.e. lambda > 0.5005;
    # the cheapest grid point there is 0.501.
    policy = make_policy("risk", mode="crc", epsilon=0.45).fit(tiny_record())
    assert policy.lambda_ == pytest.approx(0.501, abs=1e-6)
    assert policy.decide(tiny_record()).tolist() == [0, 1, 1, 0]
    assert policy.guarantee().startswith("E[risk] <= 0.45 (crc, lambda=0.501")


def test_ltt_lambda_by_hand():
    # n = 4, epsilon = 0.5, delta = 0.1: zero empirical risk has p = 1/16 <= 0.1, one loss has p = 0.59 > 0.1.
    # Testing from lambda = 1 down, the risk stays 0 until s2 leaves at its wrong exit 1 (lambda <= 0.6005):
    # the last rejected lambda is 0.601.
    policy = make_policy("risk", mode="ltt", epsilon=0.5, delta=0.1).fit(tiny_record())
    assert policy.lambda_ == pytest.approx(0.601, abs=1e-6)
    assert policy.info["cal_risk"] == 0.0
    assert policy.guarantee().startswith("P(risk > 0.5) <= 0.1 (ltt")


def test_no_valid_lambda_means_no_early_exit():
    for mode in ("ltt", "crc"):
        policy = RiskPolicy(mode=mode, epsilon=0.01).fit(tiny_record())  # 4 samples cannot certify 1%
        assert policy.lambda_ == float("inf")
        assert policy.decide(tiny_record()).tolist() == [2, 2, 2, 2]


def test_unfitted_risk_policy_is_an_error():
    with pytest.raises(EelabError, match="fit"):
        RiskPolicy().decide(tiny_record())


# ---- vectorised == loops ---------------------------------------------------------------------------------
def test_risk_curves_equal_per_lambda_loops():
    for seed in range(3):
        rec = random_record(seed=seed)
        scores = torch.softmax(rec.logits, -1).amax(-1)
        lambdas = torch.cat([lambda_grid()[::50], scores[:10, 0]])  # grid points and exact ties
        risk, mono = risk_curves(rec, lambdas)
        right = (rec.logits.argmax(-1) == rec.labels[:, None]).tolist()
        s = scores.tolist()

        def loss(i, lam):
            k = next((k for k in range(rec.k - 1) if s[i][k] >= lam), rec.k - 1)
            return int(right[i][-1] and not right[i][k])

        for j, lam in enumerate(lambdas.tolist()):
            assert risk[j] == pytest.approx(sum(loss(i, lam) for i in range(rec.n)) / rec.n, abs=1e-15)
            # sup over lambda' >= lambda: the loss only changes at a sample's own scores, so check those
            sup = [max([loss(i, lam)] + [loss(i, t) for t in s[i] if t >= lam]) for i in range(rec.n)]
            assert mono[j] == pytest.approx(sum(sup) / rec.n, abs=1e-15)
        # and the fitted policy's empirical risk is the risk of its own decisions
        for mode in ("ltt", "crc"):
            policy = make_policy("risk", mode=mode, epsilon=0.2).fit(rec)
            exits = policy.decide(rec).tolist()
            lost = sum(right[i][-1] and not right[i][exits[i]] for i in range(rec.n)) / rec.n
            assert policy.info["cal_risk"] == pytest.approx(lost, abs=1e-15)


# ---- the guarantees, on a generator with known population risk ------------------------------------------
A, EPSILON, DELTA, N_CAL, DRAWS = 0.9, 0.05, 0.1, 1000, 200


def synthetic_record(n: int, gen: torch.Generator) -> ExitRecord:
    """K=2, C=2. Exit 0 predicts class 0 with max prob s ~ U[0.5, 1]; the label is 0 with probability s;
    the last exit is right with probability A, independently. A sample is lost when it leaves at exit 0
    (s >= lambda) and exit 0 is wrong while the last is right, so R(lambda) = A (1 - max(lambda, 0.5))^2."""
    s = 0.5 + 0.5 * torch.rand(n, generator=gen)
    labels = (torch.rand(n, generator=gen) >= s).long()
    last_right = torch.rand(n, generator=gen) < A
    last_pred = torch.where(last_right, labels, 1 - labels)
    exit0 = torch.stack([s, 1 - s], 1).log()
    last = 3.0 * torch.nn.functional.one_hot(last_pred, 2).float()
    return ExitRecord(logits=torch.stack([exit0, last], 1), labels=labels, indices=torch.arange(n),
                      costs=torch.tensor([0.5, 1.0], dtype=torch.float64), full_cost=1.0)


def population_risk(lam: float) -> float:
    return 0.0 if lam == float("inf") else A * (1 - min(max(lam, 0.5), 1.0)) ** 2


def test_synthetic_generator_has_the_stated_risk():
    rec = synthetic_record(200_000, torch.Generator().manual_seed(0))
    risk, _ = risk_curves(rec, torch.tensor([0.6, 0.8, 0.95]))
    for lam, r in zip((0.6, 0.8, 0.95), risk.tolist()):
        assert r == pytest.approx(population_risk(lam), abs=4 * math.sqrt(population_risk(lam) / 200_000))


def _draw_risks(mode: str, ensembled: bool, seed: int) -> list[float]:
    """Population risk of the risk policy fitted on each of DRAWS cal draws of N_CAL samples.

    ensembled: each draw holds 2 N_CAL samples; an exit ensemble is fitted on a seeded half and the policy on
    the ensembled other half (as eelab does), and the population risk of its lambda is that of the ensembled
    exits, measured on 100,000 fresh samples (standard error under 0.001 at these risks)."""
    gen = torch.Generator().manual_seed(seed)
    if not ensembled:
        return [population_risk(RiskPolicy(mode=mode, epsilon=EPSILON, delta=DELTA).fit(
            synthetic_record(N_CAL, gen)).lambda_) for _ in range(DRAWS)]
    population = synthetic_record(100_000, torch.Generator().manual_seed(seed + 100))
    risks = []
    for draw in range(DRAWS):
        cal = replace(synthetic_record(2 * N_CAL, gen), meta={"split": "cal"})
        ens = fit_ensemble(cal, seed=draw, steps=10)  # any ensemble fitted apart from the policy's half will do
        lam = RiskPolicy(mode=mode, epsilon=EPSILON, delta=DELTA).fit(ens.apply(cal)).lambda_
        # the loss by its definition: leaves at exit 0 (max prob >= lambda) wrong while the last exit is right
        z = ens.transform_logits(population.logits)
        right = z.argmax(-1) == population.labels[:, None]
        leaves = torch.softmax(z[:, 0], -1).max(-1).values >= lam
        risks.append(float((leaves & ~right[:, 0] & right[:, 1]).double().mean()))
    return risks


@pytest.mark.parametrize("ensembled", [False, True], ids=["plain", "ensembled"])
def test_ltt_controls_the_probability_of_exceeding_epsilon(ensembled):
    risks = _draw_risks("ltt", ensembled, 1)
    violations = sum(r > EPSILON for r in risks) / DRAWS
    assert violations <= DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)
    if ensembled:  # not vacuous: it exits early on most draws
        assert sum(r > 0 for r in risks) > 0.9 * DRAWS
        return
    lambdas = [RiskPolicy(mode="ltt", epsilon=EPSILON, delta=DELTA).fit(synthetic_record(N_CAL, gen)).lambda_
               for gen in [torch.Generator().manual_seed(1)] for _ in range(DRAWS)]
    # and it is not vacuous: it exits early, near the best valid lambda 1 - sqrt(0.05 / 0.9) = 0.764
    assert all(lam < 0.9 for lam in lambdas)
    # the check has power: the cheapest lambda whose cal risk is <= epsilon (no test) violates far more often
    gen, grid, naive = torch.Generator().manual_seed(1), lambda_grid(), 0
    for _ in range(DRAWS):
        _, mono = risk_curves(synthetic_record(N_CAL, gen), grid)
        naive += population_risk(float(grid[int((mono <= EPSILON).long().cumprod(0).sum()) - 1])) > EPSILON
    assert naive / DRAWS > DELTA + 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)


@pytest.mark.parametrize("ensembled", [False, True], ids=["plain", "ensembled"])
def test_crc_controls_the_expected_risk(ensembled):
    risks = torch.tensor(_draw_risks("crc", ensembled, 2), dtype=torch.float64)
    assert float(risks.mean()) <= EPSILON + 3 * float(risks.std()) / math.sqrt(DRAWS)
    assert float(risks.mean()) > 0.5 * EPSILON  # not vacuous: it spends most of its risk budget
