"""Metrics as pure functions of exit records and exits: evaluate, frontiers, area, bootstrap, and the blocks
they are built from (exit values summed at exits, charged costs). No policy is imported here.

Definitions (DESIGN, Data contract), for exits [N] int64 in [0, K):
  accuracy        mean(argmax(logits[i, exits[i]]) == labels[i])                      fraction
  mean_macs       mean(costs[exits])                                                  MACs / sample
                  (costs plus the policy's own decision MACs at exits 0..k where it has any:
                  charged_costs, Policy.overhead_macs)
  rel_macs        mean_macs / full_cost                                               fraction
  compute_saved   1 - rel_macs  (negative when the heads cost more than early exits save)
  effectiveness   100 * accuracy * compute_saved
  block_index_saving          1 - mean((exits + 1) / K), the early-exit-cnn project's exit-index saving
  effectiveness_block_index   100 * accuracy * block_index_saving
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from .errors import EelabError
from .records import ExitRecord

SUMMARY = ("accuracy", "mean_macs", "rel_macs", "compute_saved", "effectiveness", "effectiveness_block_index")


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


def exit_values(record: ExitRecord, overhead: torch.Tensor | None = None) -> torch.Tensor:
    """What each sample contributes at each exit: float64 [N, K, 3] = (prediction right 0/1, MACs, k + 1).

    Summed over samples at their exits these give the counts behind accuracy, mean MACs and the
    block-index saving (module doc). MACs are charged_costs(record.costs, overhead).
    """
    right = _correct(record).double()
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


def oracle_exits(record: ExitRecord) -> torch.Tensor:
    """Earliest exit whose prediction is right, or exit 0 where none is: exits int64 [N]."""
    # argmax of a 0/1 row returns its first 1, and 0 for an all-zero row: exactly the rule above
    return _correct(record).to(torch.uint8).argmax(dim=1)


def evaluate(record: ExitRecord, exits: torch.Tensor, n_bins: int = 15,
             overhead: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything about one operating point, JSON-ready (floats, lists; None where undefined).

    record with N samples, K exits, C classes; exits int64 [N]. Per-exit lists have K items, per-class
    lists C items; confidence is the max softmax probability (std over all N samples, population);
    ece is the expected calibration error of each exit on all N samples with n_bins equal-width bins.
    overhead [K]: the deciding policy's MACs per exit (Policy.overhead_macs), charged into mean_macs and
    exit_macs; policy_macs repeats it (zeros when None).
    """
    exits = _check_exits(record, exits)
    n, k, c = record.n, record.k, record.c
    correct = _correct(record)  # [N, K]
    head = {key: float(value[0]) for key, value in _summaries(record, exits.unsqueeze(0), overhead).items()}
    counts = torch.bincount(exits, minlength=k)
    right = correct[torch.arange(n), exits]
    right_by_exit = torch.bincount(exits, weights=right.double(), minlength=k)
    class_counts = torch.bincount(record.labels, minlength=c).double()
    class_right = torch.bincount(record.labels, weights=right.double(), minlength=c)
    class_exit = torch.zeros(c, k, dtype=torch.float64).index_put_((record.labels, exits),
                                                                   torch.ones(n, dtype=torch.float64), accumulate=True)
    conf = torch.softmax(record.logits.double(), dim=-1).amax(dim=-1)  # [N, K]
    return {
        "n": n, "k": k, "c": c,
        **head,
        "full_macs": float(record.full_cost),
        "block_index_saving": float(1 - ((exits + 1).double() / k).mean()),
        "mean_exit": float(exits.double().mean()),
        "exit_macs": charged_costs(record.costs, overhead).tolist(),
        "policy_macs": (torch.zeros(k, dtype=torch.float64) if overhead is None
                        else torch.as_tensor(overhead, dtype=torch.float64)).tolist(),
        "exit_counts": counts.tolist(),
        "exit_fractions": (counts.double() / n).tolist(),
        "exit_accuracy": correct.double().mean(0).tolist(),
        "accuracy_of_exited": _safe(right_by_exit / counts.double()),
        "class_names": record.class_names,
        "per_class_accuracy": _safe(class_right / class_counts),
        "per_class_exit_fractions": [_safe(row) for row in class_exit / class_counts.unsqueeze(1)],
        "confidence_mean": conf.mean(0).tolist(),
        "confidence_std": conf.std(0, correction=0).tolist(),
        "ece": [expected_calibration_error(conf[:, j], correct[:, j], n_bins) for j in range(k)],
    }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N |accuracy(B_b) - mean confidence(B_b)| over equal-width bins (lo, hi] of [0, 1].

    confidence [N] in [0, 1], correct [N] bool -> a fraction (Guo et al. 2017; 0 is in the first bin).
    """
    if confidence.numel() == 0:
        return float("nan")
    b = (torch.ceil(confidence.double() * n_bins).long() - 1).clamp(0, n_bins - 1)
    size = torch.bincount(b, minlength=n_bins).double()
    gap = torch.bincount(b, weights=correct.double(), minlength=n_bins) - torch.bincount(
        b, weights=confidence.double(), minlength=n_bins)
    return float(gap.abs().sum() / size.sum())


def exit_calibration(record: ExitRecord, n_bins: int = 15) -> dict[str, list[float]]:
    """Per exit, on all N samples: accuracy [K] and expected calibration error of the max softmax probability [K]
    (fractions)."""
    prob, pred = torch.softmax(record.logits, dim=-1).max(dim=-1)  # [N, K]
    right = pred == record.labels[:, None]
    return {"accuracy": right.double().mean(0).tolist(),
            "ece": [expected_calibration_error(prob[:, k], right[:, k], n_bins) for k in range(record.k)]}


def pareto_front(points: pd.DataFrame, x: str = "rel_macs", y: str = "accuracy") -> pd.DataFrame:
    """The rows no other row beats (lower or equal x and higher or equal y, one strictly), sorted by x."""
    ordered = points.sort_values(by=[x, y], ascending=[True, False], kind="stable")
    best, keep = float("-inf"), []
    for i, value in zip(ordered.index, ordered[y].to_numpy()):
        if value > best:
            keep.append(i)
            best = value
    return ordered.loc[keep]


def oracle_frontier(record: ExitRecord) -> pd.DataFrame:
    """The best accuracy any exit assignment reaches at each mean cost: the bound frontiers are drawn against.

    Start with every sample at exit 0; move each sample exit 0 gets wrong but a later exit gets right to its
    oracle exit (earliest right), cheapest first. Every sample has unit value, so taking the cheapest moves
    first is optimal: no assignment with mean cost <= a row's mean_macs is more accurate (costs increasing).
    Rows: moved (samples moved so far), accuracy, mean_macs, rel_macs, compute_saved; the last of them is
    the oracle policy, and one more row extends its accuracy flat to rel_macs = max(1, costs[-1] / full_cost).
    """
    # Moving samples down from the last exit instead would start at the last exit's accuracy, which the
    # oracle beats at lower cost: such a path is not a bound (a policy can lie above it), this one is.
    correct = _correct(record)
    costs = record.costs.double()
    oracle = oracle_exits(record)
    movable = ~correct[:, 0] & correct.any(dim=1)
    extra = (costs[oracle[movable]] - costs[0]).sort().values
    moved = torch.arange(extra.numel() + 1)
    mean_macs = costs[0] + torch.cat([torch.zeros(1, dtype=torch.float64), extra.cumsum(0)]) / record.n
    accuracy = (correct[:, 0].sum() + moved).double() / record.n
    end = max(1.0, float(costs[-1]) / record.full_cost) * record.full_cost
    mean_macs = torch.cat([mean_macs, torch.tensor([max(end, float(mean_macs[-1]))], dtype=torch.float64)])
    accuracy = torch.cat([accuracy, accuracy[-1:]])
    rel = mean_macs / record.full_cost
    return pd.DataFrame({"moved": torch.cat([moved, moved[-1:]]).tolist(), "accuracy": accuracy.tolist(),
                         "mean_macs": mean_macs.tolist(), "rel_macs": rel.tolist(),
                         "compute_saved": (1 - rel).tolist()})


def frontier_range(record: ExitRecord) -> tuple[float, float]:
    """The x range frontiers are compared over: (costs[0] / full_cost, 1.0).

    With measured costs (a latency record) the first exit can time at or above the plain network when the
    stages are tiny or the timing noisy; the range then runs up to the last exit's cost, so it is never empty.
    """
    lo = float(record.costs[0]) / record.full_cost
    if lo < 1.0:
        return lo, 1.0
    hi = float(record.costs[-1]) / record.full_cost
    if not hi > lo:
        raise EelabError(f"the record's costs do not rise from the first exit to the last ({record.costs.tolist()}); "
                         f"re-measure them (eelab profile) or check the record")
    return lo, hi


def area_under_frontier(points: pd.DataFrame, lo: float, hi: float = 1.0, x: str = "rel_macs",
                        y: str = "accuracy") -> float:
    """Mean height of the Pareto step function over [lo, hi]: area / (hi - lo), a fraction like accuracy.

    At each budget t the step function is the best y among points with x <= t (0 before the first point),
    the accuracy a deterministic choice among the points can reach at that budget. Use
    frontier_range(record) for (lo, hi) so two policies compare in one number.
    """
    if not hi > lo:
        raise EelabError(f"area_under_frontier needs hi > lo, got [{lo:g}, {hi:g}]")
    data = points[[x, y]].dropna().sort_values(by=x, kind="stable")
    xs = torch.tensor(data[x].to_numpy(), dtype=torch.float64)
    if xs.numel() == 0:
        return 0.0
    ys = torch.tensor(data[y].to_numpy(), dtype=torch.float64).cummax(0).values
    edges = torch.cat([xs, torch.tensor([hi], dtype=torch.float64)]).clamp(lo, hi)
    return float((edges.diff() * ys).sum() / (hi - lo))


def bootstrap_ci(record: ExitRecord, exits: torch.Tensor, metric: str | Callable[[ExitRecord, torch.Tensor], float]
                 = "accuracy", n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 overhead: torch.Tensor | None = None) -> dict[str, float]:
    """Percentile bootstrap interval of a metric over test samples (the policy's exits held fixed).

    metric: one of accuracy, mean_macs, rel_macs, compute_saved, effectiveness, effectiveness_block_index
    (vectorised), or any f(record, exits) -> float (a loop). Returns value, lo, hi, level, n_boot.
    overhead [K]: the policy's MACs per exit, charged by the named metrics (see evaluate).
    """
    exits = _check_exits(record, exits)
    if not 0 < level < 1 or n_boot < 1:
        raise EelabError(f"bootstrap_ci needs 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
    if isinstance(metric, str) and metric not in SUMMARY:
        raise EelabError(f"unknown bootstrap metric {metric!r}; choose one of {', '.join(SUMMARY)} or pass a function")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, n_boot, 256):  # chunks keep the [B, N] index small; same draws for both paths
        idx = torch.randint(record.n, (min(256, n_boot - start), record.n), generator=gen)
        if isinstance(metric, str):
            values.append(_resampled(record, exits, idx, overhead)[metric])
        else:
            values.append(torch.tensor([float(metric(record.subset(row), exits[row])) for row in idx],
                                       dtype=torch.float64))
    boot = torch.cat(values)
    value = (_summaries(record, exits.unsqueeze(0), overhead)[metric][0] if isinstance(metric, str)
             else float(metric(record, exits)))
    tail = (1 - level) / 2
    q = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return {"value": float(value), "lo": float(q[0]), "hi": float(q[1]), "level": level, "n_boot": n_boot}


# ---- helpers ------------------------------------------------------------------------------------
def _check_exits(record: ExitRecord, exits: Any) -> torch.Tensor:
    """exits as int64 [N] in [0, K), or a one-line EelabError."""
    exits = torch.as_tensor(exits)
    if exits.shape != (record.n,) or exits.dtype.is_floating_point or exits.dtype == torch.bool:
        raise EelabError(f"exits must be an integer tensor [N={record.n}], got {exits.dtype} {tuple(exits.shape)}")
    if record.n == 0:
        raise EelabError("the record has no samples; record a non-empty split")
    exits = exits.long()
    if int(exits.min()) < 0 or int(exits.max()) >= record.k:
        raise EelabError(f"exits must lie in [0, {record.k - 1}], got values in [{int(exits.min())}, {int(exits.max())}]")
    return exits


def _correct(record: ExitRecord) -> torch.Tensor:
    """Whether each exit's prediction is right: bool [N, K]."""
    return record.logits.argmax(dim=-1) == record.labels.unsqueeze(1)


def _summaries(record: ExitRecord, exits: torch.Tensor,
               overhead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Headline metrics for T operating points at once: exits [T, N] -> {name: float64 [T]} (module doc)."""
    return headline_metrics(sum_at_exits(exit_values(record, overhead), exits), record)


def headline_metrics(sums: torch.Tensor, record: ExitRecord) -> dict[str, torch.Tensor]:
    """Headline metrics from sums over samples at their exits [T, 3] (see exit_values)."""
    n = max(record.n, 1)
    accuracy, mean_macs, mean_block = sums[:, 0] / n, sums[:, 1] / n, sums[:, 2] / (n * record.k)
    rel = mean_macs / record.full_cost
    return {"accuracy": accuracy, "mean_macs": mean_macs, "rel_macs": rel, "compute_saved": 1 - rel,
            "effectiveness": 100 * accuracy * (1 - rel), "effectiveness_block_index": 100 * accuracy * (1 - mean_block)}


def _resampled(record: ExitRecord, exits: torch.Tensor, idx: torch.Tensor,
               overhead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Headline metrics on bootstrap resamples: idx [B, N] rows of the record -> {name: float64 [B]}."""
    per_sample = exit_values(record, overhead)[torch.arange(record.n), exits]  # [N, 3]
    return headline_metrics(per_sample[idx].sum(dim=1), record)


def _safe(values: torch.Tensor) -> list[float | None]:
    """A float list for JSON, with None where a value is undefined (NaN: no sample to average over)."""
    return [None if v != v else float(v) for v in values.tolist()]


__all__ = ["SUMMARY", "area_under_frontier", "bootstrap_ci", "charged_costs", "evaluate", "exit_calibration",
           "exit_values",
           "expected_calibration_error", "frontier_range", "headline_metrics", "oracle_exits", "oracle_frontier",
           "pareto_front", "sum_at_exits", "sum_at_shared_threshold"]
