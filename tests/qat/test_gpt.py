"""The GPT language model (qat.models.gpt): shapes, causality, quantization layout, greedy generation."""
import itertools

import pytest
import torch
from torch import nn

import qat
from layers import QuantizedLayer
from qat import models
from qat.generate import generate_text


def tiny(**options):
    torch.manual_seed(0)
    config = dict(num_classes=256, in_channels=1, block_size=16, depth=2, width=32, heads=2)
    return models.build("gpt", **{**config, **options}).eval()


def test_default_size_is_a_few_million_parameters():
    model = models.build("gpt", num_classes=256, in_channels=1)
    # 4 blocks x (12 w^2 + 13 w) + token and position tables + final norm + head, w = 256, context 256
    assert sum(p.numel() for p in model.parameters()) == 4 * (12 * 256**2 + 13 * 256) + 3 * 256 * 256 + 2 * 256
    assert model(torch.zeros(1, 256, dtype=torch.long)).shape == (1, 256, 256)


def test_changing_a_later_token_leaves_earlier_logits_alone():
    model = tiny()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_quantization_swaps_block_linears_and_keeps_embeddings_and_head_float():
    model = qat.quantize_model(tiny(), {"method": "ternary", "keep_fp": ["last"]})
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    assert quantized == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert type(model.head) is nn.Linear and type(model.tok_emb) is nn.Embedding


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="in_channels must be 1"):
        models.build("gpt", num_classes=256, in_channels=3)
    with pytest.raises(ValueError, match="not divisible"):
        models.build("gpt", num_classes=256, in_channels=1, width=30, heads=4)


@pytest.mark.parametrize("scaled, residual_std", [(True, 0.02 / 8 ** 0.5), (False, 0.02)])
def test_residual_projection_init_is_gpt2s_or_unscaled(scaled, residual_std):
    model = tiny(width=128, depth=4, scaled_residual_init=scaled)
    for block in model.blocks:
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert abs(weight.std().item() - residual_std) < 0.05 * residual_std
        assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.001
    with pytest.raises(ValueError, match="scaled_residual_init must be true or false"):
        tiny(scaled_residual_init="no")


def test_separate_qkv_computes_the_fused_layers_function_and_quantizes_each_with_its_own_scale():
    fused, separate = tiny(), tiny(separate_qkv=True)
    separate.load_state_dict({**fused.state_dict(), **{
        f"blocks.{b}.attn.{name}.{kind}": part
        for b in range(2) for kind in ("weight", "bias")
        for name, part in zip("qkv", fused.state_dict()[f"blocks.{b}.attn.qkv.{kind}"].chunk(3), strict=True)}},
        strict=False)
    assert not any(hasattr(block.attn, "qkv") for block in separate.blocks)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(separate(x), fused(x), rtol=1e-5, atol=1e-6)
    model = qat.quantize_model(separate, {"method": "bitnet158", "keep_fp": ["last"]})
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"} <= quantized
    attention = model.blocks[0].attn
    with torch.no_grad():
        attention.k.weight.mul_(3.0)  # keys 3x larger: with one fused scale q's codes would change
        scales = [layer.quantized_weight().abs().max().item() for layer in (attention.q, attention.k)]
    assert scales[1] == pytest.approx(3 * scales[0], rel=0.2)
    with pytest.raises(ValueError, match="separate_qkv must be true or false"):
        tiny(separate_qkv="yes")


def reference_greedy(model, idx, steps):
    """Greedy decoding without the cache: the whole (last block_size) context every step."""
    for _ in range(steps):
        logits = model(idx[:, -model.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_cached_generation_equals_recomputing_and_is_deterministic():
    model = tiny()
    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    with torch.no_grad():
        out = model.generate(prompt, 20)     # runs past block_size = 16: the window slides
        assert torch.equal(out, reference_greedy(model, prompt, 20))
    assert torch.equal(out, tiny().generate(prompt, 20))
    first, second = generate_text(model, "Hello", 8), generate_text(model, "Hello", 8)
    assert first.tokens == second.tokens and first.text.startswith("Hello") and first.new_tokens == 8


def test_packed_ternary_gpt_generates_what_the_trained_model_does(tmp_path):
    from qat.export import load_packed, pack_model, save_packed

    model = qat.quantize_model(tiny(), {"method": "ternary", "keep_fp": ["last"]}).eval()
    for parameter in model.parameters():  # weights away from init, so the codes are not all one value
        parameter.data.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    qat.set_progress(model, 1.0)
    path = save_packed(pack_model(model), tmp_path / "gpt.safetensors")
    packed = load_packed(path)
    assert generate_text(packed, "Hello", 24).tokens == generate_text(model, "Hello", 24).tokens
    assert path.stat().st_size < sum(p.numel() for p in model.parameters()) * 4


@pytest.mark.parametrize("separate_qkv, input_norm", [(False, True), (True, True), (False, False)])
def test_packed_bitnet158_gpt_logits_equal_the_trained_models_bit_for_bit(tmp_path, separate_qkv, input_norm):
    """export -> load -> generate of a bitnet158 GPT: every decoding step's logits (prompt, cached
    single tokens, past block_size the sliding window) torch.equal to the quantized model's, on the
    native BitLinear where the engine is available (the path generation takes on CPU)."""
    from kernels import cpu_native, native
    from qat.export import load_packed, pack_model, save_packed
    from qat.export.packed import PackedLinear
    from qat.models.gpt import KeyValueCache

    spec = {"method": "bitnet158", "keep_fp": ["last"], "input_norm": input_norm}
    model = qat.quantize_model(tiny(separate_qkv=separate_qkv), spec).eval()
    for parameter in model.parameters():
        parameter.data.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    qat.set_progress(model, 1.0)
    packed = load_packed(save_packed(pack_model(model), tmp_path / "gpt.safetensors"))

    def greedy_logits(m, prompt, steps):  # GPT.generate's decoding, keeping each step's logits
        logits_seen, out, caches = [], prompt, None
        with torch.inference_mode():
            for _ in range(steps):
                length = out.shape[1]
                if length > m.block_size:
                    logits, caches = m(out[:, -m.block_size:], last_only=True), None
                elif caches is None:
                    caches = [KeyValueCache(m.block_size) for _ in m.blocks]
                    logits = m(out, caches, last_only=True)
                else:
                    logits = m(out[:, -1:], caches, start=length - 1, last_only=True)
                logits_seen.append(logits)
                out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                caches = None if out.shape[1] > m.block_size else caches
        return out, logits_seen

    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    (want, want_logits), (got, got_logits) = greedy_logits(model, prompt, 20), greedy_logits(packed, prompt, 20)
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_logits, want_logits, strict=True))
    # not degenerate: the decoding steps' logits are not all one vector
    assert any(not torch.equal(a, b) for a, b in itertools.pairwise(want_logits))
    with torch.inference_mode():
        assert torch.equal(packed.generate(prompt, 20), want)
        assert torch.equal(packed(want[:, -16:]), model(want[:, -16:]))
    if native.available():
        linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
        assert linears and all(isinstance(m._native, cpu_native.TernaryI8Linear) for m in linears)
