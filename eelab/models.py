"""MultiExitNet (backbone stages + one exit head per stage), its factories, and measured exit costs."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import EelabError


class MultiExitNet(nn.Module):
    """A backbone cut into K stages with an exit head after each (torchvision-style features/head split).

    forward(x [B, ch, H, W]) -> logits [B, K, C]; the plain network is stages 0..K-1 plus heads[K-1].
    """

    def __init__(self, stages: list[nn.Module], heads: list[nn.Module],
                 confidences: list[nn.Module] | None = None):
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(f"need one head per stage, got {len(stages)} stages and {len(heads)} heads")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        # optional EENets-style confidence branches h_k, one per exit (None: a plain multi-exit net)
        self.confidences = nn.ModuleList(confidences) if confidences else None

    @property
    def num_exits(self) -> int:
        """K, the number of exits."""
        return len(self.stages)

    @property
    def has_confidence(self) -> bool:
        """Whether each exit has a learned confidence branch."""
        return self.confidences is not None

    def forward_stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Backbone stage k: features after stage k-1 (or the input) -> features after stage k."""
        return self.stages[k](h)

    def forward_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Exit head k: features after stage k -> logits [B, C]."""
        return self.heads[k](h)

    def forward_confidence(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Confidence branch k: features after stage k -> h_k [B] in (0, 1), fp32."""
        return torch.sigmoid(self.confidences[k](h).float()).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """All exits: x [B, ch, H, W] -> logits [B, K, C] (and confidences [B, K] with confidence branches)."""
        outs, confs = [], []
        h = x
        for k in range(self.num_exits):
            h = self.forward_stage(k, h)
            outs.append(self.forward_head(k, h))
            if self.has_confidence:
                confs.append(self.forward_confidence(k, h))
        logits = torch.stack(outs, dim=1)
        return (logits, torch.stack(confs, dim=1)) if self.has_confidence else logits

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network: every stage, only the last head -> logits [B, C]."""
        h = x
        for stage in self.stages:
            h = stage(h)
        return self.heads[-1](h)


@torch.no_grad()
def add_confidence_branches(model: MultiExitNet, in_channels: int) -> MultiExitNet:
    """Give every exit an EENets confidence branch: average pool + Linear(ch_k, 1) + sigmoid (Demir & Akbas).

    ch_k, the channels after stage k, is read off one small dummy forward pass.
    """
    was_training = model.training
    model.eval()
    branches, h = [], None
    for size in (32, 64, 224):  # the smallest input every stage accepts
        try:
            h = torch.zeros(1, in_channels, size, size, device=next(model.parameters()).device)
            chans = []
            for k in range(model.num_exits):
                h = model.forward_stage(k, h)
                chans.append(h.shape[1])
            break
        except RuntimeError:
            chans = []
    if not chans:
        raise EelabError("could not run the backbone on a 32, 64 or 224 pixel input to size its confidence branches")
    for ch in chans:
        branches.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 1)))
    model.confidences = nn.ModuleList(branches).to(next(model.parameters()).device)
    model.train(was_training)
    return model


# ----------------------------------------------------------------------------- costs

def _count_macs(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """MACs (= FLOPs / 2, conv and matmul as torch.utils.flop_counter counts them) of one call."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops() // 2, out


@torch.no_grad()
def measure_costs(model: MultiExitNet, input_shape: tuple[int, int, int]) -> tuple[torch.Tensor, float]:
    """Exit costs [K] and full_cost in MACs for one sample of `input_shape` (ch, H, W).

    costs[k] = stages 0..k + heads 0..k (and confidence branches 0..k), each counted on its real input;
    full_cost = all stages + last head (the plain network has no confidence branch).
    """
    was_training = model.training
    model.eval()
    h = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    stage_macs, head_macs = [], []
    for k in range(model.num_exits):
        m, h = _count_macs(lambda: model.forward_stage(k, h))
        stage_macs.append(m)
        m, _ = _count_macs(lambda: model.forward_head(k, h))
        if model.has_confidence:
            m += _count_macs(lambda: model.forward_confidence(k, h))[0]
        head_macs.append(m)
    model.train(was_training)
    stage = torch.tensor(stage_macs, dtype=torch.float64)
    head = torch.tensor(head_macs, dtype=torch.float64)
    costs = stage.cumsum(0) + head.cumsum(0)
    last_head, _ = _count_macs(lambda: model.forward_head(model.num_exits - 1, h))
    full = float(stage.sum() + last_head)
    return costs, full


# ----------------------------------------------------------------------------- heads

def make_head(kind: str, in_ch: int, num_classes: int, hidden: int = 256, dropout: float = 0.2) -> nn.Module:
    """An exit head on features [B, in_ch, h, w] -> logits [B, C].

    kind: "linear" = global average pool + Linear;
          "mlp" = average pool to 2x2 + Linear(4 in_ch, hidden) + ReLU + Dropout + Linear(hidden, C);
          "conv" = conv3x3(in_ch, hidden)-BN-ReLU + global average pool + Linear(hidden, C)
                   (a learned feature layer: better early exits for more MACs).
    """
    if kind == "linear":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
    if kind == "mlp":
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * in_ch, hidden),
                             nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    raise EelabError(f"unknown head kind {kind!r}; use one of linear, mlp, conv")


# ----------------------------------------------------------------------------- factories

@dataclass(frozen=True)
class ModelConfig:
    """Arguments of a model factory; stored in config.json so a checkpoint rebuilds its own network."""

    name: str = "ee_cnn"
    num_classes: int = 10
    in_channels: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512)
    head: str = "mlp"
    head_hidden: int = 256
    dropout: float = 0.1
    # torchvision backbones only (resnet50, vgg11, ...): where the exits go. exits_after names the layers to cut
    # after; else exits_schedule/num_exits place num_exits exits by cost (place_exits); else the family's default.
    exits_after: tuple[str, ...] | None = None
    exits_schedule: str | None = None    # even | pareto | golden | fine
    num_exits: int | None = None         # K, the final exit included
    confidence: bool = False             # EENets confidence branch per exit (--objective eenet)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        if self.exits_after is not None:
            d["exits_after"] = list(self.exits_after)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise EelabError(f"model config has unknown field(s) {sorted(extra)}; this checkpoint was written "
                             f"by a newer eelab: upgrade eelab")
        d = dict(d)
        if "widths" in d:
            d["widths"] = tuple(d["widths"])
        if d.get("exits_after") is not None:
            d["exits_after"] = tuple(d["exits_after"])
        return cls(**d)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def ee_cnn(cfg: ModelConfig) -> MultiExitNet:
    """EE-CNN of the public early-exit-cnn project (S. Pandey): four blocks, an exit after each.

    Each block: two conv3x3-BN-ReLU then 2x2 max-pool and dropout (the last block pooled globally),
    widths 64-128-256-512. At 32x32 it has about 209 M backbone MACs with exits near 19/46/73/100 %.
    """
    stages, heads = [], []
    cin = cfg.in_channels
    for i, w in enumerate(cfg.widths):
        last = i == len(cfg.widths) - 1
        pool = nn.AdaptiveMaxPool2d(1) if last else nn.MaxPool2d(2)
        stages.append(nn.Sequential(*_conv_bn_relu(cin, w), *_conv_bn_relu(w, w), pool, nn.Dropout(cfg.dropout)))
        heads.append(make_head(cfg.head, w, cfg.num_classes, cfg.head_hidden))
        cin = w
    return MultiExitNet(stages, heads)


def tiny_cnn(cfg: ModelConfig) -> MultiExitNet:
    """A two-exit toy network for tests and smoke runs: conv-BN-ReLU-pool stages of cfg.widths[:2]."""
    stages, heads = [], []
    cin = cfg.in_channels
    for w in cfg.widths[:2]:
        stages.append(nn.Sequential(*_conv_bn_relu(cin, w), nn.MaxPool2d(2)))
        heads.append(make_head(cfg.head, w, cfg.num_classes, cfg.head_hidden))
        cin = w
    return MultiExitNet(stages, heads)


def tiny_cnn_nobn(cfg: ModelConfig) -> MultiExitNet:
    """tiny_cnn without batch norm (conv-ReLU-pool stages): for tests where an update must not depend on how a
    batch is split across processes (distributed training), which batch statistics would."""
    stages, heads = [], []
    cin = cfg.in_channels
    for w in cfg.widths[:2]:
        stages.append(nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
        heads.append(make_head(cfg.head, w, cfg.num_classes, cfg.head_hidden))
        cin = w
    return MultiExitNet(stages, heads)


def ee_resnet18(cfg: ModelConfig) -> MultiExitNet:
    """ResNet-18 for small images with an exit after each of its four stages.

    ResNet-18 of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in the CIFAR form used by
    the early-exit literature (e.g. Kaya et al., "Shallow-Deep Networks", ICML 2019): a 3x3 stride-1 stem and no
    max-pool, then four stages of two torchvision BasicBlocks, widths cfg.widths (64-128-256-512), strides 1-2-2-2.
    Stage 0 is stem + layer1. The last exit is ResNet's own classifier (global average pool + Linear); earlier exits
    are make_head(cfg.head) heads. At 32x32 the plain network has about 556 M MACs.
    """
    from torchvision.models.resnet import BasicBlock

    if len(cfg.widths) != 4:
        raise EelabError(f"ee_resnet18 has four stages and needs four widths, got {list(cfg.widths)}; "
                         "use e.g. --widths 64,128,256,512")
    w = cfg.widths
    stem = [("conv1", nn.Conv2d(cfg.in_channels, w[0], 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(w[0])),
            ("relu", nn.ReLU(inplace=True))]
    stages, heads, cin = [], [], w[0]
    for i, (cout, stride) in enumerate(zip(w, (1, 2, 2, 2))):
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        layer = nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))
        stages.append(nn.Sequential(OrderedDict((stem if i == 0 else []) + [(f"layer{i + 1}", layer)])))
        last = i == len(w) - 1
        heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, cfg.num_classes)) if last
                     else make_head(cfg.head, cout, cfg.num_classes, cfg.head_hidden))
        cin = cout
    net = MultiExitNet(stages, heads)
    for m in net.stages.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


# ----------------------------------------------------------------------------- exits on torchvision classifiers

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


def _first_conv(model: nn.Module) -> nn.Conv2d:
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
    h = torch.zeros(1, _first_conv(model).in_channels, 32, 32)
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
        m, h = _count_macs(lambda: stage(h))
        macs.append(m)
    full = sum(macs) + _count_macs(lambda: classifier(h))[0]
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


# torchvision classifiers eelab cuts into exits (torchvision.models.<name>)
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                         "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                         "densenet121", "densenet161", "densenet169", "densenet201", "mobilenet_v2")


def _default_cuts(model: nn.Module) -> tuple[str, ...]:
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


def _bare_torchvision(cfg: ModelConfig) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, cfg.name)(weights=None, num_classes=cfg.num_classes)
    if cfg.in_channels != 3:  # grayscale and other inputs: a fresh first conv, otherwise of the same shape
        conv = _first_conv(net)
        new = nn.Conv2d(cfg.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None)
        parent_name, _, attr = next(n for n, m in net.named_modules() if m is conv).rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)
    return net


def _plan_on(cfg: ModelConfig, net: nn.Module, input_shape: tuple[int, int, int] | None) -> tuple[str, ...]:
    if cfg.exits_after is not None:
        return tuple(cfg.exits_after)
    if cfg.exits_schedule is None and cfg.num_exits is None:
        return _default_cuts(net)
    shape = input_shape if input_shape is not None else (cfg.in_channels, 224, 224)
    return tuple(place_exits(net, list_cut_points(net), cfg.num_exits or 4, cfg.exits_schedule or "even", shape))


def plan_exits(cfg: ModelConfig, input_shape: tuple[int, int, int] | None = None) -> tuple[str, ...]:
    """The layers a torchvision backbone's ModelConfig cuts after: exits_after as given, else placed by
    exits_schedule / num_exits (default even, 4; place_exits over list_cut_points on one input of input_shape
    (ch, H, W), default (in_channels, 224, 224)), else the family's default (after each resolution stage but the last).
    Other factories have their exits built in: () for them, and an error if exit options are set.
    """
    if cfg.name not in TORCHVISION_BACKBONES:
        if cfg.exits_after is not None or cfg.exits_schedule is not None or cfg.num_exits is not None:
            raise EelabError(f"model {cfg.name} has its exits built in; --exits-after, --exits-schedule and "
                             f"--num-exits apply to torchvision backbones ({', '.join(TORCHVISION_BACKBONES[:4])}"
                             " ...)")
        return ()
    if cfg.exits_after is not None:
        return tuple(cfg.exits_after)
    return _plan_on(cfg, _bare_torchvision(cfg), input_shape)


def torchvision_backbone(cfg: ModelConfig) -> MultiExitNet:
    """A torchvision classifier cfg.name, built with weights=None, cut into exits where plan_exits(cfg) says.

    ResNet-18/34/50/101/152 (He et al., CVPR 2016), VGG-11/13/16/19 with and without batch norm (Simonyan &
    Zisserman, ICLR 2015), DenseNet-121/161/169/201 (Huang et al., CVPR 2017), MobileNetV2 (Sandler et al., CVPR
    2018): the backbones LEENet (DenseNet-121, ResNet-50, VGG-11) and CEED (ResNet-50/101, VGG-11..19, exits at
    chosen layers) attach exits to. The first conv takes cfg.in_channels; the original classifier is the last exit
    (see attach_exits); earlier exits are make_head(cfg.head) heads.
    """
    net = _bare_torchvision(cfg)
    return attach_exits(net, _plan_on(cfg, net, None), cfg.head, cfg.head_hidden)


# Literal registry: factory name -> builder. A different architecture gets a different name.
FACTORIES: dict[str, Callable[[ModelConfig], MultiExitNet]] = {
    "ee_cnn": ee_cnn,
    "ee_resnet18": ee_resnet18,
    "tiny_cnn": tiny_cnn,
    "tiny_cnn_nobn": tiny_cnn_nobn,
    "resnet18": torchvision_backbone,
    "resnet34": torchvision_backbone,
    "resnet50": torchvision_backbone,
    "resnet101": torchvision_backbone,
    "resnet152": torchvision_backbone,
    "vgg11": torchvision_backbone,
    "vgg11_bn": torchvision_backbone,
    "vgg13": torchvision_backbone,
    "vgg13_bn": torchvision_backbone,
    "vgg16": torchvision_backbone,
    "vgg16_bn": torchvision_backbone,
    "vgg19": torchvision_backbone,
    "vgg19_bn": torchvision_backbone,
    "densenet121": torchvision_backbone,
    "densenet161": torchvision_backbone,
    "densenet169": torchvision_backbone,
    "densenet201": torchvision_backbone,
    "mobilenet_v2": torchvision_backbone,
}


def build_model(cfg: ModelConfig) -> MultiExitNet:
    """Build the network a ModelConfig names."""
    if cfg.name not in FACTORIES:
        raise EelabError(f"unknown model {cfg.name!r}; choose one of {', '.join(FACTORIES)}")
    if cfg.name not in TORCHVISION_BACKBONES:
        plan_exits(cfg)  # refuse exit options that a factory with built-in exits would silently ignore
    model = FACTORIES[cfg.name](cfg)
    return add_confidence_branches(model, cfg.in_channels) if cfg.confidence else model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
