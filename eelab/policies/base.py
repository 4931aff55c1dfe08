"""Policy base class, its parameters, and run_policy: the one loop over `step` that every driver shares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..errors import EelabError
from ..records import ExitRecord, check_same_source
from .files import save_policy
from .params import parse_param, show_value

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
    INFINITE_OK: ClassVar[tuple[str, ...]] = ()  # fitted tensors where +-inf means something (a threshold no
                                                 # sample reaches); NaN is refused in every fitted tensor

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(self.PARAMS) or "none"
            raise EelabError(f"unknown parameter {unknown[0]!r} for policy {self.name}; its parameters are: {known}")
        self.given = frozenset(params)  # which parameters the caller set, for either/or checks
        self.params: dict[str, Any] = {key: parse_param(self.name, key, spec, params.get(key, spec.default))
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
        evaluated where every sample stops. See metrics.charged_costs.
        """
        return torch.zeros(num_exits, dtype=torch.float64)

    # ---- shared behaviour -------------------------------------------------------------------
    def fit(self, cal: ExitRecord) -> "Policy":
        """Fit on a cal record (a no-op where nothing is learned); returns self."""
        self.fitted = {}  # a fit that raises leaves the policy unfitted, not half-fitted
        self.info = self.cal_info(cal)
        fitted = {key: value.detach().clone() for key, value in self._fit(cal).items()}
        problem = self.fitted_problem(fitted)
        if problem:
            self.info = {}
            raise EelabError(f"fitting policy {self.describe()} produced {problem}; nothing was saved: lower lr, "
                             f"change the parameters, or check the cal record")
        self.fitted = fitted
        return self

    def fitted_problem(self, fitted: dict[str, Any]) -> str | None:
        """What is wrong with fitted tensors (not tensors, NaN, or infinity where INFINITE_OK does not allow
        it), or None: the one check fit() and policy files run."""
        for key, value in fitted.items():
            if not isinstance(value, torch.Tensor) or value.is_complex():
                return f"a fitted {key} that is not a real tensor ({type(value).__name__})"
            if not value.is_floating_point():
                continue
            if bool(torch.isnan(value).any()):
                return f"NaN in its fitted {key}"
            if key not in self.INFINITE_OK and not bool(torch.isfinite(value).all()):
                return f"infinity in its fitted {key}"
        return None

    @staticmethod
    def cal_info(cal: ExitRecord) -> dict[str, Any]:
        """What every fit records about its cal record (a family fitting many policies at once reuses it)."""
        # a fitted guarantee (risk control) holds at the precision its cal record was computed at
        return {"k": cal.k, "c": cal.c, "n_cal": cal.n, "checkpoint_sha256": cal.meta.get("checkpoint_sha256"),
                "precision": cal.meta.get("precision", "fp32"), "ensemble_sha256": cal.meta.get("ensemble_sha256")}

    @property
    def source(self) -> dict[str, Any]:
        """Where the outputs it was fitted on come from, for records.check_same_source: the checkpoint's sha256 and
        the exit ensemble's (None: plain exits); {} before any fit (nothing to compare)."""
        if not self.info:
            return {}
        return {"checkpoint_sha256": self.info.get("checkpoint_sha256"),
                "ensemble_sha256": self.info.get("ensemble_sha256")}

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
        named in INPUTS). A policy fitted on another checkpoint's outputs, or on outputs ensembled otherwise, is
        refused (records.check_same_source).
        """
        check_same_source(self.source, record.source, f"policy {self.name}", "the record",
                          "refit it on the cal record of the model this record comes from")
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

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the policy (name, params, fitted tensors, fit info) as a small torch file, atomically
        (policies.files: what `eelab predict --policy FILE` and load_policy read); a file of another kind at
        `path` is refused unless overwrite."""
        return save_policy(self, path, overwrite)

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Default sweep grid for this family on a cal record: a list of parameter dicts."""
        return [{}]

    @classmethod
    def sweep_sums(cls, points: list[dict[str, Any]], cal: ExitRecord,
                   test: ExitRecord) -> tuple[torch.Tensor, list[dict[str, float]]] | None:
        """A family's vectorised sweep, or None (the default) to fit and decide point by point.

        Returns sums over test samples at their exits [T, 3] (metrics.exit_values' columns) and each point's
        fitted scalars; its numbers must equal the point-by-point path's (tested). Called by eelab.sweep only.
        """
        return None

    def __repr__(self) -> str:
        return self.describe()


def run_policy(policy: Policy, num_exits: int, fetch: Fetch, n: int, keep_logits: bool = False,
               checked: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run `policy.step` exit by exit on the samples still running; exits int64 [N] in [0, K).

    fetch(k, rows LongTensor [B]) -> logits_k [B, C] for exactly those rows, so live inference can compute
    stage k only for survivors and no policy can look at a later exit. rows only ever shrink, and stay the
    same object while no sample stops (a driver can skip its own bookkeeping then). At the last exit every
    sample stops (step is not called there). keep_logits=True also returns each sample's logits at its exit
    [N, C]. checked=True: the driver has already run policy.check_exits(K) (live inference does, once).
    This is the one loop: Policy.decide feeds it cached logits, live inference computes them.
    """
    if num_exits < 1:
        raise EelabError(f"a policy needs at least one exit, got K={num_exits}; check the record")
    if not checked:
        policy.check_exits(num_exits)
    exits = torch.full((n,), num_exits - 1, dtype=torch.long)
    rows = torch.arange(n)
    kept: torch.Tensor | None = None
    state: State = None
    for k in range(num_exits - 1):
        if rows.numel() == 0:
            break
        logits_k, inputs = _split_fetched(fetch(k, rows))
        stop, state = decide_step(policy, k, logits_k, state, inputs)
        stopped = int(stop.sum())
        if stopped == 0:  # the cheap path (e.g. one image going on): nobody leaves, nothing to shrink
            continue
        if stopped == rows.numel():  # everyone leaves here: no masks needed (one image stopping)
            if keep_logits:
                kept = logits_k if kept is None and stopped == n else _keep(kept, rows, logits_k, n)
            exits[rows] = k
            rows = rows[:0]
            break
        if keep_logits:
            kept = _keep(kept, rows[stop], logits_k[stop], n)
        exits[rows[stop]] = k
        rows, state = rows[~stop], state_rows(state, ~stop)
    if keep_logits:
        if rows.numel():
            last = _split_fetched(fetch(num_exits - 1, rows))[0]
            kept = last if kept is None and rows.numel() == n else _keep(kept, rows, last, n)
        return exits, kept if kept is not None else torch.empty(0, 0)
    return exits


def decide_step(policy: Policy, k: int, logits_k: torch.Tensor, state: State,
                inputs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, State]:
    """One decision at exit k for B samples, checked: logits_k [B, C] -> (stop bool [B], state rows [B]).

    The body of run_policy's loop, shared with the streamed predictor (which calls it on a batch gathered
    from many input batches), so every driver decides through the same checks. inputs: INPUTS fields [B].
    """
    stop, state = policy.step(k, logits_k, state, **(inputs or {}))
    return _check_stop(policy, stop, logits_k.shape[0]), _check_state(policy, state)


def state_rows(state: State, index: torch.Tensor | slice) -> State:
    """Some rows of every state tensor: index bool [B], int64 [b] or a slice (state travels with its samples)."""
    return None if state is None else {key: value[index] for key, value in state.items()}


def _split_fetched(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What fetch returned as (logits_k [B, C], extra inputs {name: [B]}; empty for a plain tensor)."""
    return (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})


def _check_stop(policy: Policy, stop: Any, b: int) -> torch.Tensor:
    """The stop mask as bool [B], or a one-line error naming the policy."""
    if not isinstance(stop, torch.Tensor) or stop.shape != (b,):
        shape = tuple(stop.shape) if isinstance(stop, torch.Tensor) else type(stop).__name__
        raise EelabError(f"policy {policy.name} step returned stop of shape {shape}, expected bool [{b}]; fix its step")
    return stop.bool()


def _check_state(policy: Policy, state: Any) -> State:
    """The state step returned, checked: None or a dict of tensors (leading dim B), else a one-line error."""
    if state is not None and (not isinstance(state, dict)
                              or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise EelabError(f"policy {policy.name} step returned state of type {type(state).__name__}; "
                         f"state must be None or a dict of tensors with leading dim B")
    return state


def _keep(kept: torch.Tensor | None, rows: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Write the logits of samples that exit now into the [N, C] result, allocating it on first use."""
    if kept is None:
        kept = torch.zeros(n, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    kept[rows.to(kept.device)] = logits
    return kept
