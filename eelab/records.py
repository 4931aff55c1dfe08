"""ExitRecord: every exit's output for every sample of a split, written once and decided on many times."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import cast_for_inference, cast_input, inference_precision
from .errors import EelabError
from .files import check_output, load_tagged, save_torch, sha256_file
from .models import MultiExitNet

FORMAT = "eelab.exit_record"
FORMAT_VERSION = 1
_FIX = "re-create it with `eelab record CHECKPOINT --split {cal,test} --out FILE`"


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array (no copy on the CPU)."""
    return t.detach().cpu().numpy()


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
        """Validate once, wherever a record is made (load, collect, subset, tests): one-line EelabError.

        Field types and shapes agree, N > 0, every logit row has a finite maximum (no NaN or +inf; -inf, a
        probability of 0, is allowed), confidences finite, labels in [0, C), costs finite, positive and
        non-decreasing, full_cost finite and positive. Vectorised: a 10,000 x 4 x 10 record checks in about a ms.
        """
        for name in ("logits", "labels", "indices", "costs"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.is_complex() or value.dtype == torch.bool:
                what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise EelabError(f"exit record {name} must be a real-valued tensor, got {what}; {_FIX}")
        if self.confidences is not None and (not isinstance(self.confidences, torch.Tensor)
                                             or not self.confidences.is_floating_point()):
            raise EelabError(f"exit record confidences must be a float tensor or None, got "
                             f"{getattr(self.confidences, 'dtype', type(self.confidences).__name__)}; {_FIX}")
        if not isinstance(self.meta, dict):
            raise EelabError(f"exit record meta must be a dict, got {type(self.meta).__name__}; {_FIX}")
        if isinstance(self.full_cost, bool) or not isinstance(self.full_cost, (int, float)) \
                or not math.isfinite(self.full_cost) or self.full_cost <= 0:
            raise EelabError(f"exit record full_cost must be a finite number above 0 (MACs of the plain network), "
                             f"got {self.full_cost!r}; {_FIX}")
        lg = self.logits
        if lg.ndim != 3:
            raise EelabError(f"exit record logits must be [N, K, C], got shape {tuple(lg.shape)}; {_FIX}")
        n, k, c = lg.shape
        if n == 0 or k == 0 or c == 0:
            raise EelabError(f"exit record is empty (logits of shape {tuple(lg.shape)}; N, K and C must be at "
                             f"least 1); {_FIX}")
        if self.labels.shape != (n,) or self.indices.shape != (n,):
            raise EelabError(f"exit record labels/indices must be [{n}], got {tuple(self.labels.shape)} and "
                             f"{tuple(self.indices.shape)}; {_FIX}")
        if self.costs.shape != (k,):
            raise EelabError(f"exit record costs must be [{k}], got {tuple(self.costs.shape)}; {_FIX}")
        if self.confidences is not None and self.confidences.shape != (n, k):
            raise EelabError(f"exit record confidences must be [{n}, {k}], got "
                             f"{tuple(self.confidences.shape)}; {_FIX}")
        for name in ("labels", "indices"):  # whole numbers: a float label 1.5 is refused, never truncated
            value = getattr(self, name)
            if value.is_floating_point():
                if not bool((value == value.round()).all()):
                    raise EelabError(f"exit record {name} must be whole numbers, got {value.dtype} values such as "
                                     f"{float(value[value != value.round()][0])}; {_FIX}")
            if value.dtype != torch.int64:
                object.__setattr__(self, name, value.to(torch.int64))
        # one dtype per field, as the data contract says (no copy when it already is)
        object.__setattr__(self, "logits", lg.float())
        object.__setattr__(self, "costs", self.costs.double())
        if self.confidences is not None:
            object.__setattr__(self, "confidences", self.confidences.float())
        # the value checks run in numpy, single-threaded: torch's threaded reductions slow down 50x on busy cores
        # fast path: a finite sum means every logit is finite; otherwise the row maxima (max propagates NaN) refuse
        # NaN, +inf and rows with no finite logit, and allow -inf (a probability of 0) beside finite logits
        logits = _np(self.logits)
        bad = np.zeros(1, dtype=bool) if np.isfinite(logits.sum(dtype=np.float64)) else ~np.isfinite(logits.max(-1))
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise EelabError(f"exit record logits hold NaN or infinity ({int(bad.sum())} of {n * k} sample-exit "
                             f"rows, first: sample {i} exit {j}); the model or the file is broken: {_FIX}")
        if self.confidences is not None and not np.isfinite(_np(self.confidences).sum(dtype=np.float64)):
            raise EelabError(f"exit record confidences hold NaN or infinity; {_FIX}")
        labels = _np(self.labels)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= c:
            raise EelabError(f"exit record labels must be in [0, {c}) for C={c} classes, got values from {lo} to "
                             f"{hi}; {_FIX}")
        costs = _np(self.costs)
        if not np.isfinite(costs).all() or not (costs > 0).all() or not (costs[1:] >= costs[:-1]).all():
            raise EelabError(f"exit record costs must be finite, above 0 and non-decreasing (exit k+1 includes "
                             f"exit k's work), got {[round(float(v), 4) for v in costs]}; {_FIX}")

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
    def source(self) -> dict[str, Any]:
        """Where the outputs come from, for check_same_source: the checkpoint's sha256 (None in a synthetic record)
        and the exit ensemble's (None: plain exits)."""
        return {"checkpoint_sha256": self.meta.get("checkpoint_sha256"),
                "ensemble_sha256": self.meta.get("ensemble_sha256")}

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

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the record atomically (temp file and rename); a file of another kind at `path` (model weights, a
        policy) is refused unless overwrite, and so is a folder holding another checkpoint's model.pt."""
        check_record_output(path, self.source, overwrite, option="record")
        return save_torch(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "ExitRecord":
        """Read a record; one-line EelabError for a missing, truncated, foreign or newer-format file."""
        d = load_tagged(path, FORMAT, FORMAT_VERSION, "exit record", _FIX)
        version = d["format_version"]
        missing = [key for key in ("logits", "labels", "indices", "costs", "full_cost") if key not in d]
        if missing:
            raise EelabError(f"{path} lacks required field(s) {', '.join(missing)}; {_FIX}")
        meta = d.get("meta") if d.get("meta") is not None else {}
        wrong = [key for key in ("logits", "labels", "indices", "costs", "confidences")
                 if not isinstance(d[key] if key != "confidences" else d.get(key, torch.empty(0)), torch.Tensor)
                 and not (key == "confidences" and d.get(key) is None)]
        if wrong or not isinstance(meta, dict) or isinstance(d["full_cost"], bool) \
                or not isinstance(d["full_cost"], (int, float)):
            what = ", ".join(wrong) or ("meta" if not isinstance(meta, dict) else "full_cost")
            raise EelabError(f"{path} has field(s) of the wrong type ({what}); {_FIX}")
        if d["logits"].is_complex() or d["costs"].is_complex():
            raise EelabError(f"{path}: exit record logits and costs must be real numbers; {_FIX}")
        meta = dict(meta)
        meta.setdefault("format_version", version)
        try:
            record = cls(logits=d["logits"], labels=d["labels"], indices=d["indices"], costs=d["costs"],
                         full_cost=float(d["full_cost"]), meta=meta, confidences=d.get("confidences"))
        except EelabError as e:
            raise EelabError(f"{path}: {e}") from None
        # a record beside a model.pt is read as that model's (cal.pt by default): it must come from it
        check_record_of(record, Path(path).parent, f"record {path}")
        return record


def load_record(path: str | Path) -> ExitRecord:
    """Read an exit record from disk (see ExitRecord.load)."""
    return ExitRecord.load(path)


def check_same_source(a: Mapping[str, Any], b: Mapping[str, Any], what_a: str, what_b: str, fix: str) -> None:
    """The one check that two things may meet: they come from the same checkpoint and went through the same exit
    ensemble. One-line EelabError naming both, their hashes and the fix.

    a, b: sources, as ExitRecord.source, Policy.source, ExitEnsemble.source and checkpoint_source give them. A
    checkpoint sha256 is compared only when both carry one (a synthetic record carries none); the ensemble only
    when both say which one they went through (an "ensemble_sha256" key; None: plain exits). fix: what to do
    about another checkpoint (an ensemble mismatch says what to do about it).
    """
    if "ensemble_sha256" in a and "ensemble_sha256" in b and a["ensemble_sha256"] != b["ensemble_sha256"]:
        ea, eb = (str(s)[:12] if s else None for s in (a["ensemble_sha256"], b["ensemble_sha256"]))
        if ea and eb:
            problem = f"{what_a} and {what_b} are ensembled differently (ensemble {ea} vs {eb})"
        elif ea:
            problem = (f"{what_a} is for exits ensembled by {ea} and {what_b} for plain exits (used without that "
                       f"ensemble)")
        else:
            problem = f"{what_a} is for plain exits and {what_b} for exits ensembled by {eb}"
        raise EelabError(f"{problem}; use the same exit ensemble on both (--ensemble FILE), or none on either")
    sa, sb = a.get("checkpoint_sha256"), b.get("checkpoint_sha256")
    if sa and sb and sa != sb:
        raise EelabError(f"{what_a} and {what_b} come from different checkpoints ({str(sa)[:12]} vs {str(sb)[:12]}); "
                         f"{fix}")


def checkpoint_source(checkpoint: str | Path) -> dict[str, Any]:
    """The source of a checkpoint directory's network for check_same_source: the sha256 of its model.pt ({} where
    the directory holds none)."""
    weights = Path(checkpoint) / "model.pt"
    return {"checkpoint_sha256": sha256_file(weights)} if weights.is_file() else {}


def check_same_model(a: ExitRecord, b: ExitRecord, what_a: str = "record", what_b: str = "cal record") -> None:
    """Raise a one-line EelabError unless two records come from the same model and checkpoint (and, where
    ensembled, the same exit ensemble)."""
    # first: plain and ensembled outputs (or two ensembles) never mix, and their costs differ too
    check_same_source(a.source, b.source, what_a, what_b, "record both splits from the same checkpoint")
    if a.k != b.k or a.c != b.c or not torch.allclose(a.costs, b.costs) or a.full_cost != b.full_cost:
        raise EelabError(f"{what_a} and {what_b} come from different models (K={a.k}/{b.k}, C={a.c}/{b.c}, "
                         f"costs differ={not torch.allclose(a.costs, b.costs) if a.k == b.k else True}); "
                         f"record both splits from the same checkpoint")


def check_record_of(record: ExitRecord, checkpoint: str | Path, what: str = "record") -> None:
    """Raise a one-line EelabError when a record names a checkpoint hash other than the model.pt in `checkpoint`
    (e.g. records left beside a model trained later into the same folder). Nothing to compare: no error."""
    if record.meta.get("checkpoint_sha256"):  # a synthetic record has nothing to compare: model.pt is not hashed
        split = record.meta.get("split") or "{cal,test}"
        check_same_source(record.source, checkpoint_source(checkpoint), what, str(Path(checkpoint) / "model.pt"),
                          f"record it again with `eelab record {checkpoint} --split {split} --out FILE`, or move "
                          f"it out of {checkpoint}")


def check_record_output(path: str | Path, source: Mapping[str, Any], overwrite: bool = False,
                        option: str = "--out") -> Path:
    """The one check of where an exit record goes, before any work: check_output's, and a folder holding a
    checkpoint's model.pt takes only records of that checkpoint (source: the record's, or the checkpoint's about to
    be recorded), since a record beside a model.pt is read as that model's."""
    path = check_output(path, "exit record", overwrite, option=option)
    if source.get("checkpoint_sha256"):
        check_same_source(source, checkpoint_source(path.parent), f"{option} {path}", str(path.parent / "model.pt"),
                          "write a checkpoint's records into its own folder, or into one without a model.pt")
    return path


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
    from .checkpoint import load_checkpoint, sha_indices

    if split not in ("cal", "test"):
        raise EelabError(f"unknown split {split!r}; use cal or test (train is never recorded for evaluation)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EelabError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise EelabError(f"--limit must be at least 1, got {limit}")
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
    return records[0], records[1]  # each was checked against the model.pt beside it when loaded


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
