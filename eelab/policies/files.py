"""Policy files: a fitted policy (name, parameters, fitted tensors, fit info) as a small torch file."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EelabError
from ..files import load_torch, save_torch

if TYPE_CHECKING:
    from .base import Policy

FORMAT = "eelab.policy"
FORMAT_VERSION = 1
_FIX = "save it again with Policy.save or `eelab evaluate ... --save-policy FILE`"


def save_policy(policy: "Policy", path: str | Path) -> Path:
    """Write the policy (name, params, fitted tensors, fit info) as a small torch file, atomically."""
    return save_torch({"format": FORMAT, "format_version": FORMAT_VERSION, "name": policy.name,
                       "params": dict(policy.params), "given": sorted(policy.given),
                       "fitted": dict(policy.fitted), "info": _plain(policy.info)}, path)


def load_policy_file(path: str | Path, registry: dict[str, type["Policy"]]) -> "Policy":
    """Read a policy saved by Policy.save; one-line EelabError for a missing, foreign or damaged file."""
    d = load_torch(path, "policy file", _FIX)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise EelabError(f"{path} is not an eelab policy file; {_FIX}")
    if not isinstance(d.get("format_version"), int) or not 1 <= d["format_version"] <= FORMAT_VERSION:
        raise EelabError(f"{path} has policy format version {d.get('format_version')!r}, this eelab reads up to "
                         f"{FORMAT_VERSION}; upgrade eelab or {_FIX}")
    cls = registry.get(d.get("name"))  # type: ignore[arg-type]
    if cls is None:
        raise EelabError(f"{path} holds unknown policy {d.get('name')!r}; known: {', '.join(registry)}")
    params, fitted = d.get("params"), d.get("fitted")
    if not isinstance(params, dict) or not isinstance(fitted, dict):
        raise EelabError(f"{path} lacks the params or fitted fields of a policy file; {_FIX}")
    given = d.get("given")
    given = set(given) if isinstance(given, list) else {key for key, value in params.items() if value is not None}
    policy = cls(**{key: value for key, value in params.items() if key in given})
    missing = [key for key in cls.FITTED if policy.needs_fit() and not isinstance(fitted.get(key), torch.Tensor)]
    if missing:
        raise EelabError(f"{path} lacks fitted tensor(s) {', '.join(missing)} for policy {cls.name}; {_FIX}")
    policy.fitted = {key: value for key, value in fitted.items() if isinstance(value, torch.Tensor)}
    policy.info = dict(d.get("info") or {})
    return policy



def _plain(obj: Any) -> Any:
    """Keep only types torch.load(weights_only=True) accepts (dicts, lists, str, numbers, bool, None)."""
    if isinstance(obj, dict):
        return {str(key): _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(item) for item in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
