"""Packed export reproduces the trained model: XNOR, BWN, ternary (and HQ, FDA) ResNet-18, the
MNIST CNN and grouped / depthwise convs; file round trip, recorded architecture, checksum, sizes,
and errors for wrong files."""
import json
import os

import pytest
import torch
import torchvision
from torch import nn

import kernels
import qat
from conftest import trained_like
from qat import models
from qat.export import PackedConv2d, PackedLayer, load_packed, pack_model, read_packed, save_packed


@pytest.fixture(scope="module")
def resnets():
    out = {}
    for method in ("xnor", "bwn", "ternary", "hq", "fda"):
        torch.manual_seed(0)
        # resnet18_imagenet is torchvision's ResNet-18, built (and so tagged) by the registry
        model = qat.quantize_model(models.build("resnet18_imagenet", num_classes=10),
                                   {"method": method, "keep_fp": ["first", "last"]})
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
    path = save_packed(packed, tmp_path / "mnist.safetensors",
                       architecture={"name": "mnist_cnn", "num_classes": 10, "in_channels": 1})
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
    weight_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                       if k.endswith(("weight_bits", "weight_sign", "weight_nonzero")))
    quantized_weights = sum(layer.quantized_weights for layer in summary.layers)
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
    path = save_packed(pack_model(resnets["xnor"]), tmp_path / "r.safetensors", architecture=False)
    with pytest.raises(ValueError, match="records no architecture"):
        load_packed(path)
    with pytest.raises(ValueError, match="does not match"):
        load_packed(path, model=torchvision.models.resnet18(num_classes=100))


def test_export_cli_from_a_training_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
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


class GroupedNet(nn.Module):
    """A float first conv, a groups=2 conv, a stride-2 depthwise conv (replicate padding), a
    depthwise 'same' conv, then a float head: the grouped geometries a packed conv must reproduce."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.depthwise = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12, bias=True, padding_mode="replicate")
        self.bn2 = nn.BatchNorm2d(12)
        self.depthwise_same = nn.Conv2d(12, 24, 3, padding="same", groups=12, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.bn1(self.grouped(self.stem(x)))
        x = self.bn3(self.depthwise_same(self.bn2(self.depthwise(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["xnor", "fda", "bwn", "ternary", "hq"])
def test_grouped_and_depthwise_convs_pack_exactly(method):
    torch.manual_seed(0)
    model = qat.quantize_model(GroupedNet(), {"method": method})
    qat.set_progress(model, 1.0)
    model = trained_like(model, (3, 10, 10))
    assert [m.groups for m in model.modules() if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d] == [2, 12, 12]
    x = torch.randn(4, 3, 10, 10)
    packed = pack_model(model, fold_batchnorm=False)
    assert sum(isinstance(m, PackedConv2d) for m in packed.modules()) == 3
    with torch.no_grad():
        ref, out = model(x), packed(x)
    assert torch.equal(out, ref)  # bit-identical, binary and float inputs alike
    folded = pack_model(model)
    with torch.no_grad():
        out_folded = folded(x)
    torch.testing.assert_close(out_folded, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_folded.argmax(1), ref.argmax(1))
    # every grouped layer's own output, too (the model's mean-pool could hide a wrong channel)
    for name in ("grouped", "depthwise", "depthwise_same"):
        layer, packed_layer = model.get_submodule(name), packed.get_submodule(name)
        h = torch.randn(2, layer.in_channels, 7, 7)
        with torch.no_grad():
            assert torch.equal(packed_layer(h), layer(h)), name


def test_grouped_binary_accumulator_is_the_exact_grouped_conv():
    layer = qat.quantize_model(nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False)),
                               {"method": "xnor", "keep_fp": []})[0]
    packed = PackedConv2d.from_quantized(layer)
    x = torch.randn(2, 8, 6, 6)
    acc = packed.binary_accumulator(x)
    signs = torch.where(x >= 0, 1.0, -1.0).double()
    w = torch.where(layer.weight >= 0, 1.0, -1.0).double()
    ref = torch.nn.functional.conv2d(signs, w, padding=1, groups=2)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), ref)


def xnor_mnist_cnn():
    torch.manual_seed(0)
    model = qat.quantize_model(models.build("mnist_cnn", num_classes=10, in_channels=1), {"method": "xnor"})
    return trained_like(model, (1, 28, 28))


def test_save_records_the_registry_architecture_by_itself(tmp_path):
    model = xnor_mnist_cnn()
    packed = pack_model(model)
    path = save_packed(packed, tmp_path / "m.safetensors")  # no architecture given
    _, meta = read_packed(path)
    assert meta["architecture"] == {"name": "mnist_cnn", "num_classes": 10, "in_channels": 1}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_packed(path)(x), packed(x))


def test_save_refuses_what_it_could_not_load(tmp_path):
    torch.manual_seed(0)
    custom = qat.quantize_model(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)), {"method": "xnor"})
    path = tmp_path / "custom.safetensors"
    with pytest.raises(ValueError, match=r"not built by qat\.models\.build.*architecture=\{'name'.*architecture=False"):
        save_packed(pack_model(custom), path)
    assert not path.exists()
    # a registry architecture that is not this model's: refused at save time, not at load time
    packed = pack_model(xnor_mnist_cnn())
    wrong = {"name": "mnist_cnn", "num_classes": 7, "in_channels": 1}
    with pytest.raises(ValueError, match=r"(?s)does not rebuild this model.*size mismatch for classifier.4.weight"):
        save_packed(packed, path, architecture=wrong)
    with pytest.raises(ValueError, match=r"(?s)does not rebuild this model.*unknown model 'resnet19'"):
        save_packed(packed, path, architecture={"name": "resnet19", "num_classes": 10})
    assert not path.exists()
    # the explicit opt-out: the file then loads with the float model handed over
    save_packed(pack_model(custom), path, architecture=False)
    rebuilt = load_packed(path, model=nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)))
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pack_model(custom)(x))


def flip_byte(path, tensor_name):
    """Invert one byte in the middle of ``tensor_name``'s data (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_size])[tensor_name]["data_offsets"]
    data[8 + header_size + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_catches_flipped_data_bytes(tmp_path):
    packed = pack_model(xnor_mnist_cnn())
    path = save_packed(packed, tmp_path / "m.safetensors")
    flip_byte(path, "features.4.weight_bits")
    with pytest.raises(ValueError, match=rf"{path}.* is corrupt.*checksum.*verify=False"):
        load_packed(path)
    with pytest.raises(ValueError, match="is corrupt"):
        read_packed(path)
    # the damage is real: skipping the check loads a model that computes something else
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(load_packed(path, verify=False)(x), packed(x))


def test_checksum_covers_metadata_and_is_required(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = save_packed(pack_model(xnor_mnist_cnn()), tmp_path / "m.safetensors")
    tensors, _ = read_packed(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["checksum"].startswith("sha256:") and len(metadata["checksum"]) == 7 + 64
    edited = dict(metadata, folded_batchnorms="[]")  # same tensors, metadata changed
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=edited)
    with pytest.raises(ValueError, match="is corrupt"):
        load_packed(tmp_path / "edited.safetensors")
    unsummed = {k: v for k, v in metadata.items() if k != "checksum"}
    save_file(tensors, str(tmp_path / "unsummed.safetensors"), metadata=unsummed)
    with pytest.raises(ValueError, match="records no checksum.*verify=False"):
        load_packed(tmp_path / "unsummed.safetensors")
    assert isinstance(load_packed(tmp_path / "unsummed.safetensors", verify=False), nn.Module)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_float_layers_after_a_binary_conv_see_the_training_models_tensors(channels_last):
    """The packed binary conv hands on its output in the training conv's memory format: a float
    conv after it (here a BWN conv) then runs the same algorithm and stays bit-identical, where an
    NHWC view would make oneDNN sum in another order."""
    torch.manual_seed(0)
    spec = {"method": "xnor", "keep_fp": [], "overrides": {"first": {"method": "bwn"}, "features.8": {"method": "bwn"}}}
    model = trained_like(qat.quantize_model(models.build("mnist_cnn", num_classes=10, in_channels=1), spec),
                         (1, 28, 28))
    packed = pack_model(model, fold_batchnorm=False)
    x = torch.randn(16, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer, packed_layer = model.features[4], packed.features[4]
    h = torch.randn(4, 32, 13, 13)
    h = h.contiguous(memory_format=torch.channels_last) if channels_last else h
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))
        ref, out = layer(h), packed_layer(h)
    assert out.stride() == ref.stride() and torch.equal(out, ref)
