"""Alpha gates and policy overhead: features and exit probabilities by hand, the expected loss against a slow
enumeration of which gate fires first, the two ends of the knob, the batched alpha grid against separate
fits, seeding, gate MACs by hand and charged by evaluate/sweep/CLI, and the INPUTS seam for policies that
read more than logits (learned confidences)."""
from __future__ import annotations

import itertools
import json
import math
from functools import partial

import pytest
import torch

from eelab.cli import main
from eelab.errors import EelabError
from eelab.metrics import area_under_frontier, evaluate, frontier_range, oracle_frontier
from eelab.policies import AlphaPolicy, Param, Policy, exit_features, fit_alpha_grid, make_policy, run_policy
from eelab.metrics import charged_costs
from eelab.policies.alpha import exit_probabilities, expected_loss
from eelab import testing
from eelab.records import ExitRecord
from eelab.testing import stairs_record
from eelab.sweep import sweep

SHA = "cd" * 32
random_record = partial(testing.random_record, sha=SHA)  # [N, 4, 5], one pretend checkpoint


# ---- features, exit probabilities, the loss ------------------------------------------------------------------
def test_exit_features_by_hand():
    logits = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]).log()
    h = 1.5 * math.log(2)  # entropy of (1/2, 1/4, 1/4)
    want = torch.tensor([[0.5, 0.25, 0.25, 1 - h / math.log(3), 0.25, 0, 1, 0],
                         [1.0, 0.0, 0.0, 1.0, 1.0, 0, 1, 0]])
    torch.testing.assert_close(exit_features(1, logits, 3), want)
    two = exit_features(0, torch.tensor([[0.75, 0.25]]).log(), 2)  # C = 2: the third probability is padding
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(two, torch.tensor([[0.75, 0.25, 0.0, 1 - h2 / math.log(2), 0.5, 1, 0]]))
    with pytest.raises(EelabError, match="outside"):
        exit_features(3, logits, 3)


def test_exit_probabilities_by_hand():
    got = exit_probabilities(torch.tensor([[0.5, 0.5], [1.0, 0.3], [0.0, 0.0], [0.2, 0.5]]))
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0],
                                                  [0.2, 0.4, 0.4]]))


def test_expected_loss_equals_a_slow_enumeration_of_which_gate_fires_first():
    gen = torch.Generator().manual_seed(0)
    n, k = 7, 4
    gates = torch.rand(n, k - 1, generator=gen, dtype=torch.float64)
    ce = 3 * torch.rand(n, k, generator=gen, dtype=torch.float64)
    rel = torch.tensor([0.2, 0.45, 0.8, 1.05], dtype=torch.float64)
    for alpha in (0.0, 0.3, 1.0):
        total = 0.0
        for i in range(n):
            for fires in itertools.product((False, True), repeat=k - 1):  # every outcome of the K-1 gates
                prob = math.prod(g if f else 1 - g for g, f in zip(gates[i].tolist(), fires))
                leave = next((j for j, f in enumerate(fires) if f), k - 1)  # the first gate that fires
                total += prob * ((1 - alpha) * float(ce[i, leave]) + alpha * float(rel[leave]))
        assert float(expected_loss(gates, ce, rel, alpha)) == pytest.approx(total / n, rel=1e-12)
    # a batch of alphas at once: one loss per alpha
    batched = expected_loss(gates.expand(3, n, k - 1), ce, rel, torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(batched, torch.stack([expected_loss(gates, ce, rel, a) for a in (0.0, 0.3, 1.0)]))


# ---- fitting --------------------------------------------------------------------------------------------------
def test_the_two_ends_of_the_knob():
    rec = random_record(seed=1, last_boost=8.0)  # the last exit is (almost) always right and sure of it
    assert AlphaPolicy(alpha=1.0).fit(rec).decide(rec).tolist() == [0] * rec.n  # cost only: leave at once
    assert AlphaPolicy(alpha=0.0).fit(rec).decide(rec).tolist() == [rec.k - 1] * rec.n  # cross-entropy only


def test_fitting_lowers_the_loss_and_gates_decide_at_one_half():
    rec = random_record(seed=2)
    policy = AlphaPolicy(alpha=0.5).fit(rec)
    start = AlphaPolicy(alpha=0.5, steps=1, lr=1e-9).fit(rec)  # (almost) the initial gates
    assert policy.info["cal_loss"] < start.info["cal_loss"]
    for k in range(rec.k - 1):
        z = policy.gate_logits(k, rec.logits[:, k])
        stop, _ = policy.step(k, rec.logits[:, k], None)
        assert torch.equal(stop, torch.sigmoid(z) > 0.5)


def test_alpha_grid_equals_separate_fits():
    cal, test = random_record(seed=3), random_record(seed=4)
    alphas = [0.0, 0.3, 0.45, 0.6, 1.0]
    grid = fit_alpha_grid(cal, alphas, hidden=4, steps=100)
    for alpha, batched in zip(alphas, grid):
        alone = AlphaPolicy(alpha=alpha, hidden=4, steps=100).fit(cal)
        assert batched.params == alone.params and batched.info["k"] == alone.info["k"] == cal.k
        for key in AlphaPolicy.FITTED:  # equal up to rounding in a batched matmul
            torch.testing.assert_close(batched.fitted[key], alone.fitted[key], atol=1e-3, rtol=1e-3)
        agree = (batched.decide(test) == alone.decide(test)).double().mean()
        assert agree >= 0.99, alpha


def test_batched_fit_reports_its_progress_and_is_unchanged_by_it():
    """fit_grid's callback (a progress bar's) gets the share done after each optimiser step, over every group of
    points, rising to 1; fitting with it gives the same gates as without."""
    cal = random_record(seed=3)
    points = [{"alpha": a, "hidden": 4, "steps": 20} for a in (0.2, 0.6)] + [{"alpha": 0.5, "hidden": 3, "steps": 20}]
    shares: list[float] = []
    watched = AlphaPolicy.fit_grid(points, cal, callback=shares.append)
    plain = AlphaPolicy.fit_grid(points, cal)
    assert len(shares) == 40 and shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    assert shares[19] == pytest.approx(0.5)  # the first group (hidden 4) is half the work
    for a, b in zip(watched, plain):
        for key in AlphaPolicy.FITTED:
            assert torch.equal(a.fitted[key], b.fitted[key])


def test_alpha_sweep_equals_one_fit_per_point():
    cal, test = random_record(seed=5), random_record(seed=6)
    points = [{"alpha": a, "steps": 100} for a in (0.2, 0.5, 0.8)] + [{"alpha": 0.5, "hidden": 3, "steps": 100}]
    fast = sweep("alpha", cal, test, points)  # the family's batched fit_grid
    slow = sweep(lambda **p: AlphaPolicy(**p), cal, test, points)  # a plain factory: one fit per point
    assert fast["accuracy"].tolist() == pytest.approx(slow["accuracy"].tolist(), abs=0.01)
    assert fast["mean_macs"].tolist() == pytest.approx(slow["mean_macs"].tolist(), rel=0.01)


def test_same_seed_same_gates():
    cal, test = random_record(seed=7), random_record(seed=8)
    a, b = AlphaPolicy(alpha=0.4, seed=3, steps=50).fit(cal), AlphaPolicy(alpha=0.4, seed=3, steps=50).fit(cal)
    assert all(torch.equal(a.fitted[key], b.fitted[key]) for key in a.fitted)
    assert torch.equal(a.decide(test), b.decide(test))
    assert not torch.equal(a.fitted["w1"], AlphaPolicy(alpha=0.4, seed=4, steps=50).fit(cal).fitted["w1"])


@pytest.mark.parametrize("params, match", [({"alpha": "1.5"}, r"\[0, 1\]"), ({"hidden": "0"}, "hidden"),
                                           ({"steps": "x"}, "an integer"), ({"lr": "0"}, "lr")])
def test_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(EelabError, match=match) as err:
        make_policy("alpha", **params)
    assert "\n" not in str(err.value)


def test_a_policy_fitted_on_other_exits_is_refused():
    policy = AlphaPolicy(steps=5).fit(random_record(k=4))
    with pytest.raises(EelabError, match="K=4"):
        policy.decide(random_record(k=3))


# ---- overhead MACs ------------------------------------------------------------------------------------------
def test_charged_costs_by_hand():
    costs = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert charged_costs(costs).tolist() == [1.0, 2.0, 4.0]
    assert charged_costs(costs, torch.tensor([3.0, 5.0, 0.0])).tolist() == [4.0, 10.0, 12.0]
    with pytest.raises(EelabError, match="one value per exit"):
        charged_costs(costs, torch.zeros(2))
    assert make_policy("threshold").overhead_macs(3, 10).tolist() == [0.0, 0.0, 0.0]  # the default: none


def test_gate_macs_by_hand_and_charged_by_evaluate_and_sweep():
    rec = stairs_record()  # costs 1, 2, 4 MACs, full network 3.5
    policy = AlphaPolicy(alpha=0.3, hidden=4).fit(rec)
    gate = (5 + 3) * 4 + 4 * 1  # features [8] x hidden [4], then hidden [4] x 1
    assert policy.overhead_macs(3, 3).tolist() == [gate, gate, 0.0]  # the last exit evaluates no gate
    exits = policy.decide(rec)
    m = evaluate(rec, exits, overhead=policy.overhead_macs(3, 3))
    charged = [1.0 + gate, 2.0 + 2 * gate, 4.0 + 2 * gate]
    assert m["exit_macs"] == charged and m["policy_macs"] == [gate, gate, 0.0]
    assert m["mean_macs"] == pytest.approx(sum(charged[k] for k in exits.tolist()) / 3)
    assert m["compute_saved"] == pytest.approx(1 - m["mean_macs"] / 3.5)
    row = sweep("alpha", rec, rec, [{"alpha": 0.3, "hidden": 4}]).iloc[0]
    assert row["mean_macs"] == pytest.approx(m["mean_macs"]) and row["accuracy"] == m["accuracy"]
    assert evaluate(rec, exits)["exit_macs"] == [1.0, 2.0, 4.0]  # without a policy's overhead: the record's


def test_no_alpha_point_lies_above_the_oracle_frontier():
    cal, test = random_record(seed=9), random_record(seed=10)
    front = oracle_frontier(test)
    lo, hi = frontier_range(test)
    table = sweep("alpha", cal, test)
    assert len(table) == 21
    for row in table.to_dict("records"):
        reachable = front[front["mean_macs"] <= row["mean_macs"] * (1 + 1e-12)]
        assert row["accuracy"] <= float(reachable["accuracy"].max()) + 1e-12
    assert area_under_frontier(table, lo, hi) <= area_under_frontier(front, lo, hi)


def test_alpha_through_the_cli(tmp_path, capsys):
    random_record(seed=11).save(tmp_path / "test.pt")
    random_record(seed=12).save(tmp_path / "cal.pt")
    code = main(["sweep", str(tmp_path / "test.pt"), "--policy", "alpha", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out["points"]) == 21
    assert out["area_under_frontier"] <= out["oracle_area_under_frontier"]
    code = main(["evaluate", str(tmp_path / "test.pt"), "--policy", "alpha", "--param", "alpha=0.4",
                 "--save-policy", str(tmp_path / "alpha.pt"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["policy_macs"][0] == (5 + 4) * 8 + 8  # default hidden 8, K = 4
    saved = torch.load(tmp_path / "alpha.pt", weights_only=True)
    assert set(saved["fitted"]) == {"w1", "b1", "w2", "b2"}
    test = ExitRecord.load(tmp_path / "test.pt")
    policy = make_policy(tmp_path / "alpha.pt")
    assert evaluate(test, policy.decide(test), overhead=policy.overhead_macs(4, 5))["mean_macs"] == out["mean_macs"]


# ---- the INPUTS seam: a policy reading learned confidences ----------------------------------------------------
class _ConfidenceAbove(Policy):
    """Exit at the first k whose learned confidence h_k reaches a threshold (a stand-in for EENets' policy)."""

    name = "confidence_above"
    PARAMS = {"threshold": Param(0.5, "float", "threshold on h_k", lo=0, hi=1)}
    INPUTS = ("confidences",)

    def step(self, k, logits_k, state, confidences=None):
        return confidences >= self.params["threshold"], state


def test_a_policy_reading_confidences_gets_them_exit_by_exit():
    rec = stairs_record()  # costs 1, 2, 4 MACs, full network 3.5
    conf = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.6, 0.0], [0.1, 0.3, 0.0]])
    with_conf = ExitRecord(logits=rec.logits, labels=rec.labels, indices=rec.indices, costs=rec.costs,
                           full_cost=rec.full_cost, confidences=conf)
    assert _ConfidenceAbove().decide(with_conf).tolist() == [0, 1, 2]
    # live inference passes the same inputs through fetch's (logits, {name: [B]}) form
    exits = run_policy(_ConfidenceAbove(), 3, lambda k, rows: (rec.logits[rows, k], {"confidences": conf[rows, k]}), 3)
    assert exits.tolist() == [0, 1, 2]
    with pytest.raises(EelabError, match="confidences"):
        _ConfidenceAbove().decide(rec)
