"""Learned exit policies (alpha gates, DQN) against the fitted threshold policy and the oracle frontier.

Every policy is fitted on CAL and scored on TEST; each learned family sweeps its default grid once per seed
(alpha: 21 alphas; dqn: 9 cost weights), and reports the area under its accuracy-vs-compute frontier over
[costs[0] / full_cost, 1] as mean, standard deviation and range over seeds, against the threshold policy
(max-prob, plain and with per-exit temperatures fitted on cal; deterministic) and the oracle frontier (a
bound, not a policy). MACs include the gates' and Q-network's own. The area of a step frontier grows with
the number of points, so each learned policy is also compared point by point: at each of its Pareto points,
its accuracy minus the best threshold accuracy at no more MACs. Then: how much accuracy and compute saved
move between nearby alphas (LEENet reports jumps), and the DQN's operating point per cost weight. Ensembled
exits (eelab.ensemble, Zero Time Waste): one ensemble per seed fitted on that seed's half of cal, the threshold
grid fitted on the other half, with the plain threshold on the same half beside it, and what the ensembles
change per exit on test (accuracy, ECE).

Run: python benchmarks/learned_policies.py [CAL TEST] [--seeds 3] [--synthetic] [--threads N]
CAL and TEST default to checkpoints/ee_cnn-cifar10-jpeg/cal.pt and test.pt; records with learned
confidences (an `eelab train --objective eenet` checkpoint) add the EENets `confidence` policy; --synthetic builds a seeded
synthetic pair (5,000 cal and 10,000 test samples, 4 exits, 10 classes) so it runs anywhere.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import pandas as pd

from eelab.ensemble import fit_ensemble, split_cal
from eelab.metrics import (area_under_frontier, evaluate, exit_calibration, frontier_range, oracle_frontier,
                           pareto_front)
from eelab.policies import AlphaPolicy, DQNPolicy, default_grid, fit_alpha_grid
from eelab.records import ExitRecord, check_same_model, load_record
from eelab.testing import random_record
from eelab.sweep import sweep

REFERENCE = Path("checkpoints/ee_cnn-cifar10-jpeg")


def make_synthetic_pair(seed: int = 0, n_cal: int = 5000, n_test: int = 10000, k: int = 4,
                        c: int = 10) -> tuple[ExitRecord, ExitRecord]:
    """A seeded cal/test pair that behaves like a small CIFAR-10 early-exit CNN.

    Each sample has a difficulty u ~ U(0, 1); exit k adds (1.1 - u) * strength_k (rising with k) plus exit
    noise to the true class's logit, so accuracy rises from about 0.46 to 0.82 along the exits, confidence
    tracks it, and the exits' mistakes are only partly shared. Costs 0.25, 0.50, 0.78, 1.04 x 1e8 MACs.
    """
    gen = torch.Generator().manual_seed(seed)  # cal, then test, from one stream
    costs = torch.tensor([0.25, 0.5, 0.78, 1.04], dtype=torch.float64)[:k] * 1e8
    shape = dict(scale=1.0, boost=(1.5, 4.0), difficulty=True, costs=costs, full_cost=1e8)
    cal = random_record(n_cal, k, c, gen, meta={"model": "synthetic", "split": "cal", "seed": seed}, **shape)
    test = random_record(n_test, k, c, gen, meta={"model": "synthetic", "split": "test", "seed": seed}, **shape)
    return cal, test


def summarise(values: list[float]) -> str:
    """'mean ± sd [min, max]' of a list of numbers (sd over seeds, n - 1)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f} [{min(values):.4f}, {max(values):.4f}]"


def time_sweep(name: str, cal: ExitRecord, test: ExitRecord,
               points: list[dict]) -> tuple[float, float, pd.DataFrame]:
    """Area under the frontier of one sweep, its wall time in seconds, and the table."""
    lo, hi = frontier_range(test)
    start = time.perf_counter()
    table = sweep(name, cal, test, points)
    return area_under_frontier(table, lo, hi), time.perf_counter() - start, table


def matched_gap(table: pd.DataFrame, reference: pd.DataFrame) -> tuple[float, float]:
    """Over the Pareto points of a sweep: mean accuracy minus the reference's best accuracy at no more MACs,
    and the fraction of those points strictly above the reference (rel_macs and accuracy columns)."""
    ref = reference.sort_values("rel_macs")
    xs, best = ref["rel_macs"].to_numpy(), ref["accuracy"].cummax().to_numpy()
    gaps = []
    for x, acc in zip(*(pareto_front(table)[c].to_numpy() for c in ("rel_macs", "accuracy"))):
        j = (xs <= x * (1 + 1e-12)).sum() - 1
        gaps.append(acc - (best[j] if j >= 0 else 0.0))
    return statistics.mean(gaps), sum(g > 1e-12 for g in gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cal", nargs="?", default=str(REFERENCE / "cal.pt"))
    parser.add_argument("test", nargs="?", default=str(REFERENCE / "test.pt"))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per learned policy (at least 3 for a spread)")
    parser.add_argument("--synthetic", action="store_true", help="use a seeded synthetic cal/test pair instead")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic pair")
    parser.add_argument("--alphas", default="0.30:0.70:0.025",
                        help="nearby alphas for the sensitivity table, lo:hi:step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.synthetic:
        cal, test = make_synthetic_pair(args.data_seed)
        source = f"synthetic pair (seed {args.data_seed})"
    else:
        cal, test = load_record(args.cal), load_record(args.test)
        check_same_model(test, cal, "test record", "cal record")
        source = f"{args.cal} / {args.test}"
    seeds = list(range(args.seeds))
    lo, hi = frontier_range(test)
    right = (test.logits.argmax(-1) == test.labels.unsqueeze(1)).double().mean(0)
    print(f"records: {source}; cal {cal.n}, test {test.n} samples, K={test.k} exits, C={test.c} classes")
    print("exit accuracy (test): " + " ".join(f"{v:.4f}" for v in right.tolist())
          + "; exit MACs / full: " + " ".join(f"{v:.3f}" for v in (test.costs / test.full_cost).tolist()))
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; seeds {seeds}; "
          f"areas are mean accuracy over rel. MACs [{lo:.3f}, {hi:.3f}] (higher is better)\n")

    # ---- areas under the frontier ----------------------------------------------------------------------
    oracle = area_under_frontier(oracle_frontier(test), lo, hi)
    rows = [("oracle frontier (bound)", "-", "-", [oracle], None, None, None)]
    baseline, threshold_tables = {}, []
    for label, extra in (("threshold max-prob", {}), ("threshold max-prob + temperature", {"temperature": True})):
        points = [{**point, **extra} for point in default_grid("threshold", cal)]
        area, seconds, table = time_sweep("threshold", cal, test, points)
        baseline[label] = area
        threshold_tables.append(table)
        rows.append((label, "-", len(points), [area], None, None, seconds / len(points)))
    reference, reference_points = max(baseline.values()), pd.concat(threshold_tables)
    learned_tables = {}
    # EENets confidence branches: deterministic given the records (their training seed made the records)
    families = ["alpha", "dqn"] + (["confidence"] if cal.confidences is not None and test.confidences is not None
                                   else [])
    for name in families:
        areas, per_point, gaps, above = [], [], [], []
        for seed in (seeds if name != "confidence" else [0]):
            points = [{**point, **({"seed": seed} if name != "confidence" else {})} for point in default_grid(name, cal)]
            area, seconds, table = time_sweep(name, cal, test, points)
            gap, frac = matched_gap(table, reference_points)
            areas.append(area)
            per_point.append(seconds / len(points))
            gaps.append(gap)
            above.append(frac)
            learned_tables[(name, seed)] = table
        rows.append((name, len(areas), len(default_grid(name, cal)), areas, [a - reference for a in areas],
                     (gaps, above), statistics.mean(per_point)))
    # ensembled exits: fitted on a seeded half of cal, the threshold on the other half; the same half without the
    # ensemble says how much of any difference is the halved cal rather than the ensemble
    calibration = {"plain": exit_calibration(test), "ensembled": []}
    for label in ("threshold, other half of cal only", "ensemble + threshold (halves of cal)"):
        areas, per_point, gaps, above = [], [], [], []
        for seed in seeds:
            ens = fit_ensemble(cal, seed=seed)
            half = split_cal(cal, seed)[1]
            ens_cal, ens_test = (ens.apply(cal), ens.apply(test)) if label.startswith("ensemble") else (half, test)
            if label.startswith("ensemble"):
                calibration["ensembled"].append(exit_calibration(ens_test))
            points = default_grid("threshold", ens_cal)
            area, seconds, table = time_sweep("threshold", ens_cal, ens_test, points)
            gap, frac = matched_gap(table, reference_points)
            areas.append(area)
            per_point.append(seconds / len(points))
            gaps.append(gap)
            above.append(frac)
        rows.append((label, len(areas), len(points), areas, [a - reference for a in areas], (gaps, above),
                     statistics.mean(per_point)))
    start = time.perf_counter()
    AlphaPolicy(alpha=0.5).fit(cal)
    one_alpha = time.perf_counter() - start
    start = time.perf_counter()
    DQNPolicy().fit(cal)
    one_dqn = time.perf_counter() - start

    print(f"{'policy':<37} {'seeds':>5} {'points':>6}  {'area under frontier':<34} {'area - best threshold':<36} "
          f"{'fit s/point':>11}")
    for label, n, points, areas, diff, _, seconds in rows:
        text = summarise(areas) if len(areas) > 1 else f"{areas[0]:.4f}"
        gap = "" if diff is None else summarise(diff)
        fit = "-" if seconds is None else f"{seconds:.3f}"
        print(f"{label:<37} {n:>5} {points:>6}  {text:<34} {gap:<36} {fit:>11}")
    print("(the two half-of-cal rows: seeds are splits of cal; the ensemble's combination MACs are counted)")
    print("\nat the same MACs, over each policy's Pareto points: its accuracy minus the best threshold accuracy "
          "(either threshold family, fitted on all of cal) at no more MACs")
    print(f"{'policy':<37} {'mean accuracy gap':<36} {'share of points above thresholds':<36}")
    for label, _, _, _, _, matched, _ in rows:
        if matched is not None:
            print(f"{label:<37} {summarise(matched[0]):<36} {summarise(matched[1]):<36}")
    print(f"\nper exit on test, plain against ensembled (mean over {len(seeds)} ensembles; exit 0 has nothing to "
          "combine with: its ensemble is a temperature and a class bias)")
    for key, name in (("accuracy", "accuracy"), ("ece", "ECE (15 bins)")):
        ens_mean = [statistics.mean(c[key][k] for c in calibration["ensembled"]) for k in range(test.k)]
        print(f"{name:<14} plain     " + "  ".join(f"{v:.4f}" for v in calibration["plain"][key]))
        print(f"{name:<14} ensembled " + "  ".join(f"{v:.4f}" for v in ens_mean))
    print(f"\none fit on the {cal.n}-sample cal record: alpha {one_alpha:.2f} s, dqn {one_dqn:.2f} s (wall, default "
          f"parameters); the alpha sweep fits its grid in one batched run")

    # ---- alpha sensitivity -------------------------------------------------------------------------------
    a_lo, a_hi, a_step = (float(v) for v in args.alphas.split(":"))
    alphas = [round(a_lo + i * a_step, 6) for i in range(int(round((a_hi - a_lo) / a_step)) + 1)]
    acc = torch.zeros(len(seeds), len(alphas), dtype=torch.float64)
    saved = torch.zeros_like(acc)
    for s, seed in enumerate(seeds):
        for j, policy in enumerate(fit_alpha_grid(cal, alphas, seed=seed)):
            m = evaluate(test, policy.decide(test), overhead=policy.overhead_macs(test.k, test.c))
            acc[s, j], saved[s, j] = m["accuracy"], m["compute_saved"]
    print(f"\nalpha sensitivity on test (fitted on cal; mean ± sd over {len(seeds)} seeds; jump = change from the "
          f"previous alpha, mean over seeds)")
    print(f"{'alpha':>6}  {'accuracy':<17} {'compute saved':<17} {'acc jump':>9} {'saved jump':>11}")
    for j, alpha in enumerate(alphas):
        jump_a = "" if j == 0 else f"{float((acc[:, j] - acc[:, j - 1]).mean()):+.4f}"
        jump_s = "" if j == 0 else f"{float((saved[:, j] - saved[:, j - 1]).mean()):+.4f}"
        sd_a = float(acc[:, j].std()) if len(seeds) > 1 else 0.0
        sd_s = float(saved[:, j].std()) if len(seeds) > 1 else 0.0
        print(f"{alpha:>6.3f}  {float(acc[:, j].mean()):.4f} ± {sd_a:.4f}  {float(saved[:, j].mean()):+.4f} ± "
              f"{sd_s:.4f}  {jump_a:>9} {jump_s:>11}")
    if len(alphas) > 1:
        da, ds = acc.diff(dim=1).abs(), saved.diff(dim=1).abs()
        print(f"largest change between neighbouring alphas ({a_step:g} apart), any seed: accuracy "
              f"{float(da.max()):.4f}, compute saved {float(ds.max()):.4f}; seed-to-seed sd at one alpha up to accuracy "
              f"{float(acc.std(0).max()) if len(seeds) > 1 else 0.0:.4f}, compute saved "
              f"{float(saved.std(0).max()) if len(seeds) > 1 else 0.0:.4f}")

    # ---- DQN operating points ----------------------------------------------------------------------------
    print(f"\ndqn operating points on test per cost weight (mean ± sd over {len(seeds)} seeds)")
    print(f"{'cost_weight':>11}  {'accuracy':<17} {'compute saved':<17}")
    for j, point in enumerate(default_grid("dqn", cal)):
        a = [float(learned_tables[("dqn", seed)]["accuracy"][j]) for seed in seeds]
        c = [float(learned_tables[("dqn", seed)]["compute_saved"][j]) for seed in seeds]
        sd_a = statistics.stdev(a) if len(a) > 1 else 0.0
        sd_c = statistics.stdev(c) if len(c) > 1 else 0.0
        print(f"{point['cost_weight']:>11g}  {statistics.mean(a):.4f} ± {sd_a:.4f}  "
              f"{statistics.mean(c):+.4f} ± {sd_c:.4f}")


if __name__ == "__main__":
    main()
