"""Ensembled exits: the combination by hand, the identity ensemble equals the plain record, the fit, the split
it leaves to the policies, its identity in caches and checks, its file, and live inference equal to the record."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from eelab import testing
from eelab.cli import main
from eelab.ensemble import ExitEnsemble, fit_ensemble, identity_ensemble, load_ensemble, split_cal
from eelab.errors import EelabError
from eelab.metrics import exit_calibration
from eelab.policies import make_policy
from eelab.records import ExitRecord, check_same_model
from eelab.sweep import cache_path

from hostile_helpers import damage_file


def _record(n=600, seed=0, split="cal", sha="a" * 64):
    """A seeded K=4, C=5 record whose exits' mistakes are partly shared (so combining exits can help)."""
    return testing.random_record(n, 4, 5, seed, difficulty=True, sha=sha, meta={"split": split})


def _ensemble(k=4, c=5, weights=None, bias=None, fit_indices=(), split="cal"):
    w = torch.eye(k, dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    b = torch.zeros(k, c, dtype=torch.float64) if bias is None else torch.tensor(bias, dtype=torch.float64)
    return ExitEnsemble(w, b, torch.tensor(fit_indices, dtype=torch.long), {"split": split, "seed": 0})


# ---- the combination ----------------------------------------------------------------------------------------

def test_combination_by_hand():
    # K=2, C=2: exit 0 says (0.8, 0.2), exit 1 says (0.3, 0.7); w = [[2, 0], [1, 0.5]], b = [[0, 0], [0.1, -0.1]]
    rec = testing.record_from_probs([[[0.8, 0.2], [0.3, 0.7]]], [1], meta={"split": "test"})
    ens = _ensemble(2, 2, [[2.0, 0.0], [1.0, 0.5]], [[0.0, 0.0], [0.1, -0.1]])
    z = ens.apply(rec).logits[0]
    assert z[0].tolist() == pytest.approx([2 * math.log(0.8), 2 * math.log(0.2)], abs=1e-6)
    assert z[1].tolist() == pytest.approx([math.log(0.8) + 0.5 * math.log(0.3) + 0.1,
                                           math.log(0.2) + 0.5 * math.log(0.7) - 0.1], abs=1e-6)
    # costs gain the combination's multiply-adds: (j + 1) C per exit, cumulative -> 2, 2 + 4
    assert ens.apply(rec).costs.tolist() == pytest.approx([1 + 2, 2 + 6])


def test_identity_ensemble_equals_the_plain_record():
    rec, cal = _record(400, 1, "test"), _record(600, 2, "cal")
    ident = identity_ensemble(rec.k, rec.c)
    er, ec = ident.apply(rec), ident.apply(cal)
    assert er.n == rec.n and ec.n == cal.n  # an identity fitted on no rows drops none
    assert torch.allclose(torch.softmax(er.logits, -1), torch.softmax(rec.logits, -1), atol=1e-6)
    # the logits themselves differ from the plain ones by a per-row shift only (log-softmax)
    shift = er.logits - rec.logits
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-5)
    for name, params in (("threshold", {"threshold": 0.6}), ("patience", {"patience": 2}), ("budget", {"budget": 0.6}),
                         ("risk", {"epsilon": 0.05}), ("static", {"exit": 1}), ("oracle", {})):
        plain, ensembled = make_policy(name, **params), make_policy(name, **params)
        if plain.needs_fit():
            plain.fit(cal), ensembled.fit(ec)
        assert torch.equal(plain.decide(rec), ensembled.decide(er)), name


def test_live_combine_equals_the_record_transform():
    rec = _record(50, 3, "test")
    ens = _ensemble(weights=[[1.5, 0, 0, 0], [0.2, 1.1, 0, 0], [0.1, 0.0, 0.9, 0], [0.3, 0.2, 0.1, 1.0]],
                    bias=torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).tolist())
    past, whole = None, ens.transform_logits(rec.logits)
    for k in range(rec.k):
        z, past = ens.combine(k, rec.logits[:, k], past)
        assert past.shape == (rec.n, k + 1, rec.c)
        assert torch.allclose(z, whole[:, k], atol=1e-5)


def test_weights_must_be_non_negative_and_never_look_ahead():
    with pytest.raises(EelabError, match="lower-triangular"):
        _ensemble(2, 2, [[1.0, 0.5], [0.0, 1.0]])  # exit 0 reading exit 1
    with pytest.raises(EelabError, match=">= 0"):
        _ensemble(2, 2, [[1.0, 0.0], [-0.1, 1.0]])
    with pytest.raises(EelabError, match="finite"):
        _ensemble(2, 2, [[float("nan"), 0.0], [0.0, 1.0]])
    with pytest.raises(EelabError, match=r"\[K, K\]"):
        ExitEnsemble(torch.eye(2), torch.zeros(3, 2), torch.empty(0, dtype=torch.long), {})


# ---- the fit and the split -----------------------------------------------------------------------------------

def test_fit_uses_a_seeded_half_and_lowers_held_out_loss():
    cal, test = _record(1200, 4, "cal"), _record(2000, 5, "test")
    ens = fit_ensemble(cal, seed=3)
    fit_part, policy_part = split_cal(cal, seed=3)
    assert torch.equal(ens.fit_indices, fit_part.indices)
    assert fit_part.n == policy_part.n == 600
    assert not bool(torch.isin(fit_part.indices, policy_part.indices).any())
    assert bool((ens.weights >= 0).all()) and torch.equal(ens.weights, torch.tril(ens.weights))
    # what the fit is for: a lower cross-entropy per exit on data it did not see (test)
    et = ens.apply(test)
    for k in range(test.k):
        plain = torch.nn.functional.cross_entropy(test.logits[:, k], test.labels)
        ensembled = torch.nn.functional.cross_entropy(et.logits[:, k], test.labels)
        assert float(ensembled) < float(plain), k
    # and later exits lean on earlier ones here (the exits' mistakes are partly independent)
    assert float(ens.weights[3, :3].sum()) > 0.05
    # deterministic given the seed; another seed, another half
    again = fit_ensemble(cal, seed=3)
    assert again.sha256 == ens.sha256
    assert fit_ensemble(cal, seed=4).sha256 != ens.sha256


def test_apply_leaves_the_fit_rows_out_of_cal_only():
    cal, test = _record(400, 6, "cal"), _record(400, 7, "test")
    ens = fit_ensemble(cal, seed=0, steps=20)
    ec, et = ens.apply(cal), ens.apply(test)
    assert ec.n == 200 and not bool(torch.isin(ec.indices, ens.fit_indices).any())
    assert ec.meta["ensemble"]["rows_dropped"] == 200
    assert et.n == 400  # test shares index values with cal, but it is another split: nothing dropped
    with pytest.raises(EelabError, match="already ensembled"):
        ens.apply(ec)
    with pytest.raises(EelabError, match="every row"):
        ens.apply(cal.subset(torch.isin(cal.indices, ens.fit_indices)))
    with pytest.raises(EelabError, match=r"\(0, 1\)"):
        split_cal(cal, fraction=1.0)


def test_ensembled_and_plain_never_mix():
    cal, test = _record(400, 8, "cal"), _record(300, 9, "test")
    ens = fit_ensemble(cal, steps=20)
    ec, et = ens.apply(cal), ens.apply(test)
    assert et.meta["ensemble_sha256"] == ens.sha256
    check_same_model(et, ec)  # the same ensemble on both: fine
    with pytest.raises(EelabError, match="is for plain exits"):
        check_same_model(test, ec)
    other = fit_ensemble(cal, seed=1, steps=20)
    with pytest.raises(EelabError, match="ensembled differently"):
        check_same_model(other.apply(test), ec)
    # the fitted-policy cache keys on the ensemble: same family, point and cal rows, another file
    family = make_policy("risk").__class__
    assert cache_path("c", family, {"epsilon": 0.05}, ec) != cache_path("c", family, {"epsilon": 0.05},
                                                                           cal.subset(ec.indices))
    # and a fitted policy records it
    assert make_policy("risk", epsilon=0.05).fit(ec).info["ensemble_sha256"] == ens.sha256
    assert make_policy("risk", epsilon=0.05).fit(cal).info["ensemble_sha256"] is None
    with pytest.raises(EelabError, match="checkpoint"):
        ens.apply(_record(100, 1, "test", sha="b" * 64))
    with pytest.raises(EelabError, match="K=4"):
        ens.apply(testing.random_record(50, 3, 5, 0))


def test_the_ensemble_mends_calibration_on_held_out_data():
    # exits made over-confident (logits x 3): the fitted weights scale them back, so ECE falls on test
    cal, test = _record(2000, 10, "cal"), _record(3000, 11, "test")
    hot = [ExitRecord(r.logits * 3, r.labels, r.indices, r.costs, r.full_cost, r.meta) for r in (cal, test)]
    ens = fit_ensemble(hot[0])
    before, after = exit_calibration(hot[1]), exit_calibration(ens.apply(hot[1]))
    assert all(a < 0.5 * b for a, b in zip(after["ece"], before["ece"]))


# ---- the file ---------------------------------------------------------------------------------------------------

def test_file_round_trip_and_bad_files(tmp_path):
    cal = _record(300, 12, "cal")
    ens = fit_ensemble(cal, steps=20)
    path = ens.save(tmp_path / "ens.pt")
    back = load_ensemble(path)
    assert back.sha256 == ens.sha256 and torch.equal(back.weights, ens.weights) and back.info == ens.info
    # altered weights no longer match the saved hash
    d = torch.load(path, weights_only=True)
    d["weights"][1, 0] += 0.5
    torch.save(d, tmp_path / "altered.pt")
    with pytest.raises(EelabError, match="altered"):
        load_ensemble(tmp_path / "altered.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(EelabError, match="exit ensemble"):
        load_ensemble(tmp_path / "cut.pt")
    cal.save(tmp_path / "record.pt")
    with pytest.raises(EelabError, match="not an eelab exit ensemble"):
        load_ensemble(tmp_path / "record.pt")
    with pytest.raises(EelabError, match="already holds an exit record"):
        ens.save(tmp_path / "record.pt")
    with pytest.raises(EelabError, match="does not exist"):
        load_ensemble(tmp_path / "missing.pt")


# ---- live inference ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_ensemble(live):
    """(an ensemble of the live net's exits, its ensembled cal record, ensembled record of the 64 live images).

    Set by hand: the live net's labels are its last exit's answers, so a fitted ensemble would only learn to
    distrust the early exits; these weights keep the images spread over the exits."""
    _, _, record, cal = live
    ens = _ensemble(weights=[[1.0, 0, 0, 0], [0.3, 0.9, 0, 0], [0.2, 0.0, 1.1, 0], [0.1, 0.2, 0.1, 1.0]],
                    bias=(0.1 * torch.randn(4, 5, generator=torch.Generator().manual_seed(0))).tolist(), split=None)
    return ens, ens.apply(cal), ens.apply(record)


@pytest.mark.parametrize("name", ["threshold", "patience", "budget", "risk"])
def test_live_ensembled_inference_equals_the_ensembled_record(live, live_predictor, live_ensemble, name):
    _, images, _, _ = live
    ens, ecal, erec = live_ensemble
    params = {"threshold": {"thresholds": [0.55, 0.5, 0.45]}, "patience": {"patience": 2},
              "budget": {"budget": 0.55}, "risk": {"epsilon": 0.1, "delta": 0.2}}[name]
    policy = make_policy(name, **params)
    if policy.needs_fit():
        policy.fit(ecal)
    pred = live_predictor(policy, ensemble=ens)
    want = policy.decide(erec)
    assert len(set(want.tolist())) > 1, "the policy should spread the images over several exits"
    got = pred.predict(images)
    assert torch.equal(got["exits"], want)
    assert torch.allclose(got["logits"], erec.logits[torch.arange(erec.n), want], atol=1e-4)
    assert torch.allclose(got["macs"], erec.costs[want])
    streamed = list(pred.stream(images.split(7), batch=16))
    assert [s.exit for s in streamed] == want.tolist()
    assert torch.allclose(torch.stack([s.logits for s in streamed]), got["logits"], atol=1e-4)
    for i in (0, 5):  # one image at a time: nothing gathered, the same answers
        one = pred.predict(images[i:i + 1])
        assert int(one["exits"]) == int(want[i])


def test_predictor_refuses_a_policy_fitted_on_other_outputs(live, live_predictor, live_ensemble):
    cal = live[3]
    ens, ecal, _ = live_ensemble
    with pytest.raises(EelabError, match="the policy is for plain exits"):
        live_predictor(make_policy("risk", epsilon=0.1).fit(cal), ensemble=ens)
    with pytest.raises(EelabError, match="used without that ensemble"):
        live_predictor(make_policy("risk", epsilon=0.1).fit(ecal))
    with pytest.raises(EelabError, match="K=4"):
        live_predictor(make_policy("patience"), ensemble=identity_ensemble(3, 5))


# ---- the command ----------------------------------------------------------------------------------------------------

def test_cli_fits_an_ensemble_and_evaluates_through_it(tmp_path, capsys):
    cal, test = _record(800, 13, "cal"), _record(500, 14, "test")
    cal.save(tmp_path / "cal.pt"), test.save(tmp_path / "test.pt")
    assert main(["ensemble", str(tmp_path / "cal.pt"), "--out", str(tmp_path / "ens.pt"), "--json"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["fit_rows"] == 400 and fitted["policy_rows"] == 400
    assert [r["records"] for r in fitted["held_out"]] == ["plain", "ensembled"]
    args = ["evaluate", str(tmp_path / "test.pt"), "--policy", "risk", "--param", "epsilon=0.05", "--json"]
    assert main(args + ["--ensemble", str(tmp_path / "ens.pt"), "--save-policy", str(tmp_path / "risk.pt")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ensemble"] == fitted["sha256"]
    assert "n_cal=400" in out["guarantee"]  # fitted on the half the ensemble never saw
    # the saved policy is refused on plain records, and works with the same ensemble
    assert main(["evaluate", str(tmp_path / "test.pt"), "--policy", str(tmp_path / "risk.pt")]) == 1
    assert "used without that ensemble" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "test.pt"), "--policy", str(tmp_path / "risk.pt"), "--ensemble",
                 str(tmp_path / "ens.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == out["accuracy"]
    assert main(["sweep", str(tmp_path / "test.pt"), "--policy", "threshold", "--ensemble", str(tmp_path / "ens.pt"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ensemble"] == fitted["sha256"]
    # an existing file of another kind is refused before the fit
    assert main(["ensemble", str(tmp_path / "cal.pt"), "--out", str(tmp_path / "test.pt")]) == 1
    assert "already holds an exit record" in capsys.readouterr().err
    # a record of another model
    testing.random_record(100, 3, 5, 0, meta={"split": "test"}).save(tmp_path / "k3.pt")
    assert main(["evaluate", str(tmp_path / "k3.pt"), "--policy", "patience", "--ensemble",
                 str(tmp_path / "ens.pt")]) == 1
    assert "K=4" in capsys.readouterr().err


def test_fuzz_malformed_ensemble_files_load_or_raise_one_line(tmp_path):
    rng = random.Random(1719)
    base_ens = fit_ensemble(_record(200, 15, "cal"), steps=5)
    base_ens.save(tmp_path / "base.pt")
    refused = 0
    for case in range(200):
        d = torch.load(tmp_path / "base.pt", weights_only=True)
        key = rng.choice(["weights", "bias", "fit_indices", "info", "format", "format_version", "sha256"])
        choice = rng.randrange(7)
        if choice == 0:
            d[key] = rng.choice([None, "x", 3, [1, 2], {"a": 1}, torch.tensor(1.0)])
        elif choice == 1 and isinstance(d.get(key), torch.Tensor):
            t = d[key]
            d[key] = rng.choice([t.reshape(-1), t.unsqueeze(0), t[:max(0, t.shape[0] - 1)], t.to(torch.complex64),
                                 t.float() * float("nan"), -t.float(), t.flip(0), t.to(torch.bool)])
        elif choice == 2:
            d.pop(key, None)
        elif choice == 3:
            key = rng.choice(["checkpoint_sha256", "split", "seed"])
            d["info"] = {**d["info"], key: rng.choice(["test", 7, "b" * 64])}
        elif choice == 4:
            d["weights"] = d["weights"].clone()
            d["weights"][rng.randrange(4), rng.randrange(4)] += rng.choice([0.5, -3.0, float("inf")])
        path = tmp_path / f"e{case}.pt"
        torch.save(d, path)
        if choice in (5, 6):
            damage_file(rng, path, "truncate" if choice == 5 else "flip", flips=8)
        try:
            loaded = load_ensemble(path)
        except EelabError as e:
            assert type(e) is EelabError and "\n" not in str(e) and str(e), (case, e)
            refused += 1
            continue
        assert loaded.sha256 == base_ens.sha256, case  # loaded only what was saved, never an altered ensemble
    assert refused > 120, refused
