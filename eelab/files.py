"""Atomic writes and safe reads of eelab's files (checkpoints, records, policies, JSON)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import EelabError


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it over `path`.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a record or checkpoint is an ordinary file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` (tensors, dicts, lists, numbers, strings only) atomically."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented JSON atomically."""
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return write_atomic(path, write)


def load_torch(path: str | Path, what: str, fix: str) -> Any:
    """torch.load(weights_only=True) with one-line errors for missing, truncated or foreign files.

    `what` names the file's role ("exit record", "checkpoint weights"), `fix` says how to get a good one.
    """
    path = Path(path)
    if not path.exists():
        raise EelabError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise EelabError(f"{what} {path} is a directory, not a file; {fix}")
    if not zipfile.is_zipfile(path):
        raise EelabError(f"{path} is not a {what} (not a torch file, or truncated); {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EelabError(f"{path} is not a readable {what} ({first[:120]}); {fix}") from None


def load_json(path: str | Path, what: str, fix: str) -> Any:
    """Read JSON with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise EelabError(f"{what} {path} does not exist; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EelabError(f"{path} is not valid JSON ({e}); {fix}") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
