"""Slider latency: from a control's value change to its figure's data updated, in milliseconds, for each
panel's main control (the Python side: the observer runs synchronously and rewrites the traces inside
batch_update; sending the new data to the browser is asynchronous and not counted).

Run: python benchmarks/slider_latency.py [--checkpoint DIR | --cal CAL --test TEST] [--repeats 40] [--threads N]
Without records it times random ones of the reference's shape (cal 5,000, test 10,000, 4 exits, 10 classes).
Every move is checked: the figure must hold the grid's row for the new value. Prints medians, p95 and max.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from eelab import testing, widgets
from eelab.records import ExitRecord, load_record
from eelab.sweep import precompute_grid, precompute_grids
from eelab.records import latency_record, load_records

BUDGET_MS = 100.0


def random_record(n: int, seed: int, k: int = 4, c: int = 10) -> ExitRecord:
    """A record whose later exits are more often right: logits [n, k, c], costs rising to 1.05 of the plain net."""
    return testing.random_record(n, k, c, seed, scale=2.0, boost=(0.5, 3.0), full_cost=2e8,
                                 costs=torch.linspace(0.3, 1.05, k, dtype=torch.float64) * 2e8, sha="0" * 64,
                                 meta={"class_names": [f"class {i}" for i in range(c)]})


def time_moves(control, values: list, check) -> list[float]:
    """Set control.value to each value in turn; milliseconds from the assignment to the figure updated."""
    times = []
    for value in values:
        start = time.perf_counter()
        control.value = value
        times.append(1e3 * (time.perf_counter() - start))
        check(value)
    return times


def cycle(options: list, repeats: int, start: object) -> list:
    """repeats values walking through the options and back, never repeating the current one."""
    values, i, step = [], options.index(start), 1
    for _ in range(repeats):
        if not 0 <= i + step < len(options):
            step = -step
        i += step
        values.append(options[i])
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint directory with cal.pt and test.pt")
    parser.add_argument("--cal")
    parser.add_argument("--test")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dqn-steps", type=int, default=200,
                        help="updates per DQN agent (the timing needs agents, not good ones; 600 is the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        cal, test = load_records(args.checkpoint)
        source = args.checkpoint
    elif args.cal and args.test:
        cal, test, source = load_record(args.cal), load_record(args.test), f"{args.cal}, {args.test}"
    else:
        cal, test, source = random_record(5000, 0), random_record(10_000, 1), "random records"
    # a made-up timing profile (ms proportional to MACs) is enough to time the toggle
    profile = {"stages": [{"cumulative_ms": float(c) / 1e8} for c in test.costs], "plain_ms": test.full_cost / 1e8}
    latency = latency_record(test, profile)

    start = time.perf_counter()
    threshold = precompute_grid("threshold", cal, test, latency=latency)
    risk = precompute_grid("risk", cal, test, {"epsilon": [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3],
                                                          "delta": [0.05, 0.1, 0.2]})
    grids = precompute_grids(["static", "patience", "budget", "oracle"], cal, test, latency=latency)
    grids["threshold"] = threshold
    precompute = time.perf_counter() - start

    start = time.perf_counter()
    alpha = precompute_grid("alpha", cal, test, name="alpha")
    dqn = precompute_grid("dqn", cal, test, [{"cost_weight": w, "steps": args.dqn_steps}
                                                       for w in (0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.1, 1.5)])
    learned = time.perf_counter() - start

    rows = []
    panel = widgets.PolicySliderPanel([alpha, threshold], static=grids["static"])

    def check_on(grid, name, param):
        def check(value):
            row = grid.table.loc[grid.find(**{param: value})]
            selected = next(t for t in panel.frontier.data if t.name == f"{name} (selected)")
            assert selected.x == (row["rel_macs"],)
        return check

    for name, grid, param in (("alpha", alpha, "alpha"), ("threshold", threshold, "threshold")):
        slider = panel.sliders[name][param]
        rows.append((f"02 tune alpha: {name} slider", param,
                     time_moves(slider, cycle([v for _, v in slider.options], args.repeats, slider.value),
                                check_on(grid, name, param))))

    panel = widgets.PolicySliderPanel([dqn, threshold], static=grids["static"], classes=True)
    slider = panel.sliders["dqn"]["cost_weight"]

    def check_classes(value):
        point = dqn.points[dqn.find(cost_weight=value)]
        assert [list(r) for r in panel.class_figure.data[0].z] == point["per_class_exit_fractions"]
        check_on(dqn, "dqn", "cost_weight")(value)

    rows.append(("03 train dqn: cost_weight slider + class heatmap", "cost_weight",
                 time_moves(slider, cycle([v for _, v in slider.options], args.repeats, slider.value), check_classes)))

    risk_panel = widgets.RiskControlPanel(risk, static=grids["static"])
    slider = risk_panel.sliders["risk"]["epsilon"]

    def check_risk(value):
        i = risk_panel.selected()
        assert risk.policies[i].params["epsilon"] == value
        assert risk_panel.risk_figure.data[-1].y == (risk_panel.risk.at[i, "test_risk"],)

    rows.append(("risk control (04)", "epsilon",
                 time_moves(slider, cycle([v for _, v in slider.options], args.repeats, slider.value), check_risk)))

    compare = widgets.ComparePoliciesPanel(grids)

    def check_cost(value):
        assert ("latency" in compare.figure.layout.xaxis.title.text) == (value == "rel_ms")

    rows.append(("compare policies (04)", "cost axis toggle",
                 time_moves(compare.cost, ["rel_ms", "rel_macs"] * (args.repeats // 2), check_cost)))

    print(f"records: {source} (cal {cal.n}, test {test.n}, K={test.k}, C={test.c}); torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"precomputed once: {len(threshold)} threshold points, {len(risk)} risk points, the other families "
          f"(with the latency axis) in {precompute:.1f} s; {len(alpha)} alpha gates and {len(dqn)} DQN agents "
          f"({args.dqn_steps} updates each) fitted on cal in {learned:.1f} s\n")
    print(f"| panel | control | moves | median ms | p95 ms | max ms | under {BUDGET_MS:.0f} ms |")
    print("|---|---|---:|---:|---:|---:|---|")
    for panel_name, control, times in rows:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        print(f"| {panel_name} | {control} | {len(times)} | {statistics.median(times):.1f} | {p95:.1f} | "
              f"{max(times):.1f} | {'yes' if p95 < BUDGET_MS else 'NO'} |")


if __name__ == "__main__":
    main()
