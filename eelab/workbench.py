"""Tables and summaries built from sweep results: what the notebooks, panels, paper figures and the results
table show, computed once from a cal/test pair.

Every function here reads exit records and the PolicyGrids eelab.sweep fitted (on cal) and scored (on test);
none fits a policy or runs the network. eelab.plots draws what these return; eelab.widgets wires them to
controls.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .ensemble import fit_ensemble
from .errors import EelabError
from .metrics import area_under_frontier, evaluate, exit_calibration, frontier_range, oracle_frontier
from .policies import Policy, score_logits
from .records import ExitRecord, load_records
from .sweep import HEADLINE, PolicyGrid, precompute_grid
from .__version__ import __version__

# What the published systems report on the original CIFAR-10 (not cifar10-jpeg): theirs, quoted, not re-run.
PUBLISHED = {
    "early-exit-cnn": {
        "source": "early-exit-cnn project (S. Pandey), EE-CNN on CIFAR-10",
        "accuracy": 0.8877, "block_index_saving": 0.399, "effectiveness_block_index": 35.38,
        "exit_accuracy": [0.642, 0.843, 0.889, 0.889],
    },
    "airbench94": {
        "source": "airbench94 (K. Jordan, 2024), one exit, 9.9 epochs on the 50,000 training images",
        "accuracy": 0.932, "tta_accuracy": 0.940, "macs": 118e6,
        "exit_accuracy": [math.nan, math.nan, math.nan, 0.932],
    },
    "ceed-eenn": {
        "source": "CEED authors, EENN ResNet-50 on CIFAR-10, batch 1 on a Ryzen CPU",
        "accuracy": 0.9103, "ms": 14.8, "plain_accuracy": 0.9465, "plain_ms": 30.0,
    },
}

# The committed references, checkpoints/<folder>: "strong" (ee_airnet, the notebooks' default) and "ee_cnn", the
# seed project's EE-CNN kept as its faithful reproduction; and the published system each is shown beside.
REFERENCES = {"strong": "ee_airnet-cifar10-jpeg", "ee_cnn": "ee_cnn-cifar10-jpeg"}
REFERENCE_PUBLISHED = {"strong": "airbench94", "ee_cnn": "early-exit-cnn"}


def reference_checkpoint(name: str, root: str | Path = "checkpoints") -> Path:
    """The checkpoint directory of the committed reference `name` (REFERENCES) under root."""
    if name not in REFERENCES:
        raise EelabError(f"unknown reference {name!r}; use one of {', '.join(REFERENCES)}, or set EELAB_CHECKPOINT "
                         "to a checkpoint directory")
    return Path(root) / REFERENCES[name]


def reference_table(checkpoints: Mapping[str, str | Path], limit: int | None = None) -> pd.DataFrame:
    """Checkpoints side by side, one row per (checkpoint, exit): reference, exit, macs, rel_macs, cal_accuracy,
    test_accuracy (exit_table of each checkpoint's cal.pt and test.pt; limit as load_records)."""
    parts = []
    for name, path in checkpoints.items():
        table = exit_table(*load_records(path, limit=limit))
        table.insert(0, "reference", name)
        parts.append(table)
    if not parts:
        raise EelabError("reference_table needs at least one checkpoint")
    return pd.concat(parts, ignore_index=True)


def cost_range(grid: PolicyGrid, x: str = "rel_macs") -> tuple[float, float]:
    """The x range frontiers are compared over (metrics.frontier_range): of the test record's MACs, or of its
    measured latency for x = rel_ms."""
    return frontier_range(_priced(grid, x))


def oracle_points(grid: PolicyGrid, x: str = "rel_macs") -> pd.DataFrame:
    """metrics.oracle_frontier of the grid's test record, priced in ms (columns mean_ms, rel_ms) for x = rel_ms."""
    table = oracle_frontier(_priced(grid, x))
    return table if x == "rel_macs" else table.rename(columns={"mean_macs": "mean_ms", "rel_macs": "rel_ms"})


def frontier_areas(grids: Mapping[str, PolicyGrid], axes: Sequence[str] = ("rel_macs",),
                   oracle: bool = True) -> pd.DataFrame:
    """Area under each grid's test frontier on each cost axis (rows: policies, then "oracle frontier" when
    oracle; columns: axes), each over cost_range of the first grid, so the areas compare."""
    first = next(iter(grids.values()))
    areas = {x: {name: area_under_frontier(grid.table, *cost_range(first, x), x=x) for name, grid in grids.items()}
             for x in axes}
    if oracle:
        for x in axes:
            areas[x]["oracle frontier"] = area_under_frontier(oracle_points(first, x), *cost_range(first, x), x=x)
    return pd.DataFrame(areas)


def exit_table(cal: ExitRecord, test: ExitRecord) -> pd.DataFrame:
    """Per exit: exit, macs (MACs per sample), rel_macs (of the plain network), cal_accuracy, test_accuracy."""
    first = torch.zeros(test.n, dtype=torch.long)
    on_test, on_cal = evaluate(test, first), evaluate(cal, torch.zeros(cal.n, dtype=torch.long))
    return pd.DataFrame({"exit": list(range(test.k)), "macs": on_test["exit_macs"],
                         "rel_macs": [c / test.full_cost for c in on_test["exit_macs"]],
                         "cal_accuracy": on_cal["exit_accuracy"], "test_accuracy": on_test["exit_accuracy"]})


def ensemble_runs(cal: ExitRecord, test: ExitRecord, seeds: Sequence[int], policy: str = "threshold",
                  max_points: int | None = None, cache: str | Path | None = None, progress: bool = True
                  ) -> list[dict[str, PolicyGrid]]:
    """Ensembled exits, one run per seed: an exit ensemble fitted on the seed's half of cal, `policy`'s grid
    fitted on the ensembled other half and scored on the ensembled test record -> [{"POLICY + ensemble": grid}],
    ready for summarize_policies beside the plain runs (eelab.ensemble: which split each part uses)."""
    runs = []
    for seed in tqdm(list(seeds), desc="fitting exit ensembles", unit="seed", disable=not progress, leave=False):
        ens = fit_ensemble(cal, seed=seed)
        runs.append({f"{policy} + ensemble": precompute_grid(policy, ens.apply(cal), ens.apply(test),
                                                             name=f"{policy} + ensemble", max_points=max_points,
                                                             cache=cache, progress=progress)})
    return runs


def ensemble_table(test: ExitRecord, ensembled: Sequence[ExitRecord]) -> pd.DataFrame:
    """Per exit on test, what ensembling changes: exit, rel_macs, accuracy and ece plain, then ensembled (mean over
    the ensembled records, e.g. one per seed) and accuracy_change (ensembled minus plain)."""
    if not ensembled:
        raise EelabError("ensemble_table needs at least one ensembled test record")
    plain = exit_calibration(test)
    runs = [exit_calibration(r) for r in ensembled]
    mean = {key: [sum(r[key][k] for r in runs) / len(runs) for k in range(test.k)] for key in ("accuracy", "ece")}
    return pd.DataFrame({"exit": list(range(test.k)), "rel_macs": (test.costs / test.full_cost).tolist(),
                         "accuracy": plain["accuracy"], "accuracy_ensembled": mean["accuracy"],
                         "accuracy_change": [e - p for e, p in zip(mean["accuracy"], plain["accuracy"])],
                         "ece": plain["ece"], "ece_ensembled": mean["ece"]})


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


def against_oracle(grid: PolicyGrid, row: int) -> dict[str, float]:
    """A grid point's test accuracy and compute saved beside the oracle frontier's at equal test accuracy: the
    oracle's compute saved there (its cheapest point at least as accurate) and the share of it the point
    reaches (its saving / the oracle's; NaN when the oracle saves nothing there)."""
    point = grid.table.loc[row]
    oracle = oracle_frontier(grid.test)
    reach = oracle[oracle["accuracy"] >= float(point["accuracy"]) - 1e-12]
    oracle_saved = float(reach["compute_saved"].max()) if not reach.empty else math.nan
    share = float(point["compute_saved"]) / oracle_saved if oracle_saved > 0 else math.nan
    return {"accuracy": float(point["accuracy"]), "compute_saved": float(point["compute_saved"]),
            "oracle_compute_saved": oracle_saved, "oracle_share": share}


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


def find_examples(record: ExitRecord, exits: torch.Tensor, n: int = 16, seed: int = 0,
                  progress: bool = True) -> Examples:
    """n seeded samples of a record with their exits and predictions, and their images when the dataset is here.

    The images come from the record's dataset (meta dataset, split, indices); without the dataset, images is
    None and message says where eelab looked and how to get it, so a notebook goes on with the records.
    progress: tqdm.auto bars while the dataset is unpacked and decoded (the first time, about 45 s for
    cifar10-jpeg's 60,000 JPEGs; then it is read from data/cache).
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
        ds = load_dataset(name, (record.meta.get("train_config") or {}).get("image_size"), progress=progress)
    except EelabError as e:
        return Examples(images=None, message=f"{e} (the figures and tables come from the exit records and do "
                                             f"not need the images)", **base)
    pool = ds.test_images if record.meta.get("split", "test") == "test" else ds.train_images
    return Examples(images=pool[record.indices[rows]], **base)


def split_table(profile: Mapping[str, Any], record: ExitRecord, exits: torch.Tensor) -> pd.DataFrame:
    """Per split point k (device runs stages and heads 0..k, the remote part the rest): what an edge/cloud split costs.

    profile: eelab.profile_checkpoint's dict (per stage cumulative_ms, activation_bytes); exits int64 [N] a
    policy's on record [N, K, C]. One row per k: device_ms (stages + heads 0..k, ms per image at the profile's
    batch), bytes_fp32 / bytes_bf16 / bytes_int8 (the activation after stage k per image: 4, 2, 1 bytes a value),
    local_share (fraction of images with exit <= k, which never need the remote part), local_accuracy (their
    accuracy at their exits; NaN when none), mean_device_ms (per image: device time up to min(exit, k)) and
    mean_bytes_fp32 (per image: bytes_fp32 times the share that goes on).
    """
    stages = profile["stages"]
    exits = torch.as_tensor(exits).long()
    if len(stages) != record.k:
        raise EelabError(f"the profile has {len(stages)} exits, the record {record.k}; profile the checkpoint the "
                         f"record came from")
    if exits.shape != (record.n,) or record.n == 0 or int(exits.min()) < 0 or int(exits.max()) >= record.k:
        raise EelabError(f"exits must be int64 [{record.n}] in [0, {record.k}), one per record sample; got shape "
                         f"{tuple(exits.shape)}")
    ms = torch.tensor([float(s["cumulative_ms"]) for s in stages], dtype=torch.float64)  # [K]
    right = record.logits[torch.arange(record.n), exits].argmax(-1) == record.labels  # [N]
    rows = []
    for k, stage in enumerate(stages):
        local = exits <= k
        share = float(local.double().mean())
        fp32 = int(stage["activation_bytes"])
        rows.append({"split_after": k, "device_ms": float(ms[k]), "bytes_fp32": fp32, "bytes_bf16": fp32 // 2,
                     "bytes_int8": fp32 // 4, "local_share": share,
                     "local_accuracy": float(right[local].double().mean()) if bool(local.any()) else math.nan,
                     "mean_device_ms": float(ms[exits.clamp(max=k)].mean()), "mean_bytes_fp32": (1 - share) * fp32})
    return pd.DataFrame(rows)


def with_progress(desc: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) under a one-step tqdm.auto bar saying desc (shown once the call has taken half a
    second), for a slow call that has no bar of its own, e.g. loading records or profiling a checkpoint."""
    with tqdm(total=1, desc=desc, leave=False, delay=0.5) as bar:
        result = fn(*args, **kwargs)
        bar.update(1)
    return result


def record_identity(record: ExitRecord, path: str | Path | None = None) -> dict[str, Any]:
    """What identifies an exit record in a manifest: split, N, K, C, model, dataset, checkpoint sha256, cost
    unit, a sha256 of its sample indices (which subset it is) and its file path when known."""
    meta = record.meta
    return {"split": meta.get("split"), "n": record.n, "k": record.k, "c": record.c, "model": meta.get("model"),
            "dataset": meta.get("dataset"), "checkpoint_sha256": meta.get("checkpoint_sha256"),
            "cost_unit": meta.get("cost_unit", "MACs"), "eelab_version": meta.get("eelab_version"),
            "indices_sha256": hashlib.sha256(record.indices.numpy().tobytes()).hexdigest(),
            "path": None if path is None else str(path)}


def grid_identity(grid: PolicyGrid, selected: int | None = None) -> dict[str, Any]:
    """A PolicyGrid in a manifest: its family, number of points, every grid parameter's values, the checkpoint
    (and exit ensemble) of its records, and (when selected) that row's policy with its parameters and fitted
    scalars."""
    params = list(grid.table.attrs.get("params", []))
    entry: dict[str, Any] = {"grid": grid.name, "family": grid.policies[0].name if grid.policies else None,
                             "points": len(grid), "parameters": {p: grid.values(p) for p in params},
                             "checkpoint_sha256": grid.test.meta.get("checkpoint_sha256")}
    if grid.test.meta.get("ensemble_sha256"):
        entry["ensemble_sha256"] = grid.test.meta["ensemble_sha256"]
    if selected is not None:
        policy = grid.policies[selected]
        entry["selected"] = {"row": int(selected), "label": str(grid.table.at[selected, "label"]),
                             "params": dict(policy.params), "fitted": dict(policy.summary())}
    return entry


def policy_identity(policy: Policy) -> dict[str, Any]:
    """One fitted Policy in a manifest: its family, parameters and fitted scalars."""
    return {"family": policy.name, "params": dict(policy.params), "fitted": dict(policy.summary())}


@dataclass(frozen=True)
class MadeWith:
    """What produced one exported figure or table, for its manifest entry (see made_with): policies as (name or
    None, PolicyGrid or fitted Policy) pairs, the notebook constants it used, and the accuracy or budget at which
    each grid's matched_point row is the one shown (None: the whole grid)."""

    policies: tuple[tuple[str | None, Any], ...] = ()
    constants: Mapping[str, Any] = field(default_factory=dict)
    accuracy: float | None = None
    budget: float | None = None

    def identity(self) -> dict[str, Any]:
        """{"policies": [grid_identity (with the matched row) or policy_identity of each], "constants": {...}}."""
        entries = []
        for name, item in self.policies:
            if isinstance(item, PolicyGrid):
                matched = None if self.accuracy is None and self.budget is None else \
                    matched_point(item, accuracy=self.accuracy, budget=self.budget)
                entry = grid_identity(item, matched)
                if matched is None and (self.accuracy is not None or self.budget is not None):
                    entry["selected"] = None  # no grid point meets the target on cal
                entries.append({**entry, "grid": name or item.name})
            else:
                entries.append({**policy_identity(item), **({"name": name} if name else {})})
        target = {key: value for key, value in (("accuracy", self.accuracy), ("budget", self.budget))
                  if value is not None}
        return {"policies": entries, "constants": dict(self.constants), **({"matched_at": target} if target else {})}

    def records(self) -> list[ExitRecord]:
        """The records its grids were fitted on and scored on (cal, test, latency), each once."""
        found = [r for _, g in self.policies if isinstance(g, PolicyGrid) for r in (g.cal, g.test, g.latency)
                 if r is not None]
        return list({id(r): r for r in found}.values())


def made_with(*policies: Any, accuracy: float | None = None, budget: float | None = None,
              **constants: Any) -> MadeWith:
    """What produced an exported figure or table, for ExportControl(made_with={name: made_with(...)}), so the
    manifest says, per file, which policies and notebook constants made it.

    policies: PolicyGrids, {name: PolicyGrid or Policy} dicts (precompute_grids' result, one per seed), fitted
    Policy objects, or lists of these; accuracy / budget: the figure shows each grid's matched_point at this
    target (as operating_points and matched_points do); constants: the notebook constants it depends on by
    name, e.g. made_with(*alpha_runs, SEEDS=SEEDS, ALPHAS=ALPHAS).
    """
    pairs: list[tuple[str | None, Any]] = []

    def add(item: Any, name: str | None = None) -> None:
        if isinstance(item, (PolicyGrid, Policy)):
            pairs.append((name, item))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                add(value, str(key))
        elif isinstance(item, (list, tuple)):
            for value in item:
                add(value)
        else:
            raise EelabError(f"made_with takes policy grids, fitted policies, dicts or lists of them; got a "
                             f"{type(item).__name__}")

    add(list(policies))
    if accuracy is not None and budget is not None:
        raise EelabError("made_with takes at most one of accuracy= or budget= (the target the points are matched at)")
    return MadeWith(tuple(pairs), dict(constants), accuracy, budget)


def export_manifest(files: Sequence[str | Path], records: Sequence[Mapping[str, Any]] = (),
                    policies: Sequence[Mapping[str, Any]] = (),
                    about: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest written beside exported figures, so a figure can be traced and remade: eelab version, git
    commit of eelab's working tree (None outside a git checkout; dirty when it has uncommitted changes), date
    (UTC ISO), the checkpoint sha256(s) of the records, the records (record_identity), the policies
    (grid_identity) and every file (name, absolute path) with its sha256 and what about gives for its name
    (e.g. made_with: the policies and constants that produced it; size_inches of a figure)."""
    about = about or {}
    shas = sorted({r["checkpoint_sha256"] for r in records if r.get("checkpoint_sha256")})
    commit, dirty = _git_state(Path(__file__).resolve().parent)
    return {"eelab_version": __version__, "git_commit": commit, "git_dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint_sha256": shas[0] if len(shas) == 1 else (shas or None),
            "records": [dict(r) for r in records], "policies": [dict(p) for p in policies],
            "files": [{"name": Path(f).name, "path": str(Path(f).resolve()), "sha256": _sha256(Path(f)),
                       **about.get(Path(f).name, {})} for f in files]}


def _priced(grid: PolicyGrid, x: str) -> ExitRecord:
    """The grid's test record priced on cost axis x: in MACs (rel_macs) or measured ms (rel_ms)."""
    if x == "rel_macs":
        return grid.test
    if x != "rel_ms" or grid.latency is None:
        raise EelabError(f"cost axis {x!r} needs {'a latency record' if x == 'rel_ms' else 'rel_macs or rel_ms'}; "
                         f"give latency= to precompute_grid for rel_ms")
    return grid.latency


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the git checkout holding folder; (None, None)
    outside one or without git."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
        return commit.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


__all__ = ["Examples", "MadeWith", "PUBLISHED", "against_oracle", "class_exits", "class_table", "cost_range",
           "ensemble_runs", "ensemble_table", "exit_confidences", "exit_table", "export_manifest", "find_examples",
           "frontier_areas", "grid_identity", "made_with", "matched_point", "matched_points", "operating_points",
           "oracle_points", "policy_identity", "record_identity", "REFERENCE_PUBLISHED", "REFERENCES",
           "reference_checkpoint", "reference_table", "reliability_bins", "risk_table",
           "sensitivity_table", "split_table", "summarize_policies", "target_accuracy", "with_progress"]
