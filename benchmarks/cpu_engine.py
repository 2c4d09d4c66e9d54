"""Benchmark of the native CPU engine against float32 PyTorch, measured side by side in one run.

Every figure is a ratio of two timings taken in the same process, interleaved round by round (the
minimum of each is kept: the least noisy statistic on a shared machine), with the same torch
thread count for both.  Sections:

* the CPU, its instruction sets, and each one's popcount peak (``kernels.cpu_native.peak_bitmacs_per_s``:
  the microkernel on L1-resident data, all threads), which every kernel row is a fraction of;
* ``binary_matmul`` / ``ternary_matmul`` at N = K = 4096 against ``F.linear`` (weights prepacked once,
  as a packed layer does; with and without packing the activations), and the NumPy reference path;
* the binary convolutions of CIFAR ResNet-18 (pack + direct conv + float output) against ``F.conv2d``;
* end to end: packed models (``qat.export.pack_model``, then ``fuse_binary_chains``) against the float
  model in eager PyTorch (its faster memory format), batch 1 and 64;
* peak memory (RSS) of packed against float ResNet-18 inference, each in its own process.

Usage: ``python benchmarks/cpu_engine.py [--quick] [--write-results] [--note TEXT]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.append(str(Path(__file__).resolve().parent))  # appended: the packages above win their names

import kernels  # noqa: E402
from interleaved import CacheEvictor, interleaved_min  # noqa: E402
from kernels import cpu_matmul, cpu_native, native  # noqa: E402
from results_md import replace_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## CPU engine"  # one section per CPU model and instruction set: "## CPU engine: <model>, <isa>"
N = K = 4096


def peaks() -> dict[str, float]:
    """Popcount peak (bit-MACs/s, all threads) of every instruction set this CPU runs."""
    result = {}
    for name, runs in native.isas():
        if runs:
            with native.using_isa(name):
                cpu_native.peak_bitmacs_per_s(2000)
                result[name] = max(cpu_native.peak_bitmacs_per_s(20000) for _ in range(3))
    return result


def header(peak: dict[str, float]) -> list[str]:
    info = cpu_matmul.cpu_info()
    load = os.getloadavg()
    return [
        f"CPU: {info.describe()}",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads "
        f"{torch.get_num_threads()} (the native kernels use the same count), load average {load[0]:.2f} / "
        f"{load[1]:.2f} / {load[2]:.2f}",
        f"Native engine: instruction sets built here {', '.join(n for n, _ in native.isas())}; this CPU runs "
        f"{', '.join(peak)}; auto picks {native.isa()}; threads from {POOL_NAMES[native.pool()]}",
        "Popcount peak (microkernel on L1-resident data, all threads): "
        + ", ".join(f"{n} {p / 1e9:.0f} G bit-MACs/s" for n, p in peak.items()),
    ]


POOL_NAMES = {"openmp": "torch's OpenMP team", "own": "the library's own pool (built without OpenMP)"}


def section_heading() -> str:
    return f"{SECTION}: {cpu_matmul.cpu_info().model or 'unknown CPU'}, {native.isa()}"


def cold_rounds(m: int, rounds: int) -> int:
    """Rounds for a matmul row: four times as many at M = 1, whose times from memory vary most
    between calls (about 0.12-0.20 ms for the same 2 MiB read on the shared EPYC), a third at M = 256."""
    return 4 * rounds if m == 1 else rounds if m < 256 else max(3, rounds // 3)


def repeated_calls_table(rounds, weight, prepacked, ternary_weight, ternary_prepacked, gen) -> list[str]:
    """M = 1 with the same layer called 10 times in a row, nothing evicted: the packed weights
    (2 MiB binary, 4 MiB ternary) stay in the L3 cache between calls, float32's 64 MiB cannot, as
    in a packed model whose layers all fit in cache (ResNet-18: 2 MiB)."""
    x = torch.randn(1, K, generator=gen)
    x_bits = kernels.pack_bits(x)
    a = torch.randint(-1, 2, (1, K), generator=gen).float()
    a_planes = kernels.pack_ternary(a)
    t = interleaved_min({"float": lambda: F.linear(x, weight),
                         "binary": lambda: kernels.binary_matmul(x_bits, prepacked, K),
                         "float, ternary": lambda: F.linear(a, ternary_weight),
                         "ternary": lambda: kernels.ternary_matmul(a_planes, ternary_prepacked, K)},
                        rounds, repeat=10)
    return ["", "The same layer called 10 times in a row (M = 1, nothing evicted: the packed weights stay in the "
            "L3 cache, float32's 64 MiB cannot; mean of the 10 calls, min of the rounds):", "",
            "| op | F.linear fp32 (ms) | native (ms) | ratio |", "|---|---|---|---|",
            f"| binary | {t['float'] * 1e3:.3f} | {t['binary'] * 1e3:.3f} | {t['float'] / t['binary']:.1f}x |",
            f"| ternary | {t['float, ternary'] * 1e3:.3f} | {t['ternary'] * 1e3:.3f} | "
            f"{t['float, ternary'] / t['ternary']:.1f}x |"]


def matmul_section(rounds: int, peak: float) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(N, K, generator=gen)
    w_bits = kernels.pack_bits(weight)
    prepacked = kernels.prepack_binary(w_bits, K)
    ternary_weight = torch.randint(-1, 2, (N, K), generator=gen).float()
    ternary_prepacked = kernels.prepack_ternary(kernels.pack_ternary(ternary_weight), K)
    evict = CacheEvictor()  # every timed call starts from memory: no candidate inherits another's cache
    lines = [f"### Matmul, N = K = {K} (min of {rounds} interleaved rounds, {cold_rounds(1, rounds)} at M = 1; caches "
             "evicted before every call)", "",
             "| op | M | F.linear fp32 (ms) | native (ms) | ratio | incl. packing A (ms) | ratio | % of peak | "
             "NumPy path (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in (1, 16, 64, 256):
        x = torch.randn(m, K, generator=gen)
        x_bits = kernels.pack_bits(x)
        fns = {"float": lambda: F.linear(x, weight),
               "native": lambda: kernels.binary_matmul(x_bits, prepacked, K),
               "native+pack": lambda: kernels.binary_matmul(cpu_native.pack_rows(x), prepacked, K)}
        if m <= 64:
            fns["numpy"] = lambda: kernels.binary_matmul(x_bits, w_bits, K, path="popcount")
        t = interleaved_min(fns, cold_rounds(m, rounds), before=evict)
        numpy_ms = f"{t['numpy'] * 1e3:.2f}" if "numpy" in t else "-"
        lines.append(f"| binary | {m} | {t['float'] * 1e3:.3f} | {t['native'] * 1e3:.3f} | "
                     f"**{t['float'] / t['native']:.1f}x** | {t['native+pack'] * 1e3:.3f} | "
                     f"{t['float'] / t['native+pack']:.1f}x | {100 * m * N * K / t['native'] / peak:.0f}% | "
                     f"{numpy_ms} |")
    for m in (1, 64):
        a = torch.randint(-1, 2, (m, K), generator=gen).float()
        a_planes = kernels.pack_ternary(a)
        t = interleaved_min({"float": lambda: F.linear(a, ternary_weight),
                             "native": lambda: kernels.ternary_matmul(a_planes, ternary_prepacked, K),
                             "native+pack": lambda: kernels.ternary_matmul(kernels.pack_ternary(a),
                                                                          ternary_prepacked, K)},
                                cold_rounds(m, rounds), before=evict)
        lines.append(f"| ternary | {m} | {t['float'] * 1e3:.3f} | {t['native'] * 1e3:.3f} | "
                     f"**{t['float'] / t['native']:.1f}x** | {t['native+pack'] * 1e3:.3f} | "
                     f"{t['float'] / t['native+pack']:.1f}x | {100 * 2 * m * N * K / t['native'] / peak:.0f}% "
                     "(2 planes) | - |")
    lines += repeated_calls_table(rounds, weight, prepacked, ternary_weight, ternary_prepacked, gen)
    lines += ["", "Each instruction set forced (binary, prepacked weights, packed A; caches evicted before every "
              "call):", "",
              "| instruction set | M = 1 (ms) | ratio to F.linear | M = 64 (ms) | ratio to F.linear |",
              "|---|---|---|---|---|"]
    rows = {}
    for m in (1, 64):
        x = torch.randn(m, K, generator=gen)
        x_bits = kernels.pack_bits(x)
        fns = {"float": lambda: F.linear(x, weight)}
        for name, runs in native.isas():
            if runs:
                def run(name=name):
                    with native.using_isa(name):
                        kernels.binary_matmul(x_bits, prepacked, K)
                fns[name] = run
        rows[m] = interleaved_min(fns, cold_rounds(m, rounds) // 2, before=evict)
    for name, runs in native.isas():
        if runs:
            lines.append(f"| {name} | {rows[1][name] * 1e3:.3f} | {rows[1]['float'] / rows[1][name]:.1f}x | "
                         f"{rows[64][name] * 1e3:.2f} | {rows[64]['float'] / rows[64][name]:.1f}x |")
    return lines


def conv_section(rounds: int, peak: float) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    lines = [f"### Binary convolutions of CIFAR ResNet-18 (3x3, pad 1; channels_last input; min of {rounds} rounds)",
             "", "| batch | C_in -> C_out, H x W, stride | F.conv2d fp32 (ms) | native pack + conv (ms) | ratio | "
             "% of peak |", "|---|---|---|---|---|---|"]
    for batch in (1, 64):
        for c_in, c_out, size, stride in ((64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1), (256, 256, 8, 1),
                                          (512, 512, 4, 1)):
            x = torch.randn(batch, c_in, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(c_out, c_in, 3, 3, generator=gen)
            prepacked = cpu_native.prepack_conv([kernels.pack_conv_weight(weight)], (3, 3), c_in)
            mul, add = torch.rand(c_out, generator=gen), torch.rand(c_out, generator=gen)

            def binary():
                return cpu_native.conv(cpu_native.pack_pixels(x), prepacked, (stride, stride), (1, 1), (1, 1),
                                       mode=native.OUT_FLOAT, mul=mul, add=add)

            t = interleaved_min({"float": lambda: F.conv2d(x, weight, None, stride, 1), "native": binary},
                                rounds if batch == 1 else max(3, rounds // 3))
            out = size // stride
            bitmacs = batch * out * out * c_out * 9 * c_in
            lines.append(f"| {batch} | {c_in} -> {c_out}, {size}x{size}, {stride} | {t['float'] * 1e3:.2f} | "
                         f"{t['native'] * 1e3:.2f} | {t['float'] / t['native']:.1f}x | "
                         f"{100 * bitmacs / t['native'] / peak:.0f}% |")
    return lines


MODELS = [  # (label, model name, input shape, quantization spec)
    ("ResNet-18 XNOR (first, last, downsample float)", "resnet18", (3, 32, 32),
     {"method": "xnor", "keep_fp": ["first", "last", "downsample"]}),
    ("ResNet-18 XNOR (binary downsample)", "resnet18", (3, 32, 32), {"method": "xnor", "keep_fp": ["first", "last"]}),
    ("mnist_cnn XNOR (first, last float)", "mnist_cnn", (1, 28, 28), {"method": "xnor", "keep_fp": ["first", "last"]}),
    ("VGG-small XNOR (first, last float)", "vgg_small", (3, 32, 32), {"method": "xnor", "keep_fp": ["first", "last"]}),
]


def packed_model(name, shape, spec):
    import qat
    from qat import models
    from qat.export import pack_model

    torch.manual_seed(0)
    activation = "none" if name == "mnist_cnn" else "hardtanh"
    quantized = qat.quantize_model(models.build(name, num_classes=10, in_channels=shape[0], activation=activation),
                                   spec)
    qat.set_progress(quantized, 1.0)
    return pack_model(quantized.eval()), models.build(name, num_classes=10, in_channels=shape[0],
                                                      activation=activation).eval()


SLICE = 8  # samples per call in the sliced rows (qat.export.BatchSlices)
SHORT_CALL = 1e-3  # seconds: below this one call's time is mostly noise (see interleaved_min's repeat)


def _seconds(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def end_to_end_section(rounds: int) -> list[str]:
    from qat.export import BatchSlices, fuse_binary_chains

    lines = [f"### End to end (min of {rounds} interleaved rounds at every batch; where the float model "
             f"takes under {SHORT_CALL * 1e3:g} ms, a round is the mean of 20 calls in a row)", "",
             "Float: the float model in eager PyTorch, timed with NCHW and channels_last input, the faster kept. "
             "Packed: `pack_model` (BatchNorm folded, native kernels). Fused: `fuse_binary_chains(packed)` "
             "(binary layers pass packed bits). Packed models get channels_last input. Own pool: the fused model "
             "with the kernels' threads from the library's own pool instead of torch's OpenMP team "
             "(`BITQAT_CPU_POOL=own`), which spins beside torch's threads.", "",
             f"Fused in slices of {SLICE}: `qat.export.BatchSlices(fused, {SLICE})`, {SLICE} samples at a time "
             "(the memory table's way to keep peak RSS low at batch 64).", "",
             f"| model | batch | float (ms) | packed (ms) | fused (ms) | fused vs float | fused, own pool (ms) | "
             f"fused in slices of {SLICE} (ms) | sliced vs float |",
             "|---|---|---|---|---|---|---|---|---|"]
    pools = ["own"] if native.pool() != "own" else []  # the column: the same model on the own pool
    for label, name, shape, spec in MODELS:
        packed, float_model = packed_model(name, shape, spec)
        fused = fuse_binary_chains(packed)
        sliced = BatchSlices(fused, SLICE)
        for batch in (1, 64):
            x = torch.randn(batch, *shape)
            x_last = x.contiguous(memory_format=torch.channels_last)

            def with_pool(pool, model=fused, x=x_last):
                with native.using_pool(pool):
                    return model(x)

            candidates = {"float": lambda: float_model(x), "float_cl": lambda: float_model(x_last),
                          "packed": lambda: packed(x_last), "fused": lambda: fused(x_last)}
            candidates.update({pool: (lambda pool=pool: with_pool(pool)) for pool in pools})
            if batch > SLICE:
                candidates["sliced"] = lambda x=x_last: sliced(x)
            with torch.inference_mode():
                repeat = 20 if _seconds(candidates["float"]) < SHORT_CALL else 1
                # As many rounds at batch 64 as at batch 1: with 3, the float ResNet-18 alone ranged
                # 346-466 ms between runs on one quiet machine, enough to move a ratio from 2.7x to 3.6x.
                t = interleaved_min(candidates, rounds, repeat=repeat)
            best_float = min(t["float"], t["float_cl"])
            other = f"{t['own'] * 1e3:.2f}" if "own" in t else "-"
            in_slices = (f"{t['sliced'] * 1e3:.2f} | {best_float / t['sliced']:.2f}x" if "sliced" in t else "- | -")
            lines.append(f"| {label} | {batch} | {best_float * 1e3:.2f} | {t['packed'] * 1e3:.2f} | "
                         f"{t['fused'] * 1e3:.2f} | **{best_float / t['fused']:.2f}x** | {other} | {in_slices} |")
    return lines


def rss_worker(kind: str, batch: int, path: str) -> None:
    """Runs in its own process: what one inference adds to the resident set.

    The model is built and run once first, so that the code paths, libraries and thread pools it
    touches are resident; then it is deleted, the peak (VmHWM) is reset through
    ``/proc/self/clear_refs``, and it is built and run again: peak minus the RSS before is what the
    model and its activations take."""
    import gc

    import qat  # noqa: F401
    from qat import models
    from qat.export import BatchSlices, fuse_binary_chains, load_packed

    kind, _, slices = kind.partition(":")  # "packed:8": batches run 8 samples at a time (BatchSlices)

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def run():
        if kind == "float":
            model = models.build("resnet18", num_classes=10, in_channels=3, activation="hardtanh").eval()
            x = torch.randn(batch, 3, 32, 32)
        else:
            model = fuse_binary_chains(load_packed(path), inplace=True)
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        if slices:
            model = BatchSlices(model, int(slices))
        with torch.inference_mode():
            model(x)

    run()
    gc.collect()
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    run()
    print(json.dumps({"base_kb": base, "peak_kb": status("VmHWM:")}))


def memory_section() -> list[str]:
    from qat.export import save_packed

    packed, float_model = packed_model(*MODELS[0][1:])
    float_mib = sum(p.numel() for p in float_model.parameters()) * 4 / 2**20
    lines = ["### Peak memory (RSS), ResNet-18 inference, each in a fresh process", "",
             "What building and running the model adds to the resident set (peak minus the RSS before; "
             "code paths warmed up by a first run; see `rss_worker`); whole-process peaks in brackets. Packed: "
             "`load_packed` of the saved file (a shape-only skeleton, no float weights), then "
             "`fuse_binary_chains(..., inplace=True)`. Batch 64 in slices of 8: both models wrapped in "
             f"`qat.export.BatchSlices(model, {SLICE})`, so 8 images' activations are alive at a time.", "",
             "The last column sets the packed model against the float model as PyTorch runs it (whole batch).", "",
             "| batch | float (MiB) | packed (MiB) | packed / float | packed / float run whole |",
             "|---|---|---|---|---|"]
    whole_batch_float = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_packed(packed, Path(tmp) / "resnet18.safetensors")
        file_mib = path.stat().st_size / 2**20
        for batch, slices in ((1, ""), (64, ""), (64, f":{SLICE}")):
            figures = {}
            for kind in ("float" + slices, "packed" + slices):
                # Fixed mmap threshold: glibc returns every large block when it is freed, so the warm-up
                # run's activations are not left resident to be reused unseen by the measured run.
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
                done = subprocess.run([sys.executable, __file__, "--rss-worker", kind, str(batch), str(path)],
                                      capture_output=True, text=True, check=True, cwd=REPO, env=env)
                figures[kind] = json.loads(done.stdout.strip().splitlines()[-1])
            grow = {k.partition(":")[0]: (v["peak_kb"] - v["base_kb"]) / 1024 for k, v in figures.items()}
            whole = {k.partition(":")[0]: v["peak_kb"] / 1024 for k, v in figures.items()}
            label = f"{batch}, in slices of {SLICE}" if slices else f"{batch}"
            if not slices:
                whole_batch_float[batch] = grow["float"]
            lines.append(f"| {label} | {grow['float']:.1f} [{whole['float']:.0f}] | {grow['packed']:.1f} "
                         f"[{whole['packed']:.0f}] | **1/{grow['float'] / max(grow['packed'], 1e-9):.1f}** | "
                         f"1/{whole_batch_float[batch] / max(grow['packed'], 1e-9):.1f} |")
    lines += ["", f"The packed file: {file_mib:.2f} MiB (float32 weights of the same model: {float_mib:.1f} MiB)."]
    return lines


def write_results(command: str, lines: list[str], note: str) -> None:
    heading = section_heading()
    body = [heading, "", f"Command: `{command}`", *([f"Note: {note}"] if note else []), "", *lines, ""]
    replace_section(RESULTS, heading, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--write-results", action="store_true", help="update this CPU's engine section of RESULTS.md")
    parser.add_argument("--note", default="", help="a line about the run's conditions, written with the results")
    parser.add_argument("--rss-worker", nargs=3, metavar=("KIND", "BATCH", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_worker:
        kind, batch, path = args.rss_worker
        rss_worker(kind, int(batch), path)
        return 0
    if not native.available():
        parser.error(f"the native CPU engine is unavailable here: {native.unavailable_reason()}")
    rounds = 5 if args.quick else 15
    peak = peaks()
    lines = header(peak)
    print("\n".join(lines), flush=True)
    for section in (lambda: matmul_section(rounds, peak[native.isa()]),
                    lambda: conv_section(rounds, peak[native.isa()]),
                    lambda: end_to_end_section(rounds), memory_section):
        part = section()
        print("\n" + "\n".join(part), flush=True)
        lines += ["", *part]
    load = os.getloadavg()
    lines += ["", f"Load average after: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"]
    if args.write_results:
        command = "python benchmarks/cpu_engine.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        write_results(command.strip(), lines, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
