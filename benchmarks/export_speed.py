"""Wall clock of early exit on onnxruntime against onnxruntime's plain network, beside PyTorch's, same run.

Exports a checkpoint's stages and heads (eelab.export), then times, in alternating rounds (median), on the first
--images test images: the plain network (every stage, last head only) and early exit (eelab.export.OnnxEarlyExit
through run_policy), on onnxruntime and on PyTorch, at batch 1, at --batch with per-batch shrinking, and
streamed at --batch (a queue before each stage, every stage on full batches; against the plain network at
--batch). Prints
`KEY: measured time saving X, MAC saving Y, ratio R` per runtime and batch, and the exits' agreement (and the
largest logit difference) between the ONNX runner and eelab's PyTorch predictor.

    python benchmarks/export_speed.py [CHECKPOINT] [--images 1000] [--batch 256] [--rounds 5] [--threads N]

The policy is a max-prob threshold fitted on cal.pt: the cheapest point of the threshold grid whose cal accuracy
is within 0.5 points of the last exit's (never tuned on test).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from eelab import workbench
from eelab.data import load_dataset, prepare
from eelab.export import OnnxEarlyExit, export_onnx
from eelab.inference import EarlyExitPredictor
from eelab.records import load_record
from eelab.sweep import precompute_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default="checkpoints/ee_cnn-cifar10-jpeg")
    ap.add_argument("--images", type=int, default=1000, help="first N test images, timed at batch 1 and --batch")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and onnxruntime alike")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    cal = load_record(Path(a.checkpoint) / "cal.pt")
    grid = precompute_grid("threshold", cal, cal)  # scored on cal too: the choice never sees test
    policy = grid.policies[workbench.matched_point(grid, accuracy=workbench.target_accuracy(cal, 0.005))]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(f"CPU {cpu}, {threads} threads; policy {policy.describe()} (fitted on cal)")

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        export_onnx(a.checkpoint, out, policy)
        print(f"exported in {time.perf_counter() - start:.1f} s")
        onnx = OnnxEarlyExit(out, threads=threads)  # the policy shipped with the export
        torch_pred = EarlyExitPredictor.from_checkpoint(a.checkpoint, policy)
        cfg = torch_pred.config
        images = load_dataset(cfg["dataset"], cfg["train"].get("image_size"), progress=False).test_images[:a.images]
        batches = images.split(a.batch)
        ones = images.split(1)

        with torch.no_grad():
            got = [onnx.predict(x) for x in batches]
            want = [torch_pred.predict(x) for x in batches]
        exits = torch.cat([g["exits"] for g in got])
        agree = float((exits == torch.cat([w["exits"] for w in want])).double().mean())
        diff = float(max((g["logits"] - w["logits"]).abs().max() for g, w in zip(got, want)))
        mac_saving = 1 - float(onnx.costs[exits].mean()) / float(onnx.meta["full_cost"])
        print(f"exits agree with eelab's PyTorch predictor on {100 * agree:.2f}% of {images.shape[0]} test images; "
              f"largest logit difference {diff:.2e}; exit fractions "
              + " ".join(f"{v:.3f}" for v in torch.bincount(exits, minlength=onnx.num_exits).div(exits.numel())))

        model, mean, std = torch_pred.model, cfg["mean"], cfg["std"]

        def plain(x: torch.Tensor) -> torch.Tensor:  # PyTorch's plain network, normalising as eelab does
            return model.forward_plain(prepare(x, mean, std))

        runs = {
            ("onnx", "batch1", "plain"): lambda: [onnx.forward_plain(x) for x in ones],
            ("onnx", "batch1", "early"): lambda: [onnx.predict(x) for x in ones],
            ("onnx", f"batch{a.batch}", "plain"): lambda: [onnx.forward_plain(x) for x in batches],
            ("onnx", f"batch{a.batch}", "early"): lambda: [onnx.predict(x) for x in batches],
            ("torch", "batch1", "plain"): lambda: [plain(x) for x in ones],
            ("torch", "batch1", "early"): lambda: [torch_pred.predict(x) for x in ones],
            ("torch", f"batch{a.batch}", "plain"): lambda: [plain(x) for x in batches],
            ("torch", f"batch{a.batch}", "early"): lambda: [torch_pred.predict(x) for x in batches],
            # streamed: a queue before each stage, every stage run on full batches of --batch (against the plain
            # network at the same batch)
            ("onnx", f"stream{a.batch}", "early"): lambda: sum(1 for _ in onnx.stream(batches, batch=a.batch)),
            ("torch", f"stream{a.batch}", "early"): lambda: sum(1 for _ in torch_pred.stream(batches, batch=a.batch)),
        }
        seconds = {key: [] for key in runs}
        with torch.no_grad():
            for fn in runs.values():  # warm-up: first-call set-up is not timed
                fn()
            for i in range(a.rounds):  # alternate, so a change in machine load hits every mode alike
                print(f"round {i + 1}/{a.rounds}", file=sys.stderr, flush=True)
                for key, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    seconds[key].append(time.perf_counter() - start)
        med = {key: statistics.median(v) for key, v in seconds.items()}
        for runtime in ("onnx", "torch"):
            for batch in ("batch1", f"batch{a.batch}", f"stream{a.batch}"):
                plain_mode = batch.replace("stream", "batch")
                base, early = med[(runtime, plain_mode, "plain")], med[(runtime, batch, "early")]
                saving = 1 - early / base
                print(f"{runtime}_{batch}: measured time saving {saving:+.3f}, MAC saving {mac_saving:+.3f}, ratio "
                      f"{saving / mac_saving:.3f} (plain {1e3 * base / images.shape[0]:.3f} ms/image, early exit "
                      f"{1e3 * early / images.shape[0]:.3f} ms/image, median of {a.rounds} rounds)")


if __name__ == "__main__":
    main()
