"""``python -m qat.generate <run dir or checkpoint> --prompt "..." --tokens N [--packed FILE]``

Greedy text generation from a trained language model (`model=gpt`): rebuilds the quantized model from
a training checkpoint (its stored config names the model and quantization; ``set_progress(1.0)``), or
with ``--packed FILE`` the packed model ``qat.export.load_packed`` rebuilds from a file written by
``qat.export.save_packed`` (no checkpoint needed then), and prints the text, then one line with the
new tokens per second at batch 1 on this CPU.

This entry point module (and only it: the library ``qat.generate`` does not) imports ``qat.train``,
for the command-line error handling and, through ``qat.export.__main__.trained_run`` (the model export
would pack), the checkpoint reader.

Exit status: 0, 2 for bad input (missing or corrupt checkpoint or file, not a language model, empty
prompt: one line, see `qat.train.cli`), 130 for Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys

import torch

from qat.train import cli

from . import generate_text


def model_from_checkpoint(path) -> torch.nn.Module:
    """The trained (quantized) model of a run directory or checkpoint, in eval mode at progress 1: the
    one ``python -m qat.export`` packs (``qat.export.__main__.trained_run``)."""
    from qat.export.__main__ import trained_run

    return trained_run(path)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.generate", description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="a run directory (its last.pt) or a checkpoint file")
    parser.add_argument("--packed", default=None, help="a packed model file (qat.export.save_packed) instead")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--tokens", type=int, default=200, help="how many bytes to generate (default 200)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.packed is None):
        parser.error("give either a run directory / checkpoint or --packed FILE")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.packed is not None:
        from qat.export import load_packed

        model, what = load_packed(args.packed), f"packed {args.packed}"
    else:
        model, what = model_from_checkpoint(args.source), f"checkpoint {args.source}"
    result = generate_text(model, args.prompt, args.tokens)
    print(result.text)
    from kernels.cpu_matmul import cpu_info

    print(f"\n[{what}: {result.new_tokens} new tokens in {result.seconds:.3f} s = {result.tokens_per_second:.1f} "
          f"tokens/s, greedy, batch 1; CPU: {cpu_info().describe()}, {torch.get_num_threads()} threads]")
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(main, "python -m qat.generate"))
