"""A trained multi-bit run (quant=multibit) evaluated at each of its train widths twice: with the
BatchNorm statistics stored in its checkpoint, and with them calibrated at the checkpoint's weights
exactly as a run with ``multibit.bn_calibration_batches=N`` does before evaluating
(``qat.multibit.calibrate_batchnorm`` on ``qat.train.multibit.calibration_inputs``, the global random
state seeded by the run's seed). Calibration changes no weight and no training step, so for a run
trained without it, the calibrated figures are those the same run with calibration would report.
The run is only read. Top-1 % on validation and test, a markdown table:

    python -m benchmarks.multibit_bn_stats <run dir or .pt> [--batches 20] [--data-source ../shared/data]
"""
from __future__ import annotations

import argparse
import itertools

import torch
from omegaconf import OmegaConf

import qat.multibit as mb
from qat.export.__main__ import trained_model_from_checkpoint
from qat.train import checkpoint
from qat.train.config import to_plain
from qat.train.data import build_data
from qat.train.multibit import calibration_inputs
from qat.train.trainer import seed_everything


def accuracy(model, loader) -> float:
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x).argmax(1) == y).sum().item()
            seen += len(y)
    return 100.0 * right / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory (its last.pt) or a checkpoint file")
    parser.add_argument("--batches", type=int, default=20, help="calibration batches (multibit.bn_calibration_batches)")
    parser.add_argument("--data-source", help="data.source, if the run's no longer holds the data")
    parser.add_argument("--per-width", action="store_true",
                        help="a multibit.bn=shared run: give it per-width statistics before calibrating (the "
                             "weights are those of the same run with bn=per_width: docs/multibit_notes.md)")
    parser.add_argument("--calibrated-only", action="store_true", help="skip the stored statistics' figures")
    args = parser.parse_args()
    path = checkpoint.resolve_checkpoint_path(args.run)
    cfg = OmegaConf.create(checkpoint.load_checkpoint(path)["config_yaml"])
    if args.data_source:
        cfg.data.source = args.data_source
    data = build_data(cfg.data)
    splits = {name: torch.utils.data.DataLoader(split, batch_size=int(cfg.data.eval_batch_size))
              for name, split in (("val", data.val), ("test", data.test)) if split is not None}
    model, _, _ = trained_model_from_checkpoint(path)
    train_bits = [mb.parse_width(w) for w in (to_plain(cfg.get("multibit") or {}).get("train_bits") or mb.WIDTHS)]

    def figures() -> dict:
        result = {}
        for width in train_bits:
            with mb.bits(model, width):
                result[width] = {name: accuracy(model, loader) for name, loader in splits.items()}
        return result

    stored = None if args.calibrated_only else figures()
    if args.per_width:
        mb.per_width_batchnorm(model)
    seed_everything(int(cfg.seed))
    workers = int(cfg.data.get("num_workers", 0))
    inputs = calibration_inputs(data.train, int(cfg.data.batch_size), int(cfg.seed), workers)
    used = mb.calibrate_batchnorm(model, itertools.islice(inputs, args.batches), train_bits)
    calibrated = figures()
    columns = {**({"stored": stored} if stored else {}), "calibrated": calibrated}
    print(f"{path}: {used} calibration batches of {int(cfg.data.batch_size)}"
          + (", per-width statistics" if mb.per_width_batchnorms(model) else ", shared statistics"))
    print("| width | " + " | ".join(f"{c} {n}" for c in columns for n in splits) + " |\n|---|"
          + "---|" * (len(columns) * len(splits)))
    for width in train_bits:
        print(f"| {mb.width_label(width)} | " + " | ".join(f"{figures[width][n]:.2f}" for figures in columns.values()
                                                          for n in splits) + " |", flush=True)


if __name__ == "__main__":
    main()
