"""Export parity on a really trained network: the MNIST CNN trained a few hundred steps on real
MNIST (``../shared/data/MNIST/raw``), packed, and compared with the training model on 1,000 real
test images. Random weights and Gaussian inputs (``test_export.py``) leave BatchNorm statistics,
scales and sign ties far from what a trained network has; this is the case users export."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import qat
from conftest import SHARED_DATA
from qat import models
from qat.export import PackedLayer, load_packed, pack_model, save_packed

MNIST_RAW = SHARED_DATA / "MNIST" / "raw"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")
MEAN, STD = 0.1307, 0.3081  # qat.train.data's MNIST normalization
STEPS, BATCH, TEST_IMAGES = 300, 32, 1000

pytestmark = pytest.mark.skipif(not all((MNIST_RAW / f).is_file() for f in FILES),
                                reason=f"real MNIST not found: needs {', '.join(FILES)} in {MNIST_RAW}")


def read_idx(name: str, count: int) -> torch.Tensor:
    """The first ``count`` items of an idx file (big-endian header: magic, then one int32 per dim)."""
    with gzip.open(MNIST_RAW / name, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = np.frombuffer(data, dtype=">i4", count=dims, offset=4).tolist()
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
    return torch.from_numpy(values[:count].copy())


@pytest.fixture
def one_thread():
    """1 CPU thread (the budget this test is sized for), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist():
    def images(name, count):
        return ((read_idx(name, count).float() / 255 - MEAN) / STD).unsqueeze(1)
    train_count = STEPS * BATCH
    return (images(FILES[0], train_count), read_idx(FILES[1], train_count).long(),
            images(FILES[2], TEST_IMAGES), read_idx(FILES[3], TEST_IMAGES).long())


def train(spec: dict, mnist) -> torch.nn.Module:
    """The library used directly: Adam 1e-3 on batches of 32, schedules driven by set_progress."""
    x, y, _, _ = mnist
    torch.manual_seed(0)
    model = qat.quantize_model(models.build("mnist_cnn", num_classes=10, in_channels=1, activation="hardtanh"), spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(STEPS):
        qat.set_progress(model, step / STEPS)
        batch = slice(step * BATCH, (step + 1) * BATCH)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.set_progress(model, 1.0)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    {"method": "xnor", "keep_fp": [], "overrides": {"first": {"method": "bwn"}}},  # the mnist_bnn experiment
    {"method": "ternary"},
], ids=["xnor", "ternary"])
def test_packed_model_matches_the_trained_model_on_real_test_images(spec, mnist, tmp_path, one_thread):
    model = train(spec, mnist)
    _, _, test_x, test_y = mnist
    with torch.no_grad():
        reference = model(test_x)
    accuracy = (reference.argmax(1) == test_y).float().mean().item()
    print(f"{spec['method']}: {accuracy:.1%} top-1 on {TEST_IMAGES} real test images after {STEPS} steps")
    assert accuracy > 0.85, f"the model did not train ({accuracy:.1%} on {TEST_IMAGES} test images)"

    unfolded = pack_model(model, fold_batchnorm=False)
    folded = pack_model(model)
    assert sum(isinstance(m, PackedLayer) for m in folded.modules()) == (5 if spec["method"] == "xnor" else 3)
    path = save_packed(folded, tmp_path / "mnist.safetensors")
    loaded = load_packed(path)
    with torch.no_grad():
        out_unfolded, out_folded, out_loaded = unfolded(test_x), folded(test_x), loaded(test_x)
    # without folding: bit-identical logits (exact integer accumulators, the same float epilogue)
    assert torch.equal(out_unfolded, reference)
    # BatchNorm folded into the epilogue (kernels.fold_bn): rounding differences only, same top-1
    torch.testing.assert_close(out_folded, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_folded.argmax(1), reference.argmax(1))
    assert torch.equal(out_loaded, out_folded)
