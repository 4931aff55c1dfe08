"""ee_resnet18, exits on torchvision classifiers, exit placement by cost, the CEED two-step flow, and the CLI."""
import json
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from eelab.cli import build_parser, main
from eelab.errors import EelabError
from eelab.models import (FACTORIES, ModelConfig, MultiExitNet, attach_exits, build_model, count_parameters,
                          list_cut_points, measure_costs, place_exits, plan_exits, schedule_fractions)
from eelab.training import train

from conftest import tiny_config, write_image_folder


def _macs(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() // 2


def _weights(path):
    return torch.load(path / "model.pt", weights_only=True)


def test_ee_resnet18_is_a_cifar_resnet18_with_four_exits():
    m = build_model(ModelConfig(name="ee_resnet18", num_classes=10)).eval()
    assert m.num_exits == 4
    # torchvision's resnet18 body (11.17 M parameters, its fc 10-way) plus three mlp exit heads
    heads = sum(count_parameters(h) for h in m.heads[:3])
    assert count_parameters(m) - heads == 11_173_962
    costs, full = measure_costs(m, (3, 32, 32))
    assert 555e6 < full < 556e6                       # CIFAR ResNet-18: about 556 M MACs at 32x32
    assert all(a < b for a, b in zip(costs, costs[1:])) and full < costs[-1]
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(m.forward_plain(x), out[:, -1])
    # no max-pool and a stride-1 stem: stage 0 keeps 32x32
    assert m.forward_stage(0, x).shape == (2, 64, 32, 32)


def _small_vgg() -> nn.Module:
    """A torchvision VGG with narrow features and classifier: vgg11's 100 M-parameter classifier takes seconds to
    initialise, and the family's layout (features, avgpool, flatten, classifier) is what is under test."""
    from torchvision.models.vgg import VGG, make_layers

    with torch.device("meta"):  # built without memory, then given real, small parts
        m = VGG(make_layers([8, "M", 512, "M"]), num_classes=5, init_weights=False)
    m.features = make_layers([8, "M", 16, "M", 16, 16, "M", 32, "M"], batch_norm=True)
    m.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 5))
    return m


def _family_model(name: str) -> tuple[nn.Module, int]:
    """(a torchvision classifier of the family, its input channels): the factories' own builder, 1 channel."""
    from eelab.models import bare_torchvision

    if name == "vgg":
        return _small_vgg(), 3
    return bare_torchvision(ModelConfig(name=name, num_classes=5, in_channels=1)), 1


# one per family, with a cut inside a stage where the family allows it and a child of features by position
FAMILIES = [("resnet18", ("layer1", "layer2.0", "layer3")),
            ("vgg", ("features.3", "features.6", "features.13")),
            ("densenet121", ("features.denseblock1", "features.6")),
            ("mobilenet_v2", ("features.3", "features.6", "features.13"))]


@pytest.mark.parametrize("name,after", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_last_exit_equals_the_original_classifier(name, after):
    torch.manual_seed(0)
    original, ch = _family_model(name)
    original.eval()
    x = torch.randn(2, ch, 32, 32)
    with torch.no_grad():
        want = original(x)
        want_macs = _macs(lambda: original(x[:1]))
    net = attach_exits(original, after, head="linear").eval()
    assert isinstance(net, MultiExitNet) and net.num_exits == len(after) + 1
    with torch.no_grad():
        h, outs = x, []
        for k in range(net.num_exits):                  # stage by stage, as inference runs it
            h = net.forward_stage(k, h)
            outs.append(net.forward_head(k, h))
        torch.testing.assert_close(outs[-1], want)
        torch.testing.assert_close(net(x)[:, -1], want)
        assert all(o.shape == (2, 5) for o in outs)
    costs, full = measure_costs(net, (ch, 32, 32))
    assert full == want_macs                            # the plain network is the original, MAC for MAC
    assert all(a < b for a, b in zip(costs, costs[1:]))


def test_bad_cuts_are_one_line_errors():
    m = torchvision.models.resnet18(weights=None, num_classes=3)
    with pytest.raises(EelabError, match="no layer 'layer9'"):
        attach_exits(m, ["layer9"])
    with pytest.raises(EelabError, match="forward order"):
        attach_exits(m, ["layer2", "layer1"])
    with pytest.raises(EelabError, match="leaves nothing for the last stage"):
        attach_exits(m, ["layer1", "layer4"])
    with pytest.raises(EelabError, match="cannot cut inside layer1.0"):
        attach_exits(m, ["layer1.0.conv1"])
    with pytest.raises(EelabError, match="torchvision ResNet, VGG, DenseNet or MobileNetV2"):
        attach_exits(nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"])


def test_schedules_hand_computed():
    phi = (1 + math.sqrt(5)) / 2
    assert schedule_fractions("even", 4) == pytest.approx([0.25, 0.5, 0.75])
    assert schedule_fractions("pareto", 4) == pytest.approx([0.2, 0.36, 0.488])
    assert schedule_fractions("golden", 4) == pytest.approx([phi ** -3, phi ** -2, phi ** -1])
    assert schedule_fractions("golden", 4) == pytest.approx([0.2361, 0.3820, 0.6180], abs=1e-4)
    assert schedule_fractions("fine", 3) == pytest.approx([0.05, 0.0975])
    with pytest.raises(EelabError, match="unknown exit schedule"):
        schedule_fractions("cubic", 4)
    with pytest.raises(EelabError, match="at least 2"):
        schedule_fractions("even", 1)


@pytest.mark.parametrize("schedule", ["even", "pareto", "golden"])
def test_place_exits_matches_a_slow_prefix_by_prefix_count(schedule):
    m = torchvision.models.resnet18(weights=None, num_classes=3)
    cands = list_cut_points(m)
    assert cands == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0"]
    chosen = place_exits(m, cands, 4, schedule, (3, 32, 32))
    # slow and obvious: MACs of the network up to each candidate, one cut at a time
    full = _macs(lambda: m.eval()(torch.zeros(1, 3, 32, 32)))
    frac = []
    for c in cands:
        net = attach_exits(m, [c]).eval()
        frac.append(_macs(lambda: net.forward_stage(0, torch.zeros(1, 3, 32, 32))) / full)
    want, i = [], 0
    for c, f in zip(cands, frac):
        if i < 3 and f >= schedule_fractions(schedule, 4)[i]:
            want.append(c)
            i += 1
    assert chosen == want and len(chosen) == 3
    with pytest.raises(EelabError, match="only .* early exits fit"):
        place_exits(m, cands[:2], 4, schedule, (3, 32, 32))


def test_model_config_stores_exits_and_old_configs_still_load():
    cfg = ModelConfig(name="resnet50", exits_after=("layer1", "layer2", "layer3"), num_classes=7)
    d = cfg.to_dict()
    assert d["exits_after"] == ["layer1", "layer2", "layer3"]
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    old = {"name": "ee_cnn", "num_classes": 10, "in_channels": 3, "widths": [64, 128, 256, 512], "head": "mlp",
           "head_hidden": 256, "dropout": 0.1}                     # written before these fields existed
    assert ModelConfig.from_dict(old) == ModelConfig()
    assert plan_exits(ModelConfig(name="densenet121")) == ("features.transition1", "features.transition2",
                                                           "features.transition3")
    from eelab.models import default_cuts
    assert default_cuts(_small_vgg()) == ("features.3", "features.7", "features.14")   # after each pool but the last
    assert plan_exits(ModelConfig(name="resnet18", exits_schedule="pareto", num_exits=3), (3, 32, 32)) == \
        ("layer1.1", "layer2.0")                          # 20 % and 36 % of the MACs (rule checked above)
    with pytest.raises(EelabError, match="ee_cnn has its exits built in"):
        build_model(ModelConfig(exits_after=("x",)))
    assert {"ee_resnet18", "resnet50", "vgg11", "densenet121", "mobilenet_v2", "tiny_cnn_nobn"} <= set(FACTORIES)


def test_ceed_flow_plain_network_first_then_exits_on_the_frozen_backbone(tmp_path, tiny_folder):
    plain = tmp_path / "plain"
    train(tiny_config(tiny_folder, plain=True, epochs=1), plain, progress=False)
    torch.manual_seed(0)                                  # the weights training started from (seed 0)
    init = build_model(ModelConfig(name="tiny_cnn", widths=(4, 8), head="mlp", head_hidden=8, num_classes=3))
    a = _weights(plain)
    untouched = {k: v for k, v in init.state_dict().items() if k.startswith("heads.0.")}
    assert untouched and all(torch.equal(a[k], v) for k, v in untouched.items())      # exit 0 not trained
    assert not torch.equal(a["stages.0.0.weight"], init.state_dict()["stages.0.0.weight"])
    assert not torch.equal(a["heads.1.5.weight"], init.state_dict()["heads.1.5.weight"])

    exits = tmp_path / "exits"
    train(tiny_config(tiny_folder, heads_only=True, init=str(plain), loss_weights=(1.0, 0.0), epochs=1), exits,
          progress=False)
    b = _weights(exits)
    kept = [k for k in a if k.startswith(("stages.", "heads.1."))]
    assert all(torch.equal(a[k], b[k]) for k in kept)           # backbone (and BN statistics) and final exit kept
    assert not torch.equal(a["heads.0.2.weight"], b["heads.0.2.weight"])
    with pytest.raises(EelabError, match="--plain trains the backbone and --heads-only freezes it"):
        train(tiny_config(tiny_folder, plain=True, heads_only=True, init=str(plain)), tmp_path / "x", progress=False)
    with pytest.raises(EelabError, match="drop --loss-weights"):
        train(tiny_config(tiny_folder, plain=True, loss_weights=(1.0, 1.0)), tmp_path / "y", progress=False)


def test_cli_parses_the_issue_commands():
    p = build_parser()
    a = p.parse_args(["train", "--model", "ee_resnet18", "--dataset", "cifar10-jpeg", "--epochs", "1",
                      "--train-samples", "2000", "--out", "runs/x"])
    assert (a.model, a.dataset, a.epochs, a.train_samples) == ("ee_resnet18", "cifar10-jpeg", 1, 2000)
    a = p.parse_args(["train", "--model", "resnet50", "--exits-after", "layer1,layer2,layer3", "--out", "runs/y"])
    assert a.exits_after == ("layer1", "layer2", "layer3")
    a = p.parse_args(["train", "--model", "vgg16", "--exits-schedule", "golden", "--num-exits", "4", "--plain",
                      "--widths", "8,16", "--out", "z"])
    assert (a.exits_schedule, a.num_exits, a.plain, a.widths) == ("golden", 4, True, (8, 16))


def _one_line_error(capsys, argv, match):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_cli_trains_and_records_ee_resnet18_and_resnet50(tmp_path, tiny_folder, capsys):
    # fp32: on a CPU with native bf16, auto picks bf16, and a resnet50 on 12 images at lr 0.1 then diverges in
    # some runs (loss nan), old code and new alike; this test is about the CLI and the backbones, not precision
    common = ["--dataset", f"folder:{tiny_folder}", "--epochs", "1", "--batch-size", "6", "--cal-size", "6",
              "--train-samples", "12", "--quiet", "--json", "--precision", "fp32"]
    runs = {"ee_resnet18": ["--model", "ee_resnet18", "--widths", "4,8,8,16"],
            "resnet50": ["--model", "resnet50", "--exits-after", "layer1,layer2,layer3", "--half-weights"],
            "mobilenet_v2": ["--model", "mobilenet_v2", "--exits-schedule", "pareto", "--num-exits", "3"]}
    for name, argv in runs.items():
        out = tmp_path / name
        assert main(["train", *argv, *common, "--out", str(out)]) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        cfg = json.loads((out / "config.json").read_text())
        k = {"ee_resnet18": 4, "resnet50": 4, "mobilenet_v2": 3}[name]
        assert len(summary["costs"]) == k and cfg["factory"] == name
        assert main(["record", str(out), "--split", "test", "--out", str(tmp_path / f"{name}.pt"), "--quiet",
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["shape"] == [9, k, 3]
    assert json.loads((tmp_path / "resnet50" / "config.json").read_text())["model"]["exits_after"] == \
        ["layer1", "layer2", "layer3"]
    placed = json.loads((tmp_path / "mobilenet_v2" / "config.json").read_text())["model"]
    assert placed["exits_schedule"] == "pareto" and len(placed["exits_after"]) == 2    # stored as placed
    _one_line_error(capsys, ["train", "--model", "resnet50", "--exits-after", "layer1", "--num-exits", "3",
                             "--out", str(tmp_path / "e")], "drop --exits-schedule/--num-exits")
    _one_line_error(capsys, ["train", "--model", "resnet18", "--exits-after", "layer7", *common,
                             "--out", str(tmp_path / "f")], "no layer 'layer7'")
    _one_line_error(capsys, ["train", "--model", "ee_cnn", "--exits-schedule", "even", *common,
                             "--out", str(tmp_path / "g")], "has its exits built in")


def test_grayscale_dataset_trains_every_kind_of_factory(tmp_path, capsys):
    from PIL import Image

    root = write_image_folder(tmp_path / "gray", n_train=18, n_test=6, size=8)
    for f in root.rglob("*.png"):                        # the same folder, converted to 1-channel PNGs
        Image.open(f).convert("L").save(f)
    for argv in (["--model", "tiny_cnn", "--widths", "4,8"], ["--model", "ee_resnet18", "--widths", "4,4,8,8"],
                 ["--model", "mobilenet_v2"]):
        out = tmp_path / argv[1]
        # fp32 and a small step: 15 images, batches of 6 and 3, and mobilenet_v2's 1x1 feature maps at 8x8
        # input make batch norm on 3 values; bf16 on another CPU diverged there (CI), which is not what this tests
        assert main(["train", *argv, "--dataset", f"folder:{root}", "--epochs", "1", "--batch-size", "6",
                     "--cal-size", "3", "--precision", "fp32", "--lr", "0.01", "--quiet", "--out", str(out)]) == 0, \
            capsys.readouterr().err
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["input_shape"] == [1, 8, 8] and cfg["model"]["in_channels"] == 1
    capsys.readouterr()
    _one_line_error(capsys, ["train", "--model", "densenet121", "--dataset", f"folder:{root}", "--epochs", "1",
                             "--batch-size", "6", "--cal-size", "3", "--quiet", "--out", str(tmp_path / "v")],
                    "pass a larger --image-size")
