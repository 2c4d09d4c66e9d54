"""Benchmark of the packed binary kernels against float baselines, measured in one run.

CPU section: ``kernels.binary_matmul`` (weights packed once, activations packed beforehand, and
again with the activation packing included) against float32 ``F.linear`` at N = K = 4096 for
several M.  Candidate and baseline are interleaved round by round and the minimum is kept, which
is the least noisy statistic on a shared machine.  Also the packed-memory ratios.

GPU section (only with CUDA + CuPy; otherwise printed as "not measured: no CUDA device"):
GEMV M = 1 / 8 at N = K = 16384 vs cuBLAS fp16 ``F.linear`` with 4 rotating weight sets (> L2),
the CUDA-core and tensor-core GEMMs at 8192^3 vs fp32 (TF32 off) and fp16, plus the copy bandwidth
and bf16 GEMM rate measured in the same run as ceilings.  CUDA events, median of >= 20 reps.

End to end: packed ``mnist_cnn`` (XNOR, first layer BWN) and CIFAR ResNet-18 (XNOR, first/last
float) against the float model of the same architecture, batch 1 and 64, on CPU.

Every figure depends on the CPU: the output (and RESULTS.md) starts with the CPU model, its
int8-relevant feature flags (avx2, avx512*, avx512_vnni / avx_vnni / amx_int8) and torch's CPU
capability, and the "CPU path" column shows what ``path='auto'`` chose on it
(:func:`kernels.cpu_matmul.choose_cpu_path`).

Usage: ``python benchmarks/kernels.py [--quick] [--skip-gpu] [--write-results] [--note TEXT]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.append(str(Path(__file__).resolve().parent))  # appended: the packages above win their names

import kernels  # noqa: E402
from interleaved import interleaved_min  # noqa: E402
from kernels import cpu_matmul  # noqa: E402
from results_md import replace_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NO_GPU = "not yet measured (no GPU available in this session)"

# Hook for end-to-end packed-model timing: a callable (quick: bool) -> list of result lines.
def packed_models_section(quick: bool) -> list[str]:
    """Packed inference (qat.export) against the float model of the same architecture."""
    import qat
    from qat import models
    from qat.export import pack_model, time_inference

    cases = [("mnist_cnn", 1, 28, {"method": "xnor", "keep_fp": [], "overrides": {"first": {"method": "bwn"}}}),
             ("resnet18", 3, 32, {"method": "xnor"})]
    lines = ["CPU end to end: packed model (exact popcount kernels) vs the float model, min of interleaved rounds",
             "", "| model | batch | float (ms) | packed (ms) | packed speed vs float |", "|---|---|---|---|---|"]
    for name, channels, size, spec in cases:
        torch.manual_seed(0)
        float_model = models.build(name, num_classes=10, in_channels=channels).eval()
        quantized = qat.quantize_model(models.build(name, num_classes=10, in_channels=channels), spec)
        qat.set_progress(quantized, 1.0)
        packed = pack_model(quantized.eval())
        rows = time_inference({"float": float_model, "packed": packed}, (channels, size, size), (1, 64),
                              rounds=3 if quick else 10)
        lines += [f"| {name} | {r['batch']} | {r['float_ms']:.2f} | {r['packed_ms']:.2f} | "
                  f"{r['float_ms'] / r['packed_ms']:.2f}x |" for r in rows]
    return lines


END_TO_END: Callable[[bool], list[str]] | None = packed_models_section


def cpu_section(quick: bool) -> list[str]:
    n = k = 4096
    rounds = 7 if quick else 25
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen)
    w_bits = kernels.pack_bits(weight)
    w_prepacked = kernels.prepack_binary(w_bits, k)  # the native engine's layout, built once as a layer does
    lines = [
        f"CPU: N = K = {k}, float32 F.linear vs kernels.binary_matmul (exact int32), "
        f"min of {rounds} interleaved rounds, torch threads = {torch.get_num_threads()}",
        "",
        "| M | F.linear fp32 (ms) | binary_matmul, packed A (ms) | speedup | incl. packing A (ms) | speedup "
        "| CPU path |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in (1, 16, 64, 256):
        x = torch.randn(m, k, generator=gen)
        x_bits = kernels.pack_bits(x)
        t = interleaved_min(
            {
                "float": lambda: F.linear(x, weight),
                "binary": lambda: kernels.binary_matmul(x_bits, w_prepacked, k),
                "binary+pack": lambda: kernels.binary_matmul(kernels.pack_bits(x), w_prepacked, k),
            },
            rounds,
        )
        lines.append(
            f"| {m} | {t['float'] * 1e3:.3f} | {t['binary'] * 1e3:.3f} | {t['float'] / t['binary']:.1f}x | "
            f"{t['binary+pack'] * 1e3:.3f} | {t['float'] / t['binary+pack']:.1f}x | {cpu_matmul.choose_cpu_path(m)} |"
        )
    lines += ["", *forced_paths_table(weight, w_bits, gen, min(rounds, 3))]
    fp32 = weight.numel() * 4
    packed = w_bits.numel() * 8
    tern = sum(p.numel() * 8 for p in kernels.pack_ternary(torch.sign(weight)))
    lines += [
        "",
        f"Packed memory, {n}x{k} weight: fp32 {fp32 / 2**20:.1f} MiB, binary {packed / 2**20:.3f} MiB "
        f"(ratio 1/{fp32 / packed:.0f}), ternary 2 planes {tern / 2**20:.3f} MiB (ratio 1/{fp32 / tern:.0f})",
    ]
    return lines


def forced_paths_table(weight, w_bits, gen, rounds: int) -> list[str]:
    """Both exact CPU paths forced at M = 16 and 64: the evidence behind the 'auto' choice here."""
    k = weight.shape[1]
    paths = ["popcount"] + (["int_mm"] if cpu_matmul.int_mm_available() else []) + (
        ["native"] if kernels.native.available() else [])
    lines = [
        f"Both exact CPU paths forced (path=...), min of {rounds} interleaved rounds; "
        "ratio = F.linear time / path time",
        "",
        "| M | F.linear fp32 (ms) | " + " | ".join(f"{p} (ms) | {p} ratio" for p in paths) + " | auto picks |",
        "|---|---|" + "---|---|" * len(paths) + "---|",
    ]
    for m in (16, 64):
        x = torch.randn(m, k, generator=gen)
        x_bits = kernels.pack_bits(x)
        fns = {"float": lambda: F.linear(x, weight)}
        fns.update({p: (lambda p=p: kernels.binary_matmul(x_bits, w_bits, k, path=p)) for p in paths})
        t = interleaved_min(fns, rounds)
        cells = " | ".join(f"{t[p] * 1e3:.1f} | {t['float'] / t[p]:.2f}x" for p in paths)
        lines.append(f"| {m} | {t['float'] * 1e3:.1f} | {cells} | {cpu_matmul.choose_cpu_path(m)} |")
    return lines


def _cuda_ready() -> str | None:
    if not torch.cuda.is_available():
        return "not measured: no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "not measured: CuPy is not installed"
    return None


def _cuda_median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rotating(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """Run one of several equivalent calls per invocation (distinct weight sets defeat L2 reuse)."""
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return call


def gpu_section(quick: bool, figures: dict | None = None) -> list[str]:
    """The GPU rows as text; ``figures``, when given, also receives every measured number
    (times in ms, bandwidth in bytes/s) for benchmarks/gpu_check.py's JSON."""
    reason = _cuda_ready()
    if reason:
        return [f"GPU: {reason}"]
    figures = {} if figures is None else figures
    reps = 20 if quick else 50
    dev = torch.device("cuda")
    lines = [f"GPU: {torch.cuda.get_device_name()}, CUDA events, median of {reps} reps", ""]

    buf = torch.empty(2**30 // 4, device=dev)
    dst = torch.empty_like(buf)
    ms = _cuda_median_ms(lambda: dst.copy_(buf), reps)
    copy_bw = 2 * buf.numel() * 4 / (ms * 1e-3)
    figures["copy_bandwidth_bytes_per_s"] = copy_bw
    lines.append(f"copy bandwidth (1 GiB D2D, read + write): {copy_bw / 1e12:.2f} TB/s")
    buf = dst = None  # frees the 2 GiB (a `del` would leave the lambda above naming unbound variables)

    n = k = 16384
    sets = 4
    weights16 = [torch.randn(n, k, device=dev).sign_().half() for _ in range(sets)]
    w_bits = [kernels.pack_bits(w) for w in weights16]
    for m in (1, 8, 16, 32, 64):
        x = torch.randn(m, k, device=dev)
        x16, x_bits = x.half(), kernels.pack_bits(x)
        t16 = _cuda_median_ms(_rotating([lambda w=w: F.linear(x16, w) for w in weights16]), reps)
        tb = _cuda_median_ms(_rotating([lambda w=w: kernels.binary_matmul(x_bits, w, k) for w in w_bits]), reps)
        stream = w_bits[0].numel() * 8 / (tb * 1e-3)
        figures.setdefault("gemv", []).append(
            {"m": m, "n": n, "k": k, "fp16_ms": t16, "packed_ms": tb, "weight_stream_bytes_per_s": stream})
        lines.append(
            f"M={m} N=K={n}: fp16 F.linear {t16 * 1e3:.1f} us, packed {tb * 1e3:.1f} us "
            f"({t16 / tb:.1f}x; packed weight stream {stream / 1e12:.2f} TB/s = {stream / copy_bw:.0%} of copy)"
        )
    del weights16, w_bits

    s = 8192
    a, b = torch.randn(s, s, device=dev), torch.randn(s, s, device=dev)
    a_bits, b_bits = kernels.pack_bits(a), kernels.pack_bits(b)
    ops = 2 * s**3
    torch.backends.cuda.matmul.allow_tf32 = False
    t32 = _cuda_median_ms(lambda: a @ b.T, max(5, reps // 4))
    a16, b16 = a.sign().half(), b.sign().half()
    t16 = _cuda_median_ms(lambda: a16 @ b16.T, reps)
    abf, bbf = a16.bfloat16(), b16.bfloat16()
    tbf = _cuda_median_ms(lambda: abf @ bbf.T, reps)
    figures["gemm"] = {"size": s, "fp32_ms": t32, "fp16_ms": t16, "bf16_ms": tbf}
    lines.append(
        f"{s}^3 baselines: fp32 (TF32 off) {t32:.2f} ms ({ops / t32 / 1e9:.0f} TFLOP/s), fp16 {t16:.3f} ms "
        f"({ops / t16 / 1e9:.0f}), bf16 {tbf:.3f} ms ({ops / tbf / 1e9:.0f})"
    )
    for kernel in ("gemm", "tc"):
        tk = _cuda_median_ms(lambda: kernels.binary_matmul(a_bits, b_bits, s, path=kernel), reps)
        figures["gemm"][f"{kernel}_ms"] = tk
        lines.append(
            f"{s}^3 binary {kernel}: {tk:.3f} ms = {ops / tk / 1e9:.0f} T binary ops/s; "
            f"{t32 / tk:.1f}x fp32, {t16 / tk:.2f}x fp16"
        )
    return lines


def end_to_end_section(quick: bool) -> list[str]:
    if END_TO_END is None:
        return ["End to end packed model: not measured (no export hook registered; see END_TO_END)"]
    return END_TO_END(quick)


def cpu_line() -> str:
    """The CPU every CPU figure comes from, with the flags that decide the int8 path."""
    info = cpu_matmul.cpu_info()
    fast = cpu_matmul.int_mm_fast()
    how = "from its flags" if cpu_matmul.int8_dot_from_features(info) is not None else "by calibration"
    return (
        f"CPU: {info.describe()}; int8 GEMM (torch._int_mm) fast here: {fast} ({how}), "
        f"usable: {cpu_matmul.int_mm_available()}"
    )


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def write_results(
    command: str,
    cpu: list[str],
    gpu: list[str],
    e2e: list[str],
    before: str,
    after: str,
    note: str = "",
    cpu_model: str = "",
) -> None:
    """Replace (or append) the '## Kernels' section of RESULTS.md, keeping other sections."""
    gpu_rows = gpu if _cuda_ready() is None else [f"GPU rows (G1-G5, F1, T1, P1, V1): {NO_GPU}."]
    body = [
        "## Kernels",
        "",
        f"Command: `{command}`",
        "",
        *([cpu_model, ""] if cpu_model else []),
        f"Machine before: {before}",
        f"Machine after:  {after}",
        *([f"Note: {note}"] if note else []),
        "",
        *cpu,
        "",
        *gpu_rows,
        "",
        *e2e,
        "",
    ]
    replace_section(RESULTS, "## Kernels", body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    parser.add_argument("--skip-gpu", action="store_true", help="CPU section only")
    parser.add_argument("--write-results", action="store_true", help="update the Kernels section of RESULTS.md")
    parser.add_argument("--note", default="", help="a line about the run's conditions, written with the results")
    args = parser.parse_args(argv)
    cpu_model = cpu_line()
    print(cpu_model)
    before = machine_line()
    print(before)
    cpu = cpu_section(args.quick)
    print("\n".join(cpu))
    gpu = ["GPU: skipped (--skip-gpu)"] if args.skip_gpu else gpu_section(args.quick)
    print("\n".join(gpu))
    e2e = end_to_end_section(args.quick)
    print("\n".join(e2e))
    after = machine_line()
    print(after)
    if args.write_results:
        command = "python benchmarks/kernels.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_results(command.strip(), cpu, gpu, e2e, before, after, args.note, cpu_model)


if __name__ == "__main__":
    main()
