"""A trained multi-bit run (quant=multibit) evaluated at every width twice: with the BatchNorm
statistics as trained (shared by all widths) and with them re-estimated at that width from N
training batches (cumulative average; no weight changes). Diagnostic behind docs/multibit_notes.md.

    python -m benchmarks.multibit_bn_stats <run dir> [--batches 20]
"""
from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

import qat.multibit as mb
from qat.export.__main__ import trained_model_from_checkpoint
from qat.train import checkpoint
from qat.train.data import build_data


def accuracy(model, loader) -> float:
    model.eval()
    right = seen = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x).argmax(1) == y).sum().item()
            seen += len(y)
    return 100.0 * right / seen


def reestimate_batchnorm(model, loader, batches: int) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    payload = checkpoint.load_checkpoint(checkpoint.resolve_checkpoint_path(args.run))
    cfg = OmegaConf.create(payload["config_yaml"])
    data = build_data(cfg.data)
    split = data.val if data.val is not None else data.test
    train = torch.utils.data.DataLoader(data.train, batch_size=int(cfg.data.batch_size), shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    evaluation = torch.utils.data.DataLoader(split, batch_size=1000)
    print("| width | shared statistics | re-estimated at the width |\n|---|---|---|")
    for width in mb.WIDTHS:
        model, _, _ = trained_model_from_checkpoint(args.run)
        mb.set_bits(model, width)
        shared = accuracy(model, evaluation)
        reestimate_batchnorm(model, train, args.batches)
        print(f"| {mb.width_label(width)} | {shared:.2f} | {accuracy(model, evaluation):.2f} |", flush=True)


if __name__ == "__main__":
    main()
