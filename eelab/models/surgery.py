"""Exits on torchvision classifiers: cut a ResNet, VGG, DenseNet or MobileNetV2 after named layers, or place
the cuts by cost (EENets' schedules)."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..errors import EelabError
from .costs import count_macs
from .net import MultiExitNet, make_head


def _family(model: nn.Module) -> str:
    from torchvision import models as tvm

    for family, cls in (("resnet", tvm.ResNet), ("vgg", tvm.VGG), ("densenet", tvm.DenseNet),
                        ("mobilenet_v2", tvm.MobileNetV2)):
        if isinstance(model, cls):
            return family
    raise EelabError(f"attach_exits takes a torchvision ResNet, VGG, DenseNet or MobileNetV2, got "
                     f"{type(model).__name__}; build one with torchvision.models.<name>(weights=None)")


def _layout(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """(backbone units in forward order as (name, module), the classifier after them) of a torchvision model.

    Running the units one after another and then the classifier is exactly the model's own forward.
    """
    family = _family(model)
    if family == "resnet":
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        return [(n, getattr(model, n)) for n in names], nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    if family == "vgg":
        return [("features", model.features)], nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    if family == "densenet":  # DenseNet.forward applies relu and pooling functionally after features
        return [("features", model.features)], nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                                             model.classifier)
    return [("features", model.features)], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)


def _no_layer(units: list[tuple[str, nn.Module]], cut: str) -> EelabError:
    tops = ", ".join(n for n, _ in units[:12]) + (" ..." if len(units) > 12 else "")
    return EelabError(f"no layer {cut!r} to cut after; name one of {tops} or a child of one (e.g. "
                      f"{units[-1][0]}.0, a child by position)")


def _canonical_cut(units: list[tuple[str, nn.Module]], cut: str) -> str:
    """`cut` with every numbered part that is not a child's name replaced by the name of the child at that
    position (DenseNet's features.4 -> features.denseblock1)."""
    for name, module in units:
        if cut == name:
            return cut
        if cut.startswith(name + "."):
            path, m = name, module
            for part in cut[len(name) + 1:].split("."):
                children = dict(m.named_children())
                keys = list(children)
                if part not in children and part.isdigit() and int(part) < len(keys):
                    part = keys[int(part)]
                if part not in children:
                    raise _no_layer(units, cut)
                path, m = f"{path}.{part}", children[part]
            return path
    raise _no_layer(units, cut)


def _resolve_cut(units: list[tuple[str, nn.Module]], cut: str) -> int:
    """Index in `units` of the unit named `cut` (canonical), expanding nn.Sequential units in place down to it."""
    while True:
        for i, (name, _) in enumerate(units):
            if name == cut:
                return i
        for i, (name, module) in enumerate(units):
            if cut.startswith(name + "."):
                if not isinstance(module, nn.Sequential):
                    raise EelabError(f"cannot cut inside {name} ({type(module).__name__} is not a sequence of "
                                     f"layers); cut after {name} or one of its neighbours")
                units[i:i + 1] = [(f"{name}.{k}", m) for k, m in module.named_children()]
                break
        else:  # a name that an earlier expansion already split up cannot be missing; guard anyway
            raise _no_layer(units, cut)


def _split_at(model: nn.Module, after: Sequence[str]) -> tuple[list[nn.Sequential], nn.Module, list[str]]:
    """(K stages, the classifier, the cut names as resolved) of a torchvision model cut after each name."""
    if not after:
        raise EelabError("give at least one layer to cut after, e.g. layer1,layer2,layer3 for a ResNet")
    units, classifier = _layout(model)
    names = [_canonical_cut(units, cut) for cut in after]
    for name in names:
        _resolve_cut(units, name)

    def index(name: str) -> int:  # a unit a later name expanded is cut after its last child
        return max(i for i, (n, _) in enumerate(units) if n == name or n.startswith(name + "."))

    idx = [index(n) for n in names]
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise EelabError(f"exits must be given in forward order, each after the previous one; got {list(after)}")
    if idx[-1] >= len(units) - 1:
        raise EelabError(f"the last cut {after[-1]!r} leaves nothing for the last stage; cut earlier (the original "
                         "classifier is always the last exit)")
    bounds = [-1] + idx + [len(units) - 1]
    stages = []
    for k in range(len(bounds) - 1):
        part = units[bounds[k] + 1:bounds[k + 1] + 1]
        first = part[0][1]
        if k > 0 and isinstance(first, (nn.ReLU, nn.ReLU6)) and first.inplace:
            # an in-place first op would overwrite the features the previous exit head just read
            first.inplace = False
        stages.append(nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in part)))
    return stages, classifier, names


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first Conv2d of a model, in module order (the one that takes the input)."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def attach_exits(model: nn.Module, after: Sequence[str], head: str = "linear", head_hidden: int = 256) -> MultiExitNet:
    """A torchvision ResNet, VGG, DenseNet or MobileNetV2 classifier cut into a MultiExitNet after named layers.

    after: layer names in forward order, e.g. ["layer1", "layer2", "layer3"] for a ResNet ("layer3.2" cuts inside a
    stage), ["features.5", "features.10"] for VGG / DenseNet / MobileNetV2 (a child of `features` by position or
    name, e.g. "features.transition1"). K = len(after) + 1 exits; the last exit is the original classifier (its
    pooling, flatten and fc), so on x [B, ch, H, W] the last exit's logits [B, C] equal model(x). Exits 0..K-2 are new
    make_head(head) heads. The returned network shares its layers with `model` (no copy).
    """
    stages, classifier, _ = _split_at(model, after)
    was_training = model.training
    model.eval()  # probe channels with batch norm in eval mode: one sample would not do in training mode
    h = torch.zeros(1, first_conv(model).in_channels, 32, 32)
    channels = []
    with torch.no_grad():
        for stage in stages:
            h = stage(h)
            channels.append(h.shape[1])
        num_classes = classifier(h).shape[1]
    model.train(was_training)
    heads = [make_head(head, c, num_classes, head_hidden) for c in channels[:-1]] + [classifier]
    return MultiExitNet(stages, heads)


def list_cut_points(model: nn.Module) -> list[str]:
    """Layers of a torchvision classifier an exit may follow, in forward order (candidates for place_exits).

    ResNet: every residual block (layer1.0 ... ); VGG: every ReLU or max-pool of features; DenseNet: every dense
    block and transition; MobileNetV2: every inverted-residual block. The last block is left out (the original
    classifier follows it).
    """
    family = _family(model)
    if family == "resnet":
        names = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(model, f"layer{i}")))]
    elif family == "vgg":
        feats = list(model.features)
        names = [f"features.{i}" for i, m in enumerate(feats)
                 if isinstance(m, nn.MaxPool2d) or (isinstance(m, nn.ReLU) and not
                                                    (i + 1 < len(feats) and isinstance(feats[i + 1], nn.MaxPool2d)))]
    elif family == "densenet":
        names = [f"features.{n}" for n, _ in model.features.named_children()
                 if n.startswith(("denseblock", "transition"))]
    else:
        names = [f"features.{i}" for i in range(1, len(model.features) - 1)]
    return names[:-1]


SCHEDULES = ("even", "pareto", "golden", "fine")


def schedule_fractions(schedule: str, num_exits: int) -> list[float]:
    """Cumulative-MAC fractions (of the plain network's MACs) that exits 0..K-2 are placed at; K = num_exits.

    With E = K - 1 early exits and i = 1..E, after EENets (Demir & Akbas, "Early-exit Convolutional Neural Networks",
    arXiv:2409.05336, section on exit placement; reference code eksuas/eenets.pytorch, eenet.py set_thresholds):
      even    i / (E + 1)              (EENets' "linear")
      pareto  1 - 0.8^i                (20 % of the cost at the first exit, then 20 % of what is left)
      golden  phi^(i - 1 - E), phi = (1 + sqrt 5) / 2   (..., 0.236, 0.382, 0.618)
      fine    1 - 0.95^i
    """
    if schedule not in SCHEDULES:
        raise EelabError(f"unknown exit schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if num_exits < 2:
        raise EelabError(f"--num-exits counts the final exit too and must be at least 2, got {num_exits}")
    e = num_exits - 1
    phi = (1 + math.sqrt(5)) / 2
    return [{"even": i / (e + 1), "pareto": 1 - 0.8 ** i, "golden": phi ** (i - 1 - e), "fine": 1 - 0.95 ** i}[schedule]
            for i in range(1, e + 1)]


@torch.no_grad()
def place_exits(model: nn.Module, candidates: Sequence[str], num_exits: int, schedule: str = "even",
                input_shape: tuple[int, int, int] = (3, 224, 224)) -> list[str]:
    """K - 1 cut points among `candidates` where the backbone's cumulative MACs first reach a schedule.

    Exit i goes after the first candidate, later than exit i-1's, whose MACs from the input through that layer
    (one sample of input_shape (ch, H, W)) are at least schedule_fractions(schedule, K)[i] x the plain network's
    MACs, as EENets places its exit blocks (one exit per candidate at most). Returns the names, forward order.
    """
    fractions = schedule_fractions(schedule, num_exits)
    stages, classifier, names = _split_at(model, candidates)
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *input_shape)
    macs = []
    for stage in stages:
        m, h = count_macs(lambda: stage(h))
        macs.append(m)
    full = sum(macs) + count_macs(lambda: classifier(h))[0]
    model.train(was_training)
    cum = torch.tensor(macs[:-1], dtype=torch.float64).cumsum(0) / full
    chosen: list[str] = []
    for j, name in enumerate(names):
        if len(chosen) < len(fractions) and cum[j] >= fractions[len(chosen)]:
            chosen.append(name)
    if len(chosen) < len(fractions):
        raise EelabError(f"only {len(chosen)} of {len(fractions)} early exits fit the {schedule} schedule at "
                         f"{', '.join(f'{f:.0%}' for f in fractions)} of the MACs among {len(names)} cut points; ask "
                         "for fewer --num-exits or another --exits-schedule")
    return chosen




def default_cuts(model: nn.Module) -> tuple[str, ...]:
    """An exit after each resolution stage but the last."""
    family = _family(model)
    if family == "resnet":
        return ("layer1", "layer2", "layer3")
    if family == "vgg":  # after each max-pool but the last
        pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
        return tuple(f"features.{i}" for i in pools[:-1])
    if family == "densenet":
        return ("features.transition1", "features.transition2", "features.transition3")
    return ("features.3", "features.6", "features.13")  # MobileNetV2: ends of its 56, 28 and 14 px stages at 224

