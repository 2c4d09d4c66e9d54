"""``python -m qat.memory +experiment=<name> [overrides] [--modes none,exact,int2] [--batch 128]``

What one training step (forward + backward on a random batch of the experiment's data shape) keeps
for backward under each ``trainer.act_compression`` mode, and what it costs:

- saved-for-backward bytes, counted by the compression's own pack hook (``qat.act_compression``):
  ``held`` (distinct storages kept for backward, parameters excluded: the memory a step holds),
  ``binary inputs`` (what the binary-input layers save of their inputs), ratios to ``none``;
- step time: median over ``--steps`` steps per mode, modes interleaved round-robin in one process
  so a changing machine load hits them alike;
- peak memory: each mode in a fresh process (``--child``): the peak RSS of the process (CPU) or
  ``torch.cuda.max_memory_allocated`` (GPU) over one step at batch B/2 and one at B; their
  difference gives the memory per image, and with it the largest batch whose peak fits
  ``--budget-mib``.

Hydra overrides (``+experiment=...``, ``quant=...``, ``model=...``) compose the config exactly as
``train.py`` does; ``trainer.act_compression_overrides`` applies to every mode but ``none``. Bad
input prints one line and exits with status 2 (``qat.cli``).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qat
from qat import cli, models
from qat.act_compression import MODES, SavedBytes, set_act_compression
from qat.config import ConfigError, to_plain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose(overrides: list[str]):
    import qat.config  # noqa: F401  (resolvers)
    from hydra import compose as hydra_compose, initialize_config_dir

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


def child_peak(cfg, mode, overrides, size, device) -> dict:
    """Peak memory of one step at size // 2 and at size, in this (fresh) process."""
    model = build_model(cfg, device)
    compression = set_act_compression(model, mode, overrides if mode != "none" else None)
    out = {}
    for b in (max(1, size // 2), size):
        images, labels = batch(cfg, b, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            train_step(model, compression, images, labels)
            torch.cuda.synchronize(device)
            out[str(b)] = torch.cuda.max_memory_allocated(device)
        else:
            train_step(model, compression, images, labels)
            out[str(b)] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        del images, labels
    return out


def largest_batch(peaks: dict, budget: int) -> int | None:
    (b1, p1), (b2, p2) = sorted((int(b), p) for b, p in peaks.items())
    per_image = (p2 - p1) / (b2 - b1) if b2 > b1 else 0
    if per_image <= 0:
        return None
    return max(0, int((budget - p2) // per_image) + b2)


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def table(cfg, results: dict, peaks: dict, budget: int | None, device) -> str:
    base = results.get("none")
    kind = "peak RSS (process)" if device.type == "cpu" else "max_memory_allocated"
    head = ["mode", "held for backward MiB", "x less", "binary-layer inputs MiB", "x less",
            "step s (median)", "x none"]
    if peaks:
        head += [f"{kind} MiB", "x less"]
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
            peak = max(peaks[mode].values())
            base_peak = max(peaks["none"].values()) if "none" in peaks else None
            row += [mib(peak), _ratio(base_peak, peak)]
            if budget:
                found = largest_batch(peaks[mode], budget)
                row.append("-" if found is None else str(found))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio(a, b, inverse=False) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def run_child(argv: list[str], mode: str) -> dict:
    command = [sys.executable, "-m", "qat.memory", *argv, "--child", mode]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child for mode {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m qat.memory", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=resnet18_xnor")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: data.batch_size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--no-peak", action="store_true", help="skip the per-mode peak-memory processes")
    parser.add_argument("--budget-mib", type=float, default=None, help="memory budget for the largest batch")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the raw figures to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    if args.child:
        print(json.dumps(child_peak(cfg, args.child, overrides, size, device)))
        return 0
    results = measure_saved_and_time(cfg, modes, overrides, size, args.steps, device)
    peaks = {}
    if not args.no_peak:
        child_argv = [a for a in argv if a != "--no-peak"]
        peaks = {mode: run_child(child_argv, mode) for mode in modes}
    budget = int(args.budget_mib * 2**20) if args.budget_mib else None
    title = (f"{cfg.get('experiment_name', 'default')}: model {cfg.model.name}, method {cfg.quant.method}, "
             f"batch {size}, device {device}, {torch.get_num_threads()} threads")
    print(title)
    print(table(cfg, results, peaks, budget, device))
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "results": results, "peaks": peaks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(main, "python -m qat.memory"))
