"""Time a 200-threshold sweep over a random 10,000 x 4 x 10 exit record (the cost of one slider redraw).

Run: python benchmarks/sweep_speed.py [--repeats 15] [--threads N]; prints medians in milliseconds.
On a small machine that is busy (e.g. training), torch's default threads wait on each other: compare
with --threads 1, and read the load average printed first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from eelab.metrics import evaluate
from eelab.policies import ThresholdPolicy
from eelab.records import ExitRecord
from eelab.testing import random_record
from eelab.sweep import sweep


def make_record(n: int = 10_000, k: int = 4, c: int = 10, seed: int = 0) -> ExitRecord:
    """A random record whose later exits are more often right: logits [n, k, c], costs rising to 1.05."""
    return random_record(n, k, c, seed, scale=2.0, boost=(0.5, 3.0), full_cost=1e8,
                         costs=torch.linspace(0.3, 1.05, k, dtype=torch.float64) * 1e8,
                         meta={"model": "random", "seed": seed})


def time_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cal, test = make_record(seed=0), make_record(seed=1)
    grid = {"threshold": torch.linspace(0.0, 1.0, 200).tolist()}
    policy = ThresholdPolicy(threshold=0.8)
    exits = policy.decide(test)
    print(f"record {test.n} x {test.k} x {test.c}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"sweep, 200 thresholds:        {time_ms(lambda: sweep('threshold', cal, test, grid), args.repeats):8.2f} ms")
    print(f"sweep, default grid:          {time_ms(lambda: sweep('threshold', cal, test), args.repeats):8.2f} ms")
    print(f"decide, one threshold:        {time_ms(lambda: policy.decide(test), args.repeats):8.2f} ms")
    print(f"evaluate, one operating point: {time_ms(lambda: evaluate(test, exits), args.repeats):7.2f} ms")


if __name__ == "__main__":
    main()
