"""What the notebooks, panels, paper figures and the results table show, computed once from a cal/test pair.

Every function here reads exit records (and, for the latency axis, `profile_checkpoint`'s timings) and calls
eelab.metrics and the policies; none runs the network. A PolicyGrid fits each grid point on cal and
evaluates it on test (and cal) once, so a slider only looks a row up (DESIGN: cache once, decide many).
eelab.plots draws what these return; eelab.widgets wires them to controls.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import EelabError
from .metrics import area_under_frontier, evaluate, frontier_range, pareto_front
from .policies import POLICIES, Policy, score_logits
from .records import ExitRecord, check_same_model, load_record

# Headline numbers each grid row carries, as metrics.evaluate names them.
HEADLINE = ("accuracy", "mean_macs", "rel_macs", "compute_saved", "effectiveness", "effectiveness_block_index",
            "block_index_saving")

# What the published systems report on the original CIFAR-10 (not cifar10-jpeg): theirs, quoted, not re-run.
PUBLISHED = {
    "early-exit-cnn": {
        "source": "early-exit-cnn project (S. Pandey), EE-CNN on CIFAR-10",
        "accuracy": 0.8877, "block_index_saving": 0.399, "effectiveness_block_index": 35.38,
        "exit_accuracy": [0.642, 0.843, 0.889, 0.889],
    },
    "ceed-eenn": {
        "source": "CEED authors, EENN ResNet-50 on CIFAR-10, batch 1 on a Ryzen CPU",
        "accuracy": 0.9103, "ms": 14.8, "plain_accuracy": 0.9465, "plain_ms": 30.0,
    },
}


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


def load_records(checkpoint: str | Path, limit: int | None = None, seed: int = 0) -> tuple[ExitRecord, ExitRecord]:
    """(cal, test) records of a checkpoint directory (cal.pt, test.pt).

    limit keeps a seeded random subset of at most `limit` samples of each, in record order (not the first
    ones: a folder dataset's records are sorted by class).
    """
    checkpoint = Path(checkpoint)
    records = []
    for split in ("cal", "test"):
        path = checkpoint / f"{split}.pt"
        if not path.is_file():
            raise EelabError(f"{path} does not exist; record it with `eelab record {checkpoint} --split {split} "
                             f"--out {path}`")
        record = load_record(path)
        if limit is not None and limit < record.n:
            gen = torch.Generator().manual_seed(seed)
            record = record.subset(torch.randperm(record.n, generator=gen)[:limit].sort().values)
        records.append(record)
    check_same_model(records[1], records[0], f"{checkpoint}/test.pt", f"{checkpoint}/cal.pt")
    return records[0], records[1]


def latency_record(record: ExitRecord, profile: Mapping[str, Any]) -> ExitRecord:
    """The record with measured milliseconds as costs: exit k costs profile's cumulative_ms[k], full_cost plain_ms.

    profile is eelab.profile_checkpoint's dict (per stage: cumulative_ms = stages 0..k plus heads 0..k at its
    batch size). Metrics of this record read mean_macs as mean ms per sample; a policy's own decision time
    (e.g. a gate network) is not in it.
    """
    stages = profile["stages"]
    if len(stages) != record.k:
        raise EelabError(f"the profile has {len(stages)} exits, the record {record.k}; profile the checkpoint the "
                         f"record came from")
    ms = torch.tensor([float(s["cumulative_ms"]) for s in stages], dtype=torch.float64)
    meta = {**record.meta, "cost_unit": "ms", "profile_batch": profile.get("batch"),
            "profile_threads": profile.get("threads")}
    return replace(record, costs=ms, full_cost=float(profile["plain_ms"]), meta=meta)


def precompute_grid(policy: str | Callable[..., Policy] | Sequence[Policy], cal: ExitRecord, test: ExitRecord,
                    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]] | None = None,
                    latency: ExitRecord | None = None, max_points: int | None = None,
                    name: str | None = None, cache: str | Path | None = None) -> PolicyGrid:
    """Fit every grid point on cal and evaluate it on test and cal, once: the operating points a panel shows.

    policy: a registry name, a Policy class or any factory(**params) -> Policy (fitted on cal at each point),
    or a sequence of Policy objects (e.g. agents trained elsewhere; fitted on cal only where they need a fit
    and have none), with grid then one parameter dict per policy to label it (default: its parameters).
    grid: {param: values} (all combinations), a list of parameter dicts, or None for the family's default
    grid (as metrics.sweep). latency: test with costs in ms (latency_record) for the latency axis.
    max_points thins a long grid evenly, ends kept (smoke runs). cache: a folder where each point's fitted
    policy (where it needs a fit) is saved and found again (keyed by family, parameters, checkpoint and cal samples), so a learned
    family (alpha gates, DQN agents) is trained once across notebooks and runs. Per point: two decides and
    two or three evaluates.
    """
    check_same_model(test, cal, "record", "cal record")
    if latency is not None and (latency.n != test.n or not torch.equal(latency.labels, test.labels)):
        raise EelabError("the latency record must be the test record with other costs; build it with "
                         "latency_record(test, profile)")
    given, factory, points = _grid_points(policy, cal, grid)
    if max_points is not None and len(points) > max_points:
        keep = sorted({round(i * (len(points) - 1) / max(max_points - 1, 1)) for i in range(max_points)})
        points = [points[i] for i in keep]
        given = None if given is None else [given[i] for i in keep]
    policies = given if given is not None else _fit_points(factory, points, cal, cache)
    rows, evaluated, exits = [], [], []
    for pol, point in zip(policies, points):
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
    family = name or (policy if isinstance(policy, str) else (policies[0].name if policies else "policy"))
    return PolicyGrid(name=family, policies=list(policies), table=table, points=evaluated,
                      exits=torch.stack(exits) if exits else torch.empty(0, test.n, dtype=torch.long),
                      cal=cal, test=test, latency=latency)


def precompute_grids(names: Sequence[str], cal: ExitRecord, test: ExitRecord, latency: ExitRecord | None = None,
                      max_points: int | None = None, cache: str | Path | None = None) -> dict[str, PolicyGrid]:
    """precompute_grid of several registered families on their default grids: {name: PolicyGrid}.

    A family that reads a record field these records lack (e.g. learned confidences) is left out, with a
    warning naming the field, so "every registered family" means every one that can decide on these records.
    """
    grids = {}
    for name in names:
        lacking = [f for f in getattr(POLICIES.get(name), "INPUTS", ()) if getattr(cal, f, None) is None
                   or getattr(test, f, None) is None]
        if lacking:
            warnings.warn(f"policy {name} left out: it reads the record field(s) {', '.join(lacking)}, which these "
                          f"records lack (record a model that outputs them)", stacklevel=2)
            continue
        grids[name] = precompute_grid(name, cal, test, latency=latency, max_points=max_points, cache=cache)
    return grids


def exit_table(cal: ExitRecord, test: ExitRecord) -> pd.DataFrame:
    """Per exit: exit, macs (MACs per sample), rel_macs (of the plain network), cal_accuracy, test_accuracy."""
    first = torch.zeros(test.n, dtype=torch.long)
    on_test, on_cal = evaluate(test, first), evaluate(cal, torch.zeros(cal.n, dtype=torch.long))
    return pd.DataFrame({"exit": list(range(test.k)), "macs": on_test["exit_macs"],
                         "rel_macs": [c / test.full_cost for c in on_test["exit_macs"]],
                         "cal_accuracy": on_cal["exit_accuracy"], "test_accuracy": on_test["exit_accuracy"]})


def matched_point(grid: PolicyGrid, accuracy: float | None = None, budget: float | None = None) -> int | None:
    """Row chosen on cal: the cheapest point whose cal accuracy reaches `accuracy`, or the most accurate point
    whose cal rel_macs is at most `budget` (give exactly one). None when no point qualifies.

    Targets are met on cal and the row's test columns are what is reported (DESIGN, Splits).
    """
    if (accuracy is None) == (budget is None):
        raise EelabError("matched_point needs exactly one of accuracy= or budget=")
    t = grid.table
    if accuracy is not None:
        ok = t[t["cal_accuracy"] >= accuracy - 1e-12]
        if ok.empty:
            return None
        return int(ok.sort_values(["cal_rel_macs", "cal_accuracy"], ascending=[True, False], kind="stable").index[0])
    ok = t[t["cal_rel_macs"] <= budget + 1e-12]
    if ok.empty:
        return None
    return int(ok.sort_values(["cal_accuracy", "cal_rel_macs"], ascending=[False, True], kind="stable").index[0])


def target_accuracy(cal: ExitRecord, tolerance: float = 0.01) -> float:
    """The accuracy operating points are matched at: the last exit's accuracy on cal minus `tolerance`."""
    return evaluate(cal, torch.full((cal.n,), cal.k - 1, dtype=torch.long))["accuracy"] - tolerance


def operating_points(grids: Mapping[str, PolicyGrid], accuracy: float | None = None,
                     budget: float | None = None) -> pd.DataFrame:
    """One row per policy: its matched_point's label and table row (test metrics, cal columns), NaN if none."""
    rows = []
    for name, grid in grids.items():
        i = matched_point(grid, accuracy=accuracy, budget=budget)
        row = {"policy": name, "label": None if i is None else grid.table.at[i, "label"]}
        for col in (*HEADLINE, "cal_accuracy", "cal_rel_macs", "mean_ms", "rel_ms"):
            if col in grid.table:
                row[col] = math.nan if i is None else float(grid.table.at[i, col])
        rows.append(row)
    return pd.DataFrame(rows)


def matched_points(grids: Mapping[str, PolicyGrid], accuracy: float | None = None,
                   budget: float | None = None) -> dict[str, dict[str, Any]]:
    """{policy: metrics.evaluate dict on test} at each grid's matched_point; policies with none are left out."""
    rows = {name: matched_point(grid, accuracy=accuracy, budget=budget) for name, grid in grids.items()}
    return {name: grids[name].points[i] for name, i in rows.items() if i is not None}


def summarize_policies(runs: Mapping[str, PolicyGrid] | Sequence[Mapping[str, PolicyGrid]],
                       tolerance: float = 0.01, budget: float = 0.5) -> pd.DataFrame:
    """The summary table: per policy, mean and spread over runs (seeds) of the area under its test frontier,
    test accuracy at matched compute (cal rel_macs <= budget), and test compute saved and accuracy at matched
    accuracy (cal accuracy >= the last exit's cal accuracy - tolerance).

    runs: {policy: grid} for one checkpoint, or one such dict per seed. Columns: policy, n_seeds, area,
    accuracy_at_budget, compute_saved_at_target, accuracy_at_target, then each with _std (sample standard
    deviation over runs, NaN for one run); attrs hold budget and tolerance.
    """
    runs = [runs] if isinstance(runs, Mapping) else list(runs)
    per_run = []
    for run in runs:
        any_grid = next(iter(run.values()))
        lo, hi = frontier_range(any_grid.test)
        at_budget = operating_points(run, budget=budget)
        at_accuracy = operating_points(run, accuracy=target_accuracy(any_grid.cal, tolerance))
        for i, (name, grid) in enumerate(run.items()):
            per_run.append({"policy": name, "area": area_under_frontier(grid.table, lo, hi),
                            "accuracy_at_budget": at_budget.at[i, "accuracy"],
                            "compute_saved_at_target": at_accuracy.at[i, "compute_saved"],
                            "accuracy_at_target": at_accuracy.at[i, "accuracy"]})
    frame = pd.DataFrame(per_run)
    stats = frame.groupby("policy", sort=False)
    out = stats.mean()
    std = stats.std(ddof=1).add_suffix("_std")
    columns = [c for name in out.columns for c in (name, f"{name}_std")]  # each mean beside its spread
    table = pd.concat([stats.size().rename("n_seeds"), out, std], axis=1)[["n_seeds", *columns]].reset_index()
    table.attrs.update(budget=budget, tolerance=tolerance)
    return table


def sensitivity_table(grids: PolicyGrid | Sequence[PolicyGrid], param: str) -> pd.DataFrame:
    """How a family's operating point moves with one parameter (e.g. alpha), over one grid per seed.

    Per value of param: test accuracy and compute saved (mean and sample std over the grids; NaN std for one),
    cal accuracy (mean), and jump: |change in mean test accuracy| from the previous value, so a cliff between
    neighbouring values (LEENet's results jump between nearby alphas) is one look away. Rows sorted by param.
    """
    grids = [grids] if isinstance(grids, PolicyGrid) else list(grids)
    if not grids:
        raise EelabError("sensitivity_table needs at least one policy grid")
    missing = [g.name for g in grids if param not in g.table]
    if missing:
        raise EelabError(f"grid {missing[0]} has no parameter {param!r}; it varies {', '.join(grids[0].params)}")
    rows = pd.concat([g.table[[param, "accuracy", "compute_saved", "cal_accuracy"]].assign(run=i)
                      for i, g in enumerate(grids)], ignore_index=True)
    stats = rows.groupby(param, sort=True)
    table = pd.DataFrame({"n_seeds": stats.size(), "accuracy": stats["accuracy"].mean(),
                          "accuracy_std": stats["accuracy"].std(ddof=1),
                          "compute_saved": stats["compute_saved"].mean(),
                          "compute_saved_std": stats["compute_saved"].std(ddof=1),
                          "cal_accuracy": stats["cal_accuracy"].mean()}).reset_index()
    table["jump"] = table["accuracy"].diff().abs()
    return table


def risk_table(grid: PolicyGrid) -> pd.DataFrame:
    """Per point of a risk-policy grid: epsilon, delta, mode, lambda, guarantee, cal_risk and the realised test
    risk (accuracy lost against the last exit, as the policy defines risk), with test accuracy and compute saved."""
    from .policies.risk import RiskPolicy, risk_curves

    if not all(isinstance(p, RiskPolicy) for p in grid.policies):
        raise EelabError(f"risk_table needs a grid of risk policies, got {grid.name}")
    lambdas = torch.tensor([p.lambda_ for p in grid.policies], dtype=torch.float32)
    test_risk, _ = risk_curves(grid.test, lambdas)
    return pd.DataFrame({
        "epsilon": [p.params["epsilon"] for p in grid.policies], "delta": [p.params["delta"] for p in grid.policies],
        "mode": [p.params["mode"] for p in grid.policies], "lambda": lambdas.double().tolist(),
        "guarantee": [p.guarantee() for p in grid.policies],
        "cal_risk": [float(p.info.get("cal_risk", math.nan)) for p in grid.policies],
        "test_risk": test_risk.tolist(), "accuracy": grid.table["accuracy"].tolist(),
        "compute_saved": grid.table["compute_saved"].tolist()})


def reliability_bins(record: ExitRecord, n_bins: int = 15) -> pd.DataFrame:
    """Reliability diagram data of every exit: rows exit, bin, lo, hi, count, confidence (mean max-prob in the
    bin, NaN if empty), accuracy. Bins (lo, hi] of [0, 1] as metrics.expected_calibration_error uses them."""
    rows = []
    correct = record.logits.argmax(dim=-1) == record.labels.unsqueeze(1)
    for k in range(record.k):
        conf = score_logits(record.logits[:, k].contiguous(), "max_prob").double()
        b = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
        count = torch.bincount(b, minlength=n_bins).double()
        conf_sum = torch.bincount(b, weights=conf, minlength=n_bins)
        right = torch.bincount(b, weights=correct[:, k].double(), minlength=n_bins)
        for j in range(n_bins):
            n = float(count[j])
            rows.append({"exit": k, "bin": j, "lo": j / n_bins, "hi": (j + 1) / n_bins, "count": int(n),
                         "confidence": float(conf_sum[j] / n) if n else math.nan,
                         "accuracy": float(right[j] / n) if n else math.nan})
    return pd.DataFrame(rows)


def exit_confidences(record: ExitRecord) -> pd.DataFrame:
    """Long table of every sample's max-prob confidence at every exit: rows exit, confidence, correct [N * K]."""
    correct = record.logits.argmax(dim=-1) == record.labels.unsqueeze(1)
    conf = torch.stack([score_logits(record.logits[:, k].contiguous(), "max_prob") for k in range(record.k)], 1)
    return pd.DataFrame({"exit": torch.arange(record.k).repeat(record.n).tolist(),
                         "confidence": conf.reshape(-1).tolist(), "correct": correct.reshape(-1).tolist()})


def class_table(points: Mapping[str, Mapping[str, Any]], key: str = "per_class_accuracy") -> pd.DataFrame:
    """Classes x policies of a per-class list of metrics.evaluate dicts (e.g. per_class_accuracy)."""
    names = next(iter(points.values()))["class_names"] if points else []
    return pd.DataFrame({policy: point[key] for policy, point in points.items()}, index=names, dtype=float)


def class_exits(point: Mapping[str, Any]) -> pd.DataFrame:
    """Classes x exits: the fraction of each class's samples leaving at each exit (one evaluate dict)."""
    fractions = point["per_class_exit_fractions"]
    return pd.DataFrame(fractions, index=point["class_names"],
                        columns=[f"exit {k}" for k in range(point["k"])], dtype=float)


@dataclass(frozen=True)
class Examples:
    """Test images with the exit each took: images uint8 [M, ch, H, W] (None when the dataset is absent, with
    message saying how to get it), labels, predictions and exits [M], class_names [C]."""

    images: torch.Tensor | None
    labels: list[int]
    predictions: list[int]
    exits: list[int]
    class_names: list[str]
    message: str = ""


def find_examples(record: ExitRecord, exits: torch.Tensor, n: int = 16, seed: int = 0) -> Examples:
    """n seeded samples of a record with their exits and predictions, and their images when the dataset is here.

    The images come from the record's dataset (meta dataset, split, indices); without the dataset, images is
    None and message says where eelab looked and how to get it, so a notebook goes on with the records.
    """
    from .data import load_dataset

    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(record.n, generator=gen)[:n].sort().values
    exits = torch.as_tensor(exits).long()
    preds = record.logits[rows, exits[rows]].argmax(dim=-1)
    base = dict(labels=record.labels[rows].tolist(), predictions=preds.tolist(), exits=exits[rows].tolist(),
                class_names=record.class_names)
    name = record.meta.get("dataset")
    if not name:
        return Examples(images=None, message="the record names no dataset, so its images cannot be found", **base)
    try:
        ds = load_dataset(name, (record.meta.get("train_config") or {}).get("image_size"), progress=False)
    except EelabError as e:
        return Examples(images=None, message=f"{e} (the figures and tables come from the exit records and do "
                                             f"not need the images)", **base)
    pool = ds.test_images if record.meta.get("split", "test") == "test" else ds.train_images
    return Examples(images=pool[record.indices[rows]], **base)


# ---- helpers ------------------------------------------------------------------------------------
def _grid_points(policy: Any, cal: ExitRecord, grid: Any
                 ) -> tuple[list[Policy] | None, Callable[..., Policy] | None, list[dict[str, Any]]]:
    """(the given policies or None, the factory or None, one parameter dict per point) for precompute_grid."""
    if isinstance(policy, Sequence) and not isinstance(policy, str):
        policies = list(policy)
        if not all(isinstance(p, Policy) for p in policies):
            raise EelabError("precompute_grid got a sequence that is not all Policy objects")
        points = [dict(p.params) for p in policies] if grid is None else _expand(grid)
        if len(points) != len(policies):
            raise EelabError(f"precompute_grid got {len(policies)} policies but {len(points)} grid labels")
        for p in policies:
            if p.needs_fit() and not p.fitted:
                p.fit(cal)
        return policies, None, points
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise EelabError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        factory: Callable[..., Policy] = POLICIES[policy]
    elif callable(policy):
        factory = policy
    else:
        raise EelabError(f"precompute_grid needs a policy name, factory or list of policies, got {type(policy).__name__}")
    if grid is None:
        if not (isinstance(factory, type) and issubclass(factory, Policy)):
            raise EelabError("precompute_grid needs a grid for a policy factory; give grid={param: values}")
        points = factory.grid(cal)
    else:
        points = _expand(grid)
    return None, factory, [{key: _plain(value) for key, value in point.items()} for point in points]


def _fit_points(factory: Callable[..., Policy], points: list[dict[str, Any]], cal: ExitRecord,
                cache: str | Path | None = None) -> list[Policy]:
    """One policy per point fitted on cal (or found in the cache folder); a family with a batched
    fit_grid(points, cal) classmethod fits the missing ones in one go."""
    from .policies import load_policy

    # only what a fit learns is worth a file; a family with nothing to fit is rebuilt from its parameters
    paths = [None if cache is None or not factory(**point).needs_fit() else cache_path(cache, factory, point, cal)
             for point in points]
    found: dict[int, Policy] = {i: load_policy(path) for i, path in enumerate(paths) if path is not None and path.is_file()}
    missing = [i for i in range(len(points)) if i not in found]
    fit_grid = getattr(factory, "fit_grid", None)
    if callable(fit_grid) and missing:
        fresh = list(fit_grid([points[i] for i in missing], cal))
    else:
        fresh = [factory(**points[i]).fit(cal) for i in missing]
    for i, policy in zip(missing, fresh):
        if paths[i] is not None:
            policy.save(paths[i])
        found[i] = policy
    return [found[i] for i in range(len(points))]


def cache_path(cache: str | Path, factory: Any, point: dict[str, Any], cal: ExitRecord) -> Path:
    """Where a point's fitted policy is cached: family, parameters, checkpoint and cal samples in the key."""
    import hashlib
    import json

    family = getattr(factory, "name", None) or getattr(factory, "__name__", "policy")
    key = json.dumps({"family": family, "point": point, "checkpoint": cal.meta.get("checkpoint_sha256"),
                      "cal": hashlib.sha256(cal.indices.numpy().tobytes()).hexdigest(), "n": cal.n},
                     sort_keys=True, default=str)
    return Path(cache) / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _expand(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """{param: values} as all combinations, or a list of parameter dicts as it is (metrics.sweep's grids)."""
    if isinstance(grid, Mapping):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[key]) for key in keys))]
    return [dict(point) for point in grid]


def _plain(value: Any) -> Any:
    """A 0-d tensor or numpy number as a Python number."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def _hashable(value: Any) -> Any:
    """A grid value usable as a dict key and slider option (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


def _sort_key(value: Any) -> tuple:
    """Numbers first in numeric order, then everything else by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


__all__ = ["Examples", "HEADLINE", "PUBLISHED", "PolicyGrid", "class_exits", "class_table", "exit_confidences",
           "exit_table", "find_examples", "latency_record", "load_records", "matched_point", "matched_points",
           "operating_points", "precompute_grid", "precompute_grids", "reliability_bins", "risk_table", "sensitivity_table",
           "summarize_policies", "target_accuracy", "cache_path"]
