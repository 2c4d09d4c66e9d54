"""BitNet-style linear layers on CPU: the native ternary x int8 kernel against float32 ``F.linear``.

One run times, interleaved round by round (the minimum of each is kept: the least noisy statistic on
a shared machine), with the same thread count for torch and the native engine:

* per layer, M = 1 (generation at batch 1) and M = 8, transformer sizes (K, N): float32
  ``F.linear(x, W)`` against the whole packed layer ``kernels.cpu_native.ternary_i8_linear``
  (``TernaryI8Linear``, prepared once as a model holds it: per-token absmax quantization of x, the
  exact int32 product with 2-bit ternary weights, and the float output transform, one native call),
  the same layer with the parameter-free RMSNorm first (what a packed ``bitnet158`` model's linears
  run, ``qat.export.PackedLinear``), and the integer product alone (int8 codes given);
  weight bytes of each (float32 against 2-bit codes + one float scale);
* a GPT block stack estimate: the per-token time of the linears of ``layers`` blocks of width
  ``d`` (qkv d -> 3d, attention output d -> d, MLP d -> 4d -> d), each layer called from Python as
  a model would (so the per-call Python overhead is included), float against packed.  Attention,
  softmax and the normalizations are float in both and not timed.

With ``--lut`` it times instead, per instruction set (avx512, avx2 where this CPU runs them), the
integer product alone of the two exact int8 x ternary kernels, the maddubs one
(``ternary_i8_matmul``, 2-bit codes) and the lookup-table one (``ternary_i8_lut_matmul``, T-MAC /
bitnet.cpp TL2 style: 27-entry int16 tables per group of three weights), against float32
``F.linear``, all three interleaved round by round (issue 8: "two planes, or a lookup-table scheme
if it is faster: measure both").

Usage: ``nice -n 19 python benchmarks/ternary_linear.py [--threads N] [--rounds R] [--layers L] [--lut]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(Path(__file__).resolve().parent))  # appended: the packages above win their names

import kernels  # noqa: E402
from interleaved import interleaved_min  # noqa: E402
from kernels import cpu_matmul, cpu_native, native  # noqa: E402
from layers.bitnet import NORM_EPS  # noqa: E402

SIZES = [(256, 768), (256, 1024), (1024, 256), (384, 1152), (384, 1536), (1536, 384)]


def block_shapes(d: int) -> list[tuple[int, int]]:
    """(K, N) of the linears of one GPT block of width d: qkv, attention output, MLP up and down."""
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]


def packed_layer(k: int, n: int, gen: torch.Generator, norm_eps: float | None = None):
    """(float weight, packed layer) of a random absmean-ternarized [n, k] weight (BitNet b1.58);
    ``norm_eps`` puts the parameter-free RMSNorm first."""
    weight = torch.randn(n, k, generator=gen) * 0.02
    gamma = weight.abs().mean()
    ternary = (weight / gamma).round().clamp(-1, 1)
    packed = cpu_native.ternary_i8_prepack(kernels.pack_ternary(ternary), k)
    return weight, cpu_native.TernaryI8Linear(packed, float(gamma), norm_eps=norm_eps)


def layer_table(rounds: int, gen: torch.Generator) -> list[str]:
    lines = ["| M | K -> N | F.linear fp32 (us) | TernaryI8Linear, whole layer (us) | speed vs fp32 | "
             "with RMSNorm (us) | speed vs fp32 | int8 product only (us) | weight bytes fp32 | ours (2-bit + scale) "
             "| ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in (1, 8):
        for k, n in SIZES:
            weight, layer = packed_layer(k, n, gen)
            normed = cpu_native.TernaryI8Linear(layer.weights, layer.weight_scale, norm_eps=NORM_EPS)
            x = torch.randn(m, k, generator=gen)
            codes, _ = cpu_native.quantize_i8(x)
            t = interleaved_min({"float": lambda: F.linear(x, weight),
                                 "ours": lambda: layer(x),
                                 "normed": lambda: normed(x),
                                 "product": lambda: cpu_native.ternary_i8_matmul(codes, layer.weights)}, rounds)
            fp32_bytes, our_bytes = weight.numel() * 4, layer.weights.nbytes + 4
            lines.append(f"| {m} | {k} -> {n} | {t['float'] * 1e6:.1f} | {t['ours'] * 1e6:.1f} | "
                         f"**{t['float'] / t['ours']:.2f}x** | {t['normed'] * 1e6:.1f} | "
                         f"{t['float'] / t['normed']:.2f}x | {t['product'] * 1e6:.1f} | {fp32_bytes:,} | "
                         f"{our_bytes:,} | 1/{fp32_bytes / our_bytes:.1f} |")
    return lines


LUT_SIZES = [(256, 768), (384, 1536), (1536, 384), (4096, 4096)]
LUT_ISAS = ("avx512", "avx2")


def lut_table(rounds: int, gen: torch.Generator) -> list[str]:
    """The integer product only: float32 F.linear vs the maddubs kernel vs the lookup-table kernel,
    interleaved, per ISA this CPU runs, M = 1 and 8 (int8 codes given, int32 out)."""
    lines = ["| ISA | M | K -> N | F.linear fp32 (us) | maddubs kernel (us) | LUT kernel (us) | "
             "LUT speed vs maddubs | LUT speed vs fp32 | weight bytes maddubs / LUT |",
             "|---|---|---|---|---|---|---|---|---|"]
    runs = [name for name, ok in native.isas() if ok]
    for isa in [name for name in LUT_ISAS if name in runs] or [native.isa()]:
        with native.using_isa(isa):
            for m in (1, 8):
                for k, n in LUT_SIZES:
                    weight = torch.randn(n, k, generator=gen) * 0.02
                    ternary = (weight / weight.abs().mean()).round().clamp(-1, 1)
                    planes = kernels.pack_ternary(ternary)
                    madd = cpu_native.ternary_i8_prepack(planes, k)
                    lut = cpu_native.ternary_i8_lut_prepack(planes, k)
                    x = torch.randn(m, k, generator=gen)
                    codes, _ = cpu_native.quantize_i8(x)
                    if not torch.equal(cpu_native.ternary_i8_lut_matmul(codes, lut),
                                       cpu_native.ternary_i8_matmul(codes, madd)):
                        raise AssertionError(f"the two kernels disagree at {isa}, M={m}, {k} -> {n}")
                    t = interleaved_min({"float": lambda: F.linear(x, weight),
                                         "madd": lambda: cpu_native.ternary_i8_matmul(codes, madd),
                                         "lut": lambda: cpu_native.ternary_i8_lut_matmul(codes, lut)}, rounds)
                    lines.append(f"| {isa} | {m} | {k} -> {n} | {t['float'] * 1e6:.1f} | {t['madd'] * 1e6:.1f} | "
                                 f"{t['lut'] * 1e6:.1f} | **{t['madd'] / t['lut']:.2f}x** | "
                                 f"{t['float'] / t['lut']:.2f}x | {madd.nbytes:,} / {lut.nbytes:,} |")
    return lines


def call_overhead(rounds: int, gen: torch.Generator) -> str:
    """Per-call fixed cost: both layers at K = 128, N = 4, where the arithmetic takes nanoseconds."""
    weight, layer = packed_layer(128, 4, gen)
    x = torch.randn(1, 128, generator=gen)
    t = interleaved_min({"float": lambda: F.linear(x, weight), "ours": lambda: layer(x)}, rounds)
    return (f"Per-call fixed cost (a 128 -> 4 layer, batch 1): F.linear {t['float'] * 1e6:.1f} us, "
            f"TernaryI8Linear {t['ours'] * 1e6:.1f} us (Python checks, output allocation, ctypes call, quantization)")


def stack_table(rounds: int, layers: int, gen: torch.Generator) -> list[str]:
    lines = ["| width d | blocks | linears | fp32 per token (us) | packed per token (us) | speed vs fp32 | "
             "fp32 weights (MB) | packed (MB) |", "|---|---|---|---|---|---|---|---|"]
    for d in (256, 384):
        floats, packs, inputs = [], [], []
        for _ in range(layers):
            for k, n in block_shapes(d):
                weight, layer = packed_layer(k, n, gen)
                floats.append(weight)
                packs.append(layer)
                inputs.append(torch.randn(1, k, generator=gen))

        def run_float():
            for x, w in zip(inputs, floats, strict=True):
                F.linear(x, w)

        def run_packed():
            for x, layer in zip(inputs, packs, strict=True):
                layer(x)

        t = interleaved_min({"float": run_float, "packed": run_packed}, rounds)
        fp32_mb = sum(w.numel() * 4 for w in floats) / 1e6
        packed_mb = sum(layer.weights.nbytes + 4 for layer in packs) / 1e6
        lines.append(f"| {d} | {layers} | {len(floats)} | {t['float'] * 1e6:.0f} | {t['packed'] * 1e6:.0f} | "
                     f"**{t['float'] / t['packed']:.2f}x** | {fp32_mb:.2f} | {packed_mb:.3f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and native threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds per row (min is kept)")
    parser.add_argument("--layers", type=int, default=6, help="GPT blocks in the stack estimate")
    parser.add_argument("--lut", action="store_true",
                        help="only the product table: maddubs kernel vs lookup-table kernel vs F.linear, per ISA")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            raise SystemExit(2)
        torch.set_num_threads(args.threads)
    if not native.available():
        print(f"error: the native kernels are unavailable here ({native.unavailable_reason()})", file=sys.stderr)
        raise SystemExit(2)
    gen = torch.Generator().manual_seed(0)
    load = os.getloadavg()
    print(f"CPU: {cpu_matmul.cpu_info().describe()}")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()} (torch and native), native ISA {native.isa()} "
          f"(runs here: {', '.join(n for n, ok in native.isas() if ok)}), load average "
          f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"Timing: min of {args.rounds} rounds, float and packed interleaved round by round; on a shared "
          "machine run it with nice and read ratios, not absolute times.")
    print()
    if args.lut:
        print("Integer product only (int8 codes [M, K] given, int32 [M, N] out; F.linear: float32 x and W), "
              "both kernels exact and checked equal; speed = time ratio (> 1: the LUT kernel is faster)")
        print()
        print("\n".join(lut_table(args.rounds, gen)))
        return
    print("\n".join(layer_table(args.rounds, gen)))
    print()
    print(call_overhead(args.rounds, gen))
    print()
    print(f"GPT block stack, batch 1, one token: the linears only, each called from Python (min of "
          f"{max(3, args.rounds // 4)} rounds)")
    print()
    print("\n".join(stack_table(max(3, args.rounds // 4), args.layers, gen)))


if __name__ == "__main__":
    main()
