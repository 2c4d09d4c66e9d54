"""The packed format of 8-bit embeddings and heads (``qat.export``: ``PackedEmbedding``, code ``sint8``):
a packed file computes exactly what the trained model computes, stores one byte per weight and one
float32 scale per row, and the summary counts those bytes."""
from __future__ import annotations

import os

import pytest
import torch

import layers
import qat
import qat.export
from qat import models
from qat.export import PackedEmbedding, PackedLinear
from qat.export.intcodes import pack_int_codes, unpack_int_codes

#: lm_bitnet158_int8emb's quantization spec (configs/experiment/lm_bitnet158_int8emb.yaml)
SPEC = {"method": "bitnet158", "keep_fp": [], "overrides": {"last": {"method": "int8"}}, "embeddings": "int8"}


def tiny_gpt(spec=SPEC, seed=0, **options):
    architecture = {"name": "gpt", "num_classes": 32, "in_channels": 1, "block_size": 8, "depth": 1, "width": 64,
                    "heads": 2, **options}
    torch.manual_seed(seed)
    model = qat.quantize_model(models.build_architecture(architecture), spec)
    with torch.no_grad():  # random weights of varied magnitude per row (not GPT's N(0, 0.02) init)
        for p in model.parameters():
            p.mul_(torch.rand(p.shape[0], *([1] * (p.dim() - 1))) * 4).add_(torch.randn_like(p) * 0.01)
    qat.set_progress(model, 1.0)
    return model.eval(), architecture


def test_signed_codes_round_trip_and_refuse_what_8_bits_cannot_hold():
    code = torch.randint(-128, 128, (5, 37)).float()
    packed = pack_int_codes(code, 8, signed=True)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 37)
    assert torch.equal(unpack_int_codes(packed, 8, 37, signed=True), code)
    for wrong in (code + 0.5, torch.full((1, 3), 128.0)):
        with pytest.raises(ValueError, match=r"not integers in \[-128, 127\]"):
            pack_int_codes(wrong, 8, signed=True)


def test_packed_file_gives_the_trained_models_logits_and_text_bit_for_bit(tmp_path):
    model, architecture = tiny_gpt()
    path = qat.export.save_packed(qat.export.pack_model(model), tmp_path / "lm.safetensors")
    loaded = qat.export.load_packed(path)
    assert isinstance(loaded.tok_emb, PackedEmbedding) and isinstance(loaded.pos_emb, PackedEmbedding)
    assert isinstance(loaded.head, PackedLinear) and loaded.head.spec.code == "sint8"
    idx = torch.randint(0, 32, (3, 8))
    with torch.no_grad():
        expected = model(idx)
        assert torch.equal(loaded(idx), expected)
        assert torch.equal(loaded(idx[:, :5], start=2), model(idx[:, :5], start=2))
        assert torch.equal(loaded.generate(idx[:1, :3], 9), model.generate(idx[:1, :3], 9))
    tensors, _ = qat.export.read_packed(path)
    for table, rows, width in (("tok_emb", 32, 64), ("pos_emb", 8, 64), ("head", 32, 64)):
        assert tensors[f"{table}.weight_codes"].dtype == torch.uint8
        assert tensors[f"{table}.weight_codes"].shape == (rows, width)  # one byte per weight
        assert tensors[f"{table}.scale"].dtype == torch.float32 and tensors[f"{table}.scale"].shape == (rows,)
    assert not any(name.endswith(".weight") for name in tensors if name.split(".")[0] in ("tok_emb", "pos_emb"))


def test_the_summary_counts_the_bytes_the_file_stores(tmp_path):
    model, _ = tiny_gpt()
    summary = qat.summary(model, (8,), input_dtype=torch.long)
    rows = {layer.name: layer for layer in summary.layers}
    assert (rows["tok_emb"].weight_bits, rows["tok_emb"].packed_bytes) == (8, 32 * 64 + 4 * 32)
    assert (rows["head"].weight_bits, rows["head"].packed_bytes) == (8, 32 * 64 + 4 * 32)
    path = qat.export.save_packed(qat.export.pack_model(model), tmp_path / "lm.safetensors")
    tensors, _ = qat.export.read_packed(path)
    # every width a multiple of 64: ternary planes are exactly 2 bits per weight, as the summary counts
    assert summary.quantized_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_the_default_gpt_packs_under_a_twelfth_of_float32(tmp_path):
    """Issue 12's size goal for lm_bitnet158_int8emb's model (4 x 256, vocabulary and context 256);
    lm_bitnet158's file, with float embeddings and head, is 1/8.2."""
    architecture = {"name": "gpt", "num_classes": 256, "in_channels": 1, "block_size": 256}
    sizes = {}
    for name, spec in (("int8", SPEC), ("float", {"method": "bitnet158", "keep_fp": ["last"]})):
        torch.manual_seed(0)
        model = qat.quantize_model(models.build_architecture(architecture), spec)
        qat.set_progress(model, 1.0)
        path = qat.export.save_packed(qat.export.pack_model(model.eval()), tmp_path / f"{name}.safetensors")
        sizes[name] = os.path.getsize(path)
    float32 = 4 * sum(p.numel() for p in models.build_architecture(architecture).parameters())
    assert sizes["int8"] <= float32 / 12 < sizes["float"]


def test_a_float_table_left_float_stays_in_the_file_as_is(tmp_path):
    model, _ = tiny_gpt({**SPEC, "embeddings": "fp"})
    assert type(model.tok_emb) is torch.nn.Embedding and not isinstance(model.tok_emb, layers.QuantizedEmbedding)
    path = qat.export.save_packed(qat.export.pack_model(model), tmp_path / "lm.safetensors")
    loaded = qat.export.load_packed(path)
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    idx = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
