"""The checkpoint directory: weights, config, history and resume state; atomic saves, safe loads.

A CHECKPOINT is a directory: model.pt (weights), config.json (factory and arguments, dataset, class names,
normalisation, seed, exit costs), history.json (per-epoch figures), state.pt (optimizer etc. for resume;
git-ignored). Every file is written atomically and read with torch.load(weights_only=True).

A training claims its directory first (claim_run): a lock file with pid and host keeps a second training out
(stale once that pid is dead), and a directory holding another run is refused unless overwrite; that run's files,
records, summary, policies and ensembles are then removed just before the new run writes its first checkpoint
(remove_run), so a new run that fails leaves the old one whole, and no old record stays beside a new model.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .__version__ import __version__
from .errors import EelabError
from .files import (TAGGED_KINDS, check_output_folder, clean_stale_temps, file_kind, host_name, load_json,
                    load_torch, pid_alive, save_json, save_torch)
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
    # a finite sum means every weight is finite (numpy: single-threaded, fast on busy cores)
    bad = next((k for k, v in state.items() if v.is_floating_point()
                and not np.isfinite(v.detach().double().numpy().sum())), None)
    if bad is not None:
        raise EelabError(f"{path / 'model.pt'} holds NaN or infinite weights ({bad}); the run that wrote it diverged: "
                         f"retrain with a lower --lr (`eelab train --out {path} --overwrite`)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), cfg


def save_checkpoint(out: str | Path, model: MultiExitNet, config: dict[str, Any], history: list[dict],
                    state: dict[str, Any], half_weights: bool = False) -> None:
    """Write config.json, model.pt (fp16 floats with half_weights), history.json, then state.pt, each atomically."""
    out = Path(out)
    # fp16 halves the file; a float beyond fp16's range (a batch-norm running_var of an unsettled net) stays fp32
    weights = {k: (v.half() if half_weights and v.is_floating_point() and _fits_half(v) else v).detach().cpu().clone()
               for k, v in model.state_dict().items()}
    save_json(config, out / "config.json")
    save_torch(weights, out / "model.pt")
    save_json(history, out / "history.json")
    save_torch(state, out / "state.pt")  # last: resume trusts state.pt, which holds the weights too


def _fits_half(v: torch.Tensor) -> bool:
    """Whether every value of a float tensor survives fp16 (no overflow to infinity)."""
    return not v.numel() or float(v.detach().abs().max()) <= float(torch.finfo(torch.float16).max)


def load_state(out: str | Path) -> dict[str, Any]:
    """state.pt of a run (weights, optimizer, scheduler, generators, epoch), for resume."""
    state = load_torch(Path(out) / "state.pt", "training state", _RESTART.format(out=out))
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "scheduler"} <= set(state):
        raise EelabError(f"{Path(out) / 'state.pt'} is not an eelab training state; {_RESTART.format(out=out)}")
    return state


def read_history(path: str | Path, resuming: bool = False) -> list[dict]:
    """Per-epoch figures of a checkpoint directory (history.json)."""
    fix = _RESTART.format(out=path) if resuming else "train with `eelab train --out DIR`"
    history = load_json(Path(path) / "history.json", "training history", fix)
    if not isinstance(history, list) or not all(isinstance(row, dict) for row in history):
        raise EelabError(f"{Path(path) / 'history.json'} is not a list of per-epoch rows; {fix}")
    return history


# ----------------------------------------------------------------------------- claiming a run directory

_RESTART = "this run cannot be resumed: train it again with --overwrite (its files are replaced) or into a new --out"
LOCK = ".eelab-train.lock"
RUN_FILES = ("model.pt", "config.json", "history.json", "state.pt")   # what train writes
BESIDE_FILES = ("cal.pt", "test.pt", "summary.json")                # what belongs to that run's model


def run_files(out: str | Path) -> list[Path]:
    """The files of a run in a directory: its checkpoint files, records and summary, and every file of eelab's own
    kinds beside them (exit records, policy files, exit ensembles: by their format tag, whatever their name); what
    --overwrite removes so nothing of an old run stays beside a new model. Hidden files (the lock, temps) are not."""
    out = Path(out)
    if not out.is_dir():
        return []
    named = [out / name for name in RUN_FILES + BESIDE_FILES if (out / name).is_file()]
    others = [f for f in sorted(out.iterdir()) if f not in named and not f.name.startswith(".") and f.is_file()
              and file_kind(f) in TAGGED_KINDS]
    return named + others


def remove_run(out: str | Path) -> list[Path]:
    """Remove the run in a directory (run_files): what a training with overwrite does just before it writes its
    first checkpoint, so a run that fails before then leaves the old one whole. Returns what it removed."""
    held = run_files(out)
    for f in held:
        f.unlink(missing_ok=True)
    return held


@contextmanager
def claim_run(out: str | Path, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Hold a run directory for one training, checked before any work starts.

    A lock file (pid and host) keeps a second training out while this one runs; a lock whose pid is dead on this
    host is stale and taken over. resume: the directory must hold the run's state.pt. Otherwise a directory that
    holds another run (checkpoint files, records, summary, policies, ensembles) is refused unless overwrite; the
    caller removes that run (remove_run) just before it writes its own first checkpoint. Temp files of
    interrupted writes are removed. Under torchrun rank 0 alone calls this.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EelabError(f"--out {out} is a file, not a directory; give a checkpoint directory path")
    check_output_folder(out)  # made, or refused in one line: under a file, not writable
    lock = _take_lock(out)
    try:
        if resume and not (out / "state.pt").is_file():
            raise EelabError(f"nothing to resume in {out} (no state.pt; committed checkpoints do not keep it); drop "
                             "--resume and train into a new --out, or pass --overwrite to replace it")
        if not resume:
            held = run_files(out)
            if held and not overwrite:
                raise EelabError(f"--out {out} already holds a training run ({', '.join(f.name for f in held)}); pass "
                                 "--resume to continue it, --overwrite to replace it (its records, summary, "
                                 "policies and ensembles go once the new run writes its first checkpoint), or "
                                 "choose another --out")
        for name in RUN_FILES:
            clean_stale_temps(out / name)
        yield out
    finally:
        _release_lock(lock)


def _take_lock(out: Path) -> Path:
    """Create out/LOCK holding this process's pid and host; a stale lock (dead pid here) is taken over.

    Looking at the lock, judging it stale, removing it and creating ours is one step under an exclusive flock of
    the directory (released by the kernel if we die), so two runs finding the same stale lock cannot both take
    it: the second sees the first's fresh lock. Where flock is not available, the step runs unguarded.
    """
    lock = out / LOCK
    me = json.dumps({"pid": os.getpid(), "host": host_name()})
    with _directory_flock(out):
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _lock_holder(lock)
                if holder is None:  # stale: its pid is gone, or it is a half-written lock of a crash
                    lock.unlink(missing_ok=True)
                    continue
                raise EelabError(f"--out {out} is in use by another training (pid {holder['pid']} on "
                                 f"{holder['host']}); wait for it, or choose another --out (if that run is gone, "
                                 f"delete {lock})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return lock
    raise EelabError(f"could not claim {out} ({lock} keeps coming back); choose another --out")


@contextmanager
def _directory_flock(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on a directory for a moment (blocking); nothing where the system has no flock."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without flock on directories
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """Who holds a lock ({pid, host}), or None when the lock is stale."""
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        # unreadable: a crash between create and write, or a foreign file; stale once it is not brand new
        try:
            return None if time.time() - lock.stat().st_mtime > 5 else {"pid": "?", "host": "?"}
        except FileNotFoundError:
            return None
    if host == host_name() and not pid_alive(pid):
        return None
    return {"pid": pid, "host": host}


def _release_lock(lock: Path) -> None:
    """Remove our own lock (never one another process took over)."""
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError, AttributeError):
        pass


__all__ = ["FORMAT", "FORMAT_VERSION", "LOCK", "RUN_FILES", "checkpoint_config", "claim_run", "load_checkpoint",
           "load_state", "read_checkpoint_config", "read_history", "remove_run", "run_files", "save_checkpoint",
           "sha_indices"]
