"""Metrics: hand-computed answers on a tiny record, vectorised == per-sample loops on random records,
frontiers (oracle bound checked by brute force), area, bootstrap, sweep."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
from functools import partial

import pandas as pd
import pytest
import torch

from eelab import testing
from eelab.errors import EelabError
from eelab.metrics import (area_under_frontier, bootstrap_ci, evaluate, expected_calibration_error, frontier_range,
                           oracle_frontier, pareto_front)
from eelab.policies import POLICIES, default_grid, make_policy
from eelab.sweep import sweep

# TINY_P (eelab.testing): 4 samples x 3 exits x 3 classes, labels 0, 1, 2, 0; costs 1, 2, 4 MACs, full 3.5.
# Max prob / right:
#   s0: 0.95 T  0.90 T    0.99 T      s1: 0.5005 F  0.70 T  0.85 T
#   s2: 0.41 F  0.6005 F  0.50 T      s3: 0.70 T    0.45 F  0.70 F
tiny_record = partial(testing.tiny_record, meta={"class_names": ["a", "b", "c"]})
random_record = partial(testing.random_record, confidences=True)  # confidences drawn after the logits


# ---- evaluate by hand --------------------------------------------------------------------------------
def test_evaluate_by_hand():
    m = evaluate(tiny_record(), torch.tensor([0, 2, 1, 0]))
    json.dumps(m, allow_nan=False)  # plain JSON
    # right at their exits: s0 T, s1 T, s2 F, s3 T; costs 1 + 4 + 2 + 1 = 8 over 4 samples
    assert m["accuracy"] == 0.75
    assert m["mean_macs"] == 2.0 and m["full_macs"] == 3.5
    assert m["rel_macs"] == pytest.approx(4 / 7) and m["compute_saved"] == pytest.approx(3 / 7)
    assert m["effectiveness"] == pytest.approx(100 * 0.75 * 3 / 7)
    assert m["block_index_saving"] == pytest.approx(1 - 7 / 12)  # 1 - mean((exit + 1) / K)
    assert m["effectiveness_block_index"] == pytest.approx(100 * 0.75 * 5 / 12)
    assert m["exit_counts"] == [2, 1, 1] and m["exit_fractions"] == [0.5, 0.25, 0.25]
    assert m["exit_accuracy"] == [0.5, 0.5, 0.75]
    assert m["accuracy_of_exited"] == [1.0, 0.0, 1.0]
    assert m["class_names"] == ["a", "b", "c"]
    assert m["per_class_accuracy"] == [1.0, 1.0, 0.0]
    assert m["per_class_exit_fractions"] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    conf0 = [0.95, 0.5005, 0.41, 0.7]
    assert m["confidence_mean"][0] == pytest.approx(statistics.mean(conf0), abs=1e-6)
    assert m["confidence_std"][0] == pytest.approx(statistics.pstdev(conf0), abs=1e-6)
    # every confidence of an exit falls in its own of the 15 bins: ECE = mean |right - confidence|
    assert m["ece"] == pytest.approx([(0.05 + 0.5005 + 0.41 + 0.3) / 4, (0.1 + 0.3 + 0.6005 + 0.45) / 4,
                                      (0.01 + 0.15 + 0.5 + 0.7) / 4], abs=1e-6)


def test_evaluate_marks_undefined_values_none():
    m = evaluate(tiny_record(labels=(0, 0, 0, 0)), torch.tensor([0, 0, 0, 0]))
    json.dumps(m, allow_nan=False)
    assert m["accuracy_of_exited"][1:] == [None, None]  # nobody left at exits 1 and 2
    assert m["per_class_accuracy"][1:] == [None, None]  # no sample of classes b and c
    assert m["per_class_exit_fractions"][1] == [None, None, None]


def test_compute_saved_is_negative_when_heads_cost_more_than_they_save():
    m = evaluate(tiny_record(), torch.tensor([2, 2, 2, 2]))
    assert m["compute_saved"] == pytest.approx(1 - 4 / 3.5) and m["compute_saved"] < 0


def test_ece_shares_a_bin():
    # 0.94 and 0.96 share the last of 15 bins, (14/15, 1]: |accuracy 0.5 - confidence 0.95|
    assert expected_calibration_error(torch.tensor([0.94, 0.96]), torch.tensor([True, False])) == pytest.approx(0.45)
    assert expected_calibration_error(torch.tensor([0.0, 1.0]), torch.tensor([False, True])) == 0.0


@pytest.mark.parametrize("exits, match", [([0, 1, 3, 0], r"\[0, 2\]"), ([0, 1], "N=4"), ([0.0, 1.0, 2.0, 0.0], "integer")])
def test_evaluate_rejects_bad_exits(exits, match):
    with pytest.raises(EelabError, match=match):
        evaluate(tiny_record(), torch.tensor(exits))


def test_evaluate_equals_a_per_sample_loop():
    for seed in range(3):
        rec = random_record(seed=seed)
        exits = torch.randint(rec.k, (rec.n,), generator=torch.Generator().manual_seed(seed))
        m = evaluate(rec, exits)
        probs = torch.softmax(rec.logits.double(), -1)
        pred = [[int(rec.logits[i, k].argmax()) for k in range(rec.k)] for i in range(rec.n)]
        y = rec.labels.tolist()
        e = exits.tolist()
        right = [pred[i][e[i]] == y[i] for i in range(rec.n)]
        assert m["accuracy"] == pytest.approx(sum(right) / rec.n, abs=1e-15)
        assert m["mean_macs"] == pytest.approx(sum(float(rec.costs[x]) for x in e) / rec.n, rel=1e-12)
        assert m["block_index_saving"] == pytest.approx(1 - sum((x + 1) / rec.k for x in e) / rec.n, rel=1e-12)
        for k in range(rec.k):
            left = [i for i in range(rec.n) if e[i] == k]
            assert m["exit_fractions"][k] == pytest.approx(len(left) / rec.n)
            assert m["exit_accuracy"][k] == pytest.approx(sum(pred[i][k] == y[i] for i in range(rec.n)) / rec.n)
            assert m["accuracy_of_exited"][k] == pytest.approx(sum(right[i] for i in left) / len(left))
            conf = [float(probs[i, k].max()) for i in range(rec.n)]
            assert m["confidence_mean"][k] == pytest.approx(statistics.mean(conf), rel=1e-9)
            assert m["confidence_std"][k] == pytest.approx(statistics.pstdev(conf), rel=1e-9)
            ece = 0.0
            for b in range(15):
                members = [i for i in range(rec.n) if b / 15 < conf[i] <= (b + 1) / 15 or (b == 0 and conf[i] == 0)]
                if members:
                    acc = sum(pred[i][k] == y[i] for i in members) / len(members)
                    ece += len(members) / rec.n * abs(acc - statistics.mean(conf[i] for i in members))
            assert m["ece"][k] == pytest.approx(ece, abs=1e-9)
        for c in range(rec.c):
            mine = [i for i in range(rec.n) if y[i] == c]
            assert m["per_class_accuracy"][c] == pytest.approx(sum(right[i] for i in mine) / len(mine))
            assert m["per_class_exit_fractions"][c] == pytest.approx(
                [sum(e[i] == k for i in mine) / len(mine) for k in range(rec.k)])


# ---- frontiers ---------------------------------------------------------------------------------------
def test_pareto_front_by_hand():
    points = pd.DataFrame({"rel_macs": [0.5, 0.6, 0.7, 0.7, 0.9, 1.0], "accuracy": [0.6, 0.55, 0.7, 0.8, 0.8, 0.85]})
    front = pareto_front(points)
    assert front["rel_macs"].tolist() == [0.5, 0.7, 1.0] and front["accuracy"].tolist() == [0.6, 0.8, 0.85]


def test_area_under_frontier_by_hand():
    points = pd.DataFrame({"rel_macs": [0.5, 0.75, 0.9, 1.2], "accuracy": [0.6, 0.8, 0.7, 0.99]})
    # over [0.25, 1]: 0 until 0.5, 0.6 until 0.75, then 0.8 (0.7 is dominated, 1.2 is out of range)
    assert area_under_frontier(points, 0.25, 1.0) == pytest.approx((0.25 * 0.6 + 0.25 * 0.8) / 0.75)
    assert area_under_frontier(points.iloc[:0], 0.25) == 0.0
    with pytest.raises(EelabError):
        area_under_frontier(points, 1.0, 1.0)


def test_oracle_frontier_by_hand():
    front = oracle_frontier(tiny_record())
    # exit 0 alone: s0, s3 right (0.5 at 1 MAC); then s1 to exit 1 (+1 MAC), s2 to exit 2 (+3 MACs)
    assert front["moved"].tolist() == [0, 1, 2, 2]
    assert front["accuracy"].tolist() == [0.5, 0.75, 1.0, 1.0]
    assert front["mean_macs"].tolist() == [1.0, 1.25, 2.0, 4.0]  # last row: flat to costs[-1] > full_cost
    assert frontier_range(tiny_record()) == (1 / 3.5, 1.0)


def test_frontier_range_on_measured_costs_is_never_empty():
    # a latency record whose first exit timed above the plain network (tiny stages, noisy clock)
    timed = dataclasses.replace(tiny_record(), costs=torch.tensor([1.2, 1.5, 2.0], dtype=torch.float64), full_cost=1.0)
    lo, hi = frontier_range(timed)
    assert (lo, hi) == pytest.approx((1.2, 2.0))
    assert 0.0 < area_under_frontier(oracle_frontier(timed), lo, hi) <= 1.0
    flat = dataclasses.replace(timed, costs=torch.tensor([1.2, 1.2, 1.2], dtype=torch.float64))
    with pytest.raises(EelabError, match="do not rise"):
        frontier_range(flat)


def _bound(front: pd.DataFrame, mean_macs: float) -> float:
    """The oracle frontier's best accuracy at a mean cost (its Pareto step)."""
    reachable = front[front["mean_macs"] <= mean_macs * (1 + 1e-12)]
    return float(reachable["accuracy"].max()) if len(reachable) else 0.0


def test_oracle_frontier_is_the_best_of_every_assignment_by_brute_force():
    for seed in range(3):
        rec = random_record(n=6, k=3, c=3, seed=seed)
        front = oracle_frontier(rec)
        right = (rec.logits.argmax(-1) == rec.labels[:, None]).tolist()
        points = [(sum(float(rec.costs[x]) for x in a) / rec.n, sum(right[i][x] for i, x in enumerate(a)) / rec.n)
                  for a in itertools.product(range(rec.k), repeat=rec.n)]
        points.sort()
        macs, acc = front["mean_macs"].to_numpy(), front["accuracy"].to_numpy()
        best, j = 0.0, 0
        for cost, _ in points:  # best accuracy of any assignment costing <= cost, in cost order
            while j < len(points) and points[j][0] <= cost + 1e-9:
                best, j = max(best, points[j][1]), j + 1
            bound = acc[macs <= cost * (1 + 1e-12)].max()
            assert bound == pytest.approx(best)  # the bound is reached, and never beaten


def test_no_policy_point_lies_above_the_oracle_frontier():
    cal, test = random_record(n=400, seed=1), random_record(n=400, seed=2)
    front = oracle_frontier(test)
    for name in POLICIES:
        grid = default_grid(name, cal)
        grid = [dict(point, steps=60) for point in grid] if name == "dqn" else grid  # plumbing, not convergence
        for row in sweep(name, cal, test, grid).to_dict("records"):
            assert row["accuracy"] <= _bound(front, row["mean_macs"]) + 1e-12, (name, row)


# ---- sweep -------------------------------------------------------------------------------------------
def test_sweep_table_by_hand():
    rec = tiny_record()
    table = sweep("threshold", rec, rec, {"threshold": [0.8, 0.65, 0.55]})
    assert list(table.columns) == ["threshold", "accuracy", "mean_macs", "rel_macs", "compute_saved",
                                   "effectiveness", "effectiveness_block_index"]
    # exits [0,2,2,2], [0,1,2,0], [0,1,1,0] (see test_policies)
    assert table["accuracy"].tolist() == [0.75, 1.0, 0.75]
    assert table["mean_macs"].tolist() == [3.25, 2.0, 1.5]
    assert table["rel_macs"].tolist() == pytest.approx([3.25 / 3.5, 2 / 3.5, 1.5 / 3.5])


def test_sweep_grid_forms_factory_and_fitted_columns():
    cal, test = random_record(seed=3), random_record(seed=4)
    product = sweep("threshold", cal, test, {"threshold": [0.5, 0.7], "score": ["max_prob", "margin"]})
    assert len(product) == 4 and set(product["score"]) == {"max_prob", "margin"}
    listed = sweep(POLICIES["threshold"], cal, test, [{"threshold": 0.5}, {"threshold": 0.7}])
    factory = sweep(lambda **p: make_policy("threshold", **p), cal, test, {"threshold": [0.5, 0.7]})
    pd.testing.assert_frame_equal(listed, factory)
    risk = sweep("risk", cal, test, {"epsilon": [0.05, 0.1]})
    assert "lambda" in risk.columns
    with pytest.raises(EelabError, match="grid"):
        sweep(lambda **p: make_policy("threshold", **p), cal, test)


def test_sweep_refuses_a_cal_record_from_another_model():
    with pytest.raises(EelabError, match="different models") as err:
        sweep("threshold", random_record(k=4), random_record(k=3))
    assert "\n" not in str(err.value)


def test_sweep_is_fast_enough_for_a_slider():
    # benchmarks/sweep_speed.py measures this properly (target < 50 ms); here only a loose guard
    cal, test = random_record(n=10_000, k=4, c=10, seed=5), random_record(n=10_000, k=4, c=10, seed=6)
    grid = {"threshold": torch.linspace(0, 1, 200).tolist()}
    sweep("threshold", cal, test, grid)
    start = time.perf_counter()
    sweep("threshold", cal, test, grid)
    assert time.perf_counter() - start < 0.5


# ---- bootstrap ---------------------------------------------------------------------------------------
def test_bootstrap_by_hand_and_reproducible():
    rec = tiny_record()
    exits = torch.tensor([0, 1, 2, 0])  # the oracle: every sample right
    assert bootstrap_ci(rec, exits, "accuracy", n_boot=50) == {"value": 1.0, "lo": 1.0, "hi": 1.0,
                                                                 "level": 0.95, "n_boot": 50}
    rand = random_record(seed=7)
    exits = make_policy("threshold", threshold=0.7).decide(rand)
    a = bootstrap_ci(rand, exits, "effectiveness", n_boot=300, seed=3)
    assert a == bootstrap_ci(rand, exits, "effectiveness", n_boot=300, seed=3)
    assert a["lo"] < a["value"] < a["hi"]
    assert a["value"] == pytest.approx(evaluate(rand, exits)["effectiveness"])


def test_bootstrap_vectorised_equals_the_loop():
    rec = random_record(n=120, seed=8)
    exits = make_policy("patience", patience=2).decide(rec)
    for name in ("accuracy", "compute_saved", "effectiveness_block_index"):
        fast = bootstrap_ci(rec, exits, name, n_boot=100, seed=1)
        slow = bootstrap_ci(rec, exits, lambda r, e: evaluate(r, e)[name], n_boot=100, seed=1)
        assert fast == pytest.approx(slow, rel=1e-9, abs=1e-12)
    with pytest.raises(EelabError, match="unknown bootstrap metric"):
        bootstrap_ci(rec, exits, "speed")
    assert math.isfinite(bootstrap_ci(rec, exits, "mean_macs", n_boot=10)["hi"])
