import json
import subprocess
import sys
from dataclasses import fields, replace

import pytest
import torch

from eelab.cli import build_parser, main
from eelab.errors import EelabError
from eelab.models import ModelConfig
from eelab.training import TrainConfig, train

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
    # resuming a finished run is a no-op, with or without its options again; changing its config is refused in one
    # line, the same line Python's train(..., resume=True) gives for the same change
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--epochs", "5", "--head", "linear"],
                          "but --head, --epochs changed; drop them or train into a new --out")
    saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text())["train"])
    with pytest.raises(EelabError) as e:
        train(replace(saved, epochs=5, model=replace(saved.model, head="linear")), out, resume=True, progress=False)
    assert err == f"eelab train: error: {e.value}\n"
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
    _one_line_error(capsys, ["train", "--epochs", "0", "--out", "x"], "--epochs must be at least 1, got 0")
    _one_line_error(capsys, ["train", "--optimizer", "adam", "--out", "x"], "unknown optimizer 'adam'")
    _one_line_error(capsys, ["train", "--widths", "4,0", "--out", "x"], "positive whole numbers")
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


# every flag each subcommand has (train: the flags of the old code before the options were generated, then the
# fast recipe's of issue #14)
OLD_FLAGS = {
    "train": "--model --dataset --epochs --out --batch-size --optimizer --lr --weight-decay --schedule "
             "--label-smoothing --loss-weights --distill --distill-temperature --heads-only --plain --init --objective "
             "--cost-weight --train-samples --cal-size --no-augment --precision --seed --head --head-hidden --dropout "
             "--widths --exits-after --exits-schedule --num-exits --image-size --threads --half-weights --resume "
             "--quiet --json --overwrite --momentum --bn-lr-scale --ema --whiten --translate --flip --head-lr-scale "
             "--lookahead",
    "record": "--split --out --limit --batch-size --precision --threads --quiet --json --overwrite",
    "evaluate": "--policy --param --cal --save-policy --json --overwrite --ensemble",
    "sweep": "--policy --cal --json --ensemble",
    "predict": "--policy --param --precision --batch --threads --json --ensemble",
    "bench": "--policy --param --precision --images --batch --batch-images --rounds --stream --threads --json "
             "--ensemble",
    "ensemble": "--out --seed --fraction --json --overwrite",
    "profile": "--batch --rounds --precision --threads --json",
}


def _flags(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {f for a in sub.choices[command]._actions for f in a.option_strings} - {"-h", "--help"}


def test_every_config_field_is_a_train_option_and_old_flags_still_work():
    flags = _flags("train")
    assert set(OLD_FLAGS["train"].split()) <= flags
    derived = {"num_classes", "in_channels", "confidence"}
    for owner in (TrainConfig, ModelConfig):
        for f in fields(owner):
            if f.name in derived or (owner is TrainConfig and f.name == "model"):
                continue
            flag = {"name": "--model", "augment": "--no-augment"}.get(f.name, "--" + f.name.replace("_", "-"))
            assert flag in flags, flag
    assert not {"--num-classes", "--in-channels", "--confidence", "--name"} & flags
    a = build_parser().parse_args(["train", "--out", "o", "--model", "resnet50", "--no-augment", "--heads-only",
                                   "--plain", "--loss-weights", "1,2,3", "--widths", "4,8", "--exits-after", "a,b",
                                   "--lr", "0.5", "--eval-batch-size", "9"])
    assert (a.model, a.augment, a.heads_only, a.plain, a.loss_weights, a.widths, a.exits_after, a.lr,
            a.eval_batch_size) == ("resnet50", False, True, True, (1.0, 2.0, 3.0), (4, 8), ("a", "b"), 0.5, 9)
    a = build_parser().parse_args(["train", "--out", "o"])
    assert a.epochs is None and a.augment is None and a.model is None      # not given: the config's default


def test_train_help_shows_the_dataclass_defaults_and_choices(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 30)", "(default: ee_cnn)", "(default: 64,128,256,512)", "(default: 0.0005)",
                  "{sgd,adamw}", "{linear,mlp,conv}", "{even,pareto,golden,fine}", "{auto,fp32,bf16,fp16}"):
        assert shown in out, shown


@pytest.mark.parametrize("command", sorted(OLD_FLAGS))
def test_each_subcommand_keeps_its_shared_flags(command, capsys):
    flags = _flags(command)
    assert flags == set(OLD_FLAGS[command].split()) | ({"--eval-batch-size"} if command == "train" else set())
    positional = {"train": [], "record": ["ck", "--split", "test"], "evaluate": ["r.pt", "--policy", "static"],
                  "sweep": ["r.pt", "--policy", "static"], "predict": ["ck", "x.png"], "bench": ["ck"],
                  "profile": ["ck"], "ensemble": ["cal.pt"]}[command]
    out = ["--out", "o"] if command in ("train", "record", "ensemble") else []
    a = build_parser().parse_args([command, *positional, *out, "--json"]
                                  + (["--threads", "2"] if "--threads" in flags else []))
    assert a.json is True and getattr(a, "threads", 2) == 2


def test_policy_help_lists_the_registry(capsys):
    from eelab.policies import POLICIES
    for command in ("evaluate", "sweep", "predict", "bench"):
        assert main([command, "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert ", ".join(POLICIES) in out, command
