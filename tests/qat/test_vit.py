"""The ViT (qat/models/vit.py): shapes, parameter count, what each quant= swaps, a trainer step from
the vit_* experiments, packed export and the recorded architecture."""
import pytest
import torch
from torch import nn

import layers
import qat
from conftest import trained_like
from qat import models
from qat.export import PackedLayer, load_packed, pack_model, read_packed, save_packed
from qat.models.vit import Attention
from qat.train import report
from qat.train.trainer import Trainer

TINY = {"depth": 2, "width": 32, "heads": 2, "mlp_ratio": 2.0}
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
EXPERIMENTS = ("fp", "bitnet158", "ternary", "bwn", "xnor")


def tiny_vit(**options):
    torch.manual_seed(0)
    return models.build("vit", num_classes=10, **{**TINY, **options})


def test_maps_images_to_class_logits_through_64_tokens():
    model = tiny_vit().eval()
    tokens = model.patch_embed(torch.randn(3, 3, 32, 32)).flatten(2).transpose(1, 2)
    assert tokens.shape == (3, 64, 32) and model.pos_embed.shape == (1, 64, 32)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    # other sizes, channels and patches follow the options
    assert tiny_vit(image_size=28, patch=7, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_default_parameter_count_is_the_documented_figure():
    model = models.build("vit", num_classes=10)
    width, depth = 256, 6
    block = 12 * width**2 + 13 * width          # qkv, proj, fc1, fc2 (weights and biases), 2 LayerNorms
    expected = depth * block + (48 * width + width) + 64 * width + 2 * width + (width * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 4_770_570
    assert len(model.blocks) == depth and model.blocks[0].attn.heads == 4
    assert model.blocks[0].mlp.fc1.out_features == 4 * width


def test_attention_is_multi_head_softmax_attention():
    """The block's attention equals the textbook formula computed by hand, head by head."""
    torch.manual_seed(0)
    attention = Attention(width=8, heads=2).eval()
    x = torch.randn(2, 5, 8)
    q, k, v = attention.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 2.0, dim=-1)  # sqrt(4) = 2
        heads.append(weights @ v[..., part])
    expected = attention.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ternary", "bwn", "xnor", "bitnet158", "bitnet"])
def test_quant_swaps_the_block_linears_only(method):
    model = qat.quantize_model(tiny_vit(), {"method": method, "keep_fp": ["first", "last"]})
    quantized = {n for n, m in model.named_modules() if isinstance(m, layers.QuantizedLayer)}
    assert quantized == {f"blocks.{b}.{name}" for b in range(2) for name in BLOCK_LINEARS}
    assert all(getattr(model.get_submodule(n), "method", None) == method for n in quantized)
    assert type(model.patch_embed) is nn.Conv2d and type(model.head) is nn.Linear  # first and last stay float
    assert all(type(m) is nn.LayerNorm for n, m in model.named_modules() if "norm" in n.split(".")[-1])


@pytest.mark.parametrize("method", EXPERIMENTS)
def test_experiment_trains_a_step_and_quantizes_what_the_recipe_says(method, compose, smoke_overrides, tmp_path):
    tiny = [f"model.{k}={v}" for k, v in TINY.items()]
    cfg = compose([f"+experiment=vit_{method}", *smoke_overrides, *tiny])
    assert (cfg.experiment_name, cfg.quant.method, cfg.model.name) == (f"vit_{method}", method, "vit")
    # the five share vit_fp's recipe: only quant differs
    recipe = compose(["+experiment=vit_fp", *smoke_overrides, *tiny])
    for group in ("model", "data", "optim", "sched", "trainer"):
        assert cfg[group] == recipe[group], group
    assert (cfg.optim.name, cfg.sched.name, list(cfg.quant.keep_fp)) == ("adamw", "cosine", ["first", "last"])
    trainer = Trainer(cfg, tmp_path)
    quantized = {n for n, m in trainer.model.named_modules() if isinstance(m, layers.QuantizedLayer)}
    expected = set() if method == "fp" else {f"blocks.{b}.{name}" for b in range(2) for name in BLOCK_LINEARS}
    assert quantized == expected
    before = trainer.model.blocks[0].mlp.fc1.weight.detach().clone()
    summary = trainer.fit()
    assert summary["steps"] == 1 and summary["model"] == "vit"
    assert not torch.equal(trainer.model.blocks[0].mlp.fc1.weight, before)
    markdown, _ = report.write_report(tmp_path, tmp_path / "report")  # python -m qat.train.report
    assert f"| vit | synthetic | {method} |" in markdown.read_text()


def test_the_recipes_defaults(compose):
    cfg = compose(["+experiment=vit_fp"])
    assert (cfg.data.name, cfg.data.val_split, cfg.data.augment, cfg.data.batch_size) == ("cifar10", 5000, "crop_flip",
                                                                                         128)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.warmup_epochs, cfg.trainer.epochs) == (1e-3, 0.05, 5, 100)
    assert (cfg.model.depth, cfg.model.width, cfg.model.heads, cfg.model.patch) == (6, 256, 4, 4)


@pytest.mark.parametrize("method", ["ternary", "xnor", "bitnet158"])
def test_packed_vit_reproduces_the_quantized_model_and_reloads_from_its_file(method, tmp_path):
    model = qat.quantize_model(tiny_vit(), {"method": method, "keep_fp": ["first", "last"]})
    model = trained_like(model, (3, 32, 32))
    packed = pack_model(model)
    assert sum(isinstance(m, PackedLayer) for m in packed.modules()) == 8
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), packed(x)
    # ternary: the unpacked weight is bit-identical; xnor: the exact integer accumulators of the +-1
    # token rows times alpha plus bias, in the training layer's float ops; bitnet158: the same ops on
    # the per-token int8 codes
    assert torch.equal(out, ref)
    path = save_packed(packed, tmp_path / "vit.safetensors")
    _, meta = read_packed(path)
    assert meta["architecture"] == {"name": "vit", "num_classes": 10, "in_channels": 3, **TINY}
    with torch.no_grad():
        assert torch.equal(load_packed(path)(x), out)


def test_build_records_the_architecture_and_rebuilds_it():
    model = models.build("vit", num_classes=7, in_channels=1, image_size=28, patch=7, **TINY)
    record = models.architecture_of(model)
    assert record == {"name": "vit", "num_classes": 7, "in_channels": 1, "image_size": 28, "patch": 7, **TINY}
    rebuilt = models.build_architecture(record)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert models.architecture_of(qat.quantize_model(model, {"method": "xnor"})) == record


@pytest.mark.parametrize("options, message", [
    ({"patch": 5}, "patch=5 must divide image_size=32"),
    ({"heads": 3}, "heads=3 must divide width=32"),
    ({"depth": 0}, "depth must be a positive int, got 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"mlp_ratio": 0}, "mlp_ratio must be > 0, got 0"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit(**options)


def test_summary_counts_attention_products_as_float_macs():
    model = qat.quantize_model(tiny_vit(), {"method": "xnor", "keep_fp": ["first", "last"]})
    s = qat.summary(model, (3, 32, 32))
    rows = {layer.name: layer for layer in s.layers}
    tokens, width, heads = 64, 32, 2
    # q k^T and weights @ v: tokens * tokens * head_dim each, per head
    attention = heads * tokens * tokens * 2 * (width // heads)
    assert rows["blocks.0.attn"].kind == "Attention" and rows["blocks.0.attn"].params == 0
    assert rows["blocks.0.attn"].macs_by_precision() == {"binary": 0, "low_bit_weight": 0, "float": attention}
    linears = tokens * (3 * width * width + width * width + 2 * width * 64)  # qkv, proj, fc1, fc2 per block
    patch_embed, head = tokens * width * 48, width * 10
    assert s.macs == {"binary": 2 * linears, "low_bit_weight": 0, "float": 2 * attention + patch_embed + head}
    names = [layer.name for layer in s.layers]
    assert names.index("blocks.0.norm1") < names.index("blocks.0.attn") < names.index("blocks.0.attn.qkv")
