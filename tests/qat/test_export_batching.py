"""qat.export.BatchSlices: a batch run in slices gives one call's outputs (up to float rounding)."""
from __future__ import annotations

import pytest
import torch

import qat
from kernels import native
from qat import models
from qat.export import BatchSlices, fuse_binary_chains, pack_model


@pytest.mark.parametrize("size", [1, 3, 8, 100])
def test_slices_give_the_outputs_of_one_call(size):
    torch.manual_seed(0)
    quantized = qat.quantize_model(models.build("mnist_cnn", num_classes=10, in_channels=1),
                                   {"method": "xnor", "keep_fp": ["first", "last"]}).eval()
    packed = pack_model(quantized)
    model = fuse_binary_chains(packed) if native.available() else packed
    x = torch.randn(10, 1, 28, 28)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.inference_mode():
        whole = model(x)
        calls.clear()
        sliced = BatchSlices(model, size)(x)
    # the float last layer's GEMM may round differently at another batch size; nothing else differs
    assert float((sliced - whole).abs().max()) <= 1e-5 * float(whole.abs().max())
    assert torch.equal(sliced.argmax(1), whole.argmax(1))
    assert max(calls) == min(size, 10) and sum(calls) == 10


def test_a_slice_size_below_one_is_refused():
    with pytest.raises(ValueError, match="size must be >= 1"):
        BatchSlices(torch.nn.Identity(), 0)
