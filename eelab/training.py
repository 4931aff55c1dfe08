"""Training multi-exit networks into checkpoint directories (eelab.checkpoint), resumable after every epoch.

train() runs named phases: check the device and output, load the data and resolve the config (_load_data;
on resume, compare with the saved config: _resumed_config), build the model (_build_model), loss weights and
frozen heads (_loss_weights), optimizer and schedule (_optimizer), restore (_restore), then the epochs
(_epochs: _train_epoch, _evaluate_exits, _save_epoch).

Under torchrun (RANK and WORLD_SIZE set) training runs DistributedDataParallel, one process per GPU (nccl) or
CPU process (gloo): every rank draws the same global batch and augmentation and takes its share of it, so the
update equals a one-process step on the same global batch, up to batch-norm statistics and summation order.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import time
import typing
import warnings
from contextlib import nullcontext
from dataclasses import Field, asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (checkpoint_config, claim_run, load_checkpoint, load_state, read_checkpoint_config,
                         read_history, remove_run, save_checkpoint)
from .data import (DATASETS, augment, channel_stats, check_seed, image_side, load_dataset, prepare,
                   split_train_cal)
from .device import cpu_bf16_flags, default_device
from .errors import EelabError, EelabWarning
from .models import TORCHVISION_BACKBONES, ModelConfig, MultiExitNet, build_model, measure_costs, plan_exits

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("onecycle", "cosine", "triangle")
FLIPS = ("random", "alternate")
OBJECTIVES = ("joint", "eenet")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEFAULT_LR = {"sgd": 0.1, "adamw": 2e-3}
MIN_CAL_PER_CLASS = 10  # fewer cal images of a class than this: a one-line warning


def _option(default: Any, help: str, **meta: Any) -> Any:
    """A config field with a default and its --help text (meta: choices, metavar, flag)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; defaults run on a laptop CPU. Stored in config.json.

    Every field but `model` is an `eelab train` option (train_options); so is every ModelConfig field the data
    does not decide. The config refuses a bad value or combination in one line when it is made.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = _option("cifar10-jpeg", f"{', '.join(DATASETS)} (PATH/train/<class>/*, PATH/test/<class>/*)")
    image_size: int | None = _option(None, "resize images to this square size (folder datasets; imagenette "
                                           "default 64)", metavar="PIXELS")
    epochs: int = _option(30, "passes over the train split")
    batch_size: int = _option(128, "the global batch, split over the processes under torchrun")
    optimizer: str = _option("sgd", "sgd: Nesterov momentum (--momentum)", choices=OPTIMIZERS)
    momentum: float = _option(0.9, "sgd: Nesterov momentum")
    lr: float | None = _option(None, "peak learning rate (default " + ", ".join(f"{v:g} for {k}" for k, v in
                                                                        _DEFAULT_LR.items()) + ")")
    weight_decay: float = _option(5e-4, "weight decay of the optimizer")
    schedule: str = _option("onecycle", "learning-rate schedule over all steps; triangle: linear warm-up from 0.2x "
                                        "to the peak at 23% of the steps, then linear decay to 0.07x (airbench)",
                            choices=LR_SCHEDULES)
    bn_lr_scale: float = _option(1.0, "learning-rate factor of batch-norm parameters, their weight decay divided "
                                      "by it so its pull stays the same (airbench: 64)", metavar="FACTOR")
    head_lr_scale: float = _option(1.0, "learning-rate factor of the early exits' heads (every head but the "
                                        "last's): heads that a large backbone rate (e.g. airbench's) would throw "
                                        "off train at a smaller one", metavar="FACTOR")
    ema: float = _option(0.0, "decay of an exponential moving average of the weights, updated every step, which "
                              "is evaluated and saved as the checkpoint (0: off; e.g. 0.99)", metavar="DECAY")
    lookahead: int = _option(0, "look-ahead weight averaging (airbench): every N steps the weights are pulled back to "
                                "a slow copy that follows them with decay 0.95^5 (step/total)^3 (none at first, "
                                "more toward the end), and the run ends on the slow weights (0: off; airbench: 5)",
                             metavar="STEPS")
    whiten: bool = _option(False, "initialise the first conv of stage 0 to whiten training patches (its weights "
                                  "frozen; it needs 2 x or 1 x ch x k x k filters, as ee_airnet has)")
    label_smoothing: float = _option(0.1, "label smoothing of every exit's cross-entropy")
    loss_weights: tuple[float, ...] | None = _option(None, "per-exit loss weights, e.g. 0.5,0.7,0.9,1 (default "
                                                           "all 1)", metavar="W0,W1,...")
    distill: float = _option(0.0, "weight of distilling the last exit into the earlier ones")
    distill_temperature: float = _option(3.0, "softmax temperature of the distillation")
    heads_only: bool = _option(False, "train the heads on a frozen backbone (needs --init)")
    plain: bool = _option(False, "train only the plain network (backbone and last exit): CEED's first step; the "
                                 "other heads stay untouched")
    init: str | None = _option(None, "checkpoint directory to start the weights from", metavar="CHECKPOINT")
    train_samples: int | None = _option(None, "train on a seeded subset of N images of the train split",
                                        metavar="N")
    cal_size: int = _option(5000, "images held out of the train split for calibration")
    augment: bool = _option(True, "flip and reflect-pad crop (--translate), on tensors")
    translate: int = _option(4, "augmentation: random shift of up to this many pixels (reflect padding)",
                             metavar="PIXELS")
    flip: str = _option("random", "augmentation: random, or alternate (each image flipped in every other epoch, "
                                  "a seeded half of them in the first: airbench's derandomised flip)", choices=FLIPS)
    precision: str = _option("auto", "auto: fp16 on CUDA, bf16 on a CPU with native bf16 (AMX, AVX512-BF16), "
                                     "else fp32; fp16 needs CUDA", choices=PRECISIONS)
    seed: int = _option(0, "seeds the weights, the cal split, the subset, the batches and augmentation")
    eval_batch_size: int = _option(500, "batch of the per-epoch cal check (watched, never used to select)")
    objective: str = _option("joint", "joint: weighted cross-entropy per exit; eenet: EENets confidence branches "
                                      "trained with cost (records then carry confidences; policy confidence)",
                             choices=OBJECTIVES)
    cost_weight: float = _option(0.0, "eenet: the weight of the expected normalised cost (EENets' lambda)",
                                 metavar="WEIGHT")

    def __post_init__(self) -> None:
        """Refuse a bad value or combination in one line, when the config is made (CLI, Python or a checkpoint)."""
        own = {f.name: f for f in fields(self)}
        for f in own.values():  # every number finite (nan fails each range below, but inf would pass some)
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple)
                                                                           else (value,))):
                raise EelabError(f"{_flag(f)} must be a finite number, got {value}")
        for f in own.values():
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise EelabError(f"unknown {f.name.replace('_', ' ')} {getattr(self, f.name)!r}; use one of "
                                 f"{', '.join(choices)}")
        ranges = (  # (field, whether its value is sensible, what it must be)
            ("epochs", self.epochs >= 1, "at least 1"),
            ("image_size", self.image_size is None or self.image_size >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 2, "at least 2 (batch norm needs two samples)"),
            ("lr", self.lr is None or self.lr > 0, "above 0"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("loss_weights", self.loss_weights is None or (len(self.loss_weights) > 0
                                                           and all(w >= 0 for w in self.loss_weights)),
             "one value of at least 0 per exit"),
            ("distill", self.distill >= 0, "at least 0"),
            ("distill_temperature", self.distill_temperature > 0, "above 0"),
            ("train_samples", self.train_samples is None or self.train_samples >= 1, "at least 1"),
            ("cal_size", self.cal_size >= 0, "at least 0"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
            ("cost_weight", self.cost_weight >= 0, "at least 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("bn_lr_scale", self.bn_lr_scale > 0, "above 0"),
            ("head_lr_scale", self.head_lr_scale > 0, "above 0"),
            ("ema", 0 <= self.ema < 1, "in [0, 1) (0: off)"),
            ("lookahead", self.lookahead >= 0, "at least 0 (0: off)"),
            ("translate", self.translate >= 0, "at least 0"),
        )
        for name, ok, need in ranges:
            if not ok:
                raise EelabError(f"{_flag(own[name])} must be {need}, got {getattr(self, name)}")
        check_seed(self.seed, _flag(own["seed"]))
        side = image_side(self.dataset, self.image_size)
        if side is not None:  # else (an image folder at its own size) checked once its images are loaded
            self.check_translate(side)
        if self.objective == "eenet" and (self.plain or self.heads_only):
            raise EelabError("--objective eenet trains exits and confidence branches together; drop "
                             "--plain/--heads-only")
        if self.plain and self.heads_only:
            raise EelabError("--plain trains the backbone and --heads-only freezes it; choose one (CEED: --plain "
                             "first, then --heads-only --init THAT_CHECKPOINT)")
        if self.plain and (self.loss_weights is not None or self.distill > 0):
            raise EelabError("--plain trains the last exit alone; drop --loss-weights and --distill")
        if self.ema > 0 and self.lookahead > 0:
            raise EelabError("--ema and --lookahead are two weight averages; choose one")
        if self.heads_only and not self.init:
            raise EelabError("--heads-only trains heads on a trained backbone: pass --init CHECKPOINT")

    def check_translate(self, side: int) -> None:
        """Refuse a --translate that reflect padding of images side pixels wide cannot do (a shift below the side)."""
        if self.augment and self.translate >= side:
            raise EelabError(f"--translate must be below the image side ({side} pixels), got {self.translate}; lower "
                             f"--translate")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["model"] = self.model.to_dict()
        if self.loss_weights is not None:
            d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of to_dict."""
        d = dict(d)
        extra = set(d) - {f.name for f in fields(cls)}
        if extra:
            raise EelabError(f"training config has unknown field(s) {sorted(extra)}; upgrade eelab")
        d["model"] = ModelConfig.from_dict(d.get("model", {}))
        if d.get("loss_weights") is not None:
            d["loss_weights"] = tuple(d["loss_weights"])
        return cls(**d)


@dataclass(frozen=True)
class Option:
    """One user option of a training run: a TrainConfig field (in_model: a ModelConfig field) and its flag."""

    flag: str        # e.g. --lr, --model (ModelConfig.name), --no-augment (a bool that defaults to True)
    field: Field
    in_model: bool
    kind: Any        # the field's type, resolved (e.g. int | None, tuple[float, ...] | None)


def _flag(f: Field) -> str:
    """A config field's CLI flag: its metadata's, else --field-name; a bool defaulting to True: --no-field-name."""
    flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
    return "--no-" + flag[2:] if f.default is True else flag


@cache
def train_options() -> tuple[Option, ...]:
    """The options of `eelab train`: ModelConfig then TrainConfig fields, but `model` and what the data decides."""
    out = []
    for owner, in_model in ((ModelConfig, True), (TrainConfig, False)):
        kinds = typing.get_type_hints(owner)
        out += [Option(_flag(f), f, in_model, kinds[f.name]) for f in fields(owner)
                if not f.metadata.get("derived") and not (owner is TrainConfig and f.name == "model")]
    return tuple(out)


# ----------------------------------------------------------------------------- device and precision

def choose_precision(requested: str, device: torch.device, bf16_flags: list[str] | None = None
                     ) -> torch.dtype | None:
    """Autocast dtype (None: fp32) for a precision in PRECISIONS (TrainConfig checked the name) on a device.

    auto: fp16 autocast on CUDA; bf16 autocast on a CPU with native bf16 (cpu_bf16_flags: AMX or
    AVX512-BF16); fp32 elsewhere. Measured for an ee_cnn training step, batch 128, 2 threads: on an AMD EPYC
    with AVX512-BF16, bf16 + channels_last 498 images/s against fp32 + channels_last 262; on an AVX-512 Xeon
    without bf16 instructions bf16 ran at 0.6x of fp32. Training always uses channels_last: in fp32 it measured
    1.33x (Xeon) and 1.18x (EPYC) faster than NCHW.
    """
    if requested == "fp16" and device.type != "cuda":
        raise EelabError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if requested == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if (cpu_bf16_flags() if bf16_flags is None else bf16_flags) else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ----------------------------------------------------------------------------- losses

def multi_exit_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    label_smoothing: float = 0.0, distill: float = 0.0, temperature: float = 3.0) -> torch.Tensor:
    """Weighted sum over exits of cross-entropy, plus optional distillation of the last exit into earlier ones.

    logits [B, K, C] (cast to fp32 here: losses stay in fp32 under autocast), labels [B], weights [K].
    """
    logits = logits.float()
    k = logits.shape[1]
    ce = torch.stack([F.cross_entropy(logits[:, i], labels, label_smoothing=label_smoothing) for i in range(k)])
    loss = (weights * ce).sum()
    if distill > 0 and k > 1:
        teacher = F.softmax(logits[:, -1].detach() / temperature, dim=-1)
        kd = torch.stack([F.kl_div(F.log_softmax(logits[:, i] / temperature, dim=-1), teacher,
                                   reduction="batchmean") for i in range(k - 1)])
        loss = loss + distill * temperature ** 2 * kd.sum()
    return loss


def eenet_loss(logits: torch.Tensor, confidences: torch.Tensor, labels: torch.Tensor, costs: torch.Tensor,
               cost_weight: float) -> torch.Tensor:
    """EENets objective (Demir & Akbas): NLL of the confidence-weighted cumulative prediction plus lambda x cost.

    logits [B, K, C], confidences h [B, K] in (0, 1), labels [B], costs [K] normalised by the plain network's
    MACs. Y_{K-1} = p_{K-1}, Y_k = h_k p_k + (1 - h_k) Y_{k+1}; C_{K-1} = c_{K-1}, C_k = h_k c_k + (1 - h_k) C_{k+1};
    loss = mean NLL(log clamp(Y_0)[y]) + lambda mean C_0. All in fp32 (probabilities, not logits, are mixed).
    """
    p = F.softmax(logits.float(), dim=-1)
    h = confidences.float()
    costs = costs.to(p.device, torch.float32)
    k = p.shape[1]
    y_mix, c_mix = p[:, -1], costs[-1].expand(p.shape[0])
    for i in range(k - 2, -1, -1):
        y_mix = h[:, i:i + 1] * p[:, i] + (1 - h[:, i:i + 1]) * y_mix
        c_mix = h[:, i] * costs[i] + (1 - h[:, i]) * c_mix
    nll = -torch.log(y_mix.gather(1, labels.view(-1, 1)).clamp_min(1e-12)).mean()
    return nll + cost_weight * c_mix.mean()


# ----------------------------------------------------------------------------- one step

class WithConfidences(nn.Module):
    """forward(x [B, ch, H, W]) -> model.forward_with_confidences(x): (logits [B, K, C], confidences [B, K] or None).

    The module train_step calls: one forward pass gives what either objective needs, and under
    DistributedDataParallel the wrapper of this module runs it, so gradients are synchronised.
    """

    def __init__(self, model: MultiExitNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.forward_with_confidences(x)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor, cfg: TrainConfig, mean: list[float], std: list[float],
               gen: torch.Generator, device: torch.device, dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler | None = None, shard: tuple[int, int] = (0, 1),
               flip: torch.Tensor | None = None) -> float | None:
    """One optimisation step on a uint8 batch [B, ch, H, W]: augment, normalise, channels_last autocast forward,
    fp32 loss.

    net: WithConfidences(model), or its DistributedDataParallel wrapper, which averages gradients. shard (rank,
    world): distributed training; `images` is the whole global batch, augmented here with the same random draws
    on every rank, of which this rank takes rows [rank B/world, (rank+1) B/world). weights [K]: per-exit loss
    weights (eenet: the exits' normalised costs). flip [B] bool: which images to flip (--flip alternate), else
    drawn from gen. Returns the loss (the mean over ranks), or None (and no update, on every rank) when it is not
    finite.
    """
    if cfg.augment:
        images = augment(images, gen, pad=cfg.translate, flip_mask=flip)
    rank, world = shard
    if world > 1:
        b = images.shape[0] // world
        images, labels = images[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]
    x = prepare(images.to(device, non_blocking=True), mean, std).contiguous(memory_format=torch.channels_last)
    y = labels.to(device, non_blocking=True)
    with _autocast(device, dtype):
        logits, conf = net(x)
    if cfg.objective == "eenet":
        loss = eenet_loss(logits, conf, y, weights, cfg.cost_weight)
    else:
        loss = multi_exit_loss(logits, y, weights, cfg.label_smoothing, cfg.distill, cfg.distill_temperature)
    if world > 1:  # every rank must agree to step or to skip, or the gradient all-reduce would hang
        import torch.distributed as dist
        total = loss.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        value = total.item() / world
    else:
        value = loss.item()
    if not math.isfinite(value):
        return None
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return value


# ----------------------------------------------------------------------------- the run, phase by phase

@dataclass(frozen=True)
class _Run:
    """Where and how this process trains: output directory, device, its rank of world, what it reports."""

    out: Path
    device: torch.device
    rank: int
    world: int
    progress: bool
    callback: Callable[[dict], None] | None
    half_weights: bool
    replaces: bool = False  # --overwrite: the run in `out` is removed just before the first checkpoint is written


@dataclass(frozen=True)
class _Data:
    """A run's images: uint8 [N, ch, H, W] with labels [N] for train and cal, and what the checkpoint records."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_cal: torch.Tensor
    y_cal: torch.Tensor
    cal_idx: torch.Tensor            # [N_cal] indices of cal in the train split
    mean: list[float]                # per-channel normalisation, from the training images
    std: list[float]
    class_names: list[str]
    image_shape: tuple[int, int, int]


@dataclass(frozen=True)
class _Parts:
    """What the epochs drive: the model, its optimizer and schedule, loss weights, generator, precision."""

    model: MultiExitNet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    weights: torch.Tensor            # [K] per-exit loss weights (eenet: normalised exit costs)
    frozen: list[int]                # heads no loss reaches
    gen: torch.Generator             # batches and augmentation
    dtype: torch.dtype | None        # autocast dtype, None: fp32
    scaler: torch.amp.GradScaler | None
    batch: int                       # images per step (the global batch)
    steps: int                       # steps per epoch
    ema: MultiExitNet | None = None  # --ema: the averaged weights, evaluated and saved as the checkpoint
    slow: MultiExitNet | None = None  # --lookahead: the slow weights the model is pulled back to

    @property
    def kept(self) -> MultiExitNet:
        """The network the checkpoint holds: the weight average with --ema, else the trained model."""
        return self.ema if self.ema is not None else self.model


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          callback: Callable[[dict], None] | None = None, half_weights: bool = False,
          device: str | torch.device | None = None, overwrite: bool = False) -> Path:
    """Train all exits jointly (or heads only, or the plain network only) and write a checkpoint after every epoch.

    callback(row) is called after each epoch's checkpoint is written (row = that epoch's history entry).
    resume=True continues the run in `out` from its last epoch: `cfg`, resolved as a new run resolves it
    (dataset path, classes, exits), must equal the saved config (eval_batch_size may differ). Returns `out`.
    Under torchrun (RANK, WORLD_SIZE > 1) this is one rank of DistributedDataParallel training: nccl on CUDA
    (device cuda:LOCAL_RANK), gloo on the CPU; each rank takes its share of every global batch (--batch-size is
    the global batch), rank 0 alone writes the checkpoint, shows progress and calls callback.
    `out` is claimed first (checkpoint.claim_run; rank 0 holds the lock): a directory holding another run is
    refused unless overwrite=True, which removes that run's files, records, summary, policies and ensembles just
    before the first checkpoint is written (a run that fails before then leaves the old one whole).
    """
    rank, world, local = _world()
    dev = torch.device(device) if device is not None else default_device()
    if world == 1:
        return _train(cfg, resume, _Run(Path(out), dev, rank=0, world=1, progress=progress, callback=callback,
                                        half_weights=half_weights), overwrite)
    if cfg.batch_size % world:
        raise EelabError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over the {world} "
                         f"processes; use a multiple of {world}")
    import torch.distributed as dist

    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        return _train(cfg, resume, _Run(Path(out), dev, rank=rank, world=world, progress=progress and rank == 0,
                                        callback=callback if rank == 0 else None, half_weights=half_weights),
                      overwrite)
    finally:
        if own_group:
            dist.destroy_process_group()


def train_and_record(cfg: TrainConfig, out: str | Path, record_limit: int | None = None,
                     callback: Callable[[dict], None] | None = None,
                     on_split: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """train() a new run into `out`, then record its cal and test splits beside it (cal.pt, test.pt): a run the
    notebooks and `eelab evaluate` read as they read the reference. record_limit: a seeded subset of N samples
    of each split (smoke runs); on_split(split) is called before each split is recorded."""
    from .records import record_checkpoint

    out = Path(train(cfg, out, progress=False, callback=callback, overwrite=overwrite))
    for split in ("cal", "test"):
        if on_split is not None:
            on_split(split)
        record_checkpoint(out, split, limit=record_limit, progress=False).save(out / f"{split}.pt")
    return out


def _train(cfg: TrainConfig, resume: bool, run: _Run, overwrite: bool = False) -> Path:
    """One run (one rank of it under torchrun): claim the output (rank 0), then the phases."""
    dtype = choose_precision(cfg.precision, run.device)
    with claim_run(run.out, resume, overwrite) if run.rank == 0 else nullcontext():
        return _phases(cfg, resume, replace(run, replaces=overwrite and not resume), dtype)


def _phases(cfg: TrainConfig, resume: bool, run: _Run, dtype: torch.dtype | None) -> Path:
    """Data, model, loss weights, optimizer, restore, epochs."""
    cfg, data = _load_data(cfg, run)
    if resume:
        cfg = _resumed_config(cfg, run.out)
    model, costs, full_cost = _build_model(cfg, data.image_shape, run.device)
    weights, frozen = _loss_weights(cfg, model, costs, full_cost, run.device)
    if cfg.whiten:
        whiten_first_conv(model, None if (resume or cfg.init) else data.x_train, data.mean, data.std)
    n = data.x_train.shape[0]
    batch = min(cfg.batch_size, n)
    steps = max(1, n // batch)  # drop the last partial batch: batch norm needs more than one sample
    opt, sched = _optimizer(cfg, model, cfg.epochs * steps)
    parts = _Parts(model, opt, sched, weights, frozen, torch.Generator().manual_seed(cfg.seed + 2), dtype,
                   torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, batch, steps,
                   copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None,
                   copy.deepcopy(model).requires_grad_(False) if cfg.lookahead > 0 else None)
    start, history = _restore(run.out, parts) if resume else (0, [])
    ckpt_cfg = checkpoint_config(cfg.to_dict(), cfg.dataset, data.class_names, data.image_shape, data.mean,
                                 data.std, data.cal_idx, costs, full_cost)
    _epochs(cfg, data, parts, run, ckpt_cfg, start, history)
    return run.out


def _load_data(cfg: TrainConfig, run: _Run) -> tuple[TrainConfig, _Data]:
    """Load the dataset, split off cal (and a train subset), and resolve the config as this data decides it."""
    if cfg.dataset.startswith("folder:"):  # an absolute path, so records and resumes find the same images
        cfg = replace(cfg, dataset="folder:" + str(Path(cfg.dataset[len("folder:"):]).expanduser().resolve()))
    if run.rank != 0:
        _barrier(run.world, run.device)  # rank 0 downloads, unpacks and caches first; the others read its cache
    ds = load_dataset(cfg.dataset, cfg.image_size, progress=run.progress)
    if run.rank == 0:
        _barrier(run.world, run.device)
    cfg.check_translate(min(ds.image_shape[1:]))  # an image folder's size is known only now
    train_idx, cal_idx = split_train_cal(ds.train_images.shape[0], cfg.cal_size, cfg.seed)
    if cal_idx.numel() and run.rank == 0:
        per_class = torch.bincount(ds.train_labels[cal_idx], minlength=ds.num_classes)
        few = [(name, int(n)) for name, n in zip(ds.class_names, per_class) if n < MIN_CAL_PER_CLASS]
        if few:
            warnings.warn(f"{len(few)} class(es) have fewer than {MIN_CAL_PER_CLASS} images in the cal split "
                          f"(e.g. {few[0][0]}: {few[0][1]}); policies fitted on cal will be unreliable there: add "
                          "images or raise --cal-size", EelabWarning, stacklevel=2)
    if cfg.train_samples is not None:
        if cfg.train_samples > train_idx.numel():
            raise EelabError(f"--train-samples {cfg.train_samples} is more than the {train_idx.numel()} training "
                             "images left beside cal; lower --train-samples or --cal-size")
        g = torch.Generator().manual_seed(cfg.seed + 1)
        train_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)[:cfg.train_samples]].sort().values
    x_train = ds.train_images[train_idx]
    mean, std = channel_stats(x_train)
    data = _Data(x_train, ds.train_labels[train_idx], ds.train_images[cal_idx], ds.train_labels[cal_idx], cal_idx,
                 mean, std, list(ds.class_names), tuple(ds.image_shape))
    return _resolve(cfg, ds.num_classes, data.image_shape), data


def _resolve(cfg: TrainConfig, num_classes: int, image_shape: tuple[int, int, int]) -> TrainConfig:
    """The config as trained: the data's classes and channels, exits placed on its images, eenet's branches."""
    mcfg = replace(cfg.model, num_classes=num_classes, in_channels=image_shape[0])
    if mcfg.name in TORCHVISION_BACKBONES and mcfg.exits_after is None and (mcfg.exits_schedule or mcfg.num_exits):
        # place the exits by cost on this dataset's images, once: the checkpoint stores the layers chosen, beside
        # the schedule and K that chose them
        cuts = plan_exits(mcfg, image_shape)
        mcfg = replace(mcfg, exits_after=cuts, num_exits=len(cuts) + 1)
    if cfg.objective == "eenet":
        mcfg = replace(mcfg, confidence=True)
    return replace(cfg, model=mcfg)


def _resumed_config(asked: TrainConfig, out: Path) -> TrainConfig:
    """The config a resume continues with: `asked` (resolved), refused unless it equals the saved one.

    Only eval_batch_size may differ (it batches the watched cal figures, nothing trained): the new value is used.
    """
    saved = replace(TrainConfig.from_dict(read_checkpoint_config(out)["train"]),
                    eval_batch_size=asked.eval_batch_size)
    flags = {(o.in_model, o.field.name): o.flag for o in train_options()}
    changed = [flags.get((in_model, f.name), f"model.{f.name}")
               for in_model, a, s in ((True, asked.model, saved.model), (False, asked, saved))
               for f in fields(a) if f.name != "model" and getattr(a, f.name) != getattr(s, f.name)]
    if changed:
        raise EelabError(f"--resume continues the run in {out} as it was configured, but {', '.join(changed)} "
                         f"changed; drop {'it' if len(changed) == 1 else 'them'} or train into a new --out")
    return asked


def _build_model(cfg: TrainConfig, image_shape: tuple[int, int, int], device: torch.device
                 ) -> tuple[MultiExitNet, torch.Tensor, float]:
    """(model seeded by cfg.seed, started from --init if given, channels_last on device; exit costs [K] in MACs;
    the plain network's MACs)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.init:
        init_model, init_cfg = load_checkpoint(cfg.init)
        if replace(ModelConfig.from_dict(init_cfg["model"]), confidence=False) != replace(cfg.model,
                                                                                          confidence=False):
            raise EelabError(f"--init checkpoint {cfg.init} is a {init_cfg['factory']} with other arguments than "
                             f"this run's {cfg.model.name}; use the same --model and head options")
        # confidence branches an --objective eenet run adds to a plain checkpoint start fresh
        missing, unexpected = model.load_state_dict(init_model.state_dict(), strict=False)
        if unexpected or any(not key.startswith("confidences.") for key in missing):
            raise EelabError(f"--init checkpoint {cfg.init} does not fit this run's {cfg.model.name} "
                             f"({(unexpected + missing)[0]}); use the same --model and head options")
    try:
        costs, full_cost = measure_costs(model, image_shape)
    except RuntimeError as e:  # e.g. VGG's five 2x2 pools on 28x28 MNIST images
        raise EelabError(f"model {cfg.model.name} cannot run on {cfg.dataset} images of shape {list(image_shape)} "
                         f"({' '.join(str(e).split())[:120]}); pass a larger --image-size (e.g. 32)") from None
    return model.to(device).to(memory_format=torch.channels_last), costs, full_cost


def _loss_weights(cfg: TrainConfig, model: MultiExitNet, costs: torch.Tensor, full_cost: float,
                  device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """(per-exit loss weights [K] on device, the heads no loss reaches), freezing those heads (and, heads-only,
    the backbone)."""
    k = model.num_exits
    if cfg.plain:
        per_exit = [0.0] * (k - 1) + [1.0]
    else:
        per_exit = list(cfg.loss_weights) if cfg.loss_weights is not None else [1.0] * k
    if len(per_exit) != k:
        raise EelabError(f"--loss-weights needs {k} values (one per exit), got {len(per_exit)}")
    weights = torch.tensor(per_exit, device=device)
    if cfg.objective == "eenet":  # the EENets loss weighs exits by their confidence, and needs their costs
        weights = (costs / full_cost).to(device, torch.float32)
    # a head that no loss reaches is frozen, so weight decay does not drift it either (the last exit is the
    # distillation teacher and gets no gradient from it)
    frozen = [i for i in range(k) if per_exit[i] == 0 and not (cfg.distill > 0 and i < k - 1)]
    if cfg.heads_only:
        model.stages.requires_grad_(False)
    for i in frozen:
        model.heads[i].requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise EelabError("nothing to train: the backbone is frozen (--heads-only) and every head has loss weight 0; "
                         "give some exit a positive --loss-weights value")
    return weights, frozen


def _optimizer(cfg: TrainConfig, model: MultiExitNet, total_steps: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over the trainable parameters and its learning-rate schedule over total_steps."""
    lr = cfg.lr if cfg.lr is not None else _DEFAULT_LR[cfg.optimizer]
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    early = {id(p) for h in model.heads[:-1] for p in h.parameters()}
    groups = []  # (batch norm?, early head?): lr x bn_lr_scale and/or x head_lr_scale; batch norm's decay / its factor
    for is_norm, is_head in ((False, False), (True, False), (False, True), (True, True)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in norm) == is_norm
                  and (id(p) in early) == is_head]
        bn = cfg.bn_lr_scale if is_norm else 1.0
        if params:
            groups.append({"params": params, "lr": lr * bn * (cfg.head_lr_scale if is_head else 1.0),
                           "weight_decay": cfg.weight_decay / bn})
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
    if cfg.schedule == "onecycle":
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                        total_steps=total_steps, pct_start=0.25)
    if cfg.schedule == "triangle":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(triangle, total_steps=total_steps))
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)


def triangle(step: int, total_steps: int, start: float = 0.2, peak: float = 0.23, end: float = 0.07) -> float:
    """The triangle schedule's learning-rate factor at a step: linear from `start` to 1 over the first `peak`
    share of total_steps, then linear to `end` at the last step (airbench's warm-up and decay)."""
    top = max(1, int(peak * total_steps))
    if step <= top:
        return start + (1 - start) * step / top
    return 1 + (end - 1) * min(1.0, (step - top) / max(1, total_steps - top))


@torch.no_grad()
def whiten_first_conv(model: MultiExitNet, images: torch.Tensor | None, mean: Sequence[float],
                      std: Sequence[float], samples: int = 5000, eps: float = 5e-4) -> nn.Conv2d:
    """Initialise the first conv of stage 0 to whiten k x k patches of training images, and freeze its weights.

    images: uint8 [N, ch, H, W] training images (the first `samples` are used), normalised by mean/std; None
    only freezes (a resume, or --init: the weights come from the checkpoint). The conv needs d = ch k k filters
    (the patch covariance's eigenvectors, each scaled by 1/sqrt(eigenvalue + eps)) or 2d (the same and their
    negatives, airbench's layout); its bias stays trainable. Returns the conv.
    """
    conv = next((m for m in model.stages[0].modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise EelabError("--whiten needs a conv layer in the model's first stage")
    ch, (kh, kw) = conv.in_channels, conv.kernel_size
    d = ch * kh * kw
    if conv.out_channels not in (d, 2 * d) or conv.groups != 1:
        raise EelabError(f"--whiten needs a first conv with {d} or {2 * d} filters ({ch} channels x {kh}x{kw}), "
                         f"this model's has {conv.out_channels}; use --model ee_airnet or drop --whiten")
    conv.weight.requires_grad_(False)
    if images is None:
        return conv
    x = prepare(images[:samples], list(mean), list(std)).double()
    patches = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
    values, vectors = torch.linalg.eigh(patches.T @ patches / patches.shape[0])  # ascending
    filters = (vectors.T.flip(0) / torch.sqrt(values.flip(0) + eps)[:, None]).reshape(d, ch, kh, kw)
    if conv.out_channels == 2 * d:
        filters = torch.cat([filters, -filters])
    conv.weight.copy_(filters.to(conv.weight.dtype))
    return conv


def _restore(out: Path, parts: _Parts) -> tuple[int, list[dict]]:
    """Load out/state.pt into the parts; returns (epochs done, their history rows)."""
    st = load_state(out)
    try:
        parts.model.load_state_dict(st["model"])
        if parts.ema is not None:
            parts.ema.load_state_dict(st["ema"])
        if parts.slow is not None:
            parts.slow.load_state_dict(st["slow"])
        parts.opt.load_state_dict(st["optimizer"])
        parts.sched.load_state_dict(st["scheduler"])
        parts.gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        start = int(st["epoch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise EelabError(f"{out / 'state.pt'} does not fit this run ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:100]}); train it again with --overwrite or into a new "
                         "--out") from None
    return start, read_history(out, resuming=True)[:start]


def _epochs(cfg: TrainConfig, data: _Data, parts: _Parts, run: _Run, ckpt_cfg: dict[str, Any], start: int,
            history: list[dict]) -> None:
    """Epochs start+1..cfg.epochs, each followed by the cal check and a checkpoint (rank 0)."""
    if start >= cfg.epochs:
        return
    net: nn.Module = WithConfidences(parts.model)
    if run.world > 1:  # made after the restore: DistributedDataParallel starts every rank from rank 0's weights
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        loss = _train_epoch(cfg, data, parts, net, run, epoch)
        seconds = time.perf_counter() - t0
        if run.rank == 0:
            row = {"epoch": epoch + 1, "train_loss": loss, "lr": parts.sched.get_last_lr()[0], "seconds": seconds,
                   "images_per_s": parts.steps * parts.batch / seconds}
            if data.x_cal.shape[0]:
                row.update(_evaluate_exits(parts.kept, data, run.device, parts.dtype, cfg.eval_batch_size))
            history.append(row)
            _save_epoch(run, parts, ckpt_cfg, history, epoch + 1)
            if run.progress:
                accs = " ".join(f"{a:.3f}" for a in row.get("cal_acc", []))
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.3f}  cal acc per exit [{accs}]  "
                           f"{seconds:.0f}s ({row['images_per_s']:.0f} img/s)")
            if run.callback is not None:
                run.callback(row)
        _barrier(run.world, run.device)  # every rank returns only once the checkpoint is written


def _train_epoch(cfg: TrainConfig, data: _Data, parts: _Parts, net: nn.Module, run: _Run, epoch: int) -> float:
    """One pass over a fresh permutation of the train split, parts.steps steps; returns the mean loss."""
    _train_mode(parts.model, cfg.heads_only, parts.frozen)
    if run.world > 1:  # dropout draws differ between ranks, and an epoch's draws do not depend on a resume
        torch.manual_seed(cfg.seed + 1_000_003 * (epoch + 1) + 7_919 * run.rank)
    perm = torch.randperm(data.x_train.shape[0], generator=parts.gen)
    flips = alternate_flips(data.x_train.shape[0], epoch, cfg.seed) if cfg.flip == "alternate" else None
    loss_sum = 0.0
    bar = tqdm(range(parts.steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", disable=not run.progress,
               leave=False)
    for step in bar:
        rows = perm[step * parts.batch:(step + 1) * parts.batch]
        loss = train_step(net, parts.opt, data.x_train[rows], data.y_train[rows], parts.weights, cfg, data.mean,
                          data.std, parts.gen, run.device, parts.dtype, parts.scaler, shard=(run.rank, run.world),
                          flip=None if flips is None else flips[rows])
        if loss is None:
            done = f"epoch {epoch} in {run.out} is intact" if epoch > 0 else "no checkpoint was written"
            raise EelabError(f"loss became nan at epoch {epoch + 1} step {step + 1}; the last good checkpoint "
                             f"({done}); lower --lr or use --precision fp32")
        parts.sched.step()
        if parts.ema is not None:
            update_ema(parts.ema, parts.model, cfg.ema)
        if parts.slow is not None:
            done, total = epoch * parts.steps + step + 1, cfg.epochs * parts.steps
            if done == total:  # the run ends on the slow weights
                update_lookahead(parts.slow, parts.model, 1.0)
            elif done % cfg.lookahead == 0:
                update_lookahead(parts.slow, parts.model, lookahead_decay(done, total))
        loss_sum += loss
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    return loss_sum / parts.steps


def alternate_flips(n: int, epoch: int, seed: int) -> torch.Tensor:
    """Which of n training images --flip alternate flips in an epoch: bool [n], a seeded half of them in epoch 0
    and every image in every other epoch (each one alternates), so no image goes unflipped or flipped for long."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed + 3)) < 0.5
    return first ^ bool(epoch % 2)


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) model, for every float parameter and buffer; other buffers (batch counts)
    copied."""
    _blend(ema, model, decay, pull_back=False)


def lookahead_decay(step: int, total: int) -> float:
    """How much of the slow weights --lookahead keeps at a step: 0.95^5 (step/total)^3, from 0 (the slow copy
    jumps to the model) to 0.77 at the end (airbench94's schedule)."""
    return 0.95 ** 5 * (step / total) ** 3


def update_lookahead(slow: nn.Module, model: nn.Module, decay: float) -> None:
    """slow <- decay slow + (1 - decay) model, then model <- slow, for every float parameter and buffer (other
    buffers copied to slow); decay 1 puts the model on the slow weights."""
    _blend(slow, model, decay, pull_back=True)


@torch.no_grad()
def _blend(avg: nn.Module, model: nn.Module, decay: float, pull_back: bool) -> None:
    """avg <- decay avg + (1 - decay) model (float entries of the state dicts; others copied), and with
    pull_back model <- avg."""
    for a, v in zip(avg.state_dict().values(), model.state_dict().values()):
        if a.is_floating_point():
            a.lerp_(v.detach(), 1 - decay)
            if pull_back:
                v.copy_(a)
        else:
            a.copy_(v)


def _train_mode(model: MultiExitNet, heads_only: bool, frozen_heads: Sequence[int] = ()) -> None:
    model.train()
    if heads_only:
        model.stages.eval()  # frozen backbone: batch-norm statistics stay as trained
    for k in frozen_heads:
        model.heads[k].eval()  # a frozen head keeps its batch-norm statistics (and skips dropout) too


@torch.no_grad()
def _evaluate_exits(model: MultiExitNet, data: _Data, device: torch.device, dtype: torch.dtype | None,
                    batch_size: int) -> dict[str, Any]:
    """Per-exit accuracy on cal and the last exit's mean cross-entropy there: watched, never used to select."""
    model.eval()
    correct, loss_sum = None, 0.0
    for s in range(0, data.x_cal.shape[0], batch_size):
        x = prepare(data.x_cal[s:s + batch_size].to(device), data.mean, data.std)
        with _autocast(device, dtype):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        y = data.y_cal[s:s + batch_size].to(device)
        hit = (logits.argmax(-1) == y[:, None]).sum(0).cpu()
        correct = hit if correct is None else correct + hit
        loss_sum += float(F.cross_entropy(logits[:, -1], y, reduction="sum"))
    n = data.x_cal.shape[0]
    return {"cal_acc": (correct.double() / n).tolist(), "cal_loss_last": loss_sum / n}


def _save_epoch(run: _Run, parts: _Parts, ckpt_cfg: dict[str, Any], history: list[dict], epochs_done: int) -> None:
    """Write the checkpoint and the state a resume continues from; refused (the last good checkpoint kept) when a
    weight or a figure of this epoch is not finite."""
    bad = next((k for k, v in parts.kept.state_dict().items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    row = history[-1] if history else {}
    figures = [v for v in row.values() for v in (v if isinstance(v, list) else [v]) if isinstance(v, float)]
    if bad is not None or not all(math.isfinite(v) for v in figures):
        what = f"weight {bad}" if bad is not None else "per-epoch figure (loss or cal accuracy)"
        kept = f"epoch {epochs_done - 1} in {run.out} is kept" if epochs_done > 1 else "no checkpoint was written"
        raise EelabError(f"training produced a non-finite {what} at epoch {epochs_done}; the last good checkpoint "
                         f"({kept}); lower --lr or use --precision fp32")
    state = {"epoch": epochs_done,
             "model": {k: v.detach().cpu().clone() for k, v in parts.model.state_dict().items()},
             "optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict(),
             "generator": parts.gen.get_state(), "torch_rng": torch.get_rng_state()}
    for name, net in (("ema", parts.ema), ("slow", parts.slow)):
        if net is not None:
            state[name] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if run.replaces and epochs_done == 1:  # the old run goes only now: a run that failed before left it whole
        remove_run(run.out)
    save_checkpoint(run.out, parts.kept, ckpt_cfg, history, state, run.half_weights)


def _world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0) without them."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise EelabError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); unset them to "
                         "train in one process") from None
    if not 0 <= rank < world:
        raise EelabError(f"RANK {rank} is outside WORLD_SIZE {world}; start distributed training with torchrun")
    return rank, world, local


def _barrier(world: int, device: torch.device) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()
