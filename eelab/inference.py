"""True early-exit inference: stage k+1 is computed only for samples the policy did not stop at exit k.

The same `run_policy` loop that decides on cached records drives the live stages here, so record-based
and live decisions cannot drift apart. The streamed predictor (EarlyExitPredictor.stream) keeps a queue in
front of each stage and runs the stage on full batches gathered across input batches; it decides through
`decide_step`, run_policy's own loop body, with each image's policy state travelling with it.
"""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import load_checkpoint
from .data import check_image_path, load_dataset, load_image, prepare
from .device import cast_for_inference, cast_input, inference_precision
from .ensemble import ExitEnsemble, ensemble_for
from .errors import EelabError
from .metrics import charged_costs
from .models import MultiExitNet, count_macs
from .policies import Policy, decide_step, make_policy, run_policy, state_rows
from .policies.base import State
from .records import checkpoint_source, load_record


@dataclass(frozen=True)
class Prediction:
    """One image's answer: class, its softmax probability at the exit taken, the exit, MACs spent."""

    class_index: int
    class_name: str
    confidence: float
    exit: int
    macs: float
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Exited:
    """One streamed image's answer: its position in the stream, the exit taken, logits there [C] fp32, MACs."""

    index: int
    exit: int
    logits: torch.Tensor
    macs: float


class PrecisionNote(UserWarning):
    """Inference runs at another precision than the records a fitted policy was fitted on (a note, not an error)."""


def precision_note(policy: Policy, precision: str) -> str | None:
    """One line when a fitted policy's cal record was computed at another precision than inference runs at."""
    fitted_at = policy.info.get("precision")
    if not policy.fitted or fitted_at is None or fitted_at == precision:
        return None
    return (f"policy {policy.name} was fitted on {fitted_at} records and predicts at {precision}: what it "
            f"guarantees holds at {fitted_at}; refit it on a cal record made with --precision {precision}")


def resolve_policy(policy: str | Path | Policy | None, checkpoint: str | Path | None = None,
                   params: dict[str, Any] | None = None, ensemble: ExitEnsemble | None = None) -> Policy:
    """A ready-to-decide policy: a Policy, a saved policy file, or a registry name (+ params).

    A named policy that must be fitted is fitted on `cal.pt` in the checkpoint directory when it is there (with
    an ensemble: on the ensembled part of cal the ensemble was not fitted on). None means the default threshold
    policy (max-prob >= 0.9). Whether a fitted policy belongs to the network is checked where the two meet (the
    runners: ensemble.ensemble_for; export_model), whichever way the policy came.
    """
    if isinstance(policy, Policy):
        return policy
    pol = make_policy(policy if policy is not None else "threshold", **(params or {}))
    if pol.needs_fit() and not pol.fitted:
        cal = Path(checkpoint) / "cal.pt" if checkpoint is not None else None
        if cal is None or not cal.is_file():
            raise EelabError(f"policy {pol.name} must be fitted on a cal record and {cal} is missing; record it "
                             f"with `eelab record CHECKPOINT --split cal --out CHECKPOINT/cal.pt` or give a saved "
                             f"policy file")
        cal_record = load_record(cal)  # checked against the model.pt beside it (a cal.pt left by an older model)
        pol.fit(cal_record if ensemble is None else ensemble.apply(cal_record))
    return pol


class LiveExits:
    """Early exit run live, whatever computes the network: per-batch shrinking (predict) and streaming (stream).

    A runner gives num_exits, policy, ensemble, costs [K] (charged MACs per exit) and four hooks: _prepare
    (uint8 images -> the first stage's input), _stage(k, h), _head(k, h) -> logits fp32 on the CPU and
    _confidence(k, h) -> confidences fp32 on the CPU. EarlyExitPredictor computes them with PyTorch,
    eelab.export.OnnxEarlyExit with onnxruntime; both decide through the same run_policy / decide_step, and
    activations wait in the stream's queues as torch tensors either way.
    """

    num_exits: int
    policy: Policy
    ensemble: ExitEnsemble | None
    costs: torch.Tensor
    _checked: Policy | None = None

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _confidence(self, k: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_policy(self) -> None:
        """check_exits once per policy, not per image (batch-1 latency)."""
        if self.policy is not self._checked:
            self.policy.check_exits(self.num_exits)
            self._checked = self.policy

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Early-exit over a uint8 batch [B, ch, H, W] -> exits int64 [B], logits [B, C] fp32, macs [B].

        run_policy drives the live stages: stage k runs only on the rows it asks for, which shrink as samples
        stop (at batch 1 nothing is gathered: the image runs on until it stops).
        """
        x = self._prepare(images)
        live: dict[str, Any] = {"rows": None, "h": x, "past": None}
        wants_confidence = "confidences" in self.policy.INPUTS

        def fetch(k: int, rows: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # rows only ever shrink, and stay the same object while nobody stops: gather survivors only then
            if live["rows"] is not None and rows.numel() != live["rows"].numel():
                keep = torch.isin(live["rows"], rows)
                live["h"] = live["h"][keep.to(live["h"].device)]
                if live["past"] is not None:
                    live["past"] = live["past"][keep]
            live["rows"] = rows
            live["h"] = self._stage(k, live["h"])
            logits = self._head(k, live["h"])
            if self.ensemble is not None:  # exit k's answer combines exits 0..k (each row keeps its own past)
                logits, live["past"] = self.ensemble.combine(k, logits, live["past"])
            if wants_confidence:  # a learned confidence branch, computed here like a head
                return logits, {"confidences": self._confidence(k, live["h"])}
            return logits

        self._check_policy()
        exits, logits = run_policy(self.policy, self.num_exits, fetch, x.shape[0], keep_logits=True,
                                   checked=True)
        return {"exits": exits, "logits": logits, "macs": self.costs[exits]}

    @torch.no_grad()
    def stream(self, images: Iterable[torch.Tensor], batch: int = 256, wait: int = 4,
               trace: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Exited]:
        """Streamed early exit over uint8 images [ch, H, W] or batches [B, ch, H, W] -> Exited per image, in order.

        A queue of pending activations waits in front of each stage; stage k runs when its queue holds
        `batch` rows, so every stage runs at full batch however the policy splits the images. Bounds: no stage
        runs on more than `batch` rows, fewer than 2 * batch rows wait in front of any stage (the deepest
        ready stage runs first), and an image waits at most `wait` further input batches (of `batch` images)
        before its queues are flushed partly full (wait=0: flushed every input batch); the stream's end
        flushes all. Each stage-k run decides through decide_step (run_policy's loop body) with the state rows
        of the images it holds. The generator reads images lazily. trace, if given, is called before every
        stage run with {"stage": k, "rows": rows run, "queued": rows waiting per stage [K], "queued_bytes"}.
        """
        if batch < 1 or wait < 0:
            raise EelabError(f"stream needs batch >= 1 and wait >= 0, got batch={batch}, wait={wait}")
        self._check_policy()
        queues = [_Queue() for _ in range(self.num_exits)]
        done: dict[int, tuple[int, torch.Tensor]] = {}
        start = emitted = 0
        for t, x in enumerate(_batches(images, batch)):
            ids = torch.arange(start, start + x.shape[0])
            start += x.shape[0]
            queues[0].put(ids, torch.full_like(ids, t), self._prepare(x), None, None)
            self._drain(queues, batch, t - wait, done, trace)
            while emitted in done:
                yield self._exited(emitted, done.pop(emitted))
                emitted += 1
        self._drain(queues, batch, None, done, trace)
        while emitted in done:
            yield self._exited(emitted, done.pop(emitted))
            emitted += 1

    def _exited(self, index: int, answer: tuple[int, torch.Tensor]) -> Exited:
        """The Exited of stream position `index` from its (exit, logits [C])."""
        return Exited(index, answer[0], answer[1], float(self.costs[answer[0]]))

    def _drain(self, queues: list["_Queue"], batch: int, due: int | None, done: dict[int, tuple[int, torch.Tensor]],
               trace: Callable[[dict[str, Any]], None] | None) -> None:
        """Run stages until no queue holds a full batch or an image that arrived at input batch <= due (None:
        every image: the end of the stream). The deepest ready stage runs first, so a stage's output never
        lands on a queue already holding a full batch."""
        while True:
            ready = [k for k, q in enumerate(queues)
                     if len(q) >= batch or (len(q) and (due is None or q.oldest() <= due))]
            if not ready:
                return
            k = ready[-1]
            rows = min(batch, len(queues[k]))
            if trace is not None:
                trace({"stage": k, "rows": rows, "queued": [len(q) for q in queues],
                       "queued_bytes": sum(q.nbytes() for q in queues)})
            ids, born, h, state, past = queues[k].take(rows)
            h = self._stage(k, h)
            logits = self._head(k, h)
            if self.ensemble is not None:  # the ensemble's past log-probs travel with their images, like state
                logits, past = self.ensemble.combine(k, logits, past)
            if k == len(queues) - 1:  # at the last exit every sample stops
                stop = torch.ones(rows, dtype=torch.bool)
            else:
                inputs = ({"confidences": self._confidence(k, h)}
                          if "confidences" in self.policy.INPUTS else None)
                stop, state = decide_step(self.policy, k, logits, state, inputs)
            for i, row in zip(ids[stop].tolist(), logits[stop]):
                done[i] = (k, row)
            if not bool(stop.all()):
                go = ~stop
                queues[k + 1].put(ids[go], born[go], h[go.to(h.device)], state_rows(state, go),
                                  None if past is None else past[go])


class EarlyExitPredictor(LiveExits):
    """A checkpoint plus a policy, computing each stage only for the samples still running.

    predict(x uint8 [B, ch, H, W]) -> dict of exits [B], logits at the exit [B, C], MACs [B].
    stream(images) -> each image's Exited, in input order, every stage run on full batches.
    precision fp32 (default), bf16 or auto (bf16 on a CPU with native bf16): bf16 runs a copy of the model
    with its batch norms folded, its stages cast once to bfloat16 and channels_last and its heads left in fp32
    (device.cast_for_inference); logits come back in fp32 either way. config is the checkpoint's
    config.json; with a "checkpoint_sha256" (from_checkpoint adds it) a policy or ensemble fitted on another
    checkpoint is refused.
    """

    def __init__(self, model: MultiExitNet, config: dict[str, Any], policy: Policy,
                 device: str | torch.device = "cpu", precision: str = "fp32", ensemble: ExitEnsemble | None = None):
        self.device = torch.device(device)
        self.ensemble = ensemble_for(ensemble, policy.source, model.num_exits, len(config["class_names"]),
                                     config.get("checkpoint_sha256"))
        self.precision = inference_precision(precision, self.device)
        self.model = cast_for_inference(model.eval().to(device), self.precision)
        self.config = config
        self.policy = policy
        note = precision_note(policy, self.precision)
        if note:
            warnings.warn(note, PrecisionNote, stacklevel=2)
        # MACs a sample leaving at exit k spends: the network's, plus the policy's own (a gate, a Q-network)
        costs = torch.tensor(config["costs"], dtype=torch.float64)
        if self.ensemble is not None:  # the combination's multiply-adds, as the ensembled record counts them
            costs = costs + self.ensemble.extra_macs()
        self.costs = charged_costs(costs, policy.overhead_macs(model.num_exits, len(config["class_names"])))
        self.class_names: list[str] = list(config["class_names"])
        policy.check_exits(model.num_exits)
        self._checked = policy
        if "confidences" in policy.INPUTS and not model.has_confidence:
            raise EelabError(f"policy {policy.name} reads learned confidences, and this checkpoint has no confidence "
                             "branches; train one with `eelab train --objective eenet`")

    @classmethod
    def from_checkpoint(cls, path: str | Path, policy: str | Path | Policy | None = None,
                        params: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                        precision: str = "fp32", ensemble: str | Path | ExitEnsemble | None = None
                        ) -> "EarlyExitPredictor":
        """Load a checkpoint directory, a policy (name, saved file or Policy; see resolve_policy) and optionally
        an exit ensemble (file or ExitEnsemble) fitted on this checkpoint."""
        model, cfg = load_checkpoint(path, device)
        cfg = {**cfg, **checkpoint_source(path)}  # its sha256: what the policy and ensemble are checked against
        if ensemble is not None:  # loaded and tied to this checkpoint before any policy is fitted with it
            ensemble = ensemble_for(ensemble, {}, model.num_exits, len(cfg["class_names"]), cfg["checkpoint_sha256"])
        return cls(model, cfg, resolve_policy(policy, path, params, ensemble), device, precision, ensemble)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, ch, H, W] -> the model's input on its device, normalised, in its precision."""
        return cast_input(prepare(images.to(self.device), self.config["mean"], self.config["std"]), self.precision)

    @property
    def num_exits(self) -> int:
        """K."""
        return self.model.num_exits

    def _stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_stage(k, h)

    def _head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(k, h).float().cpu()

    def _confidence(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_confidence(k, h).float().cpu()

    def stream_files(self, paths: Iterable[str | Path], batch: int = 256) -> Iterator[Prediction]:
        """Streamed early exit over image files, decoded lazily as the queues need them -> Prediction per file."""
        ch, h, w = self.config["input_shape"]
        paths = list(paths)
        for p in paths:  # every path checked (a stat, no decoding) before the first image runs
            check_image_path(p)
        for out in self.stream((load_image(p, (h, w), ch) for p in paths), batch=batch):
            prob, cls_idx = torch.softmax(out.logits, dim=-1).max(dim=-1)
            yield Prediction(int(cls_idx), self.class_names[int(cls_idx)], float(prob), out.exit, out.macs,
                             str(paths[out.index]))

    def predict_files(self, paths: list[str | Path], batch: int = 256) -> list[Prediction]:
        """Decode image files (any size or mode, converted as the model's config says) and predict each."""
        return list(self.stream_files(paths, batch))


Past = torch.Tensor | None  # an ensemble's log-probs of the exits an image passed [n, k, C], or None


class _Queue:
    """Rows waiting in front of one stage, oldest first, in parts: (ids [n], born [n] input batch, h [n, ...],
    policy state rows, ensemble past rows)."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, State, Past]] = []
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def put(self, ids: torch.Tensor, born: torch.Tensor, h: torch.Tensor, state: State, past: Past) -> None:
        self.parts.append((ids, born, h, state, past))
        self.rows += ids.numel()

    def oldest(self) -> int:
        """The input batch the longest-waiting row arrived with (rows arrive in order of age)."""
        return int(self.parts[0][1][0])

    def nbytes(self) -> int:
        """Bytes of the activations waiting here (what the stream's memory bound is about)."""
        return sum(h.numel() * h.element_size() for _, _, h, _, _ in self.parts)

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State, Past]:
        """The n oldest rows, concatenated (a part is split when only some of its rows are taken)."""
        taken, got = [], 0
        while got < n:
            ids, born, h, state, past = self.parts.pop(0)
            m = min(n - got, ids.numel())
            if m < ids.numel():  # leave the rest in front
                self.parts.insert(0, (ids[m:], born[m:], h[m:], state_rows(state, slice(m, None)),
                                      None if past is None else past[m:]))
                ids, born, h, state = ids[:m], born[:m], h[:m], state_rows(state, slice(0, m))
                past = None if past is None else past[:m]
            taken.append((ids, born, h, state, past))
            got += m
        self.rows -= n
        if len(taken) == 1:
            return taken[0]
        states = [part[3] for part in taken]
        if any(s is None for s in states) and not all(s is None for s in states):
            raise EelabError("the policy returned state for some batches and None for others at the same exit; "
                             "return state consistently")
        state = None if states[0] is None else {key: torch.cat([s[key] for s in states]) for key in states[0]}
        past = None if taken[0][4] is None else torch.cat([p[4] for p in taken])
        return (torch.cat([p[0] for p in taken]), torch.cat([p[1] for p in taken]),
                torch.cat([p[2] for p in taken]), state, past)


def _batches(images: Iterable[torch.Tensor], batch: int) -> Iterator[torch.Tensor]:
    """uint8 images [ch, H, W] and batches [B, ch, H, W], in order -> batches of exactly `batch` (the last fewer)."""
    held: list[torch.Tensor] = []
    count = 0
    for item in images:
        if not isinstance(item, torch.Tensor) or item.dtype != torch.uint8 or item.ndim not in (3, 4):
            what = (f"{item.dtype} [{', '.join(map(str, item.shape))}]" if isinstance(item, torch.Tensor)
                    else type(item).__name__)
            raise EelabError(f"stream takes uint8 images [ch, H, W] or batches [B, ch, H, W], got {what}")
        held.append(item.unsqueeze(0) if item.ndim == 3 else item)
        count += held[-1].shape[0]
        while count >= batch:
            x = torch.cat(held) if len(held) > 1 else held[0]
            yield x[:batch]
            held, count = ([x[batch:]] if x.shape[0] > batch else []), x.shape[0] - batch
    if count:
        yield torch.cat(held)


# ----------------------------------------------------------------------------- wall clock

def _median_seconds(fn: Callable[[], Any], rounds: int, warmup: int = 0) -> float:
    """Median wall-clock seconds of `rounds` calls of fn, after `warmup` untimed calls (first-call set-up)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def benchmark_inference(checkpoint: str | Path, policy: str | Path | Policy | None = None,
                        params: dict[str, Any] | None = None, n_latency: int = 200, n_throughput: int = 2048,
                        batch: int = 256, rounds: int = 5, progress: bool = False, precision: str = "fp32",
                        stream: bool = False, ensemble: str | Path | ExitEnsemble | None = None) -> dict[str, Any]:
    """Wall clock of the plain network (last exit only, no intermediate heads) against early exit.

    Latency per image at batch 1 over the first n_latency test images (n_latency=0 skips it), throughput at
    `batch` over the first n_throughput, per-batch shrinking ("batch{batch}") and, with stream=True, streamed
    ("stream{batch}", with its peak of queued activation bytes); all timed in alternating rounds (median of
    `rounds`), same threads, layout and precision. Each entry has the MAC saving the policy predicts on the
    same images beside the measured time saving, and their ratio.
    """
    pred = EarlyExitPredictor.from_checkpoint(checkpoint, policy, params, precision=precision, ensemble=ensemble)
    cfg, model = pred.config, pred.model
    ds = load_dataset(cfg["dataset"], cfg["train"].get("image_size"), progress=progress)
    lat_imgs, thr_imgs = ds.test_images[:n_latency], ds.test_images[:n_throughput]
    peak = {"queued_bytes": 0, "stage_rows": 0}

    def watch(event: dict[str, Any]) -> None:
        peak["queued_bytes"] = max(peak["queued_bytes"], event["queued_bytes"])
        peak["stage_rows"] = max(peak["stage_rows"], event["rows"])

    runs: dict[str, Callable[[], Any]] = {}
    if n_latency:
        runs["plain_1"] = lambda: [model.forward_plain(pred._prepare(lat_imgs[i:i + 1]))
                                   for i in range(lat_imgs.shape[0])]
        runs["early_1"] = lambda: [pred.predict(lat_imgs[i:i + 1]) for i in range(lat_imgs.shape[0])]
    runs["plain_b"] = lambda: [model.forward_plain(pred._prepare(thr_imgs[s:s + batch]))
                               for s in range(0, thr_imgs.shape[0], batch)]
    runs["early_b"] = lambda: [pred.predict(thr_imgs[s:s + batch]) for s in range(0, thr_imgs.shape[0], batch)]
    if stream:
        runs["stream_b"] = lambda: sum(1 for _ in pred.stream(thr_imgs.split(batch), batch=batch, trace=watch))
    for fn in runs.values():  # warm-up
        fn()
    t: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):  # alternate, so a change in machine load hits both sides
        for key, fn in runs.items():
            t[key].append(_median_seconds(fn, 1))
    med = {key: statistics.median(v) for key, v in t.items()}
    exits_b = pred.predict(thr_imgs)["exits"]
    full = float(cfg["full_cost"])
    mac_saving_b = 1 - float(pred.costs[exits_b].mean()) / full
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint), "policy": pred.policy.describe(), "threads": torch.get_num_threads(),
        "rounds": rounds, "dataset": cfg["dataset"], "precision": pred.precision,
        "ensemble": None if pred.ensemble is None else pred.ensemble.sha256}
    if n_latency:
        mac_saving_1 = 1 - float(pred.costs[pred.predict(lat_imgs)["exits"]].mean()) / full
        lat_p, lat_e = med["plain_1"] / lat_imgs.shape[0], med["early_1"] / lat_imgs.shape[0]
        out["batch1"] = {"images": int(lat_imgs.shape[0]), "plain_ms_per_image": 1e3 * lat_p,
                         "early_ms_per_image": 1e3 * lat_e, "time_saving": 1 - lat_e / lat_p,
                         "mac_saving": mac_saving_1, "time_over_mac_saving": _ratio(1 - lat_e / lat_p, mac_saving_1)}
    thr_p = thr_imgs.shape[0] / med["plain_b"]
    for key, mode in (("early_b", "batch"), ("stream_b", "stream")):
        if key in med:
            thr_e = thr_imgs.shape[0] / med[key]
            out[f"{mode}{batch}"] = {"images": int(thr_imgs.shape[0]), "plain_images_per_s": thr_p,
                                     "early_images_per_s": thr_e, "time_saving": 1 - thr_p / thr_e,
                                     "mac_saving": mac_saving_b,
                                     "time_over_mac_saving": _ratio(1 - thr_p / thr_e, mac_saving_b)}
    out["exit_fractions"] = torch.bincount(exits_b, minlength=model.num_exits).div(exits_b.numel()).tolist()
    if stream:
        # what ideal streaming would save: every stage at full batch with no queueing cost, each at its
        # profiled full-batch time (stage times per MAC differ, so its ratio lies below 1); an estimate
        ideal = ideal_streaming_saving(profile_checkpoint(checkpoint, batch=batch, rounds=rounds,
                                                          precision=precision), out["exit_fractions"])
        out[f"stream{batch}"].update(peak_queued_bytes=peak["queued_bytes"], peak_stage_rows=peak["stage_rows"],
                                     time_saving_ideal=ideal, ratio_ideal=_ratio(ideal, mac_saving_b))
    return out


def ideal_streaming_saving(profile: Mapping[str, Any], exit_fractions: Sequence[float]) -> float:
    """The time saving an ideal streamed early exit would reach (an estimate from a profile): each image runs
    stages 0..k and heads 0..k (k its exit) at the profile's full-batch time per image, nothing else; against
    the plain network (every stage, the last head). profile: profile_checkpoint's at the streamed batch size;
    exit_fractions: the share of images leaving at each exit. 1 - sum_k reach_k (stage_k + head_k) / plain,
    reach_k = share still running."""
    stages = profile["stages"]
    if len(exit_fractions) != len(stages):
        raise EelabError(f"{len(exit_fractions)} exit fractions for a profile of {len(stages)} stages")
    reach, spent = 1.0, 0.0
    for row, share in zip(stages, exit_fractions):
        spent += reach * (row["stage_ms"] + row["head_ms"])
        reach -= share
    return 1.0 - spent / profile["plain_ms"]


def _ratio(a: float, b: float) -> float | None:
    return a / b if abs(b) > 1e-12 else None


@torch.no_grad()
def profile_checkpoint(checkpoint: str | Path, batch: int = 1, rounds: int = 20, precision: str = "fp32"
                       ) -> dict[str, Any]:
    """Per stage and per head: median time (ms at `batch`), MACs, and the activation leaving each stage.

    The activation size is what an edge/cloud split after that stage would have to send (bytes per sample
    at the precision run, as the CEED authors' profiler reports; fp32 by default).
    """
    precision = inference_precision(precision)
    model, cfg = load_checkpoint(checkpoint)
    model = cast_for_inference(model, precision)
    h = cast_input(torch.randn(batch, *cfg["input_shape"]), precision)
    rows = []
    for k in range(model.num_exits):
        stage_in = h
        stage_s = _median_seconds(lambda: model.forward_stage(k, stage_in), rounds, warmup=2)
        stage_macs, h = count_macs(lambda: model.forward_stage(k, stage_in))
        head_s = _median_seconds(lambda: model.forward_head(k, h), rounds, warmup=2)
        head_macs, _ = count_macs(lambda: model.forward_head(k, h))
        rows.append({"exit": k, "stage_ms": 1e3 * stage_s, "head_ms": 1e3 * head_s, "stage_macs": stage_macs // batch,
                     "head_macs": head_macs // batch, "activation_shape": list(h.shape[1:]),
                     "activation_bytes": int(h[0].numel() * h.element_size())})
    cum = 0.0
    for r in rows:
        cum += r["stage_ms"]
        r["cumulative_ms"] = cum + sum(x["head_ms"] for x in rows[:r["exit"] + 1])
    return {"checkpoint": str(checkpoint), "batch": batch, "threads": torch.get_num_threads(), "precision": precision,
            "input_shape": cfg["input_shape"], "input_bytes": int(torch.Size(cfg["input_shape"]).numel() * 4),
            "stages": rows, "plain_ms": sum(r["stage_ms"] for r in rows) + rows[-1]["head_ms"]}
