"""PEFT LoRA / SORSA (reference path) forward+backward time on the CPU, one process, interleaved.

Issue 11's CPU goal: the reference path is no slower than PEFT LoRA (ratio ≥ 1.0) at every CPU
bench shape.  Usage: ``python -m bench.cpu_ratio [--reps N] [--threads T]``; prints a markdown
table (min and median over interleaved repetitions, fp32, dropout 0).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench import harness, providers

SHAPES = [(1024, 1024, 768, 32), (2048, 2048, 2048, 64), (512, 4096, 4096, 64),
          (256, 256, 256, 8), (256, 256, 256, 32), (256, 256, 688, 8), (256, 256, 688, 32)]


def _step(module, trainable, x, dy) -> None:
    x.grad = None
    for p in trainable:
        p.grad = None
    module(x).backward(dy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {harness.device_name()}, fp32, fwd+bwd")
    print("| M | n→m | r | PEFT LoRA ms (min / median) | SORSA ref ms (min / median) | LoRA/SORSA (min / median) |")
    print("|---|---|---|---|---|---|")
    for M, n, m, r in SHAPES:
        lin = providers.base_linear(n, m, torch.float32, torch.device("cpu"))
        built = {k: providers.build(k, lin, r) for k in ("lora", "sorsa_reference")}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(M, n, generator=g).requires_grad_(True)
        dy = torch.randn(M, m, generator=g)
        times: dict[str, list[float]] = {k: [] for k in built}
        for b in built.values():  # warm-up
            _step(b.module, b.trainable, x, dy)
        t0 = time.perf_counter()
        _step(built["lora"].module, built["lora"].trainable, x, dy)
        inner = max(1, int(0.05 / (time.perf_counter() - t0)))
        for _ in range(args.reps):
            for k, b in built.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    _step(b.module, b.trainable, x, dy)
                times[k].append((time.perf_counter() - t0) / inner * 1e3)
        lo, so = times["lora"], times["sorsa_reference"]
        print(f"| {M} | {n}→{m} | {r} | {min(lo):.2f} / {statistics.median(lo):.2f} | "
              f"{min(so):.2f} / {statistics.median(so):.2f} | "
              f"{min(lo) / min(so):.2f} / {statistics.median(lo) / statistics.median(so):.2f} |")


if __name__ == "__main__":
    main()
