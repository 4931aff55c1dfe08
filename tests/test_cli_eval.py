"""`eelab evaluate` and `eelab sweep`, in-process: JSON on stdout, readable tables, one-line errors."""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import pytest

from eelab import testing
from eelab.cli import main
from eelab.metrics import evaluate
from eelab.policies import make_policy
from eelab.records import ExitRecord
from eelab.sweep import sweep

SHA = "ab" * 32
random_record = partial(testing.random_record, sha=SHA, meta={"split": "test"})


@pytest.fixture()
def records(tmp_path) -> Path:
    """A directory with test.pt and cal.pt from the same (pretend) checkpoint."""
    random_record(seed=1).save(tmp_path / "test.pt")
    random_record(seed=2).save(tmp_path / "cal.pt")
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_json_matches_the_package(records, capsys):
    code, out, err = run(capsys, "evaluate", str(records / "test.pt"), "--policy", "threshold",
                         "--param", "threshold=0.7", "--param", "score=entropy", "--json")
    assert code == 0, err
    got = json.loads(out)
    test = ExitRecord.load(records / "test.pt")
    want = evaluate(test, make_policy("threshold", threshold=0.7, score="entropy").decide(test))
    for key in ("accuracy", "compute_saved", "mean_macs", "full_macs", "effectiveness", "effectiveness_block_index",
                "exit_fractions", "exit_accuracy", "accuracy_of_exited"):
        assert got[key] == want[key], key
    assert got["params"]["score"] == "entropy" and got["cal"] is None  # nothing to fit: cal not needed


def test_evaluate_fits_on_the_cal_beside_the_record_and_saves_the_policy(records, capsys):
    code, out, err = run(capsys, "evaluate", str(records / "test.pt"), "--policy", "risk", "--param", "epsilon=0.1",
                         "--param", "mode=crc", "--save-policy", str(records / "risk.pt"), "--json")
    assert code == 0, err
    got = json.loads(out)
    cal, test = ExitRecord.load(records / "cal.pt"), ExitRecord.load(records / "test.pt")
    policy = make_policy("risk", epsilon=0.1, mode="crc").fit(cal)
    assert got["cal"] == str(records / "cal.pt") and got["fitted_lambda"] == pytest.approx(policy.lambda_)
    assert got["guarantee"].startswith("E[risk] <= 0.1")
    assert got["accuracy"] == evaluate(test, policy.decide(test))["accuracy"]
    # the saved file decides the same without a cal record
    code, out2, err = run(capsys, "evaluate", str(records / "test.pt"), "--policy", str(records / "risk.pt"), "--json")
    assert code == 0, err
    assert json.loads(out2)["accuracy"] == got["accuracy"]


def test_evaluate_table(records, capsys):
    code, out, err = run(capsys, "evaluate", str(records / "test.pt"), "--policy", "budget", "--param", "budget=0.6")
    assert code == 0, err
    assert "accuracy" in out and "compute saved" in out and len(out.splitlines()) == 3 + 4


def test_sweep_json_matches_the_package(records, capsys):
    code, out, err = run(capsys, "sweep", str(records / "test.pt"), "--policy", "threshold", "--json")
    assert code == 0, err
    got = json.loads(out)
    cal, test = ExitRecord.load(records / "cal.pt"), ExitRecord.load(records / "test.pt")
    table = sweep("threshold", cal, test)
    assert [p["accuracy"] for p in got["points"]] == table["accuracy"].tolist()
    assert 0 < got["area_under_frontier"] <= got["oracle_area_under_frontier"] <= 1
    assert got["pareto"] and all(0 <= i < len(table) for i in got["pareto"])


@pytest.mark.parametrize("policy", ["static", "patience", "budget", "risk", "oracle"])
def test_sweep_table_for_every_policy(records, capsys, policy):
    code, out, err = run(capsys, "sweep", str(records / "test.pt"), "--policy", policy)
    assert code == 0, err
    assert "Pareto" in out and "area under frontier" in out and len(out.splitlines()) <= 20


def one_line_error(capsys, *argv: str, code: int = 1) -> str:
    got, out, err = run(capsys, *argv)
    assert got == code and out == "" and len(err.strip().splitlines()) == 1, (got, out, err)
    return err


def test_bad_parameters_are_one_line_errors(records, capsys):
    test = str(records / "test.pt")
    assert "[0, 1]" in one_line_error(capsys, "evaluate", test, "--policy", "threshold", "--param", "threshold=2")
    assert "unknown parameter" in one_line_error(capsys, "evaluate", test, "--policy", "threshold", "--param", "q=1")
    assert "KEY=VALUE" in one_line_error(capsys, "evaluate", test, "--policy", "threshold", "--param", "0.9")
    assert "unknown policy" in one_line_error(capsys, "evaluate", test, "--policy", "magic")
    assert "policy name" in one_line_error(capsys, "sweep", test, "--policy", str(records / "cal.pt"))


def test_cal_from_another_model_is_a_one_line_error(records, capsys):
    random_record(k=3, seed=3).save(records / "other_k.pt")
    random_record(seed=3, sha="cd" * 32).save(records / "other_ckpt.pt")
    test = str(records / "test.pt")
    for other in ("other_k.pt", "other_ckpt.pt"):
        err = one_line_error(capsys, "evaluate", test, "--policy", "risk", "--cal", str(records / other))
        assert "different" in err
        assert "different" in one_line_error(capsys, "sweep", test, "--policy", "threshold", "--cal",
                                             str(records / other))


def test_missing_cal_and_foreign_policy_file_are_one_line_errors(records, capsys):
    lonely = records / "lonely"
    lonely.mkdir()
    random_record(seed=4).save(lonely / "test.pt")
    assert "--split cal" in one_line_error(capsys, "sweep", str(lonely / "test.pt"), "--policy", "threshold")
    assert "--split cal" in one_line_error(capsys, "evaluate", str(lonely / "test.pt"), "--policy", "budget")
    err = one_line_error(capsys, "evaluate", str(records / "test.pt"), "--policy", str(records / "cal.pt"))
    assert "not an eelab policy file" in err
    make_policy("risk").fit(random_record(seed=5, sha="ef" * 32)).save(records / "elsewhere.pt")
    assert "refit" in one_line_error(capsys, "evaluate", str(records / "test.pt"), "--policy",
                                     str(records / "elsewhere.pt"))


def test_help(capsys):
    for command in ("evaluate", "sweep"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "--policy" in out and "--cal" in out


def test_policy_help_names_every_registered_policy():
    from eelab.cli import build_parser
    from eelab.policies import POLICIES
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("evaluate", "sweep"):
        text = sub.choices[command].format_help()
        assert [name for name in POLICIES if name not in text] == [], command
