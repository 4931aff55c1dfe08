"""Policy base class, its parameters, and run_policy: the one loop over `step` that every driver shares."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import EelabError
from ..files import load_torch, save_torch
from ..records import ExitRecord

FORMAT = "eelab.policy"
FORMAT_VERSION = 1
_FIX = "save it again with Policy.save or `eelab evaluate ... --save-policy FILE`"

State = dict[str, torch.Tensor] | None
# fetch(k, rows) -> logits_k [B, C], or (logits_k, {input: [B]}) for a policy with INPUTS (see Policy)
Fetch = Callable[[int, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class Param:
    """One policy parameter: its default, kind ('float', 'int', 'str', 'bool', 'floats'), range and help.

    Bounds are inclusive unless open_lo/open_hi; 'floats' is a list of floats (on the CLI: 0.9,0.8,0.7)
    whose items obey the bounds; default None means "not set".
    """

    default: Any
    kind: str
    help: str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple[str, ...] = ()


class Policy:
    """An exit policy: `fit(cal)` once, then `step` decides one exit at a time (DESIGN, Policies).

    Subclasses set `name`, `PARAMS` and `FITTED` (names of the tensors `_fit` returns) and define `step`
    and, where something is learned, `_fit`. State passed between steps is None or a dict of tensors whose
    leading dim is B, so the driver can keep only the rows that did not stop. A policy that reads more of
    an exit's output than its logits names the record fields in INPUTS (e.g. ("confidences",) for learned
    per-exit confidences [N, K]); step then gets each as a keyword argument of shape [B]. A policy that
    runs a network to decide (a gate, a Q-network) reports its MACs in `overhead_macs`.
    """

    name: ClassVar[str] = "policy"
    PARAMS: ClassVar[dict[str, Param]] = {}
    FITTED: ClassVar[tuple[str, ...]] = ()
    INPUTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(self.PARAMS) or "none"
            raise EelabError(f"unknown parameter {unknown[0]!r} for policy {self.name}; its parameters are: {known}")
        self.given = frozenset(params)  # which parameters the caller set, for either/or checks
        self.params: dict[str, Any] = {key: _parse_param(self.name, key, spec, params.get(key, spec.default))
                                       for key, spec in self.PARAMS.items()}
        self.fitted: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = {}
        self._check_params()

    # ---- what subclasses define -------------------------------------------------------------
    def _check_params(self) -> None:
        """Cross-parameter checks (one-line EelabError); single-parameter ranges are in PARAMS."""

    def _fit(self, cal: ExitRecord) -> dict[str, torch.Tensor]:
        """Learn tensors named in FITTED from a cal record; info may be added to self.info."""
        return {}

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Decide at exit k for B running samples: logits_k [B, C] -> (stop bool [B], state)."""
        raise NotImplementedError

    def needs_fit(self) -> bool:
        """Whether this policy, with its parameters, must be fitted on a cal record before deciding."""
        return bool(self.FITTED)

    def overhead_macs(self, num_exits: int, num_classes: int) -> torch.Tensor:
        """MACs one sample spends on this policy's decision at each exit: float64 [K], zeros by default.

        Entry k is charged to every sample that reaches exit k; the last entry is 0, since no decision is
        evaluated where every sample stops. See charged_costs.
        """
        return torch.zeros(num_exits, dtype=torch.float64)

    # ---- shared behaviour -------------------------------------------------------------------
    def fit(self, cal: ExitRecord) -> "Policy":
        """Fit on a cal record (a no-op where nothing is learned); returns self."""
        self.fitted = {}  # a fit that raises leaves the policy unfitted, not half-fitted
        self.info = self._cal_info(cal)
        self.fitted = {key: value.detach().clone() for key, value in self._fit(cal).items()}
        return self

    @staticmethod
    def _cal_info(cal: ExitRecord) -> dict[str, Any]:
        """What every fit records about its cal record (a family fitting many policies at once reuses it)."""
        return {"k": cal.k, "c": cal.c, "n_cal": cal.n, "checkpoint_sha256": cal.meta.get("checkpoint_sha256")}

    def check_exits(self, num_exits: int) -> None:
        """Raise a one-line EelabError unless this policy can decide over K = num_exits exits."""
        if self.needs_fit() and not self.fitted:
            raise EelabError(f"policy {self.describe()} must be fitted first: call fit(cal_record) "
                             f"(the CLI does this with --cal)")
        fitted_k = self.info.get("k")
        if self.fitted and fitted_k is not None and fitted_k != num_exits:
            raise EelabError(f"policy {self.name} was fitted on a record with K={fitted_k} exits, this one has "
                             f"K={num_exits}; fit it on a cal record of the same model")

    def decide(self, record: ExitRecord) -> torch.Tensor:
        """Exit chosen for every sample of a record: exits int64 [N] in [0, K).

        The same run_policy loop live inference runs, fed from the record's cached logits (and the fields
        named in INPUTS).
        """
        if not self.INPUTS:
            return run_policy(self, record.k, lambda k, rows: record.logits[rows, k], record.n)
        fields = {}
        for name in self.INPUTS:
            value = getattr(record, name, None)
            if not isinstance(value, torch.Tensor):
                raise EelabError(f"policy {self.name} reads the record field {name}, which this record lacks; "
                                 f"record a model that outputs it")
            fields[name] = value
        return run_policy(self, record.k, lambda k, rows: (record.logits[rows, k],
                                                           {key: v[rows, k] for key, v in fields.items()}), record.n)

    def describe(self) -> str:
        """A short label: name, the parameters that differ from their defaults, and fitted scalars."""
        parts = [f"{key}={show_value(value)}" for key, value in self.params.items()
                 if value != self.PARAMS[key].default or key in self.given]
        parts += [f"{key}={show_value(value)}" for key, value in self.summary().items()]
        return f"{self.name}({', '.join(parts)})"

    def summary(self) -> dict[str, float]:
        """Fitted scalars worth a column in a sweep table (e.g. risk's lambda); empty by default."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write the policy (name, params, fitted tensors, fit info) as a small torch file, atomically."""
        return save_torch({"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name,
                           "params": dict(self.params), "given": sorted(self.given),
                           "fitted": dict(self.fitted), "info": _plain(self.info)}, path)

    @classmethod
    def _points_sums(cls, points: list[dict[str, Any]], cal: ExitRecord,
                     test: ExitRecord) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """Fit one policy per grid point on cal, decide on test: sums over test [T, 3] (see exit_values)
        and the fitted scalars of each point. Families override this with a vectorised path whose numbers
        must equal this loop's (tested)."""
        values, sums, extras = exit_values(test), [], []
        for point in points:
            policy = cls(**point).fit(cal)
            overhead = policy.overhead_macs(test.k, test.c)
            charged = values if not overhead.any() else exit_values(test, overhead)
            sums.append(sum_at_exits(charged, policy.decide(test).unsqueeze(0)))
            extras.append(policy.summary())
        return torch.cat(sums) if sums else torch.zeros(0, values.shape[-1], dtype=torch.float64), extras

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Default sweep grid for this family on a cal record: a list of parameter dicts."""
        return [{}]

    def __repr__(self) -> str:
        return self.describe()


def run_policy(policy: Policy, num_exits: int, fetch: Fetch, n: int,
               keep_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run `policy.step` exit by exit on the samples still running; exits int64 [N] in [0, K).

    fetch(k, rows LongTensor [B]) -> logits_k [B, C] for exactly those rows, so live inference can compute
    stage k only for survivors and no policy can look at a later exit. At the last exit every sample stops
    (step is not called there). keep_logits=True also returns each sample's logits at its exit [N, C].
    """
    if num_exits < 1:
        raise EelabError(f"a policy needs at least one exit, got K={num_exits}; check the record")
    policy.check_exits(num_exits)
    exits = torch.full((n,), num_exits - 1, dtype=torch.long)
    rows = torch.arange(n)
    kept: torch.Tensor | None = None
    state: State = None
    for k in range(num_exits - 1):
        if rows.numel() == 0:
            break
        logits_k, inputs = _split_fetched(fetch(k, rows))
        stop, state = policy.step(k, logits_k, state, **inputs)
        stop = _check_stop(policy, stop, rows.numel())
        if keep_logits:
            kept = _keep(kept, rows[stop], logits_k[stop], n)
        exits[rows[stop]] = k
        rows, state = rows[~stop], _shrink(policy, state, ~stop)
    if keep_logits:
        if rows.numel():
            kept = _keep(kept, rows, _split_fetched(fetch(num_exits - 1, rows))[0], n)
        return exits, kept if kept is not None else torch.empty(0, 0)
    return exits


def first_exits(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """First exit whose score reaches its threshold, for many threshold vectors at once.

    scores [N, K], thresholds [T, K] -> exits int64 [T, N]; the last exit is taken when none is reached
    (its threshold is ignored). Equals run_policy with `stop = score_k >= threshold_k`, vectorised.
    """
    t, (n, k) = thresholds.shape[0], scores.shape
    exits = torch.full((t, n), k - 1, dtype=torch.long)
    thresholds = thresholds.to(scores.dtype)  # step compares in the scores' dtype too
    for j in range(k - 2, -1, -1):  # backwards, so the earliest reached exit is written last
        exits.masked_fill_(scores[:, j].unsqueeze(0) >= thresholds[:, j].unsqueeze(1), j)
    return exits


def charged_costs(costs: torch.Tensor, overhead: torch.Tensor | None = None) -> torch.Tensor:
    """MACs charged to a sample leaving at exit k: costs[k] plus the policy's overhead at exits 0..k.

    costs [K] (a record's), overhead [K] (Policy.overhead_macs; None: no overhead) -> float64 [K].
    """
    costs = costs.double()
    if overhead is None:
        return costs
    overhead = torch.as_tensor(overhead, dtype=torch.float64)
    if overhead.shape != costs.shape:
        raise EelabError(f"policy overhead must have one value per exit [{costs.numel()}], got "
                         f"{tuple(overhead.shape)}; fix the policy's overhead_macs")
    return costs + overhead.cumsum(0)


def count_macs(fn: Callable[[], Any]) -> float:
    """MACs of one call of fn(), counted by torch.utils.flop_counter (conv and matmul; MACs = FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


def exit_values(record: ExitRecord, overhead: torch.Tensor | None = None) -> torch.Tensor:
    """What each sample contributes at each exit: float64 [N, K, 3] = (prediction right 0/1, MACs, k + 1).

    Summed over samples at their exits these give the counts behind accuracy, mean MACs and the
    block-index saving (metrics module doc). MACs are charged_costs(record.costs, overhead).
    """
    right = (record.logits.argmax(dim=-1) == record.labels.unsqueeze(1)).double()
    costs = charged_costs(record.costs, overhead).expand(record.n, -1)
    block = torch.arange(1, record.k + 1, dtype=torch.float64).expand(record.n, -1)
    return torch.stack([right, costs, block], dim=-1)


def sum_at_exits(values: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """Sum over samples of values at their exits: values [N, K, V], exits [T, N] -> [T, V]."""
    return values[torch.arange(values.shape[0]).unsqueeze(0), exits].sum(dim=1)


def sum_at_shared_threshold(scores: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """sum_i values[i, exit_i(t)] for every shared threshold t at once: scores [N, K], values [N, K, V],
    thresholds [T] -> [T, V], where exit_i(t) is the first k < K-1 with scores[i, k] >= t, else K-1.

    exit_i(t) <= k exactly when the running max M_ik = max_{j<=k} scores[i, j] reaches t, so
    values[i, exit_i] = values[i, K-1] + sum_{k<K-1} [M_ik >= t] (values[i, k] - values[i, k+1]): one sort
    of the N (K-1) running maxima and a searchsorted per threshold, instead of a [T, N, K] comparison.
    """
    n, k = scores.shape
    base = values[:, -1].sum(0)
    if k == 1 or n == 0:
        return base.expand(thresholds.numel(), -1).clone()
    keys, order = scores[:, :-1].cummax(dim=1).values.reshape(-1).sort()
    delta = (values[:, :-1] - values[:, 1:]).reshape(-1, values.shape[-1])[order]
    suffix = torch.cat([delta.flip(0).cumsum(0).flip(0), torch.zeros_like(delta[:1])])  # sum over keys[j:]
    first = torch.searchsorted(keys, thresholds.to(keys.dtype).reshape(-1), side="left")  # first key >= t
    return base + suffix[first]


def load_policy_file(path: str | Path, registry: dict[str, type[Policy]]) -> Policy:
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


def _split_fetched(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What fetch returned as (logits_k [B, C], extra inputs {name: [B]}; empty for a plain tensor)."""
    return (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})


def _check_stop(policy: Policy, stop: Any, b: int) -> torch.Tensor:
    """The stop mask as bool [B], or a one-line error naming the policy."""
    if not isinstance(stop, torch.Tensor) or stop.shape != (b,):
        shape = tuple(stop.shape) if isinstance(stop, torch.Tensor) else type(stop).__name__
        raise EelabError(f"policy {policy.name} step returned stop of shape {shape}, expected bool [{b}]; fix its step")
    return stop.bool()


def _shrink(policy: Policy, state: State, keep: torch.Tensor) -> State:
    """Keep the rows of every state tensor that belong to samples still running."""
    if state is None:
        return None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EelabError(f"policy {policy.name} step returned state of type {type(state).__name__}; "
                         f"state must be None or a dict of tensors with leading dim B")
    return {key: value[keep] for key, value in state.items()}


def _keep(kept: torch.Tensor | None, rows: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Write the logits of samples that exit now into the [N, C] result, allocating it on first use."""
    if kept is None:
        kept = torch.zeros(n, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    kept[rows.to(kept.device)] = logits
    return kept


def _parse_param(policy: str, key: str, spec: Param, value: Any) -> Any:
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


def _check_range(where: str, spec: Param, value: float) -> None:
    """One-line EelabError when a number is NaN or outside the parameter's range."""
    bad = math.isnan(value)
    if spec.lo is not None:
        bad |= value <= spec.lo if spec.open_lo else value < spec.lo
    if spec.hi is not None:
        bad |= value >= spec.hi if spec.open_hi else value > spec.hi
    if bad:
        lo = "-inf" if spec.lo is None else f"{spec.lo:g}"
        hi = "inf" if spec.hi is None else f"{spec.hi:g}"
        span = f"{'(' if spec.open_lo or spec.lo is None else '['}{lo}, {hi}{')' if spec.open_hi or spec.hi is None else ']'}"
        raise EelabError(f"{where} must be in {span}, got {value:g}")


def show_value(value: Any) -> str:
    """Compact text for a parameter value in a label (policy descriptions, slider labels)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show_value(item) for item in value)
    return str(value)


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
