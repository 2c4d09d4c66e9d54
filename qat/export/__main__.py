"""``python -m qat.export <run dir or checkpoint> --out model.safetensors [--benchmark]``

Rebuilds the trained quantized model from a training checkpoint (its stored config names the model,
data shape and quantization spec), finishes its schedules (``set_progress(1.0)``), packs it, checks
the packed model against it on inputs and by a check its task chooses (``qat.train.tasks``:
``export_sample`` / ``export_check``; classification: 8 random images, identical top-1; language
model: the first validation windows, identical greedy next bytes, and bits per byte of both), writes
the safetensors file and, with ``--benchmark``, times packed against float inference side by side
(image models; for a language model's generation speed see ``benchmarks/lm_generate.py``). A multi-bit model
(``quant=multibit``) is exported at ``--bits`` (8, 4, 2, ternary or 1), by default at the first of
the run's ``multibit.train_bits`` (8 when the run names none).

Exit status: 0, 1 when the check fails (the packed model's top-1, or greedy next byte, differs from
the quantized model's), 2 for bad input (a
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
from qat.train.config import ConfigError, to_plain
from qat.train.data import get_dataset
from qat.train.tasks import get_task

from .chains import fuse_binary_chains
from .packed import pack_model, save_packed
from .timing import time_inference


def trained_model_from_checkpoint(path):
    """(quantized model with the checkpoint's weights, its architecture dict, input shape)."""
    model, architecture, cfg = trained_run(path)
    return model, architecture, task_of(cfg).input_spec(cfg.data)[0]


def task_of(cfg):
    """What the run trained for (``qat.train.tasks``), from its dataset's registry row."""
    return get_task(get_dataset(cfg.data.name).task)


def trained_run(path):
    """(quantized model with the checkpoint's weights, its architecture dict, the run's config)."""
    payload = checkpoint.load_checkpoint(path)
    cfg = OmegaConf.create(payload["config_yaml"])
    architecture = models.architecture(cfg.model, cfg.data.num_classes, cfg.data.get("channels", 1))
    model = qat.quantize_model(models.build_architecture(architecture), to_plain(cfg.quant))
    bn_mode = qat.multibit.stored_batchnorm_mode(payload["model"])
    if bn_mode != "shared":  # multibit.bn=per_width / per_width_affine runs
        qat.multibit.per_width_batchnorm(model, affine=bn_mode == "per_width_affine")
    checkpoint.load_model_state(model, payload["model"], path)
    qat.set_progress(model, 1.0)
    if qat.multibit.multibit_quantizers(model):  # the width the run trained first (a baseline's only one)
        train_bits = to_plain(cfg.get("multibit") or {}).get("train_bits") or [8]
        qat.multibit.set_bits(model, train_bits[0])
    return model.eval(), architecture, cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory (uses checkpoints/last.pt) or a checkpoint file")
    parser.add_argument("--out", required=True, help="the safetensors file to write")
    parser.add_argument("--benchmark", action="store_true", help="time packed vs float inference")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--bits", default=None,
                        help="multi-bit models: the width to export (8, 4, 2, ternary, 1)")
    parser.add_argument("--data-root", default=None,
                        help="where the run's data lives here, if not its data.root (the language-model check)")
    args = parser.parse_args(argv)
    model, architecture, cfg = trained_run(args.source)
    task = task_of(cfg)
    input_shape, input_dtype = task.input_spec(cfg.data)
    if args.benchmark and input_dtype is not None:  # time_inference draws float inputs
        raise ConfigError(f"--benchmark times float input batches, and a {task.name} run takes {input_dtype} "
                          f"inputs; time its generation with `python benchmarks/lm_generate.py {args.source}`")
    if args.data_root is not None:
        cfg.data.root = args.data_root
    if args.bits is not None:
        qat.multibit.set_bits(model, args.bits)
        print(f"multi-bit model exported at width {qat.multibit.width_label(args.bits)}")
    packed = pack_model(model)
    check = task.export_check(model, packed, task.export_sample(cfg.data))
    print(f"packed {architecture['name']}: {check.text}")
    path = save_packed(packed, args.out, architecture=architecture)
    summary = qat.summary(model, input_shape, input_dtype)
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
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(cli.guard(main, "python -m qat.export"))
