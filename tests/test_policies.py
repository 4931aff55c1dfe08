"""Policies: hand-computed exits on a tiny record, decide == a per-sample step loop, the shared driver,
vectorised sweeps == loops, parameters from strings, and save/load."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from eelab.errors import EelabError
from eelab.metrics import evaluate
from eelab.policies import (POLICIES, BudgetPolicy, OraclePolicy, ThresholdPolicy, default_grid, first_exits,
                            load_policy, make_policy, run_policy, score_logits)
from eelab.metrics import exit_values, oracle_exits, sum_at_exits, sum_at_shared_threshold
from eelab.policies.budget import solve_fractions
from eelab.policies.threshold import fit_temperatures
from eelab import testing
from eelab.records import ExitRecord
from eelab.testing import tiny_record
from eelab.sweep import sweep

# TINY_P (eelab.testing): 4 samples x 3 exits x 3 classes, labels 0, 1, 2, 0; costs 1, 2, 4 MACs, full 3.5.
# Max-prob scores and whether each exit is right (hand-read from the table):
#   s0: 0.95 T  0.90 T  0.99 T      s1: 0.5005 F  0.70 T    0.85 T
#   s2: 0.41 F  0.6005 F  0.50 T    s3: 0.70 T    0.45 F    0.70 F
# random_record here carries confidences [N, K] (drawn after the logits); ties=True rounds both.
random_record = partial(testing.random_record, confidences=True)


def slow_decide(policy, record: ExitRecord) -> torch.Tensor:
    """The obvious per-sample loop over step, batch size 1."""
    out = []
    for i in range(record.n):
        state = None
        for k in range(record.k):
            if k == record.k - 1:
                out.append(k)
                break
            inputs = {name: getattr(record, name)[i:i + 1, k] for name in policy.INPUTS}
            stop, state = policy.step(k, record.logits[i:i + 1, k], state, **inputs)
            if bool(stop[0]):
                out.append(k)
                break
    return torch.tensor(out, dtype=torch.long)


# ---- hand-computed exits on the tiny record ----------------------------------------------------------
@pytest.mark.parametrize("params, exits", [
    ({"threshold": 0.8}, [0, 2, 2, 2]),
    ({"threshold": 0.65}, [0, 1, 2, 0]),
    ({"threshold": 0.55}, [0, 1, 1, 0]),
    ({"threshold": 0.0}, [0, 0, 0, 0]),
    ({"threshold": 1.0}, [2, 2, 2, 2]),
    ({"thresholds": "0.9,0.65"}, [0, 1, 2, 2]),
    ({"thresholds": [0.9, 0.65, 0.0]}, [0, 1, 2, 2]),
])
def test_threshold_exits_by_hand(params, exits):
    assert ThresholdPolicy(**params).decide(tiny_record()).tolist() == exits


def test_scores_by_hand():
    logits = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]).log()
    h = 1.5 * math.log(2)  # entropy of (1/2, 1/4, 1/4)
    torch.testing.assert_close(score_logits(logits, "max_prob"), torch.tensor([0.5, 1.0, 1 / 3]))
    torch.testing.assert_close(score_logits(logits, "entropy"), torch.tensor([1 - h / math.log(3), 1.0, 0.0]))
    torch.testing.assert_close(score_logits(logits, "margin"), torch.tensor([0.25, 1.0, 0.0]))


@pytest.mark.parametrize("patience, exits", [(1, [0, 0, 0, 0]), (2, [1, 2, 1, 2]), (3, [2, 2, 2, 2])])
def test_patience_by_hand(patience, exits):
    # predicted classes per exit: s0 0,0,0  s1 0,1,1  s2 0,0,2  s3 0,1,2
    assert make_policy("patience", patience=patience).decide(tiny_record()).tolist() == exits


@pytest.mark.parametrize("exit, exits", [(0, [0] * 4), (1, [1] * 4), (2, [2] * 4), (-1, [2] * 4)])
def test_static_by_hand(exit, exits):
    assert make_policy("static", exit=exit).decide(tiny_record()).tolist() == exits


def test_static_exit_beyond_the_record_is_an_error():
    with pytest.raises(EelabError, match="K=3"):
        make_policy("static", exit=3).decide(tiny_record())


def test_oracle_by_hand_and_record_only():
    rec = tiny_record()
    assert OraclePolicy().decide(rec).tolist() == [0, 1, 2, 0]
    with pytest.raises(EelabError, match="labels") as err:
        run_policy(OraclePolicy(), rec.k, lambda k, rows: rec.logits[rows, k], rec.n)
    assert "\n" not in str(err.value)


def test_oracle_matches_its_definition_on_random_records():
    for seed in range(3):
        rec = random_record(seed=seed, ties=True)
        want = []
        for i in range(rec.n):
            right = [k for k in range(rec.k) if int(rec.logits[i, k].argmax()) == int(rec.labels[i])]
            want.append(right[0] if right else 0)
        assert oracle_exits(rec).tolist() == want
        assert make_policy("oracle").decide(rec).tolist() == want


def test_budget_by_hand():
    # target mean cost 2 of costs 1, 2, 4: (1 + 2q + 4q^2) / (1 + q + q^2) = 2 gives q = 1/sqrt(2)
    fractions, q = solve_fractions(torch.tensor([1.0, 2.0, 4.0]), 2.0)
    assert q == pytest.approx(1 / math.sqrt(2), rel=1e-9)
    torch.testing.assert_close(fractions, torch.tensor([1, q, q * q], dtype=torch.float64) / (1 + q + q * q))
    # 4 cal samples: round(cumsum(f) * 4) = 2, 3, 4 out by exits 0, 1, 2. Exit 0 takes the two most confident
    # (0.95, 0.70): threshold 0.70; exit 1 takes one of s1 (0.70), s2 (0.6005): threshold 0.70.
    rec = tiny_record()
    policy = BudgetPolicy(budget=2 / 3.5).fit(rec)
    torch.testing.assert_close(policy.fitted["thresholds"][:2], torch.tensor([0.7, 0.7]))
    assert policy.fitted["thresholds"][2] == float("inf")
    assert policy.decide(rec).tolist() == [0, 1, 2, 0]
    assert policy.summary()["q"] == pytest.approx(1 / math.sqrt(2))


def test_budget_meets_its_target_on_cal():
    rec = random_record(n=2000, seed=3)
    for budget in (0.4, 0.6, 0.9):
        exits = BudgetPolicy(budget=budget).fit(rec).decide(rec)
        assert evaluate(rec, exits)["rel_macs"] == pytest.approx(budget, abs=0.01)


def test_budget_out_of_reach_is_a_one_line_error():
    with pytest.raises(EelabError, match="between") as err:
        BudgetPolicy(budget=0.1).fit(tiny_record())  # exit 0 alone costs 1 / 3.5 = 0.29
    assert "\n" not in str(err.value)


def test_temperature_fit_by_hand():
    # C=2, logits (a, 0), 3 of 4 labels are class 0: the NLL is minimal where sigmoid(a / T) = 3/4,
    # so T = a / log 3; exits 0 and 1 use a = 2 and a = 1.
    logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]]).expand(4, 2, 2).contiguous()
    temps = fit_temperatures(logits, torch.tensor([0, 0, 0, 1]))
    torch.testing.assert_close(temps, torch.tensor([2 / math.log(3), 1 / math.log(3)]), rtol=1e-5, atol=0)


def test_temperature_policy_needs_fit_and_rescales_scores():
    rec = random_record(seed=1)
    policy = ThresholdPolicy(threshold=0.6, temperature=True)
    with pytest.raises(EelabError, match="fit"):
        policy.decide(rec)
    policy.fit(rec)
    t = policy.fitted["temperatures"]
    want = score_logits(rec.logits[:, 0] / t[0], "max_prob")
    torch.testing.assert_close(policy.score_record(rec)[:, 0], want)


# ---- decide == per-sample step loop, for every registered policy -------------------------------------
POINTS = {
    "static": [{"exit": 0}, {"exit": 2}, {"exit": -1}],
    "threshold": [{"threshold": 0.5}, {"threshold": 0.7, "score": "entropy"}, {"threshold": 0.3, "score": "margin"},
                  {"threshold": 0.6, "temperature": True}, {"thresholds": [0.9, 0.6, 0.4]}],
    "patience": [{"patience": 1}, {"patience": 2}, {"patience": 3}],
    "budget": [{"budget": 0.5}, {"budget": 0.8, "score": "margin"}],
    "risk": [{"epsilon": 0.05}, {"epsilon": 0.1, "mode": "crc"}],
    "oracle": [{}],
    "alpha": [{"alpha": 0.3, "steps": 60}, {"alpha": 0.6, "hidden": 4, "steps": 60}],
    "dqn": [{"cost_weight": 0.1, "steps": 40}, {"cost_weight": 0.5, "hidden": 8, "steps": 40}],
    "confidence": [{}, {"threshold": 0.25}, {"threshold": 0.8}],
}


def test_every_registered_policy_is_covered():
    assert set(POINTS) == set(POLICIES)


@pytest.mark.parametrize("name", [n for n in POINTS if n != "oracle"])
def test_decide_equals_per_sample_step_loop(name):
    for seed, ties in ((0, False), (1, True)):
        cal, test = random_record(seed=seed, ties=ties), random_record(seed=seed + 10, ties=ties)
        for point in POINTS[name]:
            policy = make_policy(name, **point).fit(cal)
            assert torch.equal(policy.decide(test), slow_decide(policy, test)), (name, point)


def test_run_policy_fetches_only_running_rows_and_never_a_later_exit():
    rec = random_record(seed=2)
    policy = ThresholdPolicy(threshold=0.7)
    asked: list[tuple[int, list[int]]] = []

    def fetch(k, rows):
        asked.append((k, rows.tolist()))
        return rec.logits[rows, k]

    exits, logits = run_policy(policy, rec.k, fetch, rec.n, keep_logits=True)
    assert torch.equal(exits, policy.decide(rec))
    assert [k for k, _ in asked] == list(range(rec.k))  # exit by exit, in order
    for k, rows in asked:
        assert rows == torch.nonzero(exits >= k).flatten().tolist()  # only samples still running
    torch.testing.assert_close(logits, rec.logits[torch.arange(rec.n), exits])
    # without keep_logits the last exit is not even fetched: every sample stops there
    asked.clear()
    run_policy(policy, rec.k, fetch, rec.n)
    assert [k for k, _ in asked] == list(range(rec.k - 1))


def test_run_policy_rejects_a_bad_step():
    class Bad(ThresholdPolicy):
        def step(self, k, logits_k, state):
            return torch.ones(3, dtype=torch.bool), state

    class BadState(ThresholdPolicy):
        def step(self, k, logits_k, state):
            return torch.zeros(logits_k.shape[0], dtype=torch.bool), [1, 2]

    rec = random_record(n=10)
    for cls in (Bad, BadState):
        with pytest.raises(EelabError) as err:
            cls().decide(rec)
        assert "\n" not in str(err.value)


# ---- vectorised sweep paths == the obvious loop ------------------------------------------------------
def test_shared_threshold_sums_equal_first_exits_and_a_loop():
    for seed in range(3):
        rec = random_record(n=200, seed=seed, ties=True)
        scores = ThresholdPolicy().score_record(rec)
        thresholds = torch.cat([scores[:20, 0], torch.linspace(0, 1, 30)])  # include exact ties with scores
        exits = first_exits(scores, thresholds.unsqueeze(1).expand(-1, rec.k))
        loop = torch.tensor([[next((k for k in range(rec.k - 1) if scores[i, k] >= t), rec.k - 1)
                              for i in range(rec.n)] for t in thresholds.tolist()])
        assert torch.equal(exits, loop)
        values = exit_values(rec)
        fast = sum_at_shared_threshold(scores, values, thresholds)
        torch.testing.assert_close(fast, sum_at_exits(values, exits), rtol=1e-12, atol=1e-6)
        assert torch.equal(fast[:, 0], sum_at_exits(values, exits)[:, 0])  # right counts are exact


@pytest.mark.parametrize("grid", [
    {"threshold": [0.0, 0.3, 0.5, 0.55, 0.7, 0.9, 1.0]},
    {"threshold": [0.2, 0.6], "score": ["entropy", "margin"], "temperature": [False, True]},
    [{"thresholds": [0.9, 0.5, 0.3]}, {"thresholds": [0.4, 0.8, 0.95]}, {"threshold": 0.6}],
])
def test_threshold_sweep_equals_decide_point_by_point(grid):
    cal, test = random_record(seed=4, ties=True), random_record(seed=5, ties=True)
    table = sweep("threshold", cal, test, grid)
    points = table.drop(columns=[c for c in table.columns if c in
                                 ("accuracy", "mean_macs", "rel_macs", "compute_saved", "effectiveness",
                                  "effectiveness_block_index")]).to_dict("records")
    for row, point in zip(table.to_dict("records"), points):
        point = {k: v for k, v in point.items() if not (isinstance(v, float) and math.isnan(v))}
        want = evaluate(test, ThresholdPolicy(**point).fit(cal).decide(test))
        assert row["accuracy"] == want["accuracy"], point
        for key in ("mean_macs", "rel_macs", "compute_saved", "effectiveness", "effectiveness_block_index"):
            assert row[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), (point, key)


def _values(name: str, cal: ExitRecord, key: str) -> list:
    return [point[key] for point in default_grid(name, cal)]


@pytest.mark.parametrize("k", [4, 3])
def test_default_grids_are_valid_distinct_and_span_each_parameter(k):
    cal = random_record(k=k, seed=6)  # costs linspace(0.3, 1.1, K) MACs of a full network of 1e6
    for name in POLICIES:
        grid = default_grid(name, cal)
        assert grid and all(isinstance(point, dict) for point in grid), name
        assert len({tuple(sorted(point.items())) for point in grid}) == len(grid), f"{name}: duplicate points"
        for point in grid:  # every point is a valid policy that keeps the value it was given
            policy = make_policy(name, **point)
            assert all(policy.params[key] == value for key, value in point.items()), (name, point)
    assert _values("static", cal, "exit") == list(range(k))
    assert _values("patience", cal, "patience") == list(range(1, k + 1))  # patience K never exits early
    budgets = _values("budget", cal, "budget")  # what the model can meet: cheapest exit .. last exit
    assert budgets == sorted(budgets) and len(budgets) > 10
    assert budgets[0] == pytest.approx(0.3) and budgets[-1] == pytest.approx(1.1)
    for name, key in (("threshold", "threshold"), ("confidence", "threshold"), ("alpha", "alpha")):
        values = _values(name, cal, key)  # both ends of the knob: everyone leaves at exit 0 / at the last
        assert values == sorted(values) and values[0] == 0.0 and values[-1] == 1.0 and len(values) > 10, name
    # threshold: quantiles of the early exits' max-prob scores on cal (900 or 600 distinct scores)
    thresholds = torch.tensor(_values("threshold", cal, "threshold")[1:-1], dtype=torch.float64)
    scores = cal.logits[:, :-1].softmax(-1).amax(-1).reshape(-1).double()
    assert len(thresholds) > 150 and scores.min() <= thresholds.min() and thresholds.max() <= scores.max()
    assert float((scores <= thresholds.median()).double().mean()) == pytest.approx(0.5, abs=0.02)
    for name, key in (("risk", "epsilon"), ("dqn", "cost_weight")):
        values = _values(name, cal, key)
        assert values == sorted(values) and len(values) > 5, name
    assert _values("dqn", cal, "cost_weight")[0] == 0.0  # accuracy only, the top of the frontier


# ---- parameters ----------------------------------------------------------------------------------------
def test_string_parameters_are_parsed():
    policy = make_policy("threshold", threshold="0.75", score="entropy", temperature="true")
    assert policy.params == {"threshold": 0.75, "thresholds": None, "score": "entropy", "temperature": True}
    assert make_policy("threshold", thresholds="0.9,0.8").params["thresholds"] == [0.9, 0.8]
    assert make_policy("patience", patience="3").params["patience"] == 3
    assert make_policy("risk", epsilon="0.1", mode="crc").params["mode"] == "crc"


@pytest.mark.parametrize("name, params, match", [
    ("threshold", {"threshold": "1.5"}, r"\[0, 1\]"),
    ("threshold", {"threshold": "abc"}, "a number"),
    ("threshold", {"threshold": "nan"}, "must be in"),
    ("threshold", {"score": "logit"}, "max_prob"),
    ("threshold", {"thresholds": "0.9,x"}, "comma-separated"),
    ("threshold", {"threshold": 0.5, "thresholds": "0.9,0.8"}, "not both"),
    ("threshold", {"temperature": "maybe"}, "true or false"),
    ("threshold", {"alpha": "1"}, "unknown parameter 'alpha'"),
    ("patience", {"patience": "0"}, "patience"),
    ("patience", {"patience": "1.5"}, "an integer"),
    ("risk", {"epsilon": "0"}, r"\(0, 1\)"),
    ("risk", {"mode": "fancy"}, "ltt"),
    ("budget", {"budget": "-1"}, "budget"),
    ("static", {"exit": "-2"}, "exit"),
    ("nonsense", {}, "unknown policy"),
])
def test_bad_parameters_are_one_line_errors(name, params, match):
    with pytest.raises(EelabError, match=match) as err:
        make_policy(name, **params)
    assert "\n" not in str(err.value)


def test_per_exit_thresholds_must_fit_the_record():
    with pytest.raises(EelabError, match="K=3"):
        make_policy("threshold", thresholds="0.9,0.8,0.7,0.6").decide(tiny_record())


def test_policy_fitted_on_another_k_is_refused():
    policy = make_policy("risk").fit(random_record(k=4))
    with pytest.raises(EelabError, match="K=4"):
        policy.decide(random_record(k=3))


# ---- save / load ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(POINTS))
def test_save_load_round_trip(tmp_path, name):
    cal, test = random_record(seed=8), random_record(seed=9)
    for i, point in enumerate(POINTS[name]):
        policy = make_policy(name, **point).fit(cal)
        path = policy.save(tmp_path / f"{name}{i}.pt")
        torch.load(path, weights_only=True)  # plain types only
        loaded = make_policy(path)
        assert type(loaded) is type(policy) and loaded.params == policy.params
        assert loaded.describe() == policy.describe()
        assert torch.equal(loaded.decide(test), policy.decide(test))
        assert load_policy(path).info == loaded.info


def test_round_trip_of_defaults_and_of_a_file_without_given(tmp_path):
    rec = random_record(seed=10)
    for name in POLICIES:
        policy = make_policy(name).fit(rec)
        path = policy.save(tmp_path / f"{name}.pt")
        assert torch.equal(load_policy(path).decide(rec), policy.decide(rec))
        saved = torch.load(path, weights_only=True)
        del saved["given"]  # files written by hand or by an older eelab
        torch.save(saved, path)
        assert load_policy(path).params == policy.params


def test_bad_policy_files_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    record = tiny_record().save(tmp_path / "record.pt")
    unknown = tmp_path / "unknown.pt"
    torch.save({"format": "eelab.policy", "format_version": 1, "name": "magic", "params": {}, "fitted": {}}, unknown)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "eelab.policy", "format_version": 99, "name": "static", "params": {}, "fitted": {}}, newer)
    unfitted = tmp_path / "unfitted.pt"
    torch.save({"format": "eelab.policy", "format_version": 1, "name": "risk", "params": {}, "fitted": {}}, unfitted)
    good = make_policy("threshold", threshold=0.8).save(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    cases = [(garbage, "not a policy file"), (foreign, "not an eelab policy file"),
             (record, "not an eelab policy file"), (unknown, "unknown policy 'magic'"), (newer, "version 99"),
             (unfitted, "lacks fitted"), (truncated, "policy file"), (tmp_path / "missing.pt", "does not exist")]
    for path, match in cases:
        with pytest.raises(EelabError, match=match) as err:
            load_policy(path)
        assert "\n" not in str(err.value), path
    with pytest.raises(EelabError, match="cannot change"):
        make_policy(good, threshold=0.5)
