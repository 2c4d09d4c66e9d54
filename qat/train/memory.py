"""``python -m qat.train.memory +experiment=<name> [overrides] [--modes none,exact,int2] [--batch 128]``

What one training step (forward + backward on a random batch of the experiment's data shape) keeps
for backward under each ``trainer.act_compression`` mode, and what it costs:

- saved-for-backward bytes, counted by the compression's own pack hook (``qat.act_compression``):
  ``held`` (distinct storages kept for backward, parameters excluded: the memory a step holds),
  ``binary inputs`` (what the binary-input layers save of their inputs), ratios to ``none``;
- step time: median over ``--steps`` steps per mode, modes interleaved round-robin in one process
  so a changing machine load hits them alike;
- peak memory: each mode and batch size (B/2 and B) in a fresh process (``--child``): on CPU the
  process's peak RSS during one step (VmHWM, reset before the step) and its rise over the RSS
  before it (model built, batch made); on GPU ``torch.cuda.max_memory_allocated``. The difference
  between B/2 and B gives the memory per image, and with it the largest batch whose peak fits
  ``--budget-mib`` (a linear extrapolation).

Hydra overrides (``+experiment=...``, ``quant=...``, ``model=...``) compose the config exactly as
``train.py`` does; ``trainer.act_compression_overrides`` applies to every mode but ``none``, and
``trainer.return_freed_memory=true`` sets glibc's allocator as the trainer then does
(``qat.train.allocator``) in every process, for every mode alike (step times and peaks then both
include its cost and its effect; the table's title says which). Bad
input prints one line and exits with status 2 (``qat.train.cli``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qat
from kernels.cpu_matmul import cpu_info
from qat import models
from qat.act_compression import MODES, SavedBytes, set_act_compression
from qat.train import cli
from qat.train.allocator import malloc_huge_pages, return_freed_memory
from qat.train.config import ConfigError, to_plain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import qat.train.config  # noqa: F401  (resolvers)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def build_model(cfg, device: torch.device):
    torch.manual_seed(int(cfg.seed))
    data = cfg.data
    arch = models.architecture(cfg.model, int(data.num_classes), int(data.channels))
    model = qat.quantize_model(models.build_architecture(arch), to_plain(cfg.quant)).to(device)
    qat.set_progress(model, 0.0)
    return model.train()


def batch(cfg, size: int, device: torch.device):
    generator = torch.Generator().manual_seed(1)
    shape = (size, int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    images = torch.randn(shape, generator=generator).to(device)
    labels = torch.randint(0, int(cfg.data.num_classes), (size,), generator=generator).to(device)
    return images, labels


def train_step(model, compression, images, labels, record: bool = False) -> SavedBytes | None:
    """Forward (under the compression's hooks) + backward, as the trainer runs it."""
    model.zero_grad(set_to_none=True)
    amp = images.device.type == "cuda"
    stats = None
    if record:
        with compression.record() as stats, compression.saving(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            logits = model(images)
    else:
        with compression.saving(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
            logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    return stats


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_saved_and_time(cfg, modes, overrides, size, steps, device):
    """{mode: {"saved": SavedBytes dict, "seconds": [step times]}} in one process, round-robin."""
    model = build_model(cfg, device)
    images, labels = batch(cfg, size, device)
    results = {mode: {"seconds": []} for mode in modes}
    for mode in modes:  # counting step, also the warm-up
        compression = set_act_compression(model, mode, overrides if mode != "none" else None)
        results[mode]["saved"] = train_step(model, compression, images, labels, record=True).as_dict()
    for _ in range(steps):
        for mode in modes:
            compression = set_act_compression(model, mode, overrides if mode != "none" else None)
            _sync(device)
            start = time.perf_counter()
            train_step(model, compression, images, labels)
            _sync(device)
            results[mode]["seconds"].append(time.perf_counter() - start)
    return results


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs). getrusage's ru_maxrss cannot
    be used: Linux carries the forking parent's peak across exec into it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_peak(cfg, mode, overrides, size, device) -> dict:
    """Peak memory of one training step at batch ``size`` in this fresh process: CUDA's
    max_memory_allocated, or on CPU the process's peak RSS (VmHWM) and its rise over the RSS
    before the step (model built, batch made)."""
    model = build_model(cfg, device)
    compression = set_act_compression(model, mode, overrides if mode != "none" else None)
    images, labels = batch(cfg, size, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, compression, images, labels)
        torch.cuda.synchronize(device)
        return {"peak": torch.cuda.max_memory_allocated(device)}
    before = _status_bytes("VmRSS")
    reset = _reset_peak_rss()
    train_step(model, compression, images, labels)
    peak = _status_bytes("VmHWM")
    return {"peak": peak, "rise": peak - before if reset else None}


def largest_batch(peaks: dict, budget: int) -> int | None:
    (b1, p1), (b2, p2) = sorted((int(b), p["peak"]) for b, p in peaks.items())
    per_image = (p2 - p1) / (b2 - b1) if b2 > b1 else 0
    if per_image <= 0:
        return None
    return max(0, int((budget - p2) // per_image) + b2)


def machine_line(device: torch.device) -> str:
    """Where the figures come from: the CPU (or GPU) model and the load while measuring."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return f"CPU: {cpu_info().describe()}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def table(cfg, results: dict, peaks: dict, budget: int | None, device) -> str:
    base = results.get("none")
    kind = "peak RSS in the step" if device.type == "cpu" else "max_memory_allocated"
    head = ["mode", "held for backward MiB", "x less", "binary-layer inputs MiB", "x less",
            "step s (median)", "x none"]
    if peaks:
        head += [f"{kind} MiB", "x less"]
        if device.type == "cpu":
            head += ["rise over RSS before the step MiB", "x less"]
        if budget:
            head += [f"largest batch in {budget / 2**20:,.0f} MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, r in results.items():
        saved, seconds = r["saved"], statistics.median(r["seconds"]) if r["seconds"] else None
        row = [mode, mib(saved["held"]), _ratio(base and base["saved"]["held"], saved["held"]),
               mib(saved["binary_inputs"]), _ratio(base and base["saved"]["binary_inputs"], saved["binary_inputs"]),
               "-" if seconds is None else f"{seconds:.2f}",
               _ratio(seconds, base and base["seconds"] and statistics.median(base["seconds"]), inverse=True)]
        if peaks:
            top = str(max(int(b) for b in peaks[mode]))
            peak = peaks[mode][top]["peak"]
            base_peak = peaks["none"][top]["peak"] if "none" in peaks else None
            row += [mib(peak), _ratio(base_peak, peak)]
            if device.type == "cpu":
                rise = peaks[mode][top].get("rise")
                base_rise = peaks["none"][top].get("rise") if "none" in peaks else None
                row += [mib(rise), _ratio(base_rise, rise)]
            if budget:
                found = largest_batch(peaks[mode], budget)
                row.append("-" if found is None else str(found))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio(a, b, inverse=False) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def run_child(argv: list[str], mode: str, size: int) -> dict:
    command = [sys.executable, "-m", "qat.train.memory", *argv, "--batch", str(size), "--child", mode]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child for mode {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m qat.train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=resnet18_xnor")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: data.batch_size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--no-peak", action="store_true", help="skip the per-mode peak-memory processes")
    parser.add_argument("--budget-mib", type=float, default=None, help="memory budget for the largest batch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # overrides may come after the options too
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"--modes: {mode!r} is not a compression mode; valid: {', '.join(MODES)}")
    cfg = compose(args.overrides)
    overrides = to_plain(cfg.trainer.get("act_compression_overrides")) or None
    size = int(args.batch or cfg.data.batch_size)
    if size < 1 or args.steps < 0:
        raise ConfigError(f"--batch must be >= 1 and --steps >= 0, got {size} and {args.steps}")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu")
    release = cfg.trainer.get("return_freed_memory", False)
    if not isinstance(release, bool):
        raise ConfigError(f"trainer.return_freed_memory must be true or false, got {release!r}")
    releasing = release and device.type == "cpu" and return_freed_memory()  # as the trainer does
    if args.child:
        print(json.dumps(child_peak(cfg, args.child, overrides, size, device)))
        return 0
    results = measure_saved_and_time(cfg, modes, overrides, size, args.steps, device)
    peaks = {}
    if not args.no_peak:
        child_argv = [a for a in argv if a != "--no-peak"]
        peaks = {mode: {str(b): run_child(child_argv, mode, b) for b in (max(1, size // 2), size)} for mode in modes}
    budget = int(args.budget_mib * 2**20) if args.budget_mib else None
    title = (f"{cfg.get('experiment_name', 'default')}: model {cfg.model.name}, method {cfg.quant.method}, "
             f"batch {size}, device {device}, {torch.get_num_threads()} threads"
             + (", freed memory returned to the system (fixed mmap threshold)" if releasing else "")
             + (", malloc huge pages (GLIBC_TUNABLES)" if malloc_huge_pages() else ""))
    print(title)
    print(machine_line(device))
    print(table(cfg, results, peaks, budget, device))
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "machine": machine_line(device), "results": results,
                                               "peaks": peaks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(main, "python -m qat.train.memory"))
