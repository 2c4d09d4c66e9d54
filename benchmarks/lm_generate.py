"""Packed language-model generation on CPU against the float model in PyTorch (issue 12's goal table).

    # a trained quantized LM run (lm_bitnet158, lm_ternary, ...); the float side a fresh float gpt of its size:
    python benchmarks/lm_generate.py runs/lm_bitnet158/<run> [--float-run runs/lm_fp/<run>]
    # no trained run: a freshly built (untrained) model of an experiment's size, said so in the output:
    python benchmarks/lm_generate.py --untrained --experiment lm_bitnet158

What it measures, at batch 1, in one process with the same torch threads (``--threads``) for both:
- (a) float: the float GPT of the same architecture in plain PyTorch. A float model's speed does not
  depend on its weights, so this is a fresh float model of the run's config unless ``--float-run``
  names a trained float (``lm_fp``) run of the same architecture, whose trained model is used; the
  output says which.
- (b) packed: the quantized model packed (``qat.export.pack_model``), written with ``save_packed`` and
  read back with ``load_packed`` (whatever layers and kernels ``load_packed`` builds; the output names
  the native kernels' ISA), i.e. what ``python -m qat.generate --packed FILE`` runs.
Both generate the same `--tokens` bytes greedily after the same prompt (``qat.generate.time_generation``:
one warm-up each, then ``--repeats`` interleaved rounds); tokens/s of the fastest round and the median.
The packed model's greedy text is checked against the quantized model's (the checkpoint's).

Sizes: the packed file against the float32 state dict of the same architecture, split into the
quantized linears (codes + scales + biases in the file; their float32 weights and biases), the 8-bit
embeddings and head where the run has them (``quant.embeddings=int8``, head ``int8``: lm_bitnet158_int8emb),
the float rest (norms, and embeddings and head left float), plus the file's header and metadata.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repository's packages

import torch  # noqa: E402

import kernels.native  # noqa: E402
import qat  # noqa: E402
from kernels.cpu_matmul import cpu_info  # noqa: E402
from qat import models  # noqa: E402
from qat.export import load_packed, pack_model, read_packed, save_packed  # noqa: E402
from qat.generate import generate_text, time_generation  # noqa: E402

QUANTIZED, EIGHT_BIT, FLOAT_REST = "quantized linears", "8-bit embeddings, head", "float: norms, embeddings, head"


def untrained_model(experiment: str, overrides: list[str]):
    """(freshly built quantized model at progress 1, its architecture, config) of `+experiment=<experiment>`."""
    from hydra import compose, initialize_config_dir

    from qat.train.config import to_plain  # importing qat.train.config registers the config resolvers

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}", *overrides])
    architecture = models.architecture(cfg.model, cfg.data.num_classes, 1)
    torch.manual_seed(int(cfg.seed))
    model = qat.quantize_model(models.build_architecture(architecture), to_plain(cfg.quant))
    qat.set_progress(model, 1.0)
    return model.eval(), architecture, cfg


def trained_model(run: str):
    from qat.export.__main__ import trained_run  # the export entry point's checkpoint reader

    return trained_run(run)


def part_of(name: str, quantized_layers: dict[str, dict]) -> str:
    spec = quantized_layers.get(name.rsplit(".", 1)[0])
    if spec is None:
        return FLOAT_REST
    return EIGHT_BIT if spec["code"] == "sint8" else QUANTIZED


def size_breakdown(path: Path, float_model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """{"packed" | "float32": {part: bytes}} (module docstring); the packed side's "header" is the rest of the file."""
    tensors, meta = read_packed(path)
    quantized_layers = meta["layers"]
    parts = (QUANTIZED, *([EIGHT_BIT] if any(s["code"] == "sint8" for s in quantized_layers.values()) else []),
             FLOAT_REST)
    sizes: dict[str, dict[str, int]] = {"packed": dict.fromkeys(parts, 0), "float32": dict.fromkeys(parts, 0)}
    for name, tensor in tensors.items():
        sizes["packed"][part_of(name, quantized_layers)] += tensor.numel() * tensor.element_size()
    sizes["packed"]["header and metadata"] = os.path.getsize(path) - sum(sizes["packed"].values())
    for name, tensor in float_model.state_dict().items():
        sizes["float32"][part_of(name, quantized_layers)] += tensor.numel() * 4
    return sizes


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a trained quantized LM run directory (or checkpoint)")
    parser.add_argument("--untrained", action="store_true", help="a fresh model of --experiment's size instead")
    parser.add_argument("--experiment", default="lm_bitnet158", help="with --untrained (default lm_bitnet158)")
    parser.add_argument("--override", action="append", default=[], help="with --untrained: a config override")
    parser.add_argument("--float-run", default=None, help="a trained float LM run of the same architecture")
    parser.add_argument("--prompt", default="The Python interpreter ")
    parser.add_argument("--tokens", type=int, default=128, help="bytes to generate (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--out", default=None, help="keep the packed file here (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.untrained == (args.run is not None):
        parser.error("give a trained run directory or --untrained")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.untrained:
        quantized, architecture, cfg = untrained_model(args.experiment, args.override)
        source = f"UNTRAINED: a freshly built +experiment={args.experiment} model (random weights; speed and " \
                 f"size only, its text is meaningless)"
    else:
        quantized, architecture, cfg = trained_model(args.run)
        source = f"trained run {args.run}"
    if args.float_run:
        float_model, float_architecture, _ = trained_model(args.float_run)
        if models.complete_architecture(float_architecture) != models.complete_architecture(architecture):
            raise SystemExit(f"--float-run {args.float_run} is a {float_architecture}, not the {architecture} "
                             f"of the quantized model; give a float run of the same architecture or none")
        float_source = f"the trained float run {args.float_run}"
    else:
        torch.manual_seed(0)
        float_model = models.build_architecture(architecture).eval()
        float_source = "a fresh float gpt of the same architecture (random weights: a float model's speed does " \
                       "not depend on them)"

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(args.out or Path(scratch) / "lm.safetensors")
        save_packed(pack_model(quantized), path, architecture=architecture)
        packed = load_packed(path)
        sizes = size_breakdown(path, models.build_architecture(architecture))
        file_bytes = os.path.getsize(path)
        same_text = generate_text(packed, args.prompt, args.tokens).text == \
            generate_text(quantized, args.prompt, args.tokens).text
        timings = time_generation({"float": float_model, "packed": packed}, args.prompt, args.tokens, args.repeats)

    isa = kernels.native.isa() if kernels.native.available() else \
        f"unavailable ({kernels.native.unavailable_reason()}; NumPy/torch path)"
    method = cfg.quant.get("method", "?")
    print(f"model: {architecture} ({parameters(float_model):,} parameters), quant={method}")
    print(f"quantized model: {source}")
    print(f"float model: {float_source}")
    print(f"CPU: {cpu_info().describe()}; native kernels: {isa}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads for both")
    print(f"greedy, batch 1, prompt {args.prompt!r} ({len(args.prompt.encode())} bytes) + {args.tokens} new bytes, "
          f"{args.repeats} interleaved rounds after one warm-up each")
    print(f"packed greedy text identical to the quantized (checkpoint) model's: {same_text}\n")
    float_t, packed_t = timings["float"], timings["packed"]
    print("| model | tokens/s (best round) | tokens/s (median) | bytes | × float32 size |\n|---|---|---|---|---|")
    float_bytes = sum(sizes["float32"].values())
    print(f"| float (PyTorch) | {float_t.best_tokens_per_second:.1f} | {float_t.median_tokens_per_second:.1f} | "
          f"{float_bytes:,} (float32 state dict) | 1 |")
    print(f"| packed ({method}) | {packed_t.best_tokens_per_second:.1f} | {packed_t.median_tokens_per_second:.1f} | "
          f"{file_bytes:,} (file) | 1/{float_bytes / file_bytes:.1f} |")
    print(f"\npacked / float tokens/s: {packed_t.best_tokens_per_second / float_t.best_tokens_per_second:.2f}x "
          f"(best rounds), {packed_t.median_tokens_per_second / float_t.median_tokens_per_second:.2f}x (medians); "
          f"goal >= 2x")
    print(f"file size: 1/{float_bytes / file_bytes:.1f} of float32 (goal for ternary: <= 1/12)\n")
    print("| part | packed file (bytes) | float32 (bytes) | ratio |\n|---|---|---|---|")
    for part in sizes["packed"]:
        packed_bytes, float32 = sizes["packed"].get(part, 0), sizes["float32"].get(part, 0)
        ratio = f"1/{float32 / packed_bytes:.1f}" if packed_bytes and float32 else "-"
        print(f"| {part} | {packed_bytes:,} | {float32:,} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
