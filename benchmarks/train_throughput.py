"""Training throughput: eelab's training step against a plain fp32 NCHW loop on the same model, same run.

Prints images per second of each (median over alternating timed rounds) and their ratio. eelab's step uses
bf16 autocast + channels_last on a CPU with native bf16 (AMX or AVX512-BF16; fp16 AMP on CUDA) and fp32 +
channels_last elsewhere, so on a CPU without them the ratio is channels_last's gain alone (1.33x for ee_cnn on
a 2-core AVX-512 Xeon). On a 2-core AMD EPYC with AVX512-BF16: 2.34x (498 against 213 images/s).

    python benchmarks/train_throughput.py [--model ee_cnn,ee_airnet] [--batch 128] [--rounds 5] [--steps 3]
        [--precision auto]

Several models (comma-separated) are measured one after the other in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from eelab.models import ModelConfig, build_model
from eelab.training import (PRECISIONS, TrainConfig, WithConfidences, choose_precision, cpu_bf16_flags, default_device,
                            multi_exit_loss, train_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ee_cnn,ee_airnet", help="comma-separated model names")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="eelab's precision: auto (what `eelab train` uses), bf16, fp32")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = default_device()
    for name in a.model.split(","):
        measure(name.strip(), a, device)


def measure(name: str, a: argparse.Namespace, device: torch.device) -> None:
    """eelab's step against the plain fp32 loop for one model, printed."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(name=name))
    images = torch.randint(0, 256, (a.batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (a.batch,))
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    dtype = choose_precision(a.precision, device)

    eelab_model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
    eelab_net = WithConfidences(eelab_model)  # what train_step calls: logits and confidences in one pass
    plain_model = build_model(cfg.model).to(device)
    w = torch.ones(eelab_model.num_exits, device=device)
    opt_e = torch.optim.SGD(eelab_model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    opt_p = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def eelab_round() -> None:
        for _ in range(a.steps):
            train_step(eelab_net, opt_e, images, labels, w, cfg, mean, std, gen, device, dtype, scaler)

    def plain_round() -> None:
        # the textbook loop: fp32, NCHW, same augmentation-free input, same multi-exit loss
        x = ((images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        x, y = x.to(device), labels.to(device)
        for _ in range(a.steps):
            loss = multi_exit_loss(plain_model(x), y, w, 0.1)
            opt_p.zero_grad()
            loss.backward()
            opt_p.step()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return a.steps * a.batch / (time.perf_counter() - t)

    eelab_round(), plain_round()  # warm-up
    e_rates, p_rates = [], []
    for _ in range(a.rounds):  # alternate so drift in machine load hits both equally
        e_rates.append(timed(eelab_round))
        p_rates.append(timed(plain_round))
    e, p = statistics.median(e_rates), statistics.median(p_rates)
    prec = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    print(f"device {device} | native bf16: {','.join(cpu_bf16_flags()) or 'none'} | "
          f"threads {torch.get_num_threads()} | model {name} | batch {a.batch}")
    print(f"{f'eelab step ({prec}, channels_last):':38s}{e:8.1f} images/s  "
          f"(rounds: {', '.join(f'{r:.0f}' for r in e_rates)})")
    print(f"{'plain fp32 NCHW loop:':38s}{p:8.1f} images/s  "
          f"(rounds: {', '.join(f'{r:.0f}' for r in p_rates)})")
    print(f"ratio eelab / plain: {e / p:.2f}")


if __name__ == "__main__":
    main()
