"""ExitRecord: every exit's output for every sample of a split, written once and decided on many times."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

from .device import cast_for_inference, cast_input, inference_precision
from .errors import EelabError
from .files import load_torch, save_torch
from .models import MultiExitNet

FORMAT = "eelab.exit_record"
FORMAT_VERSION = 1
_FIX = "re-create it with `eelab record CHECKPOINT --split {cal,test} --out FILE`"


@dataclass(frozen=True)
class ExitRecord:
    """Outputs of all K exits for N samples (DESIGN, Data contract).

    logits [N, K, C] fp32, labels [N] int64, indices [N] int64 (index in the dataset split),
    costs [K] MACs to produce exit k's output for one sample, full_cost MACs of the plain network,
    confidences [N, K] optional learned per-exit confidence, meta dict.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    costs: torch.Tensor
    full_cost: float
    meta: dict[str, Any] = field(default_factory=dict)
    confidences: torch.Tensor | None = None

    def __post_init__(self) -> None:
        lg = self.logits
        if lg.ndim != 3:
            raise EelabError(f"exit record logits must be [N, K, C], got shape {tuple(lg.shape)}; {_FIX}")
        n, k, _ = lg.shape
        if self.labels.shape != (n,) or self.indices.shape != (n,):
            raise EelabError(f"exit record labels/indices must be [{n}], got {tuple(self.labels.shape)} and "
                             f"{tuple(self.indices.shape)}; {_FIX}")
        if self.costs.shape != (k,):
            raise EelabError(f"exit record costs must be [{k}], got {tuple(self.costs.shape)}; {_FIX}")
        if self.confidences is not None and self.confidences.shape != (n, k):
            raise EelabError(f"exit record confidences must be [{n}, {k}], got "
                             f"{tuple(self.confidences.shape)}; {_FIX}")

    @property
    def n(self) -> int:
        """N, the number of samples."""
        return self.logits.shape[0]

    @property
    def k(self) -> int:
        """K, the number of exits."""
        return self.logits.shape[1]

    @property
    def c(self) -> int:
        """C, the number of classes."""
        return self.logits.shape[2]

    @property
    def class_names(self) -> list[str]:
        """Class names from meta, or '0'..'C-1'."""
        return list(self.meta.get("class_names") or [str(i) for i in range(self.c)])

    def subset(self, rows: torch.Tensor | slice | list[int]) -> "ExitRecord":
        """The record restricted to some rows (samples); costs and meta unchanged."""
        conf = None if self.confidences is None else self.confidences[rows]
        return replace(self, logits=self.logits[rows], labels=self.labels[rows],
                       indices=self.indices[rows], confidences=conf)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored on disk."""
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "logits": self.logits,
             "labels": self.labels, "indices": self.indices, "costs": self.costs,
             "full_cost": float(self.full_cost), "meta": self.meta}
        if self.confidences is not None:
            d["confidences"] = self.confidences
        return d

    def save(self, path: str | Path) -> Path:
        """Write the record atomically (temp file and rename)."""
        return save_torch(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "ExitRecord":
        """Read a record; one-line EelabError for a missing, truncated, foreign or newer-format file."""
        d = load_torch(path, "exit record", _FIX)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EelabError(f"{path} is not an eelab exit record; {_FIX}")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise EelabError(f"{path} has exit-record format version {version!r}, this eelab reads up to "
                             f"{FORMAT_VERSION}; upgrade eelab or {_FIX}")
        missing = [key for key in ("logits", "labels", "indices", "costs", "full_cost") if key not in d]
        if missing:
            raise EelabError(f"{path} lacks required field(s) {', '.join(missing)}; {_FIX}")
        meta = dict(d.get("meta") or {})
        meta.setdefault("format_version", version)
        return cls(logits=d["logits"].float(), labels=d["labels"].long(), indices=d["indices"].long(),
                   costs=d["costs"].double(), full_cost=float(d["full_cost"]), meta=meta,
                   confidences=None if d.get("confidences") is None else d["confidences"].float())


def load_record(path: str | Path) -> ExitRecord:
    """Read an exit record from disk (see ExitRecord.load)."""
    return ExitRecord.load(path)


def check_same_model(a: ExitRecord, b: ExitRecord, what_a: str = "record", what_b: str = "cal record") -> None:
    """Raise a one-line EelabError unless two records come from the same model and checkpoint."""
    if a.k != b.k or a.c != b.c or not torch.allclose(a.costs, b.costs) or a.full_cost != b.full_cost:
        raise EelabError(f"{what_a} and {what_b} come from different models (K={a.k}/{b.k}, C={a.c}/{b.c}, "
                         f"costs differ={not torch.allclose(a.costs, b.costs) if a.k == b.k else True}); "
                         f"record both splits from the same checkpoint")
    sa, sb = a.meta.get("checkpoint_sha256"), b.meta.get("checkpoint_sha256")
    if sa and sb and sa != sb:
        raise EelabError(f"{what_a} and {what_b} come from different checkpoints ({sa[:12]} vs {sb[:12]}); "
                         f"record both splits from the same checkpoint")


@torch.no_grad()
def collect(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
            prepare: Callable[[torch.Tensor], torch.Tensor], costs: torch.Tensor, full_cost: float,
            meta: dict[str, Any] | None = None, batch_size: int = 500, progress: bool = True,
            device: str | torch.device = "cpu", precision: str = "fp32") -> ExitRecord:
    """Run a multi-exit model once over `images` [N, ch, H, W] uint8 and keep every exit's logits in fp32.

    `model(x)` must return logits [B, K, C]; `prepare` turns a uint8 batch into the model's float input.
    A MultiExitNet with confidence branches also fills the record's confidences [N, K]. precision: fp32,
    bf16 or auto (eelab.device.inference_precision); bf16 runs a copy of the model cast once, and the
    record's meta["precision"] says which ran.
    """
    precision = inference_precision(precision, device)
    was_training = model.training
    model.eval()
    net = cast_for_inference(model, precision)
    outs, confs = [], []
    n = images.shape[0]
    for start in tqdm(range(0, n, batch_size), desc="record", unit="batch", disable=not progress, leave=False):
        x = cast_input(prepare(images[start:start + batch_size].to(device)), precision)
        out, conf = (net.forward_with_confidences(x) if isinstance(net, MultiExitNet) else (net(x), None))
        if conf is not None:
            confs.append(conf.float().cpu())
        outs.append(out.float().cpu())
    model.train(was_training)
    return ExitRecord(logits=torch.cat(outs), labels=labels.long().clone(), indices=indices.long().clone(),
                      costs=costs.double().clone(), full_cost=float(full_cost),
                      meta={**(meta or {}), "precision": precision},
                      confidences=torch.cat(confs) if confs else None)


def record_checkpoint(checkpoint: str | Path, split: str, limit: int | None = None, batch_size: int = 500,
                      progress: bool = True, precision: str = "fp32") -> ExitRecord:
    """Run a checkpoint once over its dataset's cal or test split -> ExitRecord (precision: see collect).

    limit: only a seeded random subset of `limit` samples, in index order (image folders are sorted by class,
    so the first samples would all be one class); the subset depends only on the checkpoint's seed.
    """
    from .__version__ import __version__
    from .data import load_dataset, prepare, split_train_cal
    from .files import sha256_file
    from .checkpoint import load_checkpoint, sha_indices

    if split not in ("cal", "test"):
        raise EelabError(f"unknown split {split!r}; use cal or test (train is never recorded for evaluation)")
    checkpoint = Path(checkpoint)
    model, cfg = load_checkpoint(checkpoint)
    ds = load_dataset(cfg["dataset"], cfg["train"].get("image_size"), progress=progress)
    if ds.class_names != cfg["class_names"]:
        raise EelabError(f"dataset {cfg['dataset']} now has classes {ds.class_names[:3]}..., the checkpoint was "
                         f"trained on {cfg['class_names'][:3]}...; point eelab at the dataset it was trained on")
    if split == "cal":
        _, idx = split_train_cal(ds.train_images.shape[0], cfg["cal_size"], cfg["seed"])
        if sha_indices(idx) != cfg["cal_indices_sha256"]:
            raise EelabError(f"the cal split of {cfg['dataset']} differs from the one {checkpoint} held out "
                             "(the dataset changed); record with the dataset the checkpoint was trained on")
        images, labels = ds.train_images[idx], ds.train_labels[idx]
    else:
        idx = torch.arange(ds.test_images.shape[0])
        images, labels = ds.test_images, ds.test_labels
    if limit is not None and limit < idx.numel():
        if limit < 1:
            raise EelabError(f"--limit must be at least 1, got {limit}")
        pick = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(int(cfg["seed"]) + 7))[:limit]
        pick = pick.sort().values
        idx, images, labels = idx[pick], images[pick], labels[pick]
    meta = {"format_version": FORMAT_VERSION, "model": cfg["factory"], "model_config": cfg["model"],
            "dataset": cfg["dataset"], "split": split, "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256_file(checkpoint / "model.pt"), "class_names": cfg["class_names"],
            "train_config": cfg["train"], "seed": cfg["seed"], "eelab_version": __version__}
    mean, std = cfg["mean"], cfg["std"]
    return collect(model, images, labels, idx, lambda x: prepare(x, mean, std),
                   torch.tensor(cfg["costs"], dtype=torch.float64), cfg["full_cost"], meta,
                   batch_size=batch_size, progress=progress, precision=precision)


def summarize_records(cal: ExitRecord, test: ExitRecord) -> dict[str, Any]:
    """Per-exit accuracy on cal and test, costs and provenance: the summary.json beside reference records."""
    check_same_model(test, cal, "test record", "cal record")

    def acc(r: ExitRecord) -> list[float]:
        return (r.logits.argmax(-1) == r.labels[:, None]).double().mean(0).tolist()

    return {"model": test.meta.get("model"), "dataset": test.meta.get("dataset"),
            "checkpoint_sha256": test.meta.get("checkpoint_sha256"), "n_cal": cal.n, "n_test": test.n,
            "exit_accuracy_cal": acc(cal), "exit_accuracy_test": acc(test), "costs": test.costs.tolist(),
            "full_cost": test.full_cost, "rel_costs": (test.costs / test.full_cost).tolist()}


def load_records(checkpoint: str | Path, limit: int | None = None, seed: int = 0) -> tuple[ExitRecord, ExitRecord]:
    """(cal, test) records of a checkpoint directory (cal.pt, test.pt).

    limit keeps a seeded random subset of at most `limit` samples of each, in record order (not the first
    ones: a folder dataset's records are sorted by class).
    """
    checkpoint = Path(checkpoint)
    records = []
    for split in ("cal", "test"):
        path = checkpoint / f"{split}.pt"
        if not path.is_file():
            raise EelabError(f"{path} does not exist; record it with `eelab record {checkpoint} --split {split} "
                             f"--out {path}`")
        record = load_record(path)
        if limit is not None and limit < record.n:
            gen = torch.Generator().manual_seed(seed)
            record = record.subset(torch.randperm(record.n, generator=gen)[:limit].sort().values)
        records.append(record)
    check_same_model(records[1], records[0], f"{checkpoint}/test.pt", f"{checkpoint}/cal.pt")
    return records[0], records[1]


def latency_record(record: ExitRecord, profile: Mapping[str, Any]) -> ExitRecord:
    """The record with measured milliseconds as costs: exit k costs profile's cumulative_ms[k], full_cost plain_ms.

    profile is eelab.profile_checkpoint's dict (per stage: cumulative_ms = stages 0..k plus heads 0..k at its
    batch size). Metrics of this record read mean_macs as mean ms per sample; a policy's own decision time
    (e.g. a gate network) is not in it.
    """
    stages = profile["stages"]
    if len(stages) != record.k:
        raise EelabError(f"the profile has {len(stages)} exits, the record {record.k}; profile the checkpoint the "
                         f"record came from")
    ms = torch.tensor([float(s["cumulative_ms"]) for s in stages], dtype=torch.float64)
    meta = {**record.meta, "cost_unit": "ms", "profile_batch": profile.get("batch"),
            "profile_threads": profile.get("threads")}
    return replace(record, costs=ms, full_cost=float(profile["plain_ms"]), meta=meta)
