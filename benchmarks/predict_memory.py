"""Peak memory of `eelab predict` on many image files: it must not grow with the number of files (issue #17).

Writes N small JPEGs (32x32, the reference checkpoint's input) into a temp folder, runs `eelab predict CHECKPOINT
FILES... --json` in a child process for a small and a large N, and prints each child's peak RSS (ru_maxrss) and
the growth per extra file. Before streamed prediction, all files were decoded and run as one batch: about 0.8 MB
per image. Usage: python benchmarks/predict_memory.py [--files 5000] [--small 500] [--checkpoint DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_jpegs(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[Path]:
    """n seeded random size x size RGB JPEGs in folder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def peak_rss_of_predict(checkpoint: Path, paths: list[Path], batch: int, threads: int) -> tuple[float, float, int]:
    """(peak RSS in MB, seconds, predictions) of one `eelab predict` child process."""
    code = ("import resource, sys; from eelab.cli import main; rc = main(sys.argv[1:]); "
            "sys.stderr.write(f'PEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'); sys.exit(rc)")
    argv = [sys.executable, "-c", code, "predict", str(checkpoint), *map(str, paths), "--batch", str(batch),
            "--threads", str(threads), "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"eelab predict failed: {done.stderr.strip()[-400:]}")
    peak_kb = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KB")))
    return peak_kb / 1024, seconds, len(json.loads(done.stdout)["predictions"])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--small", type=int, default=500, help="a smaller run to compare with (0: skip)")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "ee_cnn-cifar10-jpeg")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="eelab-predict-memory-") as tmp:
        paths = write_jpegs(Path(tmp), a.files)
        print(f"{cpu_name()}, {a.threads} thread(s), --batch {a.batch}, checkpoint {a.checkpoint.name}")
        rows = []
        for n in ([a.small] if 0 < a.small < a.files else []) + [a.files]:
            peak, seconds, count = peak_rss_of_predict(a.checkpoint, paths[:n], a.batch, a.threads)
            assert count == n
            rows.append((n, peak))
            print(f"{n:>6} files: peak RSS {peak:7.1f} MB, {seconds:6.1f} s ({n / seconds:.0f} files/s)")
        if len(rows) == 2:
            (n0, m0), (n1, m1) = rows
            print(f"growth: {(m1 - m0) * 1024 / (n1 - n0):.2f} KB per extra file (the one-batch predictor of before: "
                  f"about 800 KB per file)")


if __name__ == "__main__":
    os.environ.setdefault("EELAB_OFFLINE", "1")
    main()
