"""Forward+backward time of each quantized Conv2d relative to nn.Conv2d of the same shape.

    python benchmarks/layers.py                 # 64->64, 3x3, 32x32, batch 128, CPU (+ CUDA if present)
    python benchmarks/layers.py --batch 32 --repeats 5

Each round times every layer once, in an order that rotates between rounds, so slow drift of a
shared machine hits all layers alike; the figure per layer is the minimum over rounds (the least
disturbed run), and the ratio is taken against the float layer's minimum from the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# This file is named like the `layers` package; run as a script, its own folder would shadow it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import layers  # noqa: E402
import qat  # noqa: E402
from kernels.cpu_matmul import cpu_info  # noqa: E402

#: (row label, method, training progress): FDA twice, with its noise module active (mid-training)
#: and at the end of training, where only the Fourier estimator remains.
CASES = [("nn.Conv2d", "fp", None), ("BWNConv2d", "bwn", 0.5), ("XNORConv2d", "xnor", 0.5),
         ("TernaryConv2d", "ternary", 0.5), ("HQConv2d", "hq", 0.5),
         ("FDAConv2d (noise module on, p=0.5)", "fda", 0.5), ("FDAConv2d (noise module off, p=1)", "fda", 1.0)]


def build(method: str, progress, channels: int, device) -> nn.Module:
    if method == "fp":
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False, device=device)
    layer = layers.LAYER_CLASSES[(method, nn.Conv2d)](channels, channels, 3, padding=1, bias=False, device=device)
    qat.set_progress(layer, progress)
    return layer


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
    names = [label for label, _, _ in CASES]
    built = {label: build(method, progress, channels, device) for label, method, progress in CASES}
    for layer in built.values():
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
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU: {cpu_info().describe()}")
    print(f"Conv2d {args.channels}->{args.channels}, 3x3, {args.size}x{args.size}, batch {args.batch}, "
          f"forward+backward, min of {args.repeats} interleaved rounds")
    for device in devices:
        best = time_layers(device, args.channels, args.size, args.batch, args.repeats, args.warmup)
        print("\n| device | layer | ms | ratio to nn.Conv2d |\n|---|---|---|---|")
        for label, t in best.items():
            print(f"| {device.type} | {label} | {t * 1e3:.1f} | {t / best['nn.Conv2d']:.2f}x |")


if __name__ == "__main__":
    main()
