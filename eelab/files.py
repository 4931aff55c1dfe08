"""Atomic writes and safe reads of eelab's files (checkpoints, records, policies, JSON).

write_atomic is the one writer (temp file named with its pid, fsync, rename; an interrupted write's temp is
removed by the next write); check_output is the one check of an output file before work starts, check_output_folder
of an output folder; save_json the one JSON writer (strict JSON: no NaN).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
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
    clean_stale_temps(path)
    # the temp's name carries its writer's pid, so a later write can tell an interrupted write's leftover
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove temp files an interrupted write_atomic of `path` left beside it (their writer's pid is dead).

    A temp of a live writer (another process writing the same file right now) is left alone. Returns those removed.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def glob_escape(name: str) -> str:
    """A file name with glob's special characters escaped."""
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def host_name() -> str:
    """This machine's name, as lock files record it."""
    return socket.gethostname()


def save_torch(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` (tensors, dicts, lists, numbers, strings only) atomically."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented, strictly valid JSON atomically: NaN or infinity is refused before anything is written.

    The one JSON file writer of eelab (config, history, summaries, manifests).
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError:
        raise EelabError(f"refusing to write {path}: it would hold NaN or infinity ({_first_nonfinite(obj)}), which "
                         "is not valid JSON; the computation that produced it went wrong") from None
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def _first_nonfinite(obj: Any, where: str = "") -> str:
    """Where the first NaN or infinity in a JSON-ready object is, e.g. '[3].train_loss = nan'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'value'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_nonfinite(value, f"{where}.{key}" if isinstance(obj, dict) else f"{where}[{key}]")
        if found:
            return found
    return ""


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


def load_tagged(path: str | Path, fmt: str, version: int, what: str, fix: str) -> dict[str, Any]:
    """A torch file of eelab's own (a dict with format == fmt and a format_version in 1..version), read with
    load_torch; one-line EelabError for a foreign file or a format this eelab cannot read."""
    d = load_torch(path, what, fix)
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise EelabError(f"{path} is not an eelab {what}; {fix}")
    found = d.get("format_version")
    if not isinstance(found, int) or isinstance(found, bool) or not 1 <= found <= version:
        raise EelabError(f"{path} has {what} format version {found!r}, this eelab reads up to {version}; upgrade "
                         f"eelab or {fix}")
    return d


def load_json(path: str | Path, what: str, fix: str) -> Any:
    """Read JSON with one-line errors for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise EelabError(f"{what} {path} does not exist; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EelabError(f"{path} is not valid JSON ({e}); {fix}") from None


_KINDS = {"eelab.exit_record": "exit record", "eelab.policy": "policy file", "eelab.exit_ensemble": "exit ensemble"}
TAGGED_KINDS = frozenset(_KINDS.values())  # what file_kind calls eelab's own tagged torch files, whatever their name


def file_kind(path: str | Path) -> str:
    """What an existing file holds, in words: 'exit record', 'policy file', 'model weights', 'training state',
    'JSON', 'empty file', or 'a file of another kind' (read with weights_only=True and mmap, so it is cheap)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return "empty file"
    if zipfile.is_zipfile(path):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a damaged or foreign torch file is some other kind
            return "a file of another kind"
        if isinstance(d, dict):
            if d.get("format") in _KINDS:
                return _KINDS[d["format"]]
            if d and all(isinstance(v, torch.Tensor) for v in d.values()):
                return "model weights"
            if "optimizer" in d and "epoch" in d:
                return "training state"
        return "a file of another kind"
    if path.suffix == ".json":
        return "JSON"
    return "a file of another kind"


def check_output(path: str | Path, kind: str, overwrite: bool = False, option: str = "--out") -> Path:
    """The one check of an output file, made before any work starts: it is not a directory or special file, its
    folder exists or can be made and is writable, and it does not hold a file of another kind than `kind` (an
    'exit record', a 'policy file') unless overwrite. One-line EelabError naming the option and the fix."""
    path = Path(path)
    if path.is_dir():
        raise EelabError(f"{option} {path} is a directory; give a file path inside it, e.g. {path / 'out.pt'}")
    if path.exists() and not path.is_file():
        raise EelabError(f"{option} {path} is not a regular file (a FIFO or device); give a file path")
    _check_writable(path, path.parent, option)
    if path.is_file() and not overwrite:
        found = file_kind(path)
        if found not in (kind, "empty file"):
            raise EelabError(f"{option} {path} already holds {_article(found)}, not {_article(kind)}; choose another "
                             f"path, or pass --overwrite (overwrite=True in Python) to replace it")
    return path


def check_output_folder(folder: str | Path, option: str = "--out") -> Path:
    """The one check of an output folder, made before any work starts: it is a folder or can be made (no file on
    the way) and it is writable; it is made then. One-line EelabError naming the option and the fix."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EelabError(f"{option} {folder} is a file, not a folder; give a folder path")
    _check_writable(folder, folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EelabError(f"{option} {folder} cannot be made ({e.strerror or type(e).__name__}); choose another "
                         "path") from None
    return folder


def _check_writable(path: Path, folder: Path, option: str) -> None:
    """Refuse path (one-line EelabError) unless folder, or the nearest of its parents that exists, is a folder
    this process can write in (a file made and removed there to find out)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise EelabError(f"{option} {path} cannot be written: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise EelabError(f"{option} {path} cannot be written: folder {folder} is not writable "
                         f"({e.strerror or type(e).__name__}); choose another path") from None


def _article(kind: str) -> str:
    if kind.startswith("a ") or kind == "model weights":
        return kind
    return ("an " if kind[0] in "aeiou" else "a ") + kind


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and mtime: checking a record against its
    checkpoint on every notebook start hashes model.pt once)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
