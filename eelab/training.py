"""Training loops for multi-exit networks and their checkpoints (atomic, resumable, weights_only loads).

A CHECKPOINT is a directory: model.pt (weights), config.json (factory and arguments, dataset, class names,
normalisation, seed), history.json (per-epoch figures), state.pt (optimizer etc. for resume; git-ignored).

Under torchrun (RANK and WORLD_SIZE set) training runs DistributedDataParallel, one process per GPU (nccl) or
CPU process (gloo): every rank draws the same global batch and augmentation and takes its share of it, so the
update equals a one-process step on the same global batch, up to batch-norm statistics and summation order.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .__version__ import __version__
from .data import augment, channel_stats, load_dataset, prepare, split_train_cal
from .errors import EelabError
from .files import load_json, load_torch, save_json, save_torch, sha256_file
from .models import TORCHVISION_BACKBONES, ModelConfig, MultiExitNet, build_model, measure_costs, plan_exits

CHECKPOINT_FORMAT = "eelab.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; defaults run on a laptop CPU. Stored in config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = "cifar10-jpeg"
    image_size: int | None = None        # folder datasets only: resize to image_size x image_size
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"               # sgd (Nesterov momentum) | adamw
    lr: float | None = None              # peak learning rate; None: 0.1 for sgd, 2e-3 for adamw
    weight_decay: float = 5e-4
    schedule: str = "onecycle"           # onecycle | cosine
    label_smoothing: float = 0.1
    loss_weights: tuple[float, ...] | None = None  # per exit; None: all 1.0
    distill: float = 0.0                 # weight of distilling the last exit into the earlier ones
    distill_temperature: float = 3.0
    heads_only: bool = False             # train heads on a frozen backbone (needs init)
    plain: bool = False                  # train only the plain network (backbone + last exit): CEED's first step
    init: str | None = None              # checkpoint directory to start the weights from
    train_samples: int | None = None     # seeded subset of the train split, for quick runs
    cal_size: int = 5000
    augment: bool = True                 # flip and 4-pixel reflect-pad crop, on tensors
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (fp16: CUDA only)
    seed: int = 0
    eval_batch_size: int = 500
    objective: str = "joint"             # joint (weighted CE per exit) | eenet (confidence branches + cost)
    cost_weight: float = 0.0             # eenet: lambda, the weight of the expected normalised cost

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


# ----------------------------------------------------------------------------- device and precision

def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bfloat16 instruction sets among amx_bf16 and avx512_bf16.

    Read from the flags of `cpuinfo` (a /proc/cpuinfo text); without it, from this machine's /proc/cpuinfo,
    plus amx_bf16 when torch reports AMX. Either set makes bf16 convolutions and matmuls faster than fp32
    (AMX: Sapphire Rapids and later Xeons; AVX512-BF16: Cooper Lake, AMD Zen 4 and 5). Without them torch
    emulates bf16 and it is slower than fp32.
    """
    live = cpuinfo is None
    if live:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags.update(line.split(":", 1)[1].split())
    if live:
        try:
            if torch.backends.cpu.get_cpu_capability().upper().startswith("AMX"):
                flags.add("amx_bf16")
        except Exception:
            pass
    return [name for name in ("amx_bf16", "avx512_bf16") if name in flags]


def choose_precision(requested: str, device: torch.device, bf16_flags: list[str] | None = None
                     ) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, use channels_last) for a requested precision on a device.

    auto: fp16 autocast on CUDA; bf16 autocast on a CPU with native bf16 (cpu_bf16_flags: AMX or
    AVX512-BF16); fp32 elsewhere. Measured for an ee_cnn training step, batch 128, 2 threads: on an AMD EPYC
    with AVX512-BF16, bf16 + channels_last 498 images/s against fp32 + channels_last 262; on an AVX-512 Xeon
    without bf16 instructions bf16 ran at 0.6x of fp32. channels_last is used throughout: in fp32 it measured
    1.33x (Xeon) and 1.18x (EPYC) faster than NCHW.
    """
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise EelabError(f"unknown precision {requested!r}; use auto, fp32, bf16 or fp16")
    if requested == "fp16" and device.type != "cuda":
        raise EelabError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if requested == "auto":
        if device.type == "cuda":
            return torch.float16, True
        flags = cpu_bf16_flags() if bf16_flags is None else bf16_flags
        return (torch.bfloat16, True) if flags else (None, True)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested], True


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


# ----------------------------------------------------------------------------- checkpoints

def _checkpoint_config(cfg: TrainConfig, ds_name: str, class_names: list[str], input_shape, mean, std,
                       cal_idx: torch.Tensor, costs: torch.Tensor, full_cost: float) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "eelab_version": __version__,
            "factory": cfg.model.name, "model": cfg.model.to_dict(), "dataset": ds_name,
            "class_names": list(class_names), "input_shape": list(input_shape), "mean": mean, "std": std,
            "seed": cfg.seed, "cal_size": cfg.cal_size, "cal_indices_sha256": _sha_indices(cal_idx),
            "costs": costs.tolist(), "full_cost": full_cost, "train": cfg.to_dict()}


def _sha_indices(idx: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(idx.to(torch.int64).numpy().tobytes()).hexdigest()


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with one-line errors for anything that is not eelab's."""
    path = Path(path)
    fix = "give a directory written by `eelab train --out DIR`"
    if not path.exists():
        raise EelabError(f"checkpoint {path} does not exist; {fix}")
    if not path.is_dir():
        raise EelabError(f"checkpoint {path} is a file, not a checkpoint directory; {fix}")
    cfg = load_json(path / "config.json", "checkpoint config", fix)
    if not isinstance(cfg, dict) or cfg.get("format") != CHECKPOINT_FORMAT:
        raise EelabError(f"{path} is not an eelab checkpoint (config.json has no eelab format tag); {fix}")
    if cfg.get("format_version", 0) > CHECKPOINT_VERSION:
        raise EelabError(f"checkpoint {path} has format version {cfg.get('format_version')}, newer than this "
                         f"eelab reads ({CHECKPOINT_VERSION}); upgrade eelab")
    return cfg


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiExitNet, dict[str, Any]]:
    """(model in eval mode, fp32, on device; config dict) from a checkpoint directory."""
    path = Path(path)
    cfg = read_checkpoint_config(path)
    model = build_model(ModelConfig.from_dict(cfg["model"]))
    state = load_torch(path / "model.pt", "checkpoint weights", f"retrain with `eelab train --out {path}`")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EelabError(f"{path / 'model.pt'} does not hold model weights; retrain with `eelab train`")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors, e.g. "
                  f"{(missing + unexpected + wrong)[0]}")
        raise EelabError(f"{path / 'model.pt'} holds weights of another architecture than {cfg['factory']!r} "
                         f"({detail}); use the model.pt trained with this config.json")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), cfg


def _save_checkpoint(out: Path, model: MultiExitNet, ckpt_cfg: dict, history: list[dict], state: dict,
                     half_weights: bool) -> None:
    weights = {k: (v.half() if half_weights and v.is_floating_point() else v).detach().cpu().clone()
               for k, v in model.state_dict().items()}
    save_json(ckpt_cfg, out / "config.json")
    save_torch(weights, out / "model.pt")
    save_json(history, out / "history.json")
    save_torch(state, out / "state.pt")  # last: resume trusts state.pt, which holds the weights too


# ----------------------------------------------------------------------------- the loop

def _train_mode(model: MultiExitNet, heads_only: bool, frozen_heads: Sequence[int] = ()) -> None:
    model.train()
    if heads_only:
        model.stages.eval()  # frozen backbone: batch-norm statistics stay as trained
    for k in frozen_heads:
        model.heads[k].eval()  # a frozen head keeps its batch-norm statistics (and skips dropout) too


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


@torch.no_grad()
def _evaluate_exits(model, images, labels, mean, std, device, dtype, channels_last, batch_size) -> dict[str, Any]:
    model.eval()
    correct, loss_sum = None, 0.0
    for s in range(0, images.shape[0], batch_size):
        x = prepare(images[s:s + batch_size].to(device), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, dtype):
            out = model(x)
        out = (out[0] if isinstance(out, tuple) else out).float()
        y = labels[s:s + batch_size].to(device)
        hit = (out.argmax(-1) == y[:, None]).sum(0).cpu()
        correct = hit if correct is None else correct + hit
        loss_sum += float(F.cross_entropy(out[:, -1], y, reduction="sum"))
    n = images.shape[0]
    return {"cal_acc": (correct.double() / n).tolist(), "cal_loss_last": loss_sum / n}


def train_step(model: MultiExitNet, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor, cfg: TrainConfig, mean: list[float], std: list[float],
               gen: torch.Generator, device: torch.device, dtype: torch.dtype | None, channels_last: bool,
               scaler: torch.amp.GradScaler | None = None, shard: tuple[int, int] = (0, 1)) -> float | None:
    """One optimisation step on a uint8 batch [B, ch, H, W]: augment, normalise, autocast forward, fp32 loss.

    shard (rank, world): distributed training; `images` is the whole global batch, augmented here with the same
    random draws on every rank, of which this rank takes rows [rank B/world, (rank+1) B/world); `model` is the
    DistributedDataParallel wrapper, which averages gradients. Returns the loss (the mean over ranks), or None
    (and no update, on every rank) when it is not finite.
    """
    if cfg.augment:
        images = augment(images, gen)
    rank, world = shard
    if world > 1:
        b = images.shape[0] // world
        images, labels = images[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]
    x = prepare(images.to(device, non_blocking=True), mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels.to(device, non_blocking=True)
    with _autocast(device, dtype):
        out = model(x)
    if cfg.objective == "eenet":
        logits, conf = out
        loss = eenet_loss(logits, conf, y, weights, cfg.cost_weight)  # weights hold the normalised costs here
    else:
        logits = out[0] if isinstance(out, tuple) else out
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


def _validate(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse a bad option before any data is loaded."""
    from .models import FACTORIES

    if cfg.model.name not in FACTORIES:
        raise EelabError(f"unknown model {cfg.model.name!r}; choose one of {', '.join(FACTORIES)}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise EelabError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")
    if cfg.schedule not in ("onecycle", "cosine"):
        raise EelabError(f"unknown schedule {cfg.schedule!r}; use onecycle or cosine")
    choose_precision(cfg.precision, device)
    if cfg.objective not in ("joint", "eenet"):
        raise EelabError(f"unknown objective {cfg.objective!r}; use joint or eenet")
    if cfg.objective == "eenet" and (cfg.plain or cfg.heads_only):
        raise EelabError("--objective eenet trains exits and confidence branches together; drop --plain/--heads-only")
    if cfg.cost_weight < 0:
        raise EelabError(f"--cost-weight must be at least 0, got {cfg.cost_weight}")
    if cfg.batch_size < 2:
        raise EelabError(f"batch size must be at least 2 (batch norm), got {cfg.batch_size}")
    if cfg.plain and cfg.heads_only:
        raise EelabError("--plain trains the backbone and --heads-only freezes it; choose one (CEED: --plain first, "
                         "then --heads-only --init THAT_CHECKPOINT)")
    if cfg.plain and (cfg.loss_weights is not None or cfg.distill > 0):
        raise EelabError("--plain trains the last exit alone; drop --loss-weights and --distill")


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
          callback: Callable[[dict], None] | None = None, half_weights: bool = False,
          device: str | torch.device | None = None) -> Path:
    """Train all exits jointly (or heads only, or the plain network only) and write a checkpoint after every epoch.

    callback(row) is called after each epoch's checkpoint is written (row = that epoch's history entry);
    resume=True continues from out/state.pt with the config stored there. Returns `out`.
    Under torchrun (RANK, WORLD_SIZE > 1) this is one rank of DistributedDataParallel training: nccl on CUDA
    (device cuda:LOCAL_RANK), gloo on the CPU; each rank takes its share of every global batch (--batch-size is
    the global batch), rank 0 alone writes the checkpoint, shows progress and calls callback.
    """
    rank, world, local = _world()
    if world == 1:
        return _train(cfg, Path(out), resume, progress, callback, half_weights,
                      torch.device(device) if device is not None else default_device(), 0, 1)
    import torch.distributed as dist

    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        return _train(cfg, Path(out), resume, progress and rank == 0, callback if rank == 0 else None,
                      half_weights, dev, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, out: Path, resume: bool, progress: bool, callback, half_weights: bool,
           device: torch.device, rank: int, world: int) -> Path:
    if resume:
        if not (out / "state.pt").exists():
            raise EelabError(f"nothing to resume in {out} (no state.pt); drop --resume to start a new run")
        saved = read_checkpoint_config(out)
        if TrainConfig.from_dict(saved["train"]) != cfg:
            cfg = TrainConfig.from_dict(saved["train"])  # resume continues the run it finds, as it was
    elif (out / "state.pt").exists():
        raise EelabError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if cfg.epochs < 1:
        raise EelabError(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.heads_only and not cfg.init:
        raise EelabError("heads-only training needs a trained backbone: pass --init CHECKPOINT")
    _validate(cfg, device)
    if cfg.batch_size % world:
        raise EelabError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over the {world} "
                         f"processes; use a multiple of {world}")

    if cfg.dataset.startswith("folder:"):  # an absolute path, so records and resumes find the same images
        cfg = replace(cfg, dataset="folder:" + str(Path(cfg.dataset[len("folder:"):]).expanduser().resolve()))
    if rank != 0:
        _barrier(world, device)  # rank 0 downloads, unpacks and caches first; the others then read its cache
    ds = load_dataset(cfg.dataset, cfg.image_size, progress=progress)
    if rank == 0:
        _barrier(world, device)
    train_idx, cal_idx = split_train_cal(ds.train_images.shape[0], cfg.cal_size, cfg.seed)
    if cfg.train_samples is not None:
        if not 0 < cfg.train_samples <= train_idx.numel():
            raise EelabError(f"--train-samples must be between 1 and {train_idx.numel()}, got {cfg.train_samples}")
        g = torch.Generator().manual_seed(cfg.seed + 1)
        train_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)[:cfg.train_samples]].sort().values
    x_train, y_train = ds.train_images[train_idx], ds.train_labels[train_idx]
    x_cal, y_cal = ds.train_images[cal_idx], ds.train_labels[cal_idx]
    mean, std = channel_stats(x_train)

    mcfg = replace(cfg.model, num_classes=ds.num_classes, in_channels=ds.image_shape[0])
    if mcfg.name in TORCHVISION_BACKBONES and mcfg.exits_after is None and (mcfg.exits_schedule or mcfg.num_exits):
        # place the exits by cost on this dataset's images, once: the checkpoint stores the layers chosen
        mcfg = replace(mcfg, exits_after=plan_exits(mcfg, ds.image_shape))
    if cfg.objective == "eenet":
        mcfg = replace(mcfg, confidence=True)
    cfg = replace(cfg, model=mcfg)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    k = model.num_exits
    if cfg.init:
        init_model, init_cfg = load_checkpoint(cfg.init)
        if replace(ModelConfig.from_dict(init_cfg["model"]), confidence=False) != replace(mcfg, confidence=False):
            raise EelabError(f"--init checkpoint {cfg.init} is a {init_cfg['factory']} with other arguments than "
                             f"this run's {mcfg.name}; use the same --model and head options")
        # confidence branches an --objective eenet run adds to a plain checkpoint start fresh
        missing, unexpected = model.load_state_dict(init_model.state_dict(), strict=False)
        if unexpected or any(not key.startswith("confidences.") for key in missing):
            raise EelabError(f"--init checkpoint {cfg.init} does not fit this run's {mcfg.name} "
                             f"({(unexpected + missing)[0]}); use the same --model and head options")
    try:
        costs, full_cost = measure_costs(model, ds.image_shape)
    except RuntimeError as e:  # e.g. VGG's five 2x2 pools on 28x28 MNIST images
        raise EelabError(f"model {mcfg.name} cannot run on {cfg.dataset} images of shape {list(ds.image_shape)} "
                         f"({' '.join(str(e).split())[:120]}); pass a larger --image-size (e.g. 32)") from None
    model.to(device)
    dtype, channels_last = choose_precision(cfg.precision, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
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
        for p in model.stages.parameters():
            p.requires_grad_(False)
    for i in frozen:
        model.heads[i].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EelabError("nothing to train: the backbone is frozen (--heads-only) and every head has loss weight 0; "
                         "give some exit a positive --loss-weights value")
    lr = cfg.lr if cfg.lr is not None else {"sgd": 0.1, "adamw": 2e-3}.get(cfg.optimizer, 0.0)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise EelabError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")
    n = x_train.shape[0]
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch: batch norm needs more than one sample
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        raise EelabError(f"unknown schedule {cfg.schedule!r}; use onecycle or cosine")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    ckpt_cfg = _checkpoint_config(cfg, cfg.dataset, ds.class_names, ds.image_shape, mean, std, cal_idx, costs, full_cost)
    history: list[dict] = []
    start_epoch = 0
    if resume:
        st = load_torch(out / "state.pt", "training state", f"start again without --resume into a new --out")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        start_epoch = int(st["epoch"])
        history = load_json(out / "history.json", "training history", "start again without --resume")[:start_epoch]
    if start_epoch >= cfg.epochs:
        return out
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        _train_mode(model, cfg.heads_only, frozen)
        if world > 1:  # dropout draws differ between ranks, and an epoch's draws do not depend on a resume
            torch.manual_seed(cfg.seed + 1_000_003 * (epoch + 1) + 7_919 * rank)
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not progress, leave=False)
        for step in bar:
            rows = perm[step * bs:(step + 1) * bs]
            loss = train_step(net, opt, x_train[rows], y_train[rows], weights, cfg, mean, std, gen,
                              device, dtype, channels_last, scaler, shard=(rank, world))
            if loss is None:
                done = f"epoch {epoch} in {out} is intact" if epoch > 0 else "no checkpoint was written"
                raise EelabError(f"loss became nan at epoch {epoch + 1} step {step + 1}; the last good "
                                 f"checkpoint ({done}); lower --lr or use --precision fp32")
            sched.step()
            loss_sum += loss
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
        seconds = time.perf_counter() - t0
        if rank == 0:
            row = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "lr": sched.get_last_lr()[0],
                   "seconds": seconds, "images_per_s": steps_per_epoch * bs / seconds}
            if x_cal.shape[0]:
                row.update(_evaluate_exits(model, x_cal, y_cal, mean, std, device, dtype, channels_last,
                                           cfg.eval_batch_size))
            history.append(row)
            state = {"epoch": epoch + 1,
                     "model": {kk: v.detach().cpu().clone() for kk, v in model.state_dict().items()},
                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                     "torch_rng": torch.get_rng_state()}
            _save_checkpoint(out, model, ckpt_cfg, history, state, half_weights)
            if progress:
                accs = " ".join(f"{a:.3f}" for a in row.get("cal_acc", []))
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.3f}  cal acc per exit "
                           f"[{accs}]  {seconds:.0f}s ({row['images_per_s']:.0f} img/s)")
            if callback is not None:
                callback(row)
        _barrier(world, device)  # every rank returns only once the checkpoint is written
    return out


def read_history(path: str | Path) -> list[dict]:
    """Per-epoch figures of a checkpoint directory (history.json)."""
    return load_json(Path(path) / "history.json", "training history", "train with `eelab train --out DIR`")
