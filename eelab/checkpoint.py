"""The checkpoint directory: weights, config, history and resume state; atomic saves, safe loads.

A CHECKPOINT is a directory: model.pt (weights), config.json (factory and arguments, dataset, class names,
normalisation, seed, exit costs), history.json (per-epoch figures), state.pt (optimizer etc. for resume;
git-ignored). Every file is written atomically and read with torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch

from .__version__ import __version__
from .errors import EelabError
from .files import load_json, load_torch, save_json, save_torch
from .models import ModelConfig, MultiExitNet, build_model

FORMAT = "eelab.checkpoint"
FORMAT_VERSION = 1
_FIX = "give a directory written by `eelab train --out DIR`"


def checkpoint_config(train: dict[str, Any], dataset: str, class_names: Sequence[str],
                      input_shape: Sequence[int], mean: list[float], std: list[float], cal_indices: torch.Tensor,
                      costs: torch.Tensor, full_cost: float) -> dict[str, Any]:
    """config.json of a run: train is the training config's dict (its "model" the factory arguments)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "eelab_version": __version__,
            "factory": train["model"]["name"], "model": train["model"], "dataset": dataset,
            "class_names": list(class_names), "input_shape": list(input_shape), "mean": mean, "std": std,
            "seed": train["seed"], "cal_size": train["cal_size"], "cal_indices_sha256": sha_indices(cal_indices),
            "costs": costs.tolist(), "full_cost": full_cost, "train": train}


def sha_indices(idx: torch.Tensor) -> str:
    """Hex sha256 of a split's sample indices (int64 bytes): a checkpoint names its cal split by it."""
    return hashlib.sha256(idx.to(torch.int64).numpy().tobytes()).hexdigest()


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with one-line errors for anything that is not eelab's."""
    path = Path(path)
    if not path.exists():
        raise EelabError(f"checkpoint {path} does not exist; {_FIX}")
    if not path.is_dir():
        raise EelabError(f"checkpoint {path} is a file, not a checkpoint directory; {_FIX}")
    cfg = load_json(path / "config.json", "checkpoint config", _FIX)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise EelabError(f"{path} is not an eelab checkpoint (config.json has no eelab format tag); {_FIX}")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise EelabError(f"checkpoint {path} has format version {cfg.get('format_version')}, newer than this "
                         f"eelab reads ({FORMAT_VERSION}); upgrade eelab")
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


def save_checkpoint(out: str | Path, model: MultiExitNet, config: dict[str, Any], history: list[dict],
                    state: dict[str, Any], half_weights: bool = False) -> None:
    """Write config.json, model.pt (fp16 floats with half_weights), history.json, then state.pt, each atomically."""
    out = Path(out)
    weights = {k: (v.half() if half_weights and v.is_floating_point() else v).detach().cpu().clone()
               for k, v in model.state_dict().items()}
    save_json(config, out / "config.json")
    save_torch(weights, out / "model.pt")
    save_json(history, out / "history.json")
    save_torch(state, out / "state.pt")  # last: resume trusts state.pt, which holds the weights too


def load_state(out: str | Path) -> dict[str, Any]:
    """state.pt of a run (weights, optimizer, scheduler, generators, epoch), for resume."""
    return load_torch(Path(out) / "state.pt", "training state", "start again without --resume into a new --out")


def read_history(path: str | Path) -> list[dict]:
    """Per-epoch figures of a checkpoint directory (history.json)."""
    return load_json(Path(path) / "history.json", "training history", "train with `eelab train --out DIR`")


__all__ = ["FORMAT", "FORMAT_VERSION", "checkpoint_config", "load_checkpoint", "load_state", "read_checkpoint_config",
           "read_history", "save_checkpoint", "sha_indices"]
