"""Model factories, registered in one place (FACTORIES), each citing its source, and the ModelConfig they take."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import EelabError
from .net import HEADS, MultiExitNet, add_confidence_branches, make_head
from .surgery import SCHEDULES, attach_exits, default_cuts, first_conv, list_cut_points, place_exits


@dataclass(frozen=True)
class ModelConfig:
    """Arguments of a model factory; stored in config.json so a checkpoint rebuilds its own network."""

    name: str = field(default="ee_cnn", metadata={
        "flag": "--model", "help": "factory name (FACTORIES): ee_cnn, ee_airnet, ee_resnet18, tiny_cnn, or a torchvision "
                                   "classifier (resnet18..152, vgg11..19[_bn], densenet121..201, mobilenet_v2)"})
    num_classes: int = field(default=10, metadata={"derived": True})    # from the dataset
    in_channels: int = field(default=3, metadata={"derived": True})     # from the dataset
    widths: tuple[int, ...] = field(default=(64, 128, 256, 512), metadata={
        "help": "stage widths of ee_cnn / ee_resnet18 / tiny_cnn", "metavar": "W0,W1,..."})
    head: str = field(default="mlp", metadata={"help": "exit head design", "choices": HEADS})
    head_hidden: int = field(default=256, metadata={"help": "hidden width of mlp and conv heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after each ee_cnn block"})
    # torchvision backbones only (resnet50, vgg11, ...): where the exits go. exits_after names the layers to cut
    # after; else exits_schedule/num_exits place num_exits exits by cost (place_exits); else the family's default.
    # A run whose exits a schedule placed stores the cuts in exits_after beside the schedule and num_exits = K that
    # chose them; otherwise exits_after is refused together with a schedule.
    exits_after: tuple[str, ...] | None = field(default=None, metadata={
        "help": "torchvision backbones: layers to put an exit after, e.g. layer1,layer2,layer3 (ResNet) or "
                "features.5,features.10 (VGG, DenseNet, MobileNetV2); the original classifier is the last",
        "metavar": "LAYER,..."})
    exits_schedule: str | None = field(default=None, metadata={
        "help": "torchvision backbones: place exits where cumulative MACs cross this schedule (EENets)",
        "choices": SCHEDULES})
    num_exits: int | None = field(default=None, metadata={
        "help": "with --exits-schedule: K, the last exit included (default 4)"})
    confidence: bool = field(default=False, metadata={"derived": True})  # EENets branches: --objective eenet

    def __post_init__(self) -> None:
        """Refuse a bad combination in one line, when the config is made (CLI, Python or a checkpoint)."""
        if self.name not in FACTORIES:
            raise EelabError(f"unknown model {self.name!r}; choose one of {', '.join(FACTORIES)}")
        if self.head not in HEADS:
            raise EelabError(f"unknown head kind {self.head!r}; use one of {', '.join(HEADS)}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):  # also refuses nan
            raise EelabError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (isinstance(self.head_hidden, int) and self.head_hidden >= 1):
            raise EelabError(f"--head-hidden must be at least 1, got {self.head_hidden}")
        if not self.widths or not all(isinstance(w, int) and w >= 1 for w in self.widths):
            raise EelabError(f"--widths must be positive whole numbers, got {self.widths}")
        if self.num_exits is not None and self.num_exits < 2:
            raise EelabError(f"--num-exits must be at least 2 (the last exit included), got {self.num_exits}")
        if self.exits_schedule is not None and self.exits_schedule not in SCHEDULES:
            raise EelabError(f"unknown exit schedule {self.exits_schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.exits_after is not None and (self.exits_schedule is not None or self.num_exits is not None) \
                and self.num_exits != len(self.exits_after) + 1:
            raise EelabError("--exits-after names the exits itself; drop --exits-schedule/--num-exits, or drop "
                             "--exits-after to let the schedule place them")
        if self.name not in TORCHVISION_BACKBONES and (self.exits_after is not None or self.exits_schedule is not None
                                                       or self.num_exits is not None):
            raise EelabError(f"model {self.name} has its exits built in; --exits-after, --exits-schedule and "
                             f"--num-exits apply to torchvision backbones ({', '.join(TORCHVISION_BACKBONES[:4])}"
                             " ...)")

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


class _Scale(nn.Module):
    """Multiplies its input by a constant (airbench's scaled-down classifier output)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def _air_bn(width: int) -> nn.BatchNorm2d:
    """airbench's batch norm: fast running statistics (PyTorch momentum 0.4), a fixed scale of one, a learned
    shift (the trainer's --bn-lr-scale speeds the shifts up)."""
    bn = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def _air_conv(cin: int, cout: int) -> nn.Conv2d:
    """A 3x3 'same' conv whose first cin filters start as the identity (dirac): an implicit residual."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


AIRNET_WIDTHS = (64, 256, 256)


def ee_airnet(cfg: ModelConfig) -> MultiExitNet:
    """A fast CIFAR network with four exits, after airbench94 (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a
    single GPU", 2024), itself from hlb-CIFAR10 (T. Balsam) and the ResNet-9 of D. Page's DAWNBench work.

    A 2x2 conv of 2 x 3 x 2 x 2 = 24 channels (whitened from training patches with `eelab train --whiten`), then
    three conv groups (conv3x3, max-pool 2, BN, GELU, conv3x3, BN, GELU) of widths cfg.widths (default 64, 256,
    256; ee_cnn's four-width default means this default), the last one pooled by 3x3 max-pool into a Linear
    classifier scaled by 1/9. Exits: after group 1, after the first half of group 2, after group 2, and the
    classifier, at about 19 / 47 / 71 / 100 % of the plain network's 118 M MACs on 32x32 images; earlier exits are
    make_head(cfg.head) heads. Conv filters start dirac (identity) where shapes allow; BN scales are fixed at one.
    """
    widths = AIRNET_WIDTHS if cfg.widths == ModelConfig().widths else tuple(cfg.widths)
    if len(widths) != 3:
        raise EelabError(f"ee_airnet has three conv groups and needs three widths, got {list(widths)}; use e.g. "
                         "--widths 64,256,256")
    w1, w2, w3 = widths
    whiten = 2 * cfg.in_channels * 2 * 2
    act = nn.GELU
    stages = [
        nn.Sequential(nn.Conv2d(cfg.in_channels, whiten, 2, padding=0, bias=True), act(),
                      _air_conv(whiten, w1), nn.MaxPool2d(2), _air_bn(w1), act(), _air_conv(w1, w1), _air_bn(w1),
                      act()),
        nn.Sequential(_air_conv(w1, w2), nn.MaxPool2d(2), _air_bn(w2), act()),
        nn.Sequential(_air_conv(w2, w2), _air_bn(w2), act()),
        nn.Sequential(_air_conv(w2, w3), nn.MaxPool2d(2), _air_bn(w3), act(), _air_conv(w3, w3), _air_bn(w3), act()),
    ]
    heads = [make_head(cfg.head, w, cfg.num_classes, cfg.head_hidden, cfg.dropout) for w in (w1, w2, w2)]
    heads.append(nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, cfg.num_classes, bias=False),
                               _Scale(1 / 9)))
    return MultiExitNet(stages, heads)


# torchvision classifiers eelab cuts into exits (torchvision.models.<name>)
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                         "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                         "densenet121", "densenet161", "densenet169", "densenet201", "mobilenet_v2")


def bare_torchvision(cfg: ModelConfig) -> nn.Module:
    """torchvision.models.<cfg.name>(weights=None) for cfg.num_classes, its first conv taking cfg.in_channels."""
    import torchvision

    net = getattr(torchvision.models, cfg.name)(weights=None, num_classes=cfg.num_classes)
    if cfg.in_channels != 3:  # grayscale and other inputs: a fresh first conv, otherwise of the same shape
        conv = first_conv(net)
        new = nn.Conv2d(cfg.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None)
        parent_name, _, attr = next(n for n, m in net.named_modules() if m is conv).rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)
    return net


def _plan_on(cfg: ModelConfig, net: nn.Module, input_shape: tuple[int, int, int] | None) -> tuple[str, ...]:
    if cfg.exits_after is not None:
        return tuple(cfg.exits_after)
    if cfg.exits_schedule is None and cfg.num_exits is None:
        return default_cuts(net)
    shape = input_shape if input_shape is not None else (cfg.in_channels, 224, 224)
    return tuple(place_exits(net, list_cut_points(net), cfg.num_exits or 4, cfg.exits_schedule or "even", shape))


def plan_exits(cfg: ModelConfig, input_shape: tuple[int, int, int] | None = None) -> tuple[str, ...]:
    """The layers a torchvision backbone's ModelConfig cuts after: exits_after as given, else placed by
    exits_schedule / num_exits (default even, 4; place_exits over list_cut_points on one input of input_shape
    (ch, H, W), default (in_channels, 224, 224)), else the family's default (after each resolution stage but the last).
    Other factories have their exits built in: () for them (ModelConfig refuses exit options for them).
    """
    if cfg.name not in TORCHVISION_BACKBONES:
        return ()
    if cfg.exits_after is not None:
        return tuple(cfg.exits_after)
    return _plan_on(cfg, bare_torchvision(cfg), input_shape)


def torchvision_backbone(cfg: ModelConfig) -> MultiExitNet:
    """A torchvision classifier cfg.name, built with weights=None, cut into exits where plan_exits(cfg) says.

    ResNet-18/34/50/101/152 (He et al., CVPR 2016), VGG-11/13/16/19 with and without batch norm (Simonyan &
    Zisserman, ICLR 2015), DenseNet-121/161/169/201 (Huang et al., CVPR 2017), MobileNetV2 (Sandler et al., CVPR
    2018): the backbones LEENet (DenseNet-121, ResNet-50, VGG-11) and CEED (ResNet-50/101, VGG-11..19, exits at
    chosen layers) attach exits to. The first conv takes cfg.in_channels; the original classifier is the last exit
    (see attach_exits); earlier exits are make_head(cfg.head) heads.
    """
    net = bare_torchvision(cfg)
    return attach_exits(net, _plan_on(cfg, net, None), cfg.head, cfg.head_hidden)


# Literal registry: factory name -> builder. A different architecture gets a different name.
FACTORIES: dict[str, Callable[[ModelConfig], MultiExitNet]] = {
    "ee_cnn": ee_cnn,
    "ee_resnet18": ee_resnet18,
    "ee_airnet": ee_airnet,
    "tiny_cnn": tiny_cnn,
    "tiny_cnn_nobn": tiny_cnn_nobn,
    **{name: torchvision_backbone for name in TORCHVISION_BACKBONES},
}


def build_model(cfg: ModelConfig) -> MultiExitNet:
    """Build the network a ModelConfig names (the config checked itself when it was made)."""
    model = FACTORIES[cfg.name](cfg)
    return add_confidence_branches(model, cfg.in_channels) if cfg.confidence else model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
