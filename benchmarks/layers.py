"""Forward+backward time of each quantized Conv2d relative to nn.Conv2d of the same shape.

    python benchmarks/layers.py                 # 64->64, 3x3, 32x32, batch 128, CPU (+ CUDA if present)
    python benchmarks/layers.py --batch 32 --repeats 5

Each round times every layer once, in an order that rotates between rounds, so slow drift of a
shared machine hits all layers alike; the figure per layer is the minimum over rounds (the least
disturbed run), and the ratio is taken against the float layer's minimum from the same run.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

# This file is named like the `layers` package; run as a script, its own folder would shadow it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
from torch import nn

import layers
import qat

METHODS = ["bwn", "xnor", "ternary", "hq", "fda"]


def build(method: str, channels: int, device) -> nn.Module:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device)
    if method == "fp":
        return conv
    return layers.LAYER_CLASSES[(method, nn.Conv2d)](channels, channels, 3, padding=1, bias=False, device=device)


def step(layer: nn.Module, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).sum().backward()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_layers(device, channels, size, batch, repeats, warmup):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    names = ["fp", *METHODS]
    built = {m: build(m, channels, device) for m in names}
    for m, layer in built.items():
        qat.set_progress(layer, 0.5) if m != "fp" else None  # mid-training: FDA's noise module active
        for _ in range(warmup):
            step(layer, x)
    best = {m: float("inf") for m in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for m in order:
            synchronize(device)
            start = time.perf_counter()
            step(built[m], x)
            synchronize(device)
            best[m] = min(best[m], time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    print(f"Conv2d {args.channels}->{args.channels}, 3x3, {args.size}x{args.size}, batch {args.batch}, forward+backward, "
          f"min of {args.repeats} interleaved rounds")
    for device in devices:
        best = time_layers(device, args.channels, args.size, args.batch, args.repeats, args.warmup)
        print(f"\n| device | layer | ms | ratio to nn.Conv2d |\n|---|---|---|---|")
        for m, t in best.items():
            name = "nn.Conv2d" if m == "fp" else layers.LAYER_CLASSES[(m, nn.Conv2d)].__name__
            print(f"| {device.type} | {name} | {t * 1e3:.1f} | {t / best['fp']:.2f}x |")


if __name__ == "__main__":
    main()
