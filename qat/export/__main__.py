"""``python -m qat.export <run dir or checkpoint> --out model.safetensors [--benchmark]``

Rebuilds the trained quantized model from a training checkpoint (its stored config names the model,
data shape and quantization spec), finishes its schedules (``set_progress(1.0)``), packs it, checks
the packed model against it on random inputs, writes the safetensors file and, with
``--benchmark``, times packed against float inference side by side. A multi-bit model
(``quant=multibit``) is exported at ``--bits`` (8, 4, 2, ternary or 1), by default at the first of
the run's ``multibit.train_bits`` (8 when the run names none).

Exit status: 0, 1 when the packed model's top-1 differs from the float one, 2 for bad input (a
missing or corrupt checkpoint, a model that cannot be packed, an unwritable output: one line, see
`qat.train.cli`), 130 for Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from omegaconf import OmegaConf

import kernels
import kernels.cpu_matmul
import kernels.native
import qat
import qat.multibit
from qat import models
from qat.train import checkpoint, cli
from qat.train.config import to_plain

from .chains import fuse_binary_chains
from .packed import pack_model, save_packed
from .timing import time_inference


def trained_model_from_checkpoint(path):
    """(quantized model with the checkpoint's weights, its architecture dict, input shape)."""
    payload = checkpoint.load_checkpoint(path)
    cfg = OmegaConf.create(payload["config_yaml"])
    architecture = models.architecture(cfg.model, cfg.data.num_classes, cfg.data.channels)
    model = qat.quantize_model(models.build_architecture(architecture), to_plain(cfg.quant))
    if qat.multibit.stored_batchnorm_mode(payload["model"]) == "per_width":  # multibit.bn=per_width runs
        qat.multibit.per_width_batchnorm(model)
    checkpoint.load_model_state(model, payload["model"], path)
    qat.set_progress(model, 1.0)
    if qat.multibit.multibit_quantizers(model):  # the width the run trained first (a baseline's only one)
        train_bits = to_plain(cfg.get("multibit") or {}).get("train_bits") or [8]
        qat.multibit.set_bits(model, train_bits[0])
    input_shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    return model.eval(), architecture, input_shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory (uses checkpoints/last.pt) or a checkpoint file")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--benchmark", action="store_true", help="time packed vs float inference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--bits", default=None,
                        help="multi-bit models: the width to export (8, 4, 2, ternary, 1)")
    args = parser.parse_args(argv)
    model, architecture, input_shape = trained_model_from_checkpoint(args.source)
    if args.bits is not None:
        qat.multibit.set_bits(model, args.bits)
        print(f"multi-bit model exported at width {qat.multibit.width_label(args.bits)}")
    packed = pack_model(model)
    x = torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference, output = model(x), packed(x)
    same_top1 = bool(torch.equal(reference.argmax(1), output.argmax(1)))
    print(f"packed {architecture['name']}: max |logit difference| {float((reference - output).abs().max()):.3g} "
          f"on 8 random inputs, identical top-1: {same_top1}")
    path = save_packed(packed, args.out, architecture=architecture)
    summary = qat.summary(model, input_shape)
    print(f"wrote {path}: {os.path.getsize(path):,} bytes (summary quantized_bytes {summary.quantized_bytes:,}, "
          f"float32 {summary.fp32_bytes:,}, {summary.fp32_bytes / os.path.getsize(path):.1f}x smaller)")
    if args.benchmark:
        float_model = models.build_architecture(architecture)
        fused = fuse_binary_chains(packed)
        rows = time_inference({"float": float_model, "packed": packed, "fused": fused}, input_shape,
                              args.batch_sizes, args.rounds)
        print(f"\nCPU: {kernels.cpu_matmul.cpu_info().describe()}; native kernels: "
              f"{kernels.native.isa() if kernels.native.available() else 'unavailable (NumPy path)'}, "
              f"{torch.get_num_threads()} threads")
        print("| batch | float (ms) | packed (ms) | fused chains (ms) | fused speed vs float |\n|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['batch']} | {row['float_ms']:.2f} | {row['packed_ms']:.2f} | {row['fused_ms']:.2f} | "
                  f"{row['float_ms'] / row['fused_ms']:.2f}x |")
    return 0 if same_top1 else 1


if __name__ == "__main__":
    sys.exit(cli.guard(main, "python -m qat.export"))
