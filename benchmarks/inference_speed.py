"""Wall clock of true early exit against the plain network, on a checkpoint's test split.

Latency per image at batch 1 and throughput at batch 256, plain network (last exit only, no intermediate
heads) and early exit under a policy, timed in alternating rounds (median of at least 5), same threads and
memory layout; prints the measured saving beside the saving MACs predict, and their ratio.

    python benchmarks/inference_speed.py [CHECKPOINT] [--policy FILE|NAME] [--param k=v] [--rounds 5]

By default the policy is a max-prob threshold fitted on cal.pt to stay within 0.5 points of the last exit's
accuracy on cal (never on test), as the reference-checkpoint issue asks.
"""
from __future__ import annotations

import argparse
import json

import torch

from eelab.inference import benchmark_inference
from eelab.metrics import evaluate
from eelab.policies import make_policy
from eelab.records import load_record


def fit_threshold_within(cal_path: str, points: float = 0.005) -> float:
    """Smallest shared max-prob threshold whose accuracy on cal is within `points` of the last exit's."""
    cal = load_record(cal_path)
    last = float((cal.logits[:, -1].argmax(-1) == cal.labels).double().mean())
    best = 1.0
    for t in torch.linspace(1.0, 0.0, 201).tolist():  # from conservative to cheap; stop at the first miss
        acc = evaluate(cal, make_policy("threshold", threshold=t).decide(cal))["accuracy"]
        if acc < last - points:
            break
        best = t
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="checkpoints/ee_cnn-cifar10-jpeg")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-images", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    params = dict(p.split("=", 1) for p in a.param)
    if a.policy is None:
        t = fit_threshold_within(f"{a.checkpoint}/cal.pt")
        print(f"threshold fitted on cal (within 0.5 points of the last exit): {t:.3f}")
        a.policy, params = "threshold", {"threshold": t}
    r = benchmark_inference(a.checkpoint, a.policy, params, n_latency=a.images, n_throughput=a.batch_images,
                            batch=256, rounds=a.rounds)
    print(json.dumps(r, indent=2))
    for key in ("batch1", "batch256"):
        v = r[key]
        print(f"{key}: measured time saving {v['time_saving']:+.3f}, MAC saving {v['mac_saving']:+.3f}, "
              f"ratio {v['time_over_mac_saving'] if v['time_over_mac_saving'] is None else round(v['time_over_mac_saving'], 3)}")


if __name__ == "__main__":
    main()
