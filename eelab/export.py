"""Early exit that survives export: one ONNX graph per stage, head and confidence branch, and a runner.

`export_onnx` writes DIR/stage_k.onnx, head_k.onnx (and confidence_k.onnx where the model has them), each
with a dynamic batch size, plus export.json (normalisation, input shape, class names, costs, the checkpoint's
sha256, every graph's sha256, and a saved policy, copied beside as policy.pt). `OnnxEarlyExit` computes the
stages with onnxruntime and feeds eelab's own `run_policy` (per-batch shrinking) or the streamed queues
(`stream`), the same code as the PyTorch predictor's (inference.LiveExits), so there is still one step loop:
torch decides and holds the queued arrays, onnxruntime runs the network.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .__version__ import __version__
from .checkpoint import load_checkpoint, read_checkpoint_config
from .ensemble import ExitEnsemble, ensemble_for
from .errors import EelabError
from .files import check_output_folder, load_json, save_json, sha256_file, write_atomic
from .inference import LiveExits, resolve_policy
from .metrics import charged_costs
from .models import MultiExitNet
from .policies import Policy, load_policy
from .records import check_same_source

FORMAT = "eelab.onnx_export"
FORMAT_VERSION = 1
MANIFEST = "export.json"
POLICY_FILE = "policy.pt"
OPSET = 18
_PARTS = ("stage", "head", "confidence")
_FIX = "export it again with `eelab export CHECKPOINT --format onnx --out DIR --overwrite`"


class _Part(nn.Module):
    """One piece of a MultiExitNet as a module of its own: stage k, head k or confidence branch k."""

    def __init__(self, model: MultiExitNet, part: str, k: int):
        super().__init__()
        self.model, self.part, self.k = model, part, k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, f"forward_{self.part}")(self.k, h)


def export_onnx(checkpoint: str | Path, out: str | Path, policy: str | Path | Policy | None = None,
                params: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export a checkpoint directory's stages, heads and confidence branches as ONNX graphs; returns export.json.

    policy (a name, file or Policy; see resolve_policy) is saved beside as policy.pt. DIR must be new or empty, a
    previous export of the same checkpoint, or overwrite=True; this is checked before any work.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    read_checkpoint_config(checkpoint)  # a foreign directory fails here, before the out check
    sha = sha256_file(checkpoint / "model.pt") if (checkpoint / "model.pt").is_file() else None
    _check_out(out, sha, overwrite)
    pol = None if policy is None else resolve_policy(policy, checkpoint, params)
    model, cfg = load_checkpoint(checkpoint)
    return export_model(model, {**cfg, "checkpoint": str(checkpoint), "checkpoint_sha256": sha}, out, pol,
                        overwrite=True)


def export_model(model: MultiExitNet, config: dict[str, Any], out: str | Path, policy: Policy | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write one ONNX graph per stage, head and confidence branch of `model`, then export.json; returns it.

    Graphs take and give fp32 [B, ...] with B dynamic. config holds input_shape [ch, H, W], mean and std [ch],
    class_names [C], costs [K] and full_cost (MACs), as a checkpoint's config.json; checkpoint_sha256 if known.
    """
    out = Path(out)
    sha = config.get("checkpoint_sha256")
    _check_out(out, sha, overwrite)
    if policy is not None:  # a policy fitted on another checkpoint never ships with this one's graphs
        check_same_source(policy.source, {"checkpoint_sha256": sha}, "the policy", "the exported checkpoint",
                          "refit it on this checkpoint's cal record")
    model = model.eval()
    (out / MANIFEST).unlink(missing_ok=True)  # until the new one is written, the directory reads as unfinished
    h = torch.zeros(2, *config["input_shape"])  # batch 2: an example batch of 1 would let export fix B to 1
    files: dict[str, str] = {}
    for k in range(model.num_exits):
        with torch.no_grad():
            inputs = {"stage": h, "head": model.forward_stage(k, h)}  # head and branch read the stage's output
        for part in _PARTS if model.has_confidence else _PARTS[:2]:
            name = f"{part}_{k}.onnx"
            _export_part(_Part(model, part, k).eval(), inputs.get(part, inputs["head"]), out / name)
            files[name] = sha256_file(out / name)
        h = inputs["head"]
    if policy is not None:
        policy.save(out / POLICY_FILE)
    _remove_stale(out, set(files) | ({POLICY_FILE} if policy is not None else set()))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "eelab_version": __version__, "opset": OPSET,
                "checkpoint": config.get("checkpoint"), "checkpoint_sha256": sha, "factory": config.get("factory"),
                "dataset": config.get("dataset"), "num_exits": model.num_exits, "has_confidence": model.has_confidence,
                "input_shape": list(config["input_shape"]), "mean": list(config["mean"]), "std": list(config["std"]),
                "class_names": list(config["class_names"]), "costs": [float(c) for c in config["costs"]],
                "full_cost": float(config["full_cost"]),
                "policy": None if policy is None else {"file": POLICY_FILE, "name": policy.name,
                                                        "label": policy.describe(),
                                                        "params": _jsonable(policy.params),
                                                        "summary": policy.summary()},
                "files": files}
    save_json(manifest, out / MANIFEST)  # last: a directory without it (or with stale hashes) is incomplete
    return manifest


def _check_out(out: Path, sha: str | None, overwrite: bool) -> None:
    """Refuse a file, a folder that cannot be made or written (under a file, read-only), or a non-empty directory
    that is not a previous export of this checkpoint (unless overwrite); the folder is made."""
    check_output_folder(out)  # a file, a folder under a file, or an unwritable place: one line
    if overwrite or not any(out.iterdir()):
        return
    try:
        prev = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        prev = None
    same = isinstance(prev, dict) and prev.get("format") == FORMAT and prev.get("checkpoint_sha256") == sha
    if same and sha is not None:
        return
    raise EelabError(f"--out {out} is not empty and not an export of this checkpoint; choose a new directory or "
                     f"pass --overwrite")


def _export_part(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export one module to a single-file ONNX graph with a dynamic batch dim, written atomically."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(module, (example,), input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True,
                                external_data=False, verbose=False)
    data = program.model_proto.SerializeToString()
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete graphs and a policy an earlier export left in `out` that this one did not write (only eelab's names)."""
    for path in out.iterdir():
        ours = path.name == POLICY_FILE or (path.suffix == ".onnx" and path.name.split("_")[0] in _PARTS)
        if ours and path.name not in keep and path.is_file():
            path.unlink()


def _jsonable(obj: Any) -> Any:
    """Policy parameters as JSON values (tuples as lists)."""
    return json.loads(json.dumps(obj, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def read_export(path: str | Path) -> dict[str, Any]:
    """export.json of an export directory, checked complete (every graph present with its recorded sha256)."""
    path = Path(path)
    if not path.is_dir():
        raise EelabError(f"ONNX export {path} is not a directory; {_FIX}")
    if not (path / MANIFEST).is_file():
        raise EelabError(f"{path} is not an eelab ONNX export (no {MANIFEST}), or its export did not finish; {_FIX}")
    manifest = load_json(path / MANIFEST, "ONNX export manifest", _FIX)
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("files"), dict)):
        raise EelabError(f"{path / MANIFEST} is not an eelab ONNX export manifest; {_FIX}")
    if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
        raise EelabError(f"{path} has export format version {manifest.get('format_version')!r}, this eelab reads "
                         f"up to {FORMAT_VERSION}; upgrade eelab")
    k = manifest.get("num_exits")
    parts = _PARTS if manifest.get("has_confidence") else _PARTS[:2]
    wanted = [f"{part}_{i}.onnx" for i in range(k if isinstance(k, int) else 0) for part in parts]
    if not wanted or sorted(wanted) != sorted(manifest["files"]):
        raise EelabError(f"{path / MANIFEST} does not list one graph per stage and head; {_FIX}")
    for name in wanted:
        if not (path / name).is_file():
            raise EelabError(f"ONNX export {path} is incomplete: {name} is missing; {_FIX}")
        if sha256_file(path / name) != manifest["files"][name]:
            raise EelabError(f"ONNX export {path} is damaged: {name} differs from the graph exported (truncated or "
                             f"replaced); {_FIX}")
    return manifest


class OnnxEarlyExit(LiveExits):
    """An ONNX export plus a policy: onnxruntime computes stage k only for the samples still running.

    predict(x uint8 [B, ch, H, W]) -> dict of exits [B], logits at the exit [B, C] fp32, MACs [B], and
    stream(images, batch) -> each image's Exited in input order with every stage run on full batches: the same
    code as EarlyExitPredictor's (inference.LiveExits), with onnxruntime computing each part. policy: a Policy,
    a saved policy file, a registry name (one that needs no fitting), or None for the policy saved in the export
    (else the default threshold policy).
    """

    def __init__(self, path: str | Path, policy: str | Path | Policy | None = None,
                 params: dict[str, Any] | None = None, threads: int | None = None,
                 ensemble: str | Path | ExitEnsemble | None = None):
        import onnxruntime as ort  # optional extra `export`: import only when an export is run

        self.path = Path(path)
        self.meta = read_export(self.path)
        self.num_exits: int = self.meta["num_exits"]
        self.class_names: list[str] = list(self.meta["class_names"])
        if policy is None and self.meta.get("policy"):
            policy = load_policy(self.path / POLICY_FILE)
        self.policy = resolve_policy(policy, None, params)
        self.policy.check_exits(self.num_exits)
        self._checked = self.policy
        # an exit ensemble (eelab.ensemble) combines the heads' outputs as live inference does, in torch; the
        # policy and the ensemble are checked against the exported checkpoint there
        self.ensemble = ensemble_for(ensemble, self.policy.source, self.num_exits, len(self.class_names),
                                     self.meta.get("checkpoint_sha256"))
        self._wants_confidence = "confidences" in self.policy.INPUTS
        if self._wants_confidence and not self.meta.get("has_confidence"):
            raise EelabError(f"policy {self.policy.name} reads learned confidences, and this export has no confidence "
                             "branches; export a checkpoint trained with `eelab train --objective eenet`")
        costs = torch.tensor(self.meta["costs"], dtype=torch.float64)
        if self.ensemble is not None:
            costs = costs + self.ensemble.extra_macs()
        self.costs = charged_costs(costs, self.policy.overhead_macs(self.num_exits, len(self.class_names)))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # no busy-waiting between runs: spinning worker threads take the cores from the Python thread that feeds
        # them (2-core AMD EPYC, EE-CNN plain network at 2 threads: 15.5 ms an image at batch 1 spinning, 3.3 not)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        parts = _PARTS if self._wants_confidence else _PARTS[:2]
        self._sessions = {(part, k): ort.InferenceSession(str(self.path / f"{part}_{k}.onnx"), opts,
                                                          providers=["CPUExecutionProvider"])
                          for k in range(self.num_exits) for part in parts}
        self._mean = np.asarray(self.meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(self.meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)

    def _run(self, part: str, k: int, h: np.ndarray) -> np.ndarray:
        return self._sessions[(part, k)].run(None, {"input": h})[0]

    def _part(self, part: str, k: int, h: torch.Tensor) -> torch.Tensor:
        # onnxruntime computes; torch only holds the arrays for the queues and the decision (no copy either way)
        return torch.from_numpy(self._run(part, k, np.ascontiguousarray(h.numpy())))

    def _stage(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self._part("stage", k, h)

    def _head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self._part("head", k, h)

    def _confidence(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self._part("confidence", k, h)

    def prepare(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 [B, ch, H, W] -> normalised float32 [B, ch, H, W] (as eelab.data.prepare, in numpy)."""
        x = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images).astype(np.float32) / 255
        return (x - self._mean) / self._std

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.prepare(images))

    def forward_plain(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """The plain network on onnxruntime: every stage, only the last head -> logits [B, C] fp32."""
        h = self.prepare(images)
        for k in range(self.num_exits):
            h = self._run("stage", k, h)
        return self._run("head", self.num_exits - 1, h)


__all__ = ["FORMAT", "FORMAT_VERSION", "OnnxEarlyExit", "export_model", "export_onnx", "read_export"]
