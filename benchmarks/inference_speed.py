"""Wall clock of true early exit against the plain network, on a checkpoint's test split.

Plain network (last exit only, no intermediate heads) against early exit under a policy, timed in alternating
rounds (median), same threads, memory layout and precision: latency per image at batch 1, and throughput at
batch 64 and 256, each both with per-batch shrinking (batchB: later stages run on the survivors of one batch)
and streamed (streamB: a queue in front of each stage, every stage at full batch). Prints one line per mode,
`KEY: measured time saving X, MAC saving Y, ratio R`, and for the streamed runs their peak of queued activations
and what an ideal streamer would save (inference.ideal_streaming_saving: each stage at its full-batch time per
image as profiled in the same run, no queueing cost; where early stages cost more time per MAC than late ones,
its ratio lies below 1. An estimate: the profile and the timed rounds see the machine at different moments).
With --precision bf16 it also compares bf16 with fp32 in the same run: exits agreeing on every test image,
accuracy, and the speed-up at batch 1 and 256.

    python benchmarks/inference_speed.py [CHECKPOINT] [--policy FILE|NAME] [--param k=v] [--rounds 5]
        [--precision fp32|bf16|auto] [--batch-images 10000]

By default the policy is a max-prob threshold fitted on cal.pt to stay within 0.5 points of the last exit's
accuracy on cal (never on test), as the reference-checkpoint issue asks.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from eelab.data import load_dataset
from eelab.device import cpu_bf16_flags
from eelab.inference import EarlyExitPredictor, benchmark_inference
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


def compare_precision(checkpoint: str, policy: str, params: dict, precision: str, n_latency: int,
                      n_throughput: int, rounds: int) -> dict:
    """bf16 (or auto) against fp32 early exit in one run: exit agreement and accuracy on the whole test split,
    and the speed-up at batch 1 (first n_latency images) and 256 (first n_throughput), alternating rounds."""
    preds = {p: EarlyExitPredictor.from_checkpoint(checkpoint, policy, params, precision=p)
             for p in ("fp32", precision)}
    cfg = preds["fp32"].config
    ds = load_dataset(cfg["dataset"], cfg["train"].get("image_size"), progress=False)
    images, labels = ds.test_images, ds.test_labels
    out = {}
    for name, pred in preds.items():
        runs = [pred.predict(x) for x in images.split(256)]
        exits, logits = torch.cat([r["exits"] for r in runs]), torch.cat([r["logits"] for r in runs])
        out[name] = {"exits": exits, "accuracy": float((logits.argmax(-1) == labels).double().mean())}
    one, many = images[:n_latency], images[:n_throughput]
    timed = {f"{name}_{mode}": fn for name, pred in preds.items() for mode, fn in (
        ("batch1", lambda pred=pred: [pred.predict(one[i:i + 1]) for i in range(one.shape[0])]),
        ("batch256", lambda pred=pred: [pred.predict(x) for x in many.split(256)]))}
    t = {key: [] for key in timed}
    for _ in range(rounds):  # alternate, so a change in machine load hits both precisions
        for key, fn in timed.items():
            start = time.perf_counter()
            fn()
            t[key].append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in t.items()}
    p = preds[precision].precision
    return {"precision": p, "images": int(images.shape[0]),
            "exit_agreement": float((out["fp32"]["exits"] == out[precision]["exits"]).double().mean()),
            "accuracy_fp32": out["fp32"]["accuracy"], f"accuracy_{p}": out[precision]["accuracy"],
            "speedup_batch1": med["fp32_batch1"] / med[f"{precision}_batch1"],
            "speedup_batch256": med["fp32_batch256"] / med[f"{precision}_batch256"],
            "ms_per_image_batch1": {"fp32": 1e3 * med["fp32_batch1"] / one.shape[0],
                                    p: 1e3 * med[f"{precision}_batch1"] / one.shape[0]},
            "images_per_s_batch256": {"fp32": many.shape[0] / med["fp32_batch256"],
                                      p: many.shape[0] / med[f"{precision}_batch256"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="checkpoints/ee_cnn-cifar10-jpeg")
    ap.add_argument("--policy", default=None)
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=200, help="images timed at batch 1")
    ap.add_argument("--batch-images", type=int, default=10000, help="images timed at batch 64 and 256")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    ap.add_argument("--skip-speed", action="store_true", help="only the precision comparison")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    params = dict(p.split("=", 1) for p in a.param)
    if a.policy is None:
        t = fit_threshold_within(f"{a.checkpoint}/cal.pt")
        print(f"threshold fitted on cal (within 0.5 points of the last exit): {t:.3f}")
        a.policy, params = "threshold", {"threshold": t}
    print(f"CPU {_cpu_name()}, native bf16: {','.join(cpu_bf16_flags()) or 'none'}, {torch.get_num_threads()} threads")
    lines = {}
    if not a.skip_speed:
        for batch, n_latency in ((256, a.images), (64, 0)):
            r = benchmark_inference(a.checkpoint, a.policy, params, n_latency=n_latency,
                                    n_throughput=a.batch_images, batch=batch, rounds=a.rounds,
                                    precision=a.precision, stream=True)
            print(json.dumps(r, indent=2))
            lines.update({key: r[key] for key in ("batch1", f"batch{batch}", f"stream{batch}") if key in r})
    for key in ("batch1", "batch64", "batch256", "stream64", "stream256"):
        if key in lines:
            v = lines[key]
            ratio = v["time_over_mac_saving"]
            print(f"{key}: measured time saving {v['time_saving']:+.3f}, MAC saving {v['mac_saving']:+.3f}, "
                  f"ratio {'n/a' if ratio is None else f'{ratio:.3f}'}"
                  + (f", peak queued activations {v['peak_queued_bytes'] / 2**20:.1f} MiB"
                     if "peak_queued_bytes" in v else "")
                  + (f"; ideal streaming, from stage times profiled in this run: {v['time_saving_ideal']:+.3f} "
                     f"(ratio {v['ratio_ideal']:.3f})" if v.get("ratio_ideal") is not None else ""))
    if a.precision != "fp32":
        c = compare_precision(a.checkpoint, a.policy, params, a.precision, a.images, a.batch_images, a.rounds)
        print(json.dumps(c, indent=2))
        p = c["precision"]
        print(f"{p} against fp32: exits agree on {100 * c['exit_agreement']:.2f}% of {c['images']} test images, "
              f"accuracy {100 * c[f'accuracy_{p}']:.2f}% against {100 * c['accuracy_fp32']:.2f}%, speed-up "
              f"{c['speedup_batch1']:.2f}x at batch 1 and {c['speedup_batch256']:.2f}x at batch 256")


def _cpu_name() -> str:
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
