"""True early-exit inference: stage k+1 is computed only for samples the policy did not stop at exit k.

The same `run_policy` loop that decides on cached records drives the live stages here, so record-based
and live decisions cannot drift apart.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import load_checkpoint
from .data import load_dataset, load_image, prepare
from .errors import EelabError
from .files import sha256_file
from .metrics import charged_costs
from .models import MultiExitNet, count_macs
from .policies import Policy, make_policy, run_policy
from .records import load_record


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


def resolve_policy(policy: str | Path | Policy | None, checkpoint: str | Path | None = None,
                   params: dict[str, Any] | None = None) -> Policy:
    """A ready-to-decide policy: a Policy, a saved policy file, or a registry name (+ params).

    A named policy that must be fitted is fitted on `cal.pt` in the checkpoint directory when it is there.
    None means the default threshold policy (max-prob >= 0.9).
    """
    if isinstance(policy, Policy):
        return policy
    pol = make_policy(policy if policy is not None else "threshold", **(params or {}))
    fitted_on = pol.info.get("checkpoint_sha256")
    if fitted_on and checkpoint is not None and (Path(checkpoint) / "model.pt").is_file():
        ours = sha256_file(Path(checkpoint) / "model.pt")
        if fitted_on != ours:
            raise EelabError(f"policy file {policy} was fitted on checkpoint {fitted_on[:12]}, not on {checkpoint} "
                             f"({ours[:12]}); refit it on this checkpoint's cal record")
    if pol.needs_fit() and not pol.fitted:
        cal = Path(checkpoint) / "cal.pt" if checkpoint is not None else None
        if cal is None or not cal.is_file():
            raise EelabError(f"policy {pol.name} must be fitted on a cal record and {cal} is missing; record it "
                             f"with `eelab record CHECKPOINT --split cal --out CHECKPOINT/cal.pt` or give a saved "
                             f"policy file")
        pol.fit(load_record(cal))
    return pol


class EarlyExitPredictor:
    """A checkpoint plus a policy, computing each stage only for the samples still running.

    predict(x uint8 [B, ch, H, W]) -> dict of exits [B], logits at the exit [B, C], MACs [B].
    """

    def __init__(self, model: MultiExitNet, config: dict[str, Any], policy: Policy,
                 device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.config = config
        self.policy = policy
        self.device = torch.device(device)
        # MACs a sample leaving at exit k spends: the network's, plus the policy's own (a gate, a Q-network)
        self.costs = charged_costs(torch.tensor(config["costs"], dtype=torch.float64),
                                   policy.overhead_macs(model.num_exits, len(config["class_names"])))
        self.class_names: list[str] = list(config["class_names"])
        policy.check_exits(model.num_exits)
        self._checked = policy
        if "confidences" in policy.INPUTS and not model.has_confidence:
            raise EelabError(f"policy {policy.name} reads learned confidences, and this checkpoint has no confidence "
                             "branches; train one with `eelab train --objective eenet`")

    @classmethod
    def from_checkpoint(cls, path: str | Path, policy: str | Path | Policy | None = None,
                        params: dict[str, Any] | None = None, device: str | torch.device = "cpu"
                        ) -> "EarlyExitPredictor":
        """Load a checkpoint directory and a policy (name, saved file or Policy; see resolve_policy)."""
        model, cfg = load_checkpoint(path, device)
        return cls(model, cfg, resolve_policy(policy, path, params), device)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Early-exit over a uint8 batch [B, ch, H, W] -> exits int64 [B], logits [B, C] fp32, macs [B].

        run_policy drives the live stages: stage k runs only on the rows it asks for, which shrink as samples
        stop (at batch 1 nothing is gathered: the image runs on until it stops).
        """
        x = prepare(images.to(self.device), self.config["mean"], self.config["std"])
        live = {"rows": None, "h": x}
        wants_confidence = "confidences" in self.policy.INPUTS

        def fetch(k: int, rows: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # rows only ever shrink, and stay the same object while nobody stops: gather survivors only then
            if live["rows"] is not None and rows.numel() != live["rows"].numel():
                keep = torch.isin(live["rows"], rows)
                live["h"] = live["h"][keep.to(live["h"].device)]
            live["rows"] = rows
            live["h"] = self.model.forward_stage(k, live["h"])
            logits = self.model.forward_head(k, live["h"]).float().cpu()
            if wants_confidence:  # a learned confidence branch, computed here like a head
                return logits, {"confidences": self.model.forward_confidence(k, live["h"]).cpu()}
            return logits

        if self.policy is not self._checked:  # once per policy, not per image (batch-1 latency)
            self.policy.check_exits(self.model.num_exits)
            self._checked = self.policy
        exits, logits = run_policy(self.policy, self.model.num_exits, fetch, x.shape[0], keep_logits=True,
                                   checked=True)
        return {"exits": exits, "logits": logits, "macs": self.costs[exits]}

    def predict_files(self, paths: list[str | Path]) -> list[Prediction]:
        """Decode image files (any size or mode, converted as the model's config says) and predict each."""
        ch, h, w = self.config["input_shape"]
        images = torch.stack([load_image(p, (h, w), ch) for p in paths])
        out = self.predict(images)
        probs = torch.softmax(out["logits"], dim=-1)
        conf, cls_idx = probs.max(dim=-1)
        return [Prediction(int(c), self.class_names[int(c)], float(p), int(e), float(m), str(src))
                for c, p, e, m, src in zip(cls_idx, conf, out["exits"], out["macs"], paths)]


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
                        batch: int = 256, rounds: int = 5, progress: bool = False) -> dict[str, Any]:
    """Wall clock of the plain network (last exit only, no intermediate heads) against early exit.

    Latency per image at batch 1 over the first n_latency test images, throughput at `batch` over the first
    n_throughput; the two are timed in alternating rounds (median of `rounds`), same threads and layout.
    Also returns the MAC saving the policy predicts on the same images, so time and MACs can be compared.
    """
    pred = EarlyExitPredictor.from_checkpoint(checkpoint, policy, params)
    cfg, model = pred.config, pred.model
    ds = load_dataset(cfg["dataset"], cfg["train"].get("image_size"), progress=progress)
    lat_imgs, thr_imgs = ds.test_images[:n_latency], ds.test_images[:n_throughput]
    mean, std = cfg["mean"], cfg["std"]

    def plain_one() -> None:
        for i in range(lat_imgs.shape[0]):
            model.forward_plain(prepare(lat_imgs[i:i + 1], mean, std))

    def early_one() -> None:
        for i in range(lat_imgs.shape[0]):
            pred.predict(lat_imgs[i:i + 1])

    def plain_batch() -> None:
        for s in range(0, thr_imgs.shape[0], batch):
            model.forward_plain(prepare(thr_imgs[s:s + batch], mean, std))

    def early_batch() -> None:
        for s in range(0, thr_imgs.shape[0], batch):
            pred.predict(thr_imgs[s:s + batch])

    plain_one(), early_one()  # warm-up
    t = {"plain_1": [], "early_1": [], "plain_b": [], "early_b": []}
    for _ in range(rounds):  # alternate, so a change in machine load hits both sides
        t["plain_1"].append(_median_seconds(plain_one, 1))
        t["early_1"].append(_median_seconds(early_one, 1))
        t["plain_b"].append(_median_seconds(plain_batch, 1))
        t["early_b"].append(_median_seconds(early_batch, 1))
    med = {key: statistics.median(v) for key, v in t.items()}
    exits_1 = pred.predict(lat_imgs)["exits"]
    exits_b = pred.predict(thr_imgs)["exits"]
    full = float(cfg["full_cost"])
    mac_saving_1 = 1 - float(pred.costs[exits_1].mean()) / full
    mac_saving_b = 1 - float(pred.costs[exits_b].mean()) / full
    lat_p, lat_e = med["plain_1"] / lat_imgs.shape[0], med["early_1"] / lat_imgs.shape[0]
    thr_p, thr_e = thr_imgs.shape[0] / med["plain_b"], thr_imgs.shape[0] / med["early_b"]
    return {
        "checkpoint": str(checkpoint), "policy": pred.policy.describe(), "threads": torch.get_num_threads(),
        "rounds": rounds, "dataset": cfg["dataset"],
        "batch1": {"images": int(lat_imgs.shape[0]), "plain_ms_per_image": 1e3 * lat_p,
                   "early_ms_per_image": 1e3 * lat_e, "time_saving": 1 - lat_e / lat_p,
                   "mac_saving": mac_saving_1, "time_over_mac_saving": _ratio(1 - lat_e / lat_p, mac_saving_1)},
        f"batch{batch}": {"images": int(thr_imgs.shape[0]), "plain_images_per_s": thr_p,
                          "early_images_per_s": thr_e, "time_saving": 1 - thr_p / thr_e,
                          "mac_saving": mac_saving_b, "time_over_mac_saving": _ratio(1 - thr_p / thr_e,
                                                                                     mac_saving_b)},
        "exit_fractions": torch.bincount(exits_b, minlength=model.num_exits).div(exits_b.numel()).tolist(),
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if abs(b) > 1e-12 else None


@torch.no_grad()
def profile_checkpoint(checkpoint: str | Path, batch: int = 1, rounds: int = 20) -> dict[str, Any]:
    """Per stage and per head: median time (ms at `batch`), MACs, and the activation leaving each stage.

    The activation size is what an edge/cloud split after that stage would have to send (fp32 bytes per
    sample, as the CEED authors' profiler reports).
    """
    model, cfg = load_checkpoint(checkpoint)
    h = torch.randn(batch, *cfg["input_shape"])
    rows = []
    for k in range(model.num_exits):
        stage_in = h
        stage_s = _median_seconds(lambda: model.forward_stage(k, stage_in), rounds, warmup=2)
        stage_macs, h = count_macs(lambda: model.forward_stage(k, stage_in))
        head_s = _median_seconds(lambda: model.forward_head(k, h), rounds, warmup=2)
        head_macs, _ = count_macs(lambda: model.forward_head(k, h))
        rows.append({"exit": k, "stage_ms": 1e3 * stage_s, "head_ms": 1e3 * head_s, "stage_macs": stage_macs // batch,
                     "head_macs": head_macs // batch, "activation_shape": list(h.shape[1:]),
                     "activation_bytes": int(h[0].numel() * 4)})
    cum = 0.0
    for r in rows:
        cum += r["stage_ms"]
        r["cumulative_ms"] = cum + sum(x["head_ms"] for x in rows[:r["exit"] + 1])
    return {"checkpoint": str(checkpoint), "batch": batch, "threads": torch.get_num_threads(),
            "input_shape": cfg["input_shape"], "input_bytes": int(torch.Size(cfg["input_shape"]).numel() * 4),
            "stages": rows, "plain_ms": sum(r["stage_ms"] for r in rows) + rows[-1]["head_ms"]}
