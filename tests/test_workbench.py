"""sweep and workbench: precomputed grids equal sweep() and per-point evaluate; hand-computed matched points,
latency pricing, risk, reliability bins; the fit cache; examples with and without the dataset."""
from __future__ import annotations

import math
from functools import partial

import pandas as pd
import pytest
import torch

from eelab import testing, workbench
from eelab.errors import EelabError
from eelab.metrics import evaluate, expected_calibration_error
from eelab.policies import POLICIES, Policy, RiskPolicy, ThresholdPolicy, make_policy
from eelab.records import ExitRecord
from eelab.sweep import precompute_grid, precompute_grids, sweep
from eelab.records import latency_record, load_records

# TINY_P (eelab.testing): 4 samples x 3 exits x 3 classes, labels 0, 1, 2, 0; costs 1, 2, 4 MACs, plain 3.5.
# right at exit 0 / 1 / 2:  s0 T T T   s1 F T T   s2 F F T   s3 T F F   -> exit accuracy 0.5, 0.5, 0.75
tiny_record = partial(testing.tiny_record, meta={"class_names": ["a", "b", "c"], "checkpoint_sha256": "ab" * 32})
random_record = partial(testing.random_record, sha="cd" * 32, meta={"class_names": list("vwxyz")})


@pytest.fixture(scope="module")
def pair() -> tuple[ExitRecord, ExitRecord]:
    return random_record(seed=1), random_record(seed=2)


# ---- grids equal the metrics -----------------------------------------------------------------------
@pytest.mark.parametrize("name,grid", [("threshold", {"threshold": [0.0, 0.3, 0.5, 0.7, 0.9, 1.0]}),
                                       ("risk", {"epsilon": [0.02, 0.1, 0.3], "delta": [0.05, 0.2]}),
                                       ("budget", None), ("static", None), ("patience", None), ("oracle", None)])
def test_grid_rows_equal_sweep_and_evaluate(pair, name, grid):
    cal, test = pair
    g = precompute_grid(name, cal, test, grid)
    table = sweep(name, cal, test, grid)
    assert len(g) == len(table) == len(g.points) == g.exits.shape[0]
    for col in ("accuracy", "mean_macs", "rel_macs", "compute_saved", "effectiveness", "effectiveness_block_index"):
        assert g.table[col].tolist() == pytest.approx(table[col].tolist(), rel=1e-12, abs=1e-12), col
    for i, point in enumerate(g.table[g.table.attrs["params"]].to_dict("records")):
        policy = make_policy(name, **point).fit(cal)  # the slow obvious path, point by point
        exits = policy.decide(test)
        assert torch.equal(g.exits[i], exits)
        assert g.points[i] == evaluate(test, exits)
        assert g.table.at[i, "cal_accuracy"] == evaluate(cal, policy.decide(cal))["accuracy"]


def test_grid_params_values_and_find(pair):
    g = precompute_grid("risk", *pair, {"epsilon": [0.1, 0.02], "delta": [0.2, 0.05]})
    assert g.params == ["epsilon", "delta"]
    assert g.values("epsilon") == [0.02, 0.1] and g.values("delta") == [0.05, 0.2]
    i = g.find(epsilon=0.02, delta=0.2)
    assert g.policies[i].params["epsilon"] == 0.02 and g.policies[i].params["delta"] == 0.2
    assert g.find(epsilon=0.021, delta=0.2) == i  # off the grid: the nearest value
    assert precompute_grid("oracle", *pair).params == []


def test_grid_of_given_fitted_policies_is_not_refitted(pair, monkeypatch):
    cal, test = pair
    fitted = [RiskPolicy(epsilon=e).fit(cal) for e in (0.05, 0.2)]
    monkeypatch.setattr(Policy, "fit", lambda self, cal: pytest.fail("a fitted policy was refitted"))
    g = precompute_grid(fitted, cal, test, [{"agent": 1}, {"agent": 2}])
    assert g.name == "risk" and g.params == ["agent"] and g.policies == fitted
    assert torch.equal(g.exits[1], fitted[1].decide(test))


def test_max_points_thins_evenly_and_keeps_both_ends(pair):
    g = precompute_grid("threshold", *pair, {"threshold": [i / 10 for i in range(11)]}, max_points=4)
    assert g.values("threshold") == [0.0, 0.3, 0.7, 1.0]


def test_fit_cache_saves_fitted_points_and_finds_them_again(pair, tmp_path, monkeypatch):
    cal, test = pair
    first = precompute_grid("risk", cal, test, {"epsilon": [0.05, 0.1]}, cache=tmp_path)
    assert len(list(tmp_path.glob("risk-*.pt"))) == 2
    precompute_grid("threshold", cal, test, {"threshold": [0.5]}, cache=tmp_path)
    assert not list(tmp_path.glob("threshold-*"))  # nothing learned, nothing cached
    monkeypatch.setattr(RiskPolicy, "_fit", lambda self, cal: pytest.fail("a cached point was fitted again"))
    again = precompute_grid("risk", cal, test, {"epsilon": [0.05, 0.1]}, cache=tmp_path)
    pd.testing.assert_frame_equal(first.table, again.table)
    other_cal = cal.subset(slice(0, 200))  # another cal split: another key, fitted afresh
    monkeypatch.undo()
    precompute_grid("risk", other_cal, test, {"epsilon": [0.05]}, cache=tmp_path)
    assert len(list(tmp_path.glob("risk-*.pt"))) == 3


def test_batched_fit_grid_hook_is_used(pair):
    calls = []

    class Batched(ThresholdPolicy):
        @classmethod
        def fit_grid(cls, points, cal):
            calls.append(len(points))
            return [cls(**point).fit(cal) for point in points]

    precompute_grid(Batched, *pair, {"threshold": [0.2, 0.8]})
    assert calls == [2]


def test_batched_fit_moves_its_bar_while_it_runs(pair, capsys):
    """A batched fit_grid is one long call: the bar follows the share it reports (callback=) and its clock keeps
    being redrawn while it runs."""
    import time

    class Reporting(ThresholdPolicy):
        def needs_fit(self) -> bool:  # a learned family: its points get a bar
            return True

        @classmethod
        def fit_grid(cls, points, cal, callback=None):
            callback(0.5)
            time.sleep(1.6)  # the clock is redrawn every half second meanwhile
            return [cls(**point).fit(cal) for point in points]

    from eelab.sweep import fit_points

    fit_points(Reporting, [{"threshold": t} for t in (0.2, 0.5, 0.8, 0.9)], pair[0], progress=True)
    err = capsys.readouterr().err
    assert " 2/4 " in err and err.count(" 2/4 ") >= 2 and " 4/4 " in err, err


# ---- hand-computed answers on the tiny record ---------------------------------------------------------
def test_matched_points_by_hand():
    rec = tiny_record()
    g = precompute_grid("static", rec, rec)  # exits 0, 1, 2: accuracy 0.5, 0.5, 0.75; MACs 1, 2, 4
    assert g.table["cal_accuracy"].tolist() == [0.5, 0.5, 0.75]
    assert workbench.matched_point(g, accuracy=0.5) == 0      # cheapest reaching it
    assert workbench.matched_point(g, accuracy=0.6) == 2
    assert workbench.matched_point(g, accuracy=0.8) is None
    assert workbench.matched_point(g, budget=0.6) == 0        # 2/3.5 = 0.571 fits too; equal accuracy, cheaper wins
    assert workbench.matched_point(g, budget=4 / 3.5) == 2
    assert workbench.matched_point(g, budget=0.2) is None
    assert workbench.target_accuracy(rec, 0.01) == pytest.approx(0.74)
    with pytest.raises(EelabError):
        workbench.matched_point(g)
    table = workbench.operating_points({"static": g}, accuracy=0.6)
    assert table.loc[0, "label"] == "static(exit=2)" and table.loc[0, "accuracy"] == 0.75
    assert math.isnan(workbench.operating_points({"static": g}, accuracy=0.9).loc[0, "accuracy"])
    assert list(workbench.matched_points({"static": g}, accuracy=0.9)) == []


def test_against_oracle_by_hand():
    # right at exits 0/1/2: sample 0 all, sample 1 from exit 1, sample 2 only at exit 2, sample 3 only at exit 0
    g = precompute_grid("static", tiny_record(), tiny_record())
    first = workbench.against_oracle(g, 0)       # exit 0: 0.5, mean 1 MAC of 3.5; the oracle's first point is it
    assert first == pytest.approx({"accuracy": 0.5, "compute_saved": 1 - 1 / 3.5, "oracle_compute_saved": 1 - 1 / 3.5,
                                   "oracle_share": 1.0})
    assert workbench.against_oracle(g, 1)["oracle_share"] == pytest.approx((1 - 2 / 3.5) / (1 - 1 / 3.5))
    last = workbench.against_oracle(g, 2)        # 0.75 at 4 MACs; the oracle moves sample 1 to exit 1: 1.25 MACs
    assert last["oracle_compute_saved"] == pytest.approx(1 - 1.25 / 3.5)
    assert last["oracle_share"] == pytest.approx((1 - 4 / 3.5) / (1 - 1.25 / 3.5))


def test_latency_record_prices_exits_in_ms():
    rec = tiny_record()
    profile = {"stages": [{"cumulative_ms": 0.5}, {"cumulative_ms": 1.0}, {"cumulative_ms": 2.0}], "plain_ms": 1.75,
               "batch": 1, "threads": 1}
    ms = latency_record(rec, profile)
    assert ms.costs.tolist() == [0.5, 1.0, 2.0] and ms.full_cost == 1.75 and ms.meta["cost_unit"] == "ms"
    g = precompute_grid("static", rec, rec, latency=ms)
    assert g.table["mean_ms"].tolist() == [0.5, 1.0, 2.0]
    assert g.table["rel_ms"].tolist() == pytest.approx(g.table["rel_macs"].tolist())  # ms = MACs / 2 here
    with pytest.raises(EelabError, match="profile"):
        latency_record(rec, {"stages": profile["stages"][:2], "plain_ms": 1.0})


def test_exit_table_by_hand():
    rec = tiny_record()
    table = workbench.exit_table(rec, rec)
    assert table["macs"].tolist() == [1.0, 2.0, 4.0]
    assert table["rel_macs"].tolist() == pytest.approx([1 / 3.5, 2 / 3.5, 4 / 3.5])
    assert table["test_accuracy"].tolist() == [0.5, 0.5, 0.75] == table["cal_accuracy"].tolist()


def test_summary_over_one_and_two_runs(pair):
    cal, test = pair
    grids = precompute_grids(["static", "threshold"], cal, test)
    one = workbench.summarize_policies(grids, tolerance=0.02, budget=0.6)
    assert one["policy"].tolist() == ["static", "threshold"] and one["n_seeds"].tolist() == [1, 1]
    assert one["area_std"].isna().all()
    i = workbench.matched_point(grids["threshold"], budget=0.6)
    assert one.loc[1, "accuracy_at_budget"] == grids["threshold"].table.at[i, "accuracy"]
    two = workbench.summarize_policies([grids, grids], tolerance=0.02, budget=0.6)
    assert two["n_seeds"].tolist() == [2, 2] and two["area_std"].tolist() == [0.0, 0.0]
    assert two["area"].tolist() == pytest.approx(one["area"].tolist())
    assert list(two.columns[:4]) == ["policy", "n_seeds", "area", "area_std"]


def test_risk_table_reports_the_realised_test_risk(pair):
    cal, test = pair
    g = precompute_grid("risk", cal, test, {"epsilon": [0.02, 0.1, 0.3]})
    table = workbench.risk_table(g)
    correct = test.logits.argmax(-1) == test.labels.unsqueeze(1)
    for i, policy in enumerate(g.policies):
        exits = policy.decide(test)
        lost = [bool(correct[s, -1]) and not bool(correct[s, exits[s]]) for s in range(test.n)]  # slow and obvious
        assert table.at[i, "test_risk"] == pytest.approx(sum(lost) / test.n)
        assert table.at[i, "guarantee"] == policy.guarantee()
    with pytest.raises(EelabError):
        workbench.risk_table(precompute_grid("static", cal, test))


def test_reliability_bins_give_the_metrics_ece(pair):
    test = pair[1]
    bins = workbench.reliability_bins(test, n_bins=10)
    conf = torch.softmax(test.logits, -1).amax(-1)
    correct = test.logits.argmax(-1) == test.labels.unsqueeze(1)
    for k in range(test.k):
        rows = bins[(bins["exit"] == k) & (bins["count"] > 0)]
        assert rows["count"].sum() == test.n
        ece = (rows["count"] * (rows["accuracy"] - rows["confidence"]).abs()).sum() / test.n
        assert ece == pytest.approx(expected_calibration_error(conf[:, k], correct[:, k], 10), abs=1e-6)
    long = workbench.exit_confidences(test)
    assert len(long) == test.n * test.k
    assert long[long["exit"] == 2]["confidence"].tolist() == pytest.approx(conf[:, 2].tolist(), abs=1e-6)


def test_class_tables_reshape_evaluate(pair):
    test = pair[1]
    point = evaluate(test, torch.randint(test.k, (test.n,), generator=torch.Generator().manual_seed(0)))
    acc = workbench.class_table({"p": point, "q": point})
    assert list(acc.index) == list("vwxyz") and acc["p"].tolist() == point["per_class_accuracy"]
    exits = workbench.class_exits(point)
    assert exits.shape == (5, test.k) and exits.to_numpy().tolist() == point["per_class_exit_fractions"]


# ---- records and examples ---------------------------------------------------------------------------
def test_load_records_limit_is_a_seeded_subset(tmp_path):
    rec = random_record(n=50)
    rec.save(tmp_path / "cal.pt")
    rec.save(tmp_path / "test.pt")
    cal, test = load_records(tmp_path, limit=20)
    assert cal.n == test.n == 20 and torch.equal(cal.indices, load_records(tmp_path, limit=20)[0].indices)
    assert not torch.equal(cal.indices, torch.arange(20)) and bool((cal.indices.diff() > 0).all())
    (tmp_path / "cal.pt").unlink()
    with pytest.raises(EelabError, match="eelab record .* --split cal"):
        load_records(tmp_path)


def test_examples_without_the_dataset_say_how_to_get_it(pair, tmp_path):
    test = pair[1]
    absent = ExitRecord(**{**test.__dict__, "meta": {"dataset": f"folder:{tmp_path / 'gone'}", "split": "test"}})
    ex = workbench.find_examples(absent, torch.zeros(test.n, dtype=torch.long), n=5)
    assert ex.images is None and "does not exist" in ex.message and "exit records" in ex.message
    assert len(ex.labels) == len(ex.exits) == 5


def test_examples_show_the_dataset_loading_progress(pair, monkeypatch):
    """A fresh clone decodes the dataset on its first examples (60,000 JPEGs for cifar10-jpeg): with a bar."""
    asked = []

    def load(name, image_size=None, progress=True):
        asked.append(progress)
        raise EelabError("not here")

    monkeypatch.setattr("eelab.data.load_dataset", load)
    test = ExitRecord(**{**pair[1].__dict__, "meta": {**pair[1].meta, "dataset": "cifar10-jpeg", "split": "test"}})
    workbench.find_examples(test, torch.zeros(test.n, dtype=torch.long), n=2)
    workbench.find_examples(test, torch.zeros(test.n, dtype=torch.long), n=2, progress=False)
    assert asked == [True, False]


def test_examples_come_from_the_dataset_when_it_is_here(tiny_checkpoint):
    from eelab.data import load_dataset
    from eelab.records import record_checkpoint

    rec = record_checkpoint(tiny_checkpoint, "test", progress=False)
    exits = torch.ones(rec.n, dtype=torch.long)
    ex = workbench.find_examples(rec, exits, n=4, seed=1)
    ds = load_dataset(rec.meta["dataset"], progress=False)
    rows = torch.randperm(rec.n, generator=torch.Generator().manual_seed(1))[:4].sort().values
    assert torch.equal(ex.images, ds.test_images[rec.indices[rows]])
    assert ex.exits == [1] * 4 and ex.predictions == rec.logits[rows, 1].argmax(-1).tolist()


def test_families_that_need_fields_the_records_lack_are_left_out_with_a_note_not_a_warning(pair, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal situation: no UserWarning (a pink box in a notebook)
        grids = precompute_grids(["static", "confidence"], *pair)
    assert list(grids) == ["static"]
    assert grids.left_out["confidence"].startswith("it reads the record field(s) confidences")
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"note: policy confidence left out: {grids.left_out['confidence']}"]  # one line
    quiet = precompute_grids(["confidence"], *pair, progress=False)
    assert dict(quiet) == {} and "confidence" in quiet.left_out and capsys.readouterr().out == ""


def test_grids_show_progress_bars_saying_what_they_do(pair, monkeypatch):
    import importlib

    module = importlib.import_module("eelab.sweep")  # eelab.sweep is also the function of that name
    made = []
    real = module.tqdm

    def spy(*args, **kwargs):
        made.append((kwargs.get("desc"), kwargs.get("disable")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "tqdm", spy)
    precompute_grids(["static", "threshold"], *pair, max_points=5)
    descs = [d for d, off in made if not off]
    assert "policy grids" in descs and "scoring 5 threshold point(s) on test and cal" in descs
    made.clear()
    precompute_grid("alpha", *pair, {"alpha": [0.0, 1.0], "steps": [2]})
    assert ("fitting 2 alpha point(s) on cal (one batched run)", False) in made
    made.clear()
    precompute_grid("threshold", *pair, max_points=3, progress=False)
    assert made and all(off for _, off in made)


def test_manifest_entries_identify_records_and_policies(pair, tmp_path):
    cal, test = pair
    grid = precompute_grid("threshold", cal, test, max_points=4)
    rec = workbench.record_identity(cal, tmp_path / "cal.pt")
    assert rec["n"] == cal.n and rec["k"] == cal.k and rec["checkpoint_sha256"] == cal.meta.get("checkpoint_sha256")
    assert rec["path"] == str(tmp_path / "cal.pt") and rec["indices_sha256"] != workbench.record_identity(
        cal.subset(torch.arange(10)))["indices_sha256"]
    entry = workbench.grid_identity(grid, selected=2)
    assert entry["points"] == 4 and entry["parameters"]["threshold"] == grid.values("threshold")
    assert entry["selected"]["params"] == grid.policies[2].params and entry["selected"]["row"] == 2
    (tmp_path / "a.txt").write_text("abc")
    manifest = workbench.export_manifest([tmp_path / "a.txt"], [rec], [entry])
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256 of "abc" (FIPS 180-2)
    assert manifest["files"] == [{"name": "a.txt", "path": str((tmp_path / "a.txt").resolve()), "sha256": abc}]
    assert manifest["checkpoint_sha256"] == rec["checkpoint_sha256"]


def test_every_registered_family_has_a_grid(pair):
    # the compare notebook draws every registered family; each must at least build its default grid
    for name, cls in POLICIES.items():
        assert isinstance(cls.grid(pair[0]), list), name


def test_sensitivity_table_by_hand(pair):
    cal, test = pair
    runs = [precompute_grid("alpha", cal, test, {"alpha": [0.0, 0.5, 1.0], "seed": [s], "steps": [30]})
            for s in (0, 1)]
    table = workbench.sensitivity_table(runs, "alpha")
    assert table["alpha"].tolist() == [0.0, 0.5, 1.0] and table["n_seeds"].tolist() == [2, 2, 2]
    for i in range(3):
        accs = [run.table.loc[i, "accuracy"] for run in runs]
        saved = [run.table.loc[i, "compute_saved"] for run in runs]
        assert table.loc[i, "accuracy"] == pytest.approx(sum(accs) / 2)
        assert table.loc[i, "accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        assert table.loc[i, "compute_saved"] == pytest.approx(sum(saved) / 2)
    assert table["jump"].iloc[1:].tolist() == pytest.approx(table["accuracy"].diff().abs().iloc[1:].tolist())
    one = workbench.sensitivity_table(runs[0], "alpha")
    assert one["accuracy"].tolist() == runs[0].table["accuracy"].tolist() and one["accuracy_std"].isna().all()
    with pytest.raises(EelabError, match="no parameter 'gamma'"):
        workbench.sensitivity_table(runs, "gamma")


def test_alpha_grid_is_fitted_in_one_batched_run_and_cached(pair, tmp_path, monkeypatch):
    from eelab.policies import alpha as alpha_module

    calls = []
    real = alpha_module.fit_alpha_grid
    monkeypatch.setattr(alpha_module, "fit_alpha_grid", lambda cal, alphas, **p: calls.append(len(alphas))
                        or real(cal, alphas, **p))
    grid = {"alpha": [0.0, 0.3, 0.6, 0.9], "steps": [20]}
    first = precompute_grid("alpha", *pair, grid, cache=tmp_path)
    again = precompute_grid("alpha", *pair, grid, cache=tmp_path)
    assert calls == [4] and len(list(tmp_path.glob("alpha-*.pt"))) == 4  # one run for four alphas, then found
    assert first.table["accuracy"].tolist() == again.table["accuracy"].tolist()


def test_split_table_by_hand():
    # TINY_P with exits s0 -> 0 (right), s1 -> 2 (right), s2 -> 1 (wrong), s3 -> 0 (right)
    record = testing.tiny_record()
    profile = {"stages": [{"cumulative_ms": 1.0, "activation_bytes": 400},
                          {"cumulative_ms": 3.0, "activation_bytes": 200},
                          {"cumulative_ms": 6.0, "activation_bytes": 40}]}
    table = workbench.split_table(profile, record, torch.tensor([0, 2, 1, 0]))
    assert table["split_after"].tolist() == [0, 1, 2]
    assert table["device_ms"].tolist() == [1.0, 3.0, 6.0]
    assert table["bytes_fp32"].tolist() == [400, 200, 40]
    assert table["bytes_bf16"].tolist() == [200, 100, 20] and table["bytes_int8"].tolist() == [100, 50, 10]
    assert table["local_share"].tolist() == [0.5, 0.75, 1.0]
    assert table["local_accuracy"].tolist() == pytest.approx([1.0, 2 / 3, 0.75])
    # device time per image: up to min(exit, k): k=0 all 1 ms; k=1 1, 3, 3, 1; k=2 1, 6, 3, 1
    assert table["mean_device_ms"].tolist() == pytest.approx([1.0, 2.0, 2.75])
    assert table["mean_bytes_fp32"].tolist() == pytest.approx([200.0, 50.0, 0.0])


def test_split_table_refuses_a_profile_or_exits_of_another_shape():
    record = testing.tiny_record()
    stage = {"cumulative_ms": 1.0, "activation_bytes": 4}
    with pytest.raises(EelabError, match="profile has 2 exits"):
        workbench.split_table({"stages": [stage, stage]}, record, torch.zeros(4, dtype=torch.long))
    with pytest.raises(EelabError, match="exits must be"):
        workbench.split_table({"stages": [stage] * 3}, record, torch.tensor([0, 1, 3, 0]))
    none_local = workbench.split_table({"stages": [stage] * 3}, record, torch.full((4,), 2))
    assert math.isnan(none_local["local_accuracy"][0]) and none_local["local_share"][0] == 0.0


def test_with_progress_shows_a_bar_saying_what_it_does(monkeypatch):
    made = []
    real = workbench.tqdm
    monkeypatch.setattr(workbench, "tqdm", lambda *a, **k: made.append(k["desc"]) or real(*a, **k))
    assert workbench.with_progress("loading the records", lambda a, b=0: a + b, 2, b=3) == 5
    assert made == ["loading the records"]
