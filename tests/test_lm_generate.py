"""benchmarks/lm_generate.py on a tiny untrained model: both models timed, the packed text checked
against the quantized model's, the size breakdown adding up to the file and the float32 state dict."""
from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from conftest import CONFIGS, REPO
from qat import models
from qat.export import pack_model, save_packed

TINY = ["--override", "model.depth=1", "--override", "model.width=32", "--override", "data.block_size=64"]


def load_script():
    spec = importlib.util.spec_from_file_location("lm_generate_script", REPO / "benchmarks" / "lm_generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lm_generate = load_script()


@pytest.mark.parametrize("experiment", ["lm_bitnet158", "lm_fp"])
def test_untrained_benchmark_prints_speeds_sizes_and_the_machine(capsys, experiment):
    quant = "bitnet158" if experiment == "lm_bitnet158" else "ternary"
    if not (CONFIGS / "quant" / f"{quant}.yaml").is_file():
        pytest.skip(f"quant={quant} is missing")
    overrides = TINY if experiment == "lm_bitnet158" else [*TINY, "--override", "quant=ternary"]
    assert lm_generate.main(["--untrained", "--experiment", experiment, *overrides, "--tokens", "8",
                             "--repeats", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "fresh float gpt" in out and "native kernels:" in out and "CPU:" in out
    assert "packed greedy text identical to the quantized (checkpoint) model's: True" in out
    assert re.search(r"\| float \(PyTorch\) \| [\d.]+ \| [\d.]+ \| 124,800 \(float32 state dict\) \| 1 \|", out)
    assert re.search(rf"\| packed \({quant}\) \| [\d.]+ \|", out)
    assert re.search(r"packed / float tokens/s: [\d.]+x", out)


def packed_sizes(experiment: str, tmp_path):
    """The size breakdown of a tiny untrained ``experiment`` packed to a file (its sizes and float model),
    checking that the parts add up to the file."""
    model, architecture, _ = lm_generate.untrained_model(experiment, [o for o in TINY if o != "--override"])
    path = save_packed(pack_model(model), tmp_path / "lm.safetensors", architecture=architecture)
    float_model = models.build_architecture(architecture)
    sizes = lm_generate.size_breakdown(path, float_model)
    assert sum(sizes["packed"].values()) == path.stat().st_size
    return sizes, float_model


def test_size_breakdown_splits_the_file_and_the_float32_state_dict(tmp_path):
    sizes, float_model = packed_sizes("lm_bitnet158", tmp_path)
    linears = [m for name, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and name != "head"]
    linear_floats = sum(m.weight.numel() + m.bias.numel() for m in linears)
    assert sizes["float32"][lm_generate.QUANTIZED] == 4 * linear_floats
    assert sum(sizes["float32"].values()) == 4 * sum(p.numel() for p in float_model.parameters())
    assert sizes["packed"][lm_generate.FLOAT_REST] == sizes["float32"][lm_generate.FLOAT_REST]  # kept float32
    # ternary codes at 2 bits plus float scales and biases: well under a quarter of the float32 linears
    assert sizes["packed"][lm_generate.QUANTIZED] < sizes["float32"][lm_generate.QUANTIZED] / 4


def test_size_breakdown_counts_8_bit_embeddings_and_head_apart(tmp_path):
    sizes, float_model = packed_sizes("lm_bitnet158_int8emb", tmp_path)
    tables = [float_model.tok_emb.weight, float_model.pos_emb.weight, float_model.head.weight]  # 256, 64, 256 rows
    assert sizes["float32"][lm_generate.EIGHT_BIT] == 4 * sum(w.numel() for w in tables)
    assert sizes["packed"][lm_generate.EIGHT_BIT] == sum(w.numel() + 4 * w.shape[0] for w in tables)  # codes + scales
    norms = sum(p.numel() for m in float_model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    assert sizes["packed"][lm_generate.FLOAT_REST] == sizes["float32"][lm_generate.FLOAT_REST] == 4 * norms
