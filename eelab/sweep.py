"""The one fit-on-cal / score-on-test engine: grids of policy parameters, fitted on cal (and cached), scored
on test. `eelab sweep`, the notebooks' grids and the panels that train a policy live all run through it.

sweep() gives a frontier table, vectorised where a family allows it (Policy.sweep_sums); precompute_grid()
gives a PolicyGrid, every point fitted once and evaluated in full on test and cal, so a slider only looks a
row up (DESIGN: cache once, decide many). Both fit through fit_points, the one place that fits and caches.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import EelabError
from .metrics import evaluate, exit_values, headline_metrics, pareto_front, sum_at_exits
from .policies import POLICIES, Policy, load_policy
from .records import ExitRecord, check_same_model

Factory = Callable[..., Policy]
Grid = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]

# Headline numbers each grid row carries, as metrics.evaluate names them.
HEADLINE = ("accuracy", "mean_macs", "rel_macs", "compute_saved", "effectiveness", "effectiveness_block_index",
            "block_index_saving")


def resolve_factory(policy: str | Factory) -> Factory:
    """A registry name, Policy class or factory(**params) -> Policy, as something callable with parameters."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise EelabError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        return POLICIES[policy]
    if not callable(policy):
        raise EelabError(f"a sweep needs a policy name or factory, got {type(policy).__name__}")
    return policy


def grid_points(factory: Factory, cal: ExitRecord, grid: Grid | None = None) -> list[dict[str, Any]]:
    """One parameter dict per point: {param: values} as all combinations, a list of dicts as it is, or None for
    the family's default grid on this cal record (Policy.grid)."""
    if grid is None:
        if not _is_family(factory):
            raise EelabError("a sweep needs a grid for a policy factory; give grid={param: values}")
        points = factory.grid(cal)
    else:
        points = _expand(grid)
    return [{key: _plain(value) for key, value in point.items()} for point in points]


def cache_path(cache: str | Path, factory: Factory, point: Mapping[str, Any], cal: ExitRecord) -> Path:
    """Where a point's fitted policy is cached: family, parameters, checkpoint, cal samples and (for ensembled
    records) the ensemble in the key."""
    family = getattr(factory, "name", None) or getattr(factory, "__name__", "policy")
    fields = {"family": family, "point": dict(point), "checkpoint": cal.meta.get("checkpoint_sha256"),
              "cal": hashlib.sha256(cal.indices.numpy().tobytes()).hexdigest(), "n": cal.n}
    if cal.meta.get("ensemble_sha256"):  # only where ensembled, so plain keys (and caches) stay as they were
        fields["ensemble"] = cal.meta["ensemble_sha256"]
    key = json.dumps(fields, sort_keys=True, default=str)
    return Path(cache) / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def fit_points(factory: Factory, points: Sequence[Mapping[str, Any]], cal: ExitRecord,
               cache: str | Path | None = None, fit: Callable[[int, Policy], Policy] | None = None,
               found: Callable[[int, Policy], None] | None = None, progress: bool = True) -> list[Policy]:
    """One policy per point, fitted on cal: the one place policies are fitted for a grid.

    cache: a folder where each point's fitted policy (where it needs a fit) is saved and found again
    (cache_path), so a learned family is trained once across notebooks and runs. fit(i, policy): how to fit
    point i (e.g. with a live-plot callback); without it a family with a batched `fit_grid(points, cal)`
    classmethod fits the missing points in one go, others one by one. found(i, policy) is called for each
    point read from the cache. progress: a tqdm bar over the points to fit; none when nothing needs fitting.
    During a batched fit_grid the bar's clock keeps running, and a fit_grid that takes callback= (called with
    the share of the run done, 0 to 1) moves the bar as it goes.
    """
    points = [dict(point) for point in points]
    # only what a fit learns is worth a file; a family with nothing to fit is rebuilt from its parameters
    paths = [None if cache is None or not factory(**point).needs_fit() else cache_path(cache, factory, point, cal)
             for point in points]
    ready: dict[int, Policy] = {}
    for i, path in enumerate(paths):
        if path is not None and path.is_file():
            ready[i] = load_policy(path)
            if found is not None:
                found(i, ready[i])
    missing = [i for i in range(len(points)) if i not in ready]
    fit_grid = getattr(factory, "fit_grid", None)
    learned = [i for i in missing if paths[i] is not None or factory(**points[i]).needs_fit()]
    family = getattr(factory, "name", None) or getattr(factory, "__name__", "policy")
    batched = fit is None and callable(fit_grid) and bool(missing)
    with _bar(len(learned), f"fitting {len(learned)} {family} point(s) on cal" + (" (one batched run)" if batched
              else ""), progress and bool(learned)) as bar:
        if fit is not None:
            fresh = [_advance(bar, fit(i, factory(**points[i]))) for i in missing]
        elif batched:
            fresh = list(_fit_batched(fit_grid, [points[i] for i in missing], cal, bar))
            bar.update(len(learned) - bar.n)
        else:
            fresh = [_advance(bar, factory(**points[i]).fit(cal)) for i in missing]
    for i, policy in zip(missing, fresh):
        if paths[i] is not None:
            policy.save(paths[i])
        ready[i] = policy
    return [ready[i] for i in range(len(points))]


def sweep(policy: str | Factory, cal: ExitRecord, test: ExitRecord, grid: Grid | None = None,
          cache: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Fit on cal and score on test at every grid point: one row per point.

    policy: a registry name, a Policy class, or any factory(**params) -> Policy. grid: {param: values}
    (all combinations), a list of parameter dicts, or None for the family's default grid. Columns: the
    parameters, fitted scalars (e.g. lambda), then accuracy, mean_macs (MACs/sample), rel_macs,
    compute_saved, effectiveness, effectiveness_block_index (eelab.metrics). A family's vectorised
    sweep_sums is used where it has one; its numbers equal fitting and deciding point by point (tested).
    progress: fit_points' bar while learned points are fitted (stderr in a terminal).
    """
    check_same_model(test, cal, "record", "cal record")
    factory = resolve_factory(policy)
    points = grid_points(factory, cal, grid)
    fast = factory.sweep_sums(points, cal, test) if _is_family(factory) else None
    if fast is not None:
        sums, extras = fast
    else:
        fitted = fit_points(factory, points, cal, cache, progress=progress)
        sums = torch.zeros(len(fitted), 3, dtype=torch.float64)
        for i, p in enumerate(fitted):  # each charged its own decision MACs
            sums[i] = sum_at_exits(exit_values(test, p.overhead_macs(test.k, test.c)), p.decide(test).unsqueeze(0))[0]
        extras = [p.summary() for p in fitted]
    table = {key: value.tolist() for key, value in headline_metrics(sums, test).items()}
    rows = pd.DataFrame([{**point, **extra} for point, extra in zip(points, extras)], index=range(len(points)))
    return pd.concat([rows, pd.DataFrame(table)], axis=1)


@dataclass(frozen=True)
class PolicyGrid:
    """Operating points of one policy family, fitted on cal and evaluated on test, computed once.

    name: the family's label; policies [T] fitted Policy objects; table: T rows (the grid parameters,
    fitted scalars, label, HEADLINE on test, cal_accuracy and cal_rel_macs on cal, mean_ms and rel_ms
    when a latency record was given); points [T] metrics.evaluate dicts on test; exits int64 [T, N] on
    test; cal, test and latency (test with costs in ms, or None) are the records they came from.
    """

    name: str
    policies: list[Policy]
    table: pd.DataFrame
    points: list[dict[str, Any]]
    exits: torch.Tensor
    cal: ExitRecord
    test: ExitRecord
    latency: ExitRecord | None = None

    def __len__(self) -> int:
        return len(self.policies)

    @property
    def params(self) -> list[str]:
        """Names of the grid parameters that take more than one value (one slider each)."""
        return [c for c in self._param_columns() if len(set(self.table[c].map(_hashable))) > 1]

    def values(self, param: str) -> list[Any]:
        """Sorted distinct values of one grid parameter."""
        return sorted(set(self.table[param].map(_hashable)), key=_sort_key)

    def find(self, **params: Any) -> int:
        """Row of the grid point with these parameter values (exact), else the nearest one by value ranks."""
        if not params:
            return 0
        want = [_hashable(v) for v in params.values()]
        for i, row in enumerate(self.table[list(params)].itertuples(index=False)):
            if [_hashable(v) for v in row] == want:
                return i
        distance = sum(self._rank_distance(c, v) for c, v in params.items())
        return int(torch.as_tensor(distance).argmin())

    def front(self, x: str = "rel_macs", y: str = "accuracy") -> pd.DataFrame:
        """The grid's Pareto front on test (metrics.pareto_front), sorted by x."""
        return pareto_front(self.table, x=x, y=y)

    def _param_columns(self) -> list[str]:
        return list(self.table.attrs.get("params", []))

    def _rank_distance(self, col: str, value: Any) -> torch.Tensor:
        order = self.values(col)
        ranks = {v: i for i, v in enumerate(order)}
        target = ranks.get(_hashable(value))
        if target is None:  # a value off the grid: nearest number, or no preference
            nums = [v for v in order if isinstance(v, (int, float))]
            target = ranks[min(nums, key=lambda v: abs(v - value))] if nums and isinstance(value, (int, float)) else 0
        return torch.tensor([abs(ranks[_hashable(v)] - target) / max(len(order) - 1, 1)
                             for v in self.table[col]], dtype=torch.float64)



def precompute_grid(policy: str | Factory | Sequence[Policy], cal: ExitRecord, test: ExitRecord,
                    grid: Grid | None = None, latency: ExitRecord | None = None, max_points: int | None = None,
                    name: str | None = None, cache: str | Path | None = None, progress: bool = True) -> PolicyGrid:
    """Fit every grid point on cal and evaluate it on test and cal, once: the operating points a panel shows.

    policy: a registry name, a Policy class or any factory(**params) -> Policy (fitted on cal at each point
    through fit_points, with its cache), or a sequence of Policy objects (e.g. agents fitted elsewhere; fitted
    on cal only where they need a fit and have none), with grid then one parameter dict per policy to label it
    (default: its parameters). grid: as sweep's. latency: test with costs in ms (records.latency_record) for
    the latency axis. max_points thins a long grid evenly, ends kept (smoke runs). Per point: two decides and
    two or three evaluates. progress: tqdm bars saying what is fitted and scored (fit_points' and this one's).
    """
    check_same_model(test, cal, "record", "cal record")
    if latency is not None and (latency.n != test.n or not torch.equal(latency.labels, test.labels)):
        raise EelabError("the latency record must be the test record with other costs; build it with "
                         "latency_record(test, profile)")
    given = _given_policies(policy, cal, grid)
    factory = None if given is not None else resolve_factory(policy)
    points = grid_points(factory, cal, grid) if given is None else given[1]
    if max_points is not None and len(points) > max_points:
        keep = sorted({round(i * (len(points) - 1) / max(max_points - 1, 1)) for i in range(max_points)})
        points = [points[i] for i in keep]
        given = None if given is None else ([given[0][i] for i in keep], points)
    policies = given[0] if given is not None else fit_points(factory, points, cal, cache, progress=progress)
    family = name or (policy if isinstance(policy, str) else (policies[0].name if policies else "policy"))
    rows, evaluated, exits = [], [], []
    for pol, point in _bar(zip(policies, points), f"scoring {len(points)} {family} point(s) on test and cal",
                           progress, total=len(points)):
        overhead = pol.overhead_macs(test.k, test.c)
        chosen = pol.decide(test)
        m = evaluate(test, chosen, overhead=overhead)
        on_cal = evaluate(cal, pol.decide(cal), overhead=overhead)
        row = {**point, **pol.summary(), "label": pol.describe(), **{key: m[key] for key in HEADLINE},
               "cal_accuracy": on_cal["accuracy"], "cal_rel_macs": on_cal["rel_macs"]}
        if latency is not None:  # the same exits, priced in measured ms instead of MACs
            ms = evaluate(latency, chosen)
            row.update(mean_ms=ms["mean_macs"], rel_ms=ms["rel_macs"])
        rows.append(row)
        evaluated.append(m)
        exits.append(chosen)
    table = pd.DataFrame(rows, index=range(len(rows)))
    table.attrs["params"] = sorted({key for point in points for key in point}, key=list(table.columns).index)
    return PolicyGrid(name=family, policies=list(policies), table=table, points=evaluated,
                      exits=torch.stack(exits) if exits else torch.empty(0, test.n, dtype=torch.long),
                      cal=cal, test=test, latency=latency)


class PolicyGrids(dict):
    """{name: PolicyGrid}, as precompute_grids returns it, with left_out {name: why} for the families these
    records cannot feed (a normal situation, e.g. records without learned confidences)."""

    def __init__(self, grids: Mapping[str, PolicyGrid] = (), left_out: Mapping[str, str] | None = None):
        super().__init__(grids)
        self.left_out: dict[str, str] = dict(left_out or {})


def precompute_grids(names: Sequence[str], cal: ExitRecord, test: ExitRecord, latency: ExitRecord | None = None,
                     max_points: int | None = None, cache: str | Path | None = None,
                     progress: bool = True) -> PolicyGrids:
    """precompute_grid of several registered families on their default grids: {name: PolicyGrid}.

    A family that reads a record field these records lack (e.g. learned confidences) is left out, so "every
    registered family" means every one that can decide on these records; why is in the result's left_out
    and, with progress, printed as a one-line note (not a warning: records without such a field are normal).
    progress: a bar over the families (and the bars of each family's fit and scoring).
    """
    grids = PolicyGrids()
    for name in names:
        lacking = [f for f in getattr(POLICIES.get(name), "INPUTS", ()) if getattr(cal, f, None) is None
                   or getattr(test, f, None) is None]
        if lacking:
            grids.left_out[name] = (f"it reads the record field(s) {', '.join(lacking)}, which these records lack "
                                    f"(record a model that outputs them)")
    wanted = [name for name in names if name not in grids.left_out]
    with _bar(len(wanted), "policy grids", progress) as bar:
        for name in wanted:
            bar.set_description(f"policy grids: {name}")
            grids[name] = precompute_grid(name, cal, test, latency=latency, max_points=max_points, cache=cache,
                                          progress=progress)
            bar.update(1)
        bar.set_description("policy grids")
    if progress:
        for name, why in grids.left_out.items():
            print(f"note: policy {name} left out: {why}")
    return grids


# ---- helpers ------------------------------------------------------------------------------------
def _bar(iterable: Any, desc: str, progress: bool, total: int | None = None) -> Any:
    """A tqdm.auto bar (a widget in a notebook, text in a terminal) over iterable, or over a count to update()
    by hand when iterable is an int; disabled (it still counts) when not progress. A bar shows only once its
    work has taken half a second (delay), and goes away when done (leave=False): a cell keeps its results."""
    if isinstance(iterable, int):
        return tqdm(total=iterable, desc=desc, disable=not progress, leave=False, delay=0.5)
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False, delay=0.5)


def _fit_batched(fit_grid: Callable[..., Sequence[Policy]], points: list[dict[str, Any]], cal: ExitRecord,
                 bar: Any) -> Sequence[Policy]:
    """fit_grid(points, cal) with the bar alive while it runs: the bar follows the share done when fit_grid
    takes callback=, and its clock is redrawn every half second either way (a batched run is one long call)."""
    def report(done: float) -> None:
        target = min(bar.total or 0, int(float(done) * (bar.total or 0)))
        if target > bar.n:
            bar.update(target - bar.n)

    kwargs = {"callback": report} if "callback" in inspect.signature(fit_grid).parameters else {}
    if bar.disable:
        return fit_grid(points, cal, **kwargs)
    stop = threading.Event()
    bar.refresh()  # shown from this thread; the ticker only redraws it

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="eelab-fit-clock", daemon=True)
    ticker.start()
    try:
        return fit_grid(points, cal, **kwargs)
    finally:
        stop.set()
        ticker.join()


def _advance(bar: Any, value: Any) -> Any:
    """value, after one step of the bar."""
    bar.update(1)
    return value


def _is_family(factory: Any) -> bool:
    """Whether a factory is a Policy class (with a default grid and maybe a vectorised sweep)."""
    return isinstance(factory, type) and issubclass(factory, Policy)


def _given_policies(policy: Any, cal: ExitRecord, grid: Grid | None
                    ) -> tuple[list[Policy], list[dict[str, Any]]] | None:
    """(the policies, one label dict each) when precompute_grid got fitted Policy objects, else None."""
    if not isinstance(policy, Sequence) or isinstance(policy, str):
        return None
    policies = list(policy)
    if not all(isinstance(p, Policy) for p in policies):
        raise EelabError("precompute_grid got a sequence that is not all Policy objects")
    points = [dict(p.params) for p in policies] if grid is None else _expand(grid)
    if len(points) != len(policies):
        raise EelabError(f"precompute_grid got {len(policies)} policies but {len(points)} grid labels")
    for p in policies:
        if p.needs_fit() and not p.fitted:
            p.fit(cal)
    return policies, points


def _expand(grid: Grid) -> list[dict[str, Any]]:
    """{param: values} as all combinations, or a list of parameter dicts as it is."""
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[key]) for key in keys))]
    return [dict(point) for point in grid]


def _plain(value: Any) -> Any:
    """A 0-d tensor or numpy number as a Python number, so grid columns hold plain values."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def _hashable(value: Any) -> Any:
    """A grid value usable as a dict key and slider option (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


def _sort_key(value: Any) -> tuple:
    """Numbers first in numeric order, then everything else by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


__all__ = ["HEADLINE", "PolicyGrid", "PolicyGrids", "cache_path", "fit_points", "grid_points", "precompute_grid",
           "precompute_grids", "resolve_factory", "sweep"]
