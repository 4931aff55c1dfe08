"""Policy files: a fitted policy (name, parameters, fitted tensors, fit info) as a small torch file."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EelabError
from ..files import check_output, load_tagged, save_torch

if TYPE_CHECKING:
    from .base import Policy

FORMAT = "eelab.policy"
FORMAT_VERSION = 1
_FIX = "save it again with Policy.save or `eelab evaluate ... --save-policy FILE`"


def save_policy(policy: "Policy", path: str | Path, overwrite: bool = False) -> Path:
    """Write the policy (name, params, fitted tensors, fit info) as a small torch file, atomically; a file of
    another kind at `path` (a record, model weights) is refused unless overwrite."""
    check_output(path, "policy file", overwrite, option="policy file")
    return save_torch({"format": FORMAT, "format_version": FORMAT_VERSION, "name": policy.name,
                       "params": dict(policy.params), "given": sorted(policy.given),
                       "fitted": dict(policy.fitted), "info": _plain(policy.info)}, path)


def load_policy_file(path: str | Path, registry: dict[str, type["Policy"]]) -> "Policy":
    """Read a policy saved by Policy.save; one-line EelabError for a missing, foreign or damaged file."""
    d = load_tagged(path, FORMAT, FORMAT_VERSION, "policy file", _FIX)
    name = d.get("name")
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise EelabError(f"{path} holds unknown policy {name!r}; known: {', '.join(registry)}")
    params, fitted, given, info = d.get("params"), d.get("fitted"), d.get("given"), d.get("info")
    if not isinstance(params, dict) or not isinstance(fitted, dict) \
            or not all(isinstance(key, str) for key in [*params, *fitted]):
        raise EelabError(f"{path} lacks the params or fitted fields of a policy file; {_FIX}")
    if given is not None and (not isinstance(given, list) or not all(isinstance(key, str) for key in given)):
        raise EelabError(f"{path} has a malformed 'given' field (a list of parameter names); {_FIX}")
    if info is not None and not isinstance(info, dict):
        raise EelabError(f"{path} has a malformed 'info' field (a dict); {_FIX}")
    given = set(given) if given is not None else {key for key, value in params.items() if value is not None}
    try:
        policy = cls(**{key: value for key, value in params.items() if key in given})
    except EelabError as e:
        raise EelabError(f"{path}: {e}") from None
    missing = [key for key in cls.FITTED if policy.needs_fit() and not isinstance(fitted.get(key), torch.Tensor)]
    if missing:
        raise EelabError(f"{path} lacks fitted tensor(s) {', '.join(missing)} for policy {cls.name}; {_FIX}")
    fitted = {key: value for key, value in fitted.items() if isinstance(value, torch.Tensor)}
    problem = policy.fitted_problem(fitted)
    if problem:
        raise EelabError(f"{path} holds {problem}; {_FIX}")
    policy.fitted = {key: value.float() if value.is_floating_point() else value for key, value in fitted.items()}
    policy.info = dict(info or {})
    if policy.fitted:
        _try_decide(policy, path)
    return policy


def _try_decide(policy: "Policy", path: str | Path) -> None:
    """Decide on a tiny synthetic record of the K exits and C classes the policy was fitted on: the one generic
    check that its fitted tensors have the shapes its step needs (a malformed file fails here, at load, in one
    line, not later inside torch)."""
    from ..records import ExitRecord

    k, c = policy.info.get("k"), policy.info.get("c")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 100_000 for v in (k, c)):
        raise EelabError(f"{path} does not say how many exits and classes its policy was fitted on (info k, c); "
                         f"{_FIX}")
    gen = torch.Generator().manual_seed(0)
    rec = ExitRecord(logits=torch.randn(4, k, c, generator=gen), labels=torch.zeros(4, dtype=torch.long),
                     indices=torch.arange(4), costs=torch.arange(1, k + 1, dtype=torch.float64), full_cost=float(k),
                     meta=dict(policy.source),  # the outputs it was fitted on, so decide's source check passes
                     confidences=torch.full((4, k), 0.5) if "confidences" in policy.INPUTS else None)
    try:
        exits = policy.decide(rec)
    except Exception as e:  # any failure here is the file's: shapes or dtypes its step cannot use
        first = " ".join(str(e).split())[:120]
        raise EelabError(f"{path} holds fitted tensors its policy {policy.name} cannot use ({type(e).__name__}: "
                         f"{first}); {_FIX}") from None
    if exits.shape != (4,) or bool(((exits < 0) | (exits >= k)).any()):
        raise EelabError(f"{path} holds fitted tensors that decide exits outside [0, {k}); {_FIX}")



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
