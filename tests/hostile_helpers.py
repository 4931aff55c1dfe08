"""Helpers of tests/test_hostile.py: hostile files (decompression bombs, malformed records) and a strict checker."""
from __future__ import annotations

import json
import math
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from eelab.cli import main


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `eelab ARGV`."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, assert a one-line error with a non-zero exit code other than 3 (internal) naming the needles."""
    code, _, err = run_cli(capsys, argv)
    assert code not in (0, 3), (code, err)
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and infinities (as any strict parser does)."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"not valid JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A PNG whose header declares width x height pixels (10^10 by default) and holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def copy_checkpoint(src: Path, dst: Path, drop: tuple[str, ...] = ("state.pt",)) -> Path:
    """A copy of a checkpoint directory without some files (committed checkpoints have no state.pt)."""
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink(missing_ok=True)
    return dst


def record_dict(n: int = 6, k: int = 3, c: int = 4, seed: int = 0, conf: bool = False) -> dict[str, Any]:
    """A valid on-disk exit record dict (what ExitRecord.save writes)."""
    g = torch.Generator().manual_seed(seed)
    d = {"format": "eelab.exit_record", "format_version": 1, "logits": torch.randn(n, k, c, generator=g),
         "labels": torch.randint(0, c, (n,), generator=g), "indices": torch.arange(n),
         "costs": torch.arange(1, k + 1, dtype=torch.float64) * 10, "full_cost": 25.0,
         "meta": {"model": "tiny", "checkpoint_sha256": "ab" * 32}}
    if conf:
        d["confidences"] = torch.rand(n, k, generator=g)
    return d


def record_is_valid(d: Any) -> bool:
    """The data contract checked the slow, obvious way (loops, no vectorisation): the fuzz test's oracle."""
    if not isinstance(d, dict) or d.get("format") != "eelab.exit_record":
        return False
    version = d.get("format_version")
    if type(version) is not int or not 1 <= version <= 1:
        return False
    if any(key not in d for key in ("logits", "labels", "indices", "costs", "full_cost")):
        return False
    lg, y, idx, costs, full = d["logits"], d["labels"], d["indices"], d["costs"], d["full_cost"]
    conf, meta = d.get("confidences"), d.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return False
    if not all(isinstance(t, torch.Tensor) for t in (lg, y, idx, costs)):
        return False
    if conf is not None and (not isinstance(conf, torch.Tensor) or not conf.is_floating_point()):
        return False
    if type(full) not in (int, float) or not math.isfinite(full) or full <= 0:
        return False
    if any(t.dtype == torch.bool or t.is_complex() for t in (lg, y, idx, costs)):
        return False
    if lg.ndim != 3 or 0 in lg.shape:
        return False
    n, k, c = lg.shape
    if tuple(y.shape) != (n,) or tuple(idx.shape) != (n,) or tuple(costs.shape) != (k,):
        return False
    if conf is not None and tuple(conf.shape) != (n, k):
        return False
    for t in (y, idx):
        for v in t.tolist():
            if float(v) != math.floor(float(v)) or not math.isfinite(float(v)):
                return False
    if any(not 0 <= int(v) < c for v in y.tolist()):
        return False
    rows = lg.float().reshape(n * k, c).tolist()
    for row in rows:
        if any(math.isnan(v) for v in row) or any(v == math.inf for v in row) or max(row) == -math.inf:
            return False
    if conf is not None and any(not math.isfinite(v) for v in conf.float().reshape(-1).tolist()):
        return False
    cs = costs.double().tolist()
    if any(not math.isfinite(v) or v <= 0 for v in cs) or any(b < a for a, b in zip(cs, cs[1:])):
        return False
    return True


def damage_file(rng: Any, path: Path, how: str, flips: int = 6) -> None:
    """Damage a file in place: how="truncate" cuts it at a random offset, "flip" overwrites 1..flips-1 random
    bytes with random values (rng: a random.Random)."""
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[:rng.randrange(len(raw))])
        return
    damaged = bytearray(raw)
    for _ in range(rng.randrange(1, flips)):
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
    path.write_bytes(bytes(damaged))
