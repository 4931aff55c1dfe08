"""Policy parameters: parsing CLI strings and Python values into a Param's kind, range checks, and labels."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EelabError

if TYPE_CHECKING:
    from .base import Param


def parse_param(policy: str, key: str, spec: "Param", value: Any) -> Any:
    """Convert a CLI string or Python value to the parameter's kind and check its range."""
    if value is None:
        return None
    where = f"parameter {key} of policy {policy}"
    try:
        if spec.kind == "floats":
            items = value.split(",") if isinstance(value, str) else list(torch.as_tensor(value).reshape(-1).tolist())
            out = [float(item) for item in items]
            for item in out:
                _check_range(where, spec, item)
            return out
        if spec.kind == "bool":
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError
            return bool(value)
        if spec.kind == "str":
            if not isinstance(value, str):
                raise ValueError
            if spec.choices and value not in spec.choices:
                raise EelabError(f"{where} must be one of {', '.join(spec.choices)}, got {value!r}")
            return value
        if spec.kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value.strip()) if isinstance(value, str) else int(value)
        else:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
    except (ValueError, TypeError):
        raise EelabError(f"{where} must be {_KIND_WORDS[spec.kind]}, got {value!r}") from None
    _check_range(where, spec, out)
    return out


_KIND_WORDS = {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false",
               "floats": "comma-separated numbers, e.g. 0.9,0.8,0.7"}


def _check_range(where: str, spec: "Param", value: float) -> None:
    """One-line EelabError when a number is NaN, infinite or outside the parameter's range (ints of any size)."""
    bad = isinstance(value, float) and not math.isfinite(value)
    if spec.lo is not None:
        bad |= value <= spec.lo if spec.open_lo else value < spec.lo
    if spec.hi is not None:
        bad |= value >= spec.hi if spec.open_hi else value > spec.hi
    if bad:
        lo = "-inf" if spec.lo is None else f"{spec.lo:g}"
        hi = "inf" if spec.hi is None else f"{spec.hi:g}"
        span = f"{'(' if spec.open_lo or spec.lo is None else '['}{lo}, {hi}{')' if spec.open_hi or spec.hi is None else ']'}"
        small = isinstance(value, float) or abs(value) < 10**15  # a huge int has no float to show
        shown = f"{value:g}" if small else f"a {len(str(abs(value)))}-digit number"
        raise EelabError(f"{where} must be in {span} and finite, got {shown}")


def show_value(value: Any) -> str:
    """Compact text for a parameter value in a label (policy descriptions, slider labels)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show_value(item) for item in value)
    return str(value)


