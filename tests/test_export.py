"""Packed export reproduces the trained model: XNOR, BWN, ternary (and HQ, FDA) ResNet-18 and the
MNIST CNN; file round trip, sizes, and errors for wrong files."""
import os

import pytest
import torch
import torchvision
from torch import nn

import kernels
import qat
from qat.export import PackedConv2d, PackedLayer, load_packed, pack_model, read_packed, save_packed


def trained_like(model, input_shape):
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *input_shape))
    return model.eval()


@pytest.fixture(scope="module")
def resnets():
    out = {}
    for method in ("xnor", "bwn", "ternary", "hq", "fda"):
        torch.manual_seed(0)
        model = qat.quantize_model(torchvision.models.resnet18(num_classes=10), {"method": method, "keep_fp": ["first", "last"]})
        qat.set_progress(model, 1.0)
        out[method] = trained_like(model, (3, 32, 32))
    return out


@pytest.mark.parametrize("method", ["xnor", "bwn", "ternary", "hq", "fda"])
def test_packed_resnet18_reproduces_eval_outputs(resnets, method):
    model = resnets[method]
    x = torch.randn(3, 3, 32, 32)
    packed = pack_model(model, fold_batchnorm=False)
    assert sum(isinstance(m, PackedLayer) for m in packed.modules()) == 19
    with torch.no_grad():
        ref, out = model(x), packed(x)
    # float inputs: the unpacked weight is bit-identical; binary inputs: integer accumulator * alpha
    # + bias in the same float ops as the training layer
    assert torch.equal(out, ref)
    folded = pack_model(model)  # BatchNorm folded into the binary layers' epilogue
    with torch.no_grad():
        out_folded = folded(x)
    torch.testing.assert_close(out_folded, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_folded.argmax(1), ref.argmax(1))
    folded_bns = sum(type(m).__name__ == "FoldedBatchNorm" for m in folded.modules())
    assert folded_bns == (19 if method in ("xnor", "fda") else 0)
    # the packed model keeps no latent float weight of the quantized layers
    assert not any(isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d for m in packed.modules())


def test_binary_layer_accumulators_are_exact(resnets):
    """The integer accumulator of a packed XNOR conv equals F.conv2d of the +-1 tensors."""
    layer = resnets["xnor"].layer2[0].conv1
    packed = PackedConv2d.from_quantized(layer)
    x = torch.randn(2, layer.in_channels, 9, 9)
    acc = packed.binary_accumulator(x)
    signs = torch.where(x >= 0, 1.0, -1.0).double()
    w = torch.where(layer.weight >= 0, 1.0, -1.0).double()
    ref = torch.nn.functional.conv2d(signs, w, stride=layer.stride, padding=layer.padding)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), ref)


def test_mnist_cnn_packed_round_trip(tmp_path):
    from qat import models
    torch.manual_seed(0)
    model = models.build("mnist_cnn", num_classes=10, in_channels=1)
    model = qat.quantize_model(model, {"method": "xnor", "keep_fp": [], "overrides": {"first": {"method": "bwn"}}})
    model = trained_like(model, (1, 28, 28))
    packed = pack_model(model)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        ref, out = model(x), packed(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    path = save_packed(packed, tmp_path / "mnist.safetensors", architecture={"name": "mnist_cnn", "num_classes": 10, "in_channels": 1})
    loaded = load_packed(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


@pytest.mark.parametrize("method,planes", [("xnor", 1), ("ternary", 2)])
def test_file_size_matches_summary(resnets, tmp_path, method, planes):
    model = resnets[method]
    packed = pack_model(model, fold_batchnorm=False)
    path = save_packed(packed, tmp_path / "m.safetensors")
    tensors, meta = read_packed(path)
    summary = qat.summary(model, (3, 32, 32))
    weight_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(("weight_bits", "weight_sign", "weight_nonzero")))
    quantized_weights = sum(l.quantized_weights for l in summary.layers)
    # every swapped ResNet-18 conv has K % 64 == 0: bits are exactly 1 (2) per weight
    assert weight_bytes == quantized_weights * planes // 8
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers())
    size = os.path.getsize(path)
    assert summary.quantized_bytes + buffers <= size <= summary.quantized_bytes + buffers + 64 * 1024
    assert size < summary.fp32_bytes / (12 if planes == 1 else 8)
    folded = save_packed(pack_model(model), tmp_path / "folded.safetensors")
    assert os.path.getsize(folded) <= size


def test_packed_weight_bytes_are_one_thirty_second():
    w = torch.randn(128, 4096)
    assert kernels.pack_bits(w).numel() * 8 * 32 == w.numel() * 4
    sign, nonzero = kernels.pack_ternary(torch.sign(w))
    assert (sign.numel() + nonzero.numel()) * 8 * 16 == w.numel() * 4


def test_fda_must_finish_its_schedule_before_packing():
    model = qat.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)), {"method": "fda"})
    with pytest.raises(ValueError, match="set_progress"):
        pack_model(model)


def test_load_errors(tmp_path, resnets):
    with pytest.raises(FileNotFoundError, match="no packed model"):
        load_packed(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_packed(corrupt)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a packed model"):
        load_packed(other)
    path = save_packed(pack_model(resnets["xnor"]), tmp_path / "r.safetensors")
    with pytest.raises(ValueError, match="records no architecture"):
        load_packed(path)
    with pytest.raises(ValueError, match="does not match"):
        load_packed(path, model=torchvision.models.resnet18(num_classes=100))


def test_export_cli_from_a_training_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "train.py", "+experiment=mnist_bnn", "data=synthetic", "trainer.max_steps=2",
                    "logger=none", f"hydra.run.dir={run}"], cwd=root, check=True, capture_output=True, env=env)
    out = tmp_path / "model.safetensors"
    result = subprocess.run([sys.executable, "-m", "qat.export", str(run), "--out", str(out)],
                            cwd=root, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "identical top-1: True" in result.stdout and out.is_file()
    loaded = load_packed(out)
    assert sum(isinstance(m, PackedLayer) for m in loaded.modules()) == 5
    bad = subprocess.run([sys.executable, "-m", "qat.export", str(tmp_path / "nothing"), "--out", str(out)],
                         cwd=root, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
