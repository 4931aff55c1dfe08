"""Issue #17: outputs that cannot destroy work, inputs that cannot fake numbers, errors before the work, in one line.

Every example of the issue is a case here (each failed on the code before the fix: it overwrote, accepted, or
ended in an internal error), then a seeded fuzz of malformed records and policy files.
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eelab.inference as inference
import eelab.records as records
import eelab.checkpoint as checkpoint
from eelab.checkpoint import LOCK, claim_run
from eelab.data import load_dataset, load_image
from eelab.ensemble import fit_ensemble, identity_ensemble
from eelab.errors import EelabError, EelabWarning
from eelab.files import save_json, save_torch, write_atomic
from eelab.models import ModelConfig
from eelab.policies import load_policy, make_policy
from eelab.policies.base import Policy
from eelab.published import unpack_archive
from eelab.records import ExitRecord, load_record, load_records, record_checkpoint
from eelab.testing import random_record
from eelab.training import TrainConfig, train

from conftest import tiny_config, write_image_folder
from hostile_helpers import (bomb_png, copy_checkpoint, damage_file, one_line_error, record_dict, record_is_valid,
                             run_cli, strict_json)


def _train_argv(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny_cnn", "--dataset", f"folder:{folder}", "--epochs", "1", "--out", str(out),
            "--batch-size", "6", "--cal-size", "6", "--widths", "4,8", "--head-hidden", "8", "--quiet", *extra]


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint as committed (no state.pt) with cal.pt, test.pt and summary.json beside."""
    ck = copy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("recorded") / "ck")
    for split in ("cal", "test"):
        record_checkpoint(ck, split, progress=False).save(ck / f"{split}.pt")
    save_json({"model": "tiny_cnn"}, ck / "summary.json")
    return ck


def _retrained(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint whose model.pt now holds other weights, as a later training into the folder would
    leave it, with the old run's records (cal.pt, test.pt) still beside: `cp old/{cal,test}.pt ck/`."""
    ck = copy_checkpoint(src, dst)
    weights = torch.load(ck / "model.pt", weights_only=True)
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 0.01
    torch.save(weights, ck / "model.pt")
    return ck


def _no_work(monkeypatch, *targets: tuple[object, str]) -> None:
    """Make the expensive step fail loudly, so a test proves a check came before it."""
    for owner, name in targets:
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail(f"{name} ran before the output was checked"))


# ============================================================================ 1. an output never destroys work

def test_train_into_a_committed_checkpoint_without_state_is_refused(tmp_path, capsys, recorded, tiny_folder):
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    one_line_error(capsys, _train_argv(tiny_folder, ck), "already holds a training run", "--overwrite")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before          # nothing replaced, nothing added


def test_overwrite_removes_the_old_runs_records_summary_and_policies(tmp_path, capsys, recorded, tiny_folder):
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    make_policy("threshold").save(ck / "my_policy.pt")
    (ck / "notes.txt").write_text("mine")
    old_weights = (ck / "model.pt").read_bytes()
    code, _, err = run_cli(capsys, _train_argv(tiny_folder, ck, "--overwrite", "--seed", "5"))
    assert code == 0, err
    names = {p.name for p in ck.iterdir()}
    assert not {"cal.pt", "test.pt", "summary.json", "my_policy.pt", LOCK} & names
    assert {"model.pt", "config.json", "history.json", "state.pt", "notes.txt"} <= names
    assert (ck / "model.pt").read_bytes() != old_weights


def test_overwrite_removes_every_file_of_eelabs_kinds_whatever_its_name(tmp_path, capsys, recorded, tiny_folder):
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    make_policy("threshold").fit(load_record(ck / "cal.pt")).save(ck / "risk.pol")
    identity_ensemble(2, 3).save(ck / "ens.pt")
    (ck / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, _train_argv(tiny_folder, ck, "--overwrite", "--seed", "5"))
    assert code == 0, err
    names = {p.name for p in ck.iterdir()}
    assert not {"risk.pol", "ens.pt", "cal.pt", "test.pt"} & names and "notes.txt" in names


def test_an_overwrite_that_fails_leaves_the_old_run_whole(tmp_path, capsys, recorded, tiny_folder, monkeypatch):
    import eelab.training as training
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    one_line_error(capsys, _train_argv(tiny_folder, ck, "--overwrite", "--translate", "100"), "--translate")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    monkeypatch.setattr(training, "_train_epoch", lambda *a, **k: (_ for _ in ()).throw(EelabError("disk full")))
    code, _, err = run_cli(capsys, _train_argv(tiny_folder, ck, "--overwrite"))   # after the cal-split warning
    assert code == 1 and err.splitlines()[-1] == "eelab train: error: disk full", err
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_a_second_training_into_a_claimed_directory_is_refused(tmp_path, capsys, tiny_folder):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (out / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        one_line_error(capsys, _train_argv(tiny_folder, out), "in use by another training", str(other.pid))
        assert not (out / "model.pt").exists()
    finally:
        other.kill()
        other.wait()


def test_a_crashed_runs_lock_is_stale_and_taken_over(tmp_path, capsys, tiny_folder):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    code, _, err = run_cli(capsys, _train_argv(tiny_folder, out))
    assert code == 0, err
    assert not (out / LOCK).exists()                                          # released after the run


def test_two_runs_taking_over_one_stale_lock_cannot_both_hold_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    real, judged = checkpoint._lock_holder, threading.Barrier(2, timeout=1)

    def slow(lock):
        holder = real(lock)
        if holder is None:          # both judge the old lock stale before either removes it: the race, made wide
            try:
                judged.wait()
            except threading.BrokenBarrierError:
                pass
            if threading.current_thread().name == "second":
                import time
                time.sleep(0.3)     # the first has removed the stale lock and made its own by now
        return holder
    monkeypatch.setattr(checkpoint, "_lock_holder", slow)
    outcomes = []

    def claim():
        try:
            checkpoint._take_lock(out)
            outcomes.append("held")
        except EelabError:
            outcomes.append("refused")
    threads = [threading.Thread(target=claim, name=name) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused"]


def test_claim_run_locks_and_releases(tmp_path):
    with claim_run(tmp_path / "r") as out:
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(EelabError, match="in use by another training"):
            with claim_run(out):                                              # our own live pid holds it
                pass
    assert not (tmp_path / "r" / LOCK).exists()


def test_record_over_model_weights_is_refused_before_the_forward_pass(tmp_path, capsys, recorded, monkeypatch):
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    weights = (ck / "model.pt").read_bytes()
    _no_work(monkeypatch, (records, "record_checkpoint"))
    one_line_error(capsys, ["record", ck, "--split", "test", "--out", ck / "model.pt", "--quiet"],
                   "model weights", "--overwrite")
    assert (ck / "model.pt").read_bytes() == weights


def test_a_policy_saved_over_a_record_is_refused(tmp_path, capsys, recorded, monkeypatch):
    test = tmp_path / "test.pt"
    test.write_bytes((recorded / "test.pt").read_bytes())
    with pytest.raises(EelabError, match="exit record"):
        make_policy("threshold").save(test)                                   # Python API: the same check
    _no_work(monkeypatch, (Policy, "decide"))
    one_line_error(capsys, ["evaluate", recorded / "test.pt", "--policy", "threshold", "--save-policy", test],
                   "--save-policy", "exit record")
    load_record(test)                                                          # still the record


def test_a_record_saved_over_a_policy_is_refused_and_overwrite_replaces_it(tmp_path, recorded):
    target = tmp_path / "p.pt"
    make_policy("threshold").save(target)
    rec = load_record(recorded / "test.pt")
    with pytest.raises(EelabError, match="policy file"):
        rec.save(target)
    rec.save(target, overwrite=True)
    assert load_record(target).n == rec.n


def test_records_of_another_model_beside_a_checkpoint_are_refused(tmp_path, capsys, recorded):
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    for split in ("cal", "test"):                                             # as an old run would leave them
        rec = load_record(ck / f"{split}.pt")
        torch.save(replace(rec, meta={**rec.meta, "checkpoint_sha256": "0" * 64}).to_dict(), ck / f"{split}.pt")
    with pytest.raises(EelabError, match=r"different checkpoints \(000000000000 vs"):
        load_records(ck)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    one_line_error(capsys, ["predict", ck, img, "--policy", "risk"], "cal.pt", "different checkpoints")


def _fitted_elsewhere(recorded: Path) -> Policy:
    """A policy fitted on the cal record of another checkpoint (the hash in its fit info is not this one's)."""
    cal = load_record(recorded / "cal.pt")
    elsewhere = replace(cal, meta={**cal.meta, "checkpoint_sha256": "0" * 64})
    return make_policy("threshold", temperature=True).fit(elsewhere)


def test_a_policy_of_another_checkpoint_is_refused_however_it_is_given(tmp_path, capsys, recorded):
    from eelab.export import export_onnx
    policy = _fitted_elsewhere(recorded)
    policy.save(tmp_path / "risk.pol")                                          # any suffix
    for given in (policy, load_policy(tmp_path / "risk.pol"), tmp_path / "risk.pol"):  # an object, loaded, a path
        with pytest.raises(EelabError, match=r"different checkpoints \(000000000000 vs .*refit") as e:
            inference.EarlyExitPredictor.from_checkpoint(recorded, given)
        assert "\n" not in str(e.value)
    with pytest.raises(EelabError, match="different checkpoints"):
        export_onnx(recorded, tmp_path / "onnx", policy=policy)
    assert not list((tmp_path / "onnx").glob("*"))                              # no graph written
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    one_line_error(capsys, ["predict", recorded, img, "--policy", tmp_path / "risk.pol"], "different checkpoints",
                   "refit")


def test_a_policy_decides_only_on_the_outputs_it_was_fitted_on(tmp_path, capsys):
    cal = random_record(60, 3, 4, seed=3, sha="a" * 64)
    policy = make_policy("threshold", temperature=True).fit(cal)
    with pytest.raises(EelabError, match=r"different checkpoints \(aaaaaaaaaaaa vs bbbbbbbbbbbb\)"):
        policy.decide(random_record(40, 3, 4, seed=4, sha="b" * 64))
    assert policy.decide(random_record(40, 3, 4, seed=4, sha="a" * 64)).shape == (40,)   # its own checkpoint
    assert policy.decide(random_record(40, 3, 4, seed=4)).shape == (40,)                # a synthetic record: no hash
    ens = identity_ensemble(3, 4)
    test = random_record(40, 3, 4, seed=4, sha="a" * 64)
    with pytest.raises(EelabError, match="used without that ensemble"):
        make_policy("threshold").fit(ens.apply(cal)).decide(test)
    with pytest.raises(EelabError, match="is for plain exits"):
        policy.decide(ens.apply(test))
    # and on the command line, a policy file fitted elsewhere
    policy.save(tmp_path / "p.pt")
    random_record(40, 3, 4, seed=4, sha="b" * 64).save(tmp_path / "test.pt")
    one_line_error(capsys, ["evaluate", tmp_path / "test.pt", "--policy", tmp_path / "p.pt"], "different checkpoints",
                   "refit")


def test_a_record_is_never_written_beside_another_checkpoints_model(tmp_path, capsys, recorded, monkeypatch):
    other = _retrained(recorded, tmp_path / "other")
    with pytest.raises(EelabError, match="different checkpoints"):
        load_record(recorded / "test.pt").save(other / "mine.pt")
    assert not (other / "mine.pt").exists()
    _no_work(monkeypatch, (records, "record_checkpoint"))
    one_line_error(capsys, ["record", recorded, "--split", "test", "--out", other / "test.pt", "--overwrite"],
                   "different checkpoints", "own folder")


def test_evaluate_and_sweep_refuse_records_left_beside_a_newer_model(tmp_path, capsys, recorded):
    ck = _retrained(recorded, tmp_path / "ck")
    for argv in (["evaluate", ck / "test.pt", "--policy", "risk"], ["evaluate", ck / "test.pt", "--policy", "static"],
                 ["sweep", ck / "test.pt", "--policy", "threshold"],
                 ["evaluate", recorded / "test.pt", "--policy", "risk", "--cal", ck / "cal.pt"]):
        one_line_error(capsys, argv, "model.pt", "different checkpoints", "eelab record")


def test_stale_temp_files_are_cleaned_on_the_next_write(tmp_path):
    target = tmp_path / "model.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".model.pt.{dead.pid}.x1y2.tmp", tmp_path / ".model.pt.abc123.tmp"]
    live = tmp_path / f".model.pt.{os.getpid()}.zz.tmp"                         # a writer still at work
    for f in stale + [live]:
        f.write_bytes(b"half")
    save_torch({"a": torch.ones(2)}, target)
    assert not any(f.exists() for f in stale) and live.exists()
    # resume (claim_run) cleans them as well
    (tmp_path / f".state.pt.{dead.pid}.q.tmp").write_bytes(b"half")
    (tmp_path / "state.pt").write_bytes(b"")
    with claim_run(tmp_path, resume=True):
        assert not (tmp_path / f".state.pt.{dead.pid}.q.tmp").exists()


def test_write_atomic_leaves_no_temp_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "x.pt", lambda tmp: (_ for _ in ()).throw(RuntimeError("disk")))
    assert list(tmp_path.iterdir()) == []


# ============================================================================ 2. numbers are never silently wrong

@pytest.mark.parametrize("change, message", [
    (lambda d: d["logits"].__setitem__((0, 1), float("nan")), "NaN or infinity"),
    (lambda d: d["logits"].__setitem__((2, 0, 1), float("inf")), "NaN or infinity"),
    (lambda d: d["logits"].__setitem__((2, 0), float("-inf")), "NaN or infinity"),   # no finite logit in the row
    (lambda d: d.__setitem__("full_cost", 0.0), "full_cost"),
    (lambda d: d.__setitem__("full_cost", float("nan")), "full_cost"),
    (lambda d: d["labels"].__setitem__(0, 4), "labels must be in [0, 4)"),
    (lambda d: d["labels"].__setitem__(0, -1), "labels must be in [0, 4)"),
    (lambda d: d.update(logits=d["logits"][:0], labels=d["labels"][:0], indices=d["indices"][:0]), "empty"),
    (lambda d: d.__setitem__("costs", torch.tensor([10.0, 5.0, 30.0], dtype=torch.float64)), "non-decreasing"),
    (lambda d: d.__setitem__("costs", torch.tensor([0.0, 5.0, 30.0], dtype=torch.float64)), "above 0"),
    (lambda d: d["costs"].__setitem__(1, float("nan")), "finite"),
    (lambda d: d.__setitem__("labels", d["labels"].float() + 0.5), "whole numbers"),
    (lambda d: d.__setitem__("logits", d["logits"].tolist()), "wrong type"),
    (lambda d: d.__setitem__("costs", "cheap"), "wrong type"),
    (lambda d: d.__setitem__("meta", ["not", "a", "dict"]), "wrong type"),
    (lambda d: d.__setitem__("full_cost", "1e6"), "wrong type"),
])
def test_a_bad_record_is_refused_at_load_and_at_construction(tmp_path, change, message):
    d = record_dict()
    change(d)
    torch.save(d, tmp_path / "r.pt")
    with pytest.raises(EelabError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        load_record(tmp_path / "r.pt")
    assert "\n" not in str(e.value)
    if isinstance(d["logits"], torch.Tensor) and isinstance(d["costs"], torch.Tensor) \
            and isinstance(d["meta"], dict) and isinstance(d["full_cost"], float):
        with pytest.raises(EelabError):                                       # the same check, in Python
            ExitRecord(d["logits"], d["labels"], d["indices"], d["costs"], d["full_cost"], d["meta"])


def test_minus_infinity_beside_finite_logits_is_a_probability_of_zero():
    d = record_dict()
    d["logits"][0, 0, 1] = float("-inf")
    assert ExitRecord(d["logits"], d["labels"], d["indices"], d["costs"], 25.0).n == 6


def test_nan_in_cal_stops_evaluate_and_sweep(tmp_path, capsys):
    test = random_record(50, 3, 4, seed=1)
    test.save(tmp_path / "test.pt")
    d = random_record(50, 3, 4, seed=2).to_dict()
    d["logits"][7, 1, :] = float("nan")
    torch.save(d, tmp_path / "cal.pt")
    for policy in (["threshold", "--param", "temperature=true"], ["risk"], ["budget", "--param", "budget=0.8"]):
        one_line_error(capsys, ["evaluate", tmp_path / "test.pt", "--policy", *policy], "cal.pt", "NaN")
    one_line_error(capsys, ["sweep", tmp_path / "test.pt", "--policy", "threshold"], "NaN")


def test_an_empty_test_record_is_refused_by_sweep(tmp_path, capsys):
    random_record(50, 3, 4, seed=2).save(tmp_path / "cal.pt")
    d = random_record(50, 3, 4, seed=1).to_dict()
    d.update(logits=d["logits"][:0], labels=d["labels"][:0], indices=d["indices"][:0])
    torch.save(d, tmp_path / "test.pt")
    one_line_error(capsys, ["sweep", tmp_path / "test.pt", "--policy", "threshold"], "empty")


@pytest.mark.parametrize("changes, flag", [
    ({"lr": float("inf")}, "--lr"), ({"lr": -0.1}, "--lr"), ({"lr": float("nan")}, "--lr"),
    ({"weight_decay": -1e-4}, "--weight-decay"), ({"label_smoothing": 1.5}, "--label-smoothing"),
    ({"distill_temperature": float("inf")}, "--distill-temperature"), ({"seed": 2**70}, "--seed"),
    ({"seed": -1}, "--seed"), ({"loss_weights": (1.0, float("nan"))}, "--loss-weights"),
    ({"image_size": 0}, "--image-size"),
])
def test_training_options_have_ranges_checked_when_the_config_is_made(changes, flag):
    with pytest.raises(EelabError, match=flag):
        TrainConfig(**changes)


@pytest.mark.parametrize("changes, flag", [({"dropout": 1.5}, "--dropout"), ({"dropout": -0.1}, "--dropout"),
                                           ({"head_hidden": 0}, "--head-hidden"), ({"widths": (4, 0)}, "--widths")])
def test_model_options_have_ranges(changes, flag):
    with pytest.raises(EelabError, match=flag):
        ModelConfig(name="tiny_cnn", **changes)


def test_cli_dropout_and_seed_out_of_range_are_one_line_before_any_work(capsys, tmp_path, tiny_folder, monkeypatch):
    import eelab.training as training
    _no_work(monkeypatch, (training, "load_dataset"))
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "a", "--dropout", "1.5"), "--dropout")
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "b", "--seed", str(2**70)), "--seed")
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "c", "--lr", "inf"), "--lr")
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "d", "--threads", "0"), "--threads")


def _stop_after_epoch_1(row):
    if row["epoch"] == 1:
        raise KeyboardInterrupt  # as a Ctrl-C after the first checkpoint


def test_training_that_produces_non_finite_numbers_keeps_the_last_good_checkpoint(tmp_path, tiny_folder):
    out = tmp_path / "run"
    # one step an epoch at an absurd learning rate: the loss of the step is finite, the weights after it are not
    cfg = tiny_config(tiny_folder, epochs=1, batch_size=12, train_samples=12, lr=1e30)
    with pytest.raises(EelabError, match="non-finite") as e:
        train(cfg, out, progress=False)
    assert "\n" not in str(e.value)
    assert not (out / "model.pt").exists() and not (out / "history.json").exists()
    # with a good epoch written first, a bad second epoch leaves the first one intact
    good, cfg = tmp_path / "good", tiny_config(tiny_folder, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, good, progress=False, callback=_stop_after_epoch_1)
    weights = (good / "model.pt").read_bytes()
    import eelab.training as training
    real = training._train_epoch

    def poisoned(cfg, data, parts, net, run, epoch):
        loss = real(cfg, data, parts, net, run, epoch)
        with torch.no_grad():
            next(parts.model.parameters()).fill_(float("nan"))
        return loss
    training._train_epoch = poisoned
    try:
        with pytest.raises(EelabError, match="epoch 1 in .* is kept"):
            train(cfg, good, resume=True, progress=False)
    finally:
        training._train_epoch = real
    assert (good / "model.pt").read_bytes() == weights
    strict_json((good / "history.json").read_text())


def test_a_checkpoint_with_nan_weights_is_refused_where_it_is_loaded(tmp_path, capsys, recorded):
    ck = copy_checkpoint(recorded, tmp_path / "ck")
    weights = torch.load(ck / "model.pt", weights_only=True)
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = torch.full_like(weights[key], float("nan"))
    torch.save(weights, ck / "model.pt")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    one_line_error(capsys, ["predict", ck, img], "NaN or infinite weights")
    one_line_error(capsys, ["record", ck, "--split", "test", "--out", tmp_path / "t.pt"], "NaN or infinite weights")


@pytest.mark.parametrize("param", ["lr=inf", "lr=nan", "lr=1e38", "seed=-1", "steps=0"])
def test_learned_policy_parameters_are_ranged(param, capsys, tmp_path):
    random_record(40, 3, 4, seed=2).save(tmp_path / "cal.pt")
    random_record(40, 3, 4, seed=1).save(tmp_path / "test.pt")
    one_line_error(capsys, ["evaluate", tmp_path / "test.pt", "--policy", "alpha", "--param", param,
                            "--save-policy", tmp_path / "p.pt"], param.split("=")[0])
    assert not (tmp_path / "p.pt").exists()


def test_a_fit_that_produces_nan_stops_and_saves_nothing(tmp_path, capsys, monkeypatch):
    random_record(40, 3, 4, seed=2).save(tmp_path / "cal.pt")
    random_record(40, 3, 4, seed=1).save(tmp_path / "test.pt")
    from eelab.policies.alpha import AlphaPolicy
    real = AlphaPolicy._fit
    monkeypatch.setattr(AlphaPolicy, "_fit",
                        lambda self, cal: {k: v * float("nan") for k, v in real(self, cal).items()})
    make_policy("threshold").save(tmp_path / "p.pt")                           # the last good file
    good = (tmp_path / "p.pt").read_bytes()
    one_line_error(capsys, ["evaluate", tmp_path / "test.pt", "--policy", "alpha", "--param", "steps=3",
                            "--save-policy", tmp_path / "p.pt"], "NaN")
    assert (tmp_path / "p.pt").read_bytes() == good
    with pytest.raises(EelabError, match="NaN"):
        make_policy("alpha", steps=3).fit(load_record(tmp_path / "cal.pt"))


def test_every_json_eelab_writes_is_strict_json(tmp_path, capsys, recorded):
    with pytest.raises(EelabError, match=r"NaN or infinity \(\[1\].loss = nan\)"):
        save_json([{"loss": 1.0}, {"loss": float("nan")}], tmp_path / "h.json")
    assert not (tmp_path / "h.json").exists()
    for name in ("config.json", "history.json", "summary.json"):
        strict_json((recorded / name).read_text())
    for argv in (["evaluate", recorded / "test.pt", "--policy", "threshold", "--json"],
                 ["sweep", recorded / "test.pt", "--policy", "static", "--json"],
                 ["profile", recorded, "--json", "--rounds", "1"]):
        code, out, err = run_cli(capsys, argv)
        assert code == 0, err
        strict_json(out)


# ============================================================================ 3. fail before the work, in one line

def test_train_out_naming_an_existing_file_fails_before_loading_data(tmp_path, capsys, tiny_folder, monkeypatch):
    import eelab.training as training
    (tmp_path / "f").write_text("x")
    _no_work(monkeypatch, (training, "load_dataset"))
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "f"), "is a file, not a directory")


def test_record_out_to_an_impossible_path_fails_before_the_forward_pass(tmp_path, capsys, recorded, monkeypatch):
    (tmp_path / "plain").write_text("x")
    _no_work(monkeypatch, (records, "record_checkpoint"))
    one_line_error(capsys, ["record", recorded, "--split", "test", "--out", tmp_path / "plain" / "sub" / "t.pt"],
                   "is a file, not a folder")
    one_line_error(capsys, ["record", recorded, "--split", "test", "--out", tmp_path], "is a directory")


def test_save_policy_to_a_directory_fails_before_the_evaluation(tmp_path, capsys, recorded, monkeypatch):
    _no_work(monkeypatch, (Policy, "decide"))
    one_line_error(capsys, ["evaluate", recorded / "test.pt", "--policy", "threshold", "--save-policy", tmp_path],
                   "--save-policy", "is a directory")


@pytest.mark.parametrize("flag", ["--batch-size=0", "--batch-size=-3", "--limit=0"])
def test_record_batch_size_and_limit_are_checked_first(flag, tmp_path, capsys, recorded, monkeypatch):
    _no_work(monkeypatch, (records, "record_checkpoint"))
    one_line_error(capsys, ["record", recorded, "--split", "test", "--out", tmp_path / "t.pt", flag],
                   flag.split("=")[0])


@pytest.mark.parametrize("changes", [{"translate": 32}, {"translate": 8, "image_size": 8},
                                     {"translate": 28, "dataset": "mnist"}])
def test_translate_is_bounded_by_the_image_side(changes):
    with pytest.raises(EelabError, match="--translate must be below the image side"):
        TrainConfig(**changes)
    TrainConfig(**{**changes, "translate": changes["translate"] - 1})
    TrainConfig(**changes, augment=False)                                     # not used without augmentation


def test_translate_beyond_a_folders_images_is_one_line_before_the_model_is_built(tmp_path, capsys, tiny_folder,
                                                                                monkeypatch):
    import eelab.training as training
    _no_work(monkeypatch, (training, "_build_model"))
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "a", "--translate", "100"), "--translate", "8 pixels")
    _no_work(monkeypatch, (training, "load_dataset"))
    one_line_error(capsys, _train_argv(tiny_folder, tmp_path / "b", "--translate", "8", "--image-size", "8"),
                   "--translate")


@pytest.mark.parametrize("policy, param", [("alpha", "hidden"), ("alpha", "steps"), ("dqn", "hidden"),
                                           ("dqn", "steps"), ("dqn", "batch_size"), ("dqn", "target_every"),
                                           ("patience", "patience"), ("static", "exit")])
def test_integer_policy_parameters_have_a_maximum(policy, param, tmp_path, capsys, monkeypatch):
    random_record(40, 3, 4, seed=2).save(tmp_path / "cal.pt")
    random_record(40, 3, 4, seed=1).save(tmp_path / "test.pt")
    _no_work(monkeypatch, (Policy, "fit"), (Policy, "decide"))
    err = one_line_error(capsys, ["evaluate", tmp_path / "test.pt", "--policy", policy, "--param",
                                  f"{param}={10**23}"], f"parameter {param}", "24-digit number")
    assert len(err) < 300, err


def test_every_integer_policy_parameter_declares_its_maximum():
    from eelab.policies import POLICIES
    loose = [f"{name}.{key}" for name, cls in POLICIES.items() for key, spec in cls.PARAMS.items()
             if spec.kind == "int" and spec.hi is None]
    assert not loose


def test_every_seed_is_checked_before_the_work(tmp_path, capsys, monkeypatch):
    random_record(40, 3, 4, seed=2).save(tmp_path / "cal.pt")
    with pytest.raises(EelabError, match="--seed"):
        fit_ensemble(load_record(tmp_path / "cal.pt"), seed=2**70)
    _no_work(monkeypatch, (records, "load_record"))
    for seed in (str(10**23), "-1"):
        one_line_error(capsys, ["ensemble", tmp_path / "cal.pt", "--out", tmp_path / "e.pt", "--seed", seed], "--seed")
    with pytest.raises(EelabError, match="--seed"):
        TrainConfig(seed=10**23)


def test_export_to_a_folder_that_cannot_be_made_fails_before_loading(tmp_path, capsys, recorded, monkeypatch):
    import eelab.export as export
    _no_work(monkeypatch, (export, "load_checkpoint"))
    (tmp_path / "plain").write_text("x")
    one_line_error(capsys, ["export", recorded, "--format", "onnx", "--out", tmp_path / "plain" / "sub"],
                   "is a file, not a folder")
    one_line_error(capsys, ["export", recorded, "--format", "onnx", "--out", "/proc/eelab-export"], "/proc")


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, capsys, recorded):
    bomb = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(EelabError, match="bomb.png.*pixels"):
        load_image(bomb)
    one_line_error(capsys, ["predict", recorded, bomb], "bomb.png", "pixels")


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_bomb_or_empty_file_inside_a_folder_dataset_names_the_file(tmp_path, where):
    folder = write_image_folder(tmp_path / "imgs")
    name = "0000.png" if where == "first" else "0003.png"
    bomb_png(folder / "train" / "blue" / name)
    with pytest.raises(EelabError, match=f"blue/{name}"):
        load_dataset(f"folder:{folder}")
    folder2 = write_image_folder(tmp_path / "imgs2")
    (folder2 / "train" / "blue" / name).write_bytes(b"")
    with pytest.raises(EelabError, match=f"blue/{name}.*empty"):
        load_dataset(f"folder:{folder2}")


def test_a_corrupt_archive_is_named_and_nothing_is_unpacked(tmp_path):
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            data = os.urandom(3000)
            info = tarfile.TarInfo(f"cifar10-jpeg/train/a/{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    raw[3584 + 10:3584 + 200] = b"x" * 190          # the second member's header, damaged
    archive = tmp_path / "cifar10-jpeg.tar"
    archive.write_bytes(bytes(raw))
    with pytest.raises(EelabError, match="cifar10-jpeg.tar is corrupt"):
        unpack_archive(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_directories_and_fifos_as_images_say_what_they_are(tmp_path, capsys, recorded):
    one_line_error(capsys, ["predict", recorded, tmp_path], "is a directory")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    one_line_error(capsys, ["predict", recorded, fifo], "not a regular file")


def test_a_bad_image_among_many_fails_before_any_stage_runs(tmp_path, capsys, recorded, monkeypatch):
    paths = []
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    _no_work(monkeypatch, (inference.EarlyExitPredictor, "stream"))
    one_line_error(capsys, ["predict", recorded, *paths, tmp_path / "missing.png"], "missing.png", "does not exist")


def test_resume_without_history_gives_advice_that_works(tmp_path, tiny_folder):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_folder, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, callback=_stop_after_epoch_1)
    (out / "history.json").unlink()
    with pytest.raises(EelabError) as e:
        train(cfg, out, resume=True, progress=False)
    assert "without --resume" not in str(e.value) and "--overwrite" in str(e.value)
    train(cfg, out, overwrite=True, progress=False)                          # the advice works
    strict_json((out / "history.json").read_text())


# ============================================================================ 4. datasets that make no sense

def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    folder = write_image_folder(tmp_path / "imgs")
    (folder / "train" / "purple").mkdir()
    with pytest.raises(EelabError, match="train/purple holds no images"):
        load_dataset(f"folder:{folder}")


def test_a_one_class_folder_is_refused(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs")
    for split in ("train", "test"):
        for name in ("green", "blue"):
            for f in (folder / split / name).iterdir():
                f.unlink()
            (folder / split / name).rmdir()
    with pytest.raises(EelabError, match="one class folder"):
        load_dataset(f"folder:{folder}")
    one_line_error(capsys, _train_argv(folder, tmp_path / "run"), "one class folder")


def test_few_cal_images_of_a_class_warn_in_one_line(tmp_path, capsys, tiny_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(tiny_folder, epochs=1), tmp_path / "a", progress=False)
    assert any(issubclass(w.category, EelabWarning) and "fewer than 10 images in the cal split" in str(w.message)
               for w in caught)
    code, _, err = run_cli(capsys, _train_argv(tiny_folder, tmp_path / "b"))
    assert code == 0
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and lines[0].startswith("eelab train: warning:") and "cal split" in lines[0]


# ============================================================================ 5. memory stays bounded

def test_predict_decodes_and_runs_in_bounded_batches(tmp_path, recorded, monkeypatch):
    """No more than --batch images are ever decoded ahead of stage 0, and no stage runs on more than --batch rows."""
    for i in range(23):
        Image.fromarray(np.full((8, 8, 3), (i * 11) % 255, np.uint8)).save(tmp_path / f"{i:02d}.png")
    paths = sorted(tmp_path.glob("*.png"))
    pred = inference.EarlyExitPredictor.from_checkpoint(recorded, "threshold", {"threshold": "0.5"})
    seen = {"decoded": 0, "stage0": 0, "ahead": 0, "rows": []}
    real_load = inference.load_image

    def counting_load(*a, **k):
        seen["decoded"] += 1
        seen["ahead"] = max(seen["ahead"], seen["decoded"] - seen["stage0"])
        return real_load(*a, **k)
    real_stage = pred.model.forward_stage

    def counting_stage(k, h):
        seen["rows"].append(h.shape[0])
        if k == 0:
            seen["stage0"] += h.shape[0]
        return real_stage(k, h)
    monkeypatch.setattr(inference, "load_image", counting_load)
    monkeypatch.setattr(pred.model, "forward_stage", counting_stage)
    out = list(pred.stream_files(paths, batch=4))
    assert [p.source for p in out] == [str(p) for p in paths]
    assert seen["decoded"] == 23 and seen["ahead"] <= 4 and max(seen["rows"]) <= 4


# ============================================================================ fuzz

def _mutate_record(rng: random.Random, d: dict) -> dict | bytes:
    """One random malformation of a valid record dict (or of its bytes)."""
    choice = rng.randrange(12)
    key = rng.choice(["logits", "labels", "indices", "costs", "confidences", "full_cost", "meta", "format",
                      "format_version"])
    if choice == 0:                                                 # wrong type
        d[key] = rng.choice([None, "x", 3, 2.5, [1, 2], {"a": 1}, torch.tensor(1.0), True])
    elif choice == 1 and isinstance(d.get(key), torch.Tensor):      # wrong dtype
        d[key] = d[key].to(rng.choice([torch.bool, torch.int32, torch.float16, torch.complex64, torch.uint8,
                                       torch.float64]))
    elif choice == 2 and isinstance(d.get(key), torch.Tensor):      # wrong shape
        t = d[key]
        d[key] = rng.choice([t.reshape(-1), t.unsqueeze(0), t[:max(0, t.shape[0] - 1)], torch.cat([t, t]),
                             t[..., :0] if t.ndim else t])
    elif choice == 3:                                               # NaN / inf somewhere
        k2 = rng.choice(["logits", "costs", "confidences"])
        if isinstance(d.get(k2), torch.Tensor) and d[k2].numel():
            flat = d[k2].reshape(-1)
            flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
        else:
            d["full_cost"] = rng.choice([float("nan"), float("inf"), -1.0, 0.0])
    elif choice == 4:                                               # empty
        for k2 in ("logits", "labels", "indices", "confidences"):
            if isinstance(d.get(k2), torch.Tensor):
                d[k2] = d[k2][:0]
    elif choice == 5:                                               # missing field
        d.pop(key, None)
    elif choice == 6 and isinstance(d.get("labels"), torch.Tensor):  # labels out of range or fractional
        d["labels"] = d["labels"] + rng.choice([-10, 4, 100]) if rng.random() < 0.7 else d["labels"].float() + 0.25
    elif choice == 7 and isinstance(d.get("costs"), torch.Tensor):   # costs not rising or not positive
        d["costs"] = d["costs"].flip(0) if rng.random() < 0.5 else d["costs"] - 20
    elif choice == 8:                                               # not a dict at all
        buf = io.BytesIO()
        torch.save(rng.choice([[1, 2], "record", torch.zeros(3)]), buf)
        return buf.getvalue()
    elif choice == 9:                                               # format tags
        d["format_version"] = rng.choice([0, 2, "1", 1.0, None])
    # 10, 11: bytes damaged below
    buf = io.BytesIO()
    torch.save(d, buf)
    raw = buf.getvalue()
    if choice == 10:
        return raw[:rng.randrange(len(raw))]                        # truncated at a random offset
    if choice == 11:
        raw = bytearray(raw)
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return d


def test_fuzz_malformed_records_load_or_raise_one_line(tmp_path):
    rng = random.Random(1717)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(400):
        d = record_dict(n=rng.randrange(1, 6), k=rng.randrange(1, 4), c=rng.randrange(2, 5), seed=case,
                        conf=rng.random() < 0.3)
        for _ in range(rng.randrange(1, 3)):
            out = _mutate_record(rng, d)
            if not isinstance(out, dict):
                break
            d = out
        path = tmp_path / f"r{case}.pt"
        if isinstance(out, dict):
            torch.save(out, path)
        else:
            path.write_bytes(out)
        try:
            rec = load_record(path)
        except EelabError as e:
            assert type(e) is EelabError and "\n" not in str(e) and str(e), (case, e)
            outcomes["refused"] += 1
            if isinstance(out, dict):
                assert not record_is_valid(out), (case, str(e))           # refused only what is wrong
            continue
        outcomes["loaded"] += 1
        on_disk = torch.load(path, weights_only=True)
        assert record_is_valid(on_disk), case                              # loaded only what is right
        assert rec.logits.dtype == torch.float32 and rec.labels.dtype == torch.int64
    assert outcomes["refused"] > 250 and outcomes["loaded"] > 5, outcomes


def _fitted_policies() -> list[Policy]:
    cal = random_record(60, 3, 4, seed=3)
    return [make_policy("threshold"), make_policy("budget", budget=0.8).fit(cal), make_policy("risk").fit(cal),
            make_policy("alpha", steps=3).fit(cal), make_policy("threshold", temperature=True).fit(cal)]


def test_fuzz_malformed_policy_files_load_or_raise_one_line(tmp_path):
    rng = random.Random(1718)
    bases = []
    for i, policy in enumerate(_fitted_policies()):
        policy.save(tmp_path / f"base{i}.pt")
        bases.append(torch.load(tmp_path / f"base{i}.pt", weights_only=True))
    refused = loaded = 0
    for case in range(300):
        d = json.loads(json.dumps({k: v for k, v in rng.choice(bases).items() if k != "fitted"}))
        base = rng.choice(bases)
        d = {**d, "fitted": {k: v.clone() for k, v in base["fitted"].items()}, "name": base["name"],
             "params": dict(base["params"]), "info": dict(base["info"])}
        choice = rng.randrange(9)
        if choice == 0:
            d[rng.choice(["params", "fitted", "given", "info", "name"])] = rng.choice([None, 3, "x", [1], {"a": 1}])
        elif choice == 1 and d["fitted"]:
            k = rng.choice(list(d["fitted"]))
            t = d["fitted"][k]
            d["fitted"][k] = rng.choice([t.reshape(-1)[:max(0, t.numel() - 1)], t.unsqueeze(0), torch.cat(
                [t.reshape(-1), t.reshape(-1)]), t.to(torch.complex64), torch.zeros(0), t * float("nan")])
        elif choice == 2 and d["params"]:
            k = rng.choice(list(d["params"]))
            d["params"][k] = rng.choice([float("nan"), float("inf"), -5, "abc", [1, 2], None, 10**30])
            d["given"] = sorted(set(d.get("given") or []) | {k})
        elif choice == 3:
            d["info"]["k"] = rng.choice([0, -1, "3", 2, 7, None, 3.0])
        elif choice == 4:
            d["info"]["c"] = rng.choice([0, "4", 1, 9, None])
        elif choice == 5:
            d["format_version"] = rng.choice([0, 9, "1", None])
        path = tmp_path / f"p{case}.pt"
        torch.save(d, path)
        if choice in (6, 7):
            damage_file(rng, path, "truncate" if choice == 6 else "flip")
        try:
            policy = load_policy(path)
        except EelabError as e:
            assert type(e) is EelabError and "\n" not in str(e) and str(e), (case, e)
            refused += 1
            continue
        loaded += 1
        # loaded means usable: no NaN fitted, and it decides on a record of the exits and classes it was fitted on
        assert all(not torch.isnan(v).any() for v in policy.fitted.values() if v.is_floating_point()), case
        if policy.fitted:
            rec = random_record(8, policy.info["k"], policy.info["c"], seed=case)
            exits = policy.decide(rec)
            assert exits.shape == (8,) and int(exits.min()) >= 0 and int(exits.max()) < rec.k, case
    assert refused > 100 and loaded > 30, (refused, loaded)
