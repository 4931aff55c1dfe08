import json
import subprocess
import sys

import pytest
import torch

from eelab.cli import main

from conftest import write_image_folder


def _one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "record"):
        assert cmd in out
    assert main(["train", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_train_then_record_end_to_end(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny_cnn", "--dataset", f"folder:{folder}", "--epochs", "1", "--out", str(out),
            "--batch-size", "6", "--cal-size", "6", "--head-hidden", "8", "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["history"]) == 1 and len(summary["costs"]) == 2
    assert main(["record", str(out), "--split", "test", "--out", str(tmp_path / "test.pt"), "--quiet", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["shape"] == [9, 2, 3]
    # resuming a finished run is a no-op; changing its config on resume is refused in one line
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--epochs", "5"], "epochs")
    _one_line_error(capsys, argv, "already holds a training run")


def test_errors_are_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["record", str(tmp_path / "nope"), "--split", "test", "--out", "x.pt"], "does not exist")
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "config.json").write_text('{"hello": 1}')
    _one_line_error(capsys, ["record", str(tmp_path / "notckpt"), "--split", "test", "--out", "x.pt"],
                    "not an eelab checkpoint")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "o"), "--dataset", "nope"], "unknown dataset")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "o"), "--model", "resnet9000", "--quiet",
                             "--dataset", f"folder:{write_image_folder(tmp_path / 'i')}"], "unknown model")
    _one_line_error(capsys, ["train", "--out", str(tmp_path / "o"), "--quiet",
                             "--dataset", f"folder:{tmp_path / 'i'}"], "lower --cal-size")
    _one_line_error(capsys, ["train", "--epochs", "two", "--out", "x"], "invalid int value")
    _one_line_error(capsys, ["train"], "--out")
    _one_line_error(capsys, ["bogus"], "invalid choice")


def test_checkpoint_of_another_architecture_and_corrupt_weights(tiny_checkpoint, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    w = torch.load(bad / "model.pt", weights_only=True)
    w["stages.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(w, bad / "model.pt")
    _one_line_error(capsys, ["record", str(bad), "--split", "test", "--out", str(tmp_path / "r.pt")],
                    "another architecture")
    raw = (tiny_checkpoint / "model.pt").read_bytes()
    (bad / "model.pt").write_bytes(raw[:100])
    _one_line_error(capsys, ["record", str(bad), "--split", "test", "--out", str(tmp_path / "r.pt")],
                    "not a checkpoint weights")


def test_installed_command_runs_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "eelab.cli"]
    ok = subprocess.run(exe + ["--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "record" in ok.stdout
    bad = subprocess.run(exe + ["record", str(tmp_path / "x"), "--split", "test", "--out", "r.pt"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
