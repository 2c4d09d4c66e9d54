"""The int8 method (``layers.int8``: per-row symmetric absmax int8 weights) and the quantized embedding
table (``layers.embedding``): the formula against a float64 transcription, the straight-through
gradient, and the swap (``quant.embeddings``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import estimators
import layers
import qat
from layers.int8 import AbsMaxInt8Weight


def float64_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The docstring's formula in float64, row by row: s_r = max(max_j |W_rj|, 1e-5) / 127,
    c = Clip(round(W / s_r), -128, 127), W_q = s_r c."""
    rows = w.double().reshape(w.shape[0], -1)
    steps = torch.clamp(rows.abs().max(dim=1, keepdim=True).values, min=1e-5) / 127
    codes = torch.clamp(torch.round(rows / steps), -128, 127)
    return codes.reshape(w.shape), steps.reshape(-1), (codes * steps).reshape(w.shape)


def random_weight(shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=generator)
    w[1] = 0.0  # an all-zero row: the eps floor, codes 0
    return w


@pytest.mark.parametrize("shape", [(7, 33), (6, 3, 3, 3), (50, 16)])
def test_codes_steps_and_weight_follow_the_float64_formula(shape):
    w = random_weight(shape)
    quantizer = AbsMaxInt8Weight(estimators.get("identity"))
    codes, steps = quantizer.codes(w)
    ref_codes, ref_steps, ref_weight = float64_reference(w)
    assert torch.equal(codes.double(), ref_codes)
    # one float32 division of float32 values = the float64 quotient rounded once to float32
    assert torch.equal(steps, ref_steps.float())
    w_q = quantizer(w)
    assert torch.equal(w_q, codes * steps.view(-1, *([1] * (len(shape) - 1))))  # one rounding per element
    torch.testing.assert_close(w_q.double(), ref_weight, rtol=2 ** -23, atol=0)
    rows = codes.reshape(shape[0], -1).abs().amax(dim=1)
    assert rows[1] == 0 and bool((rows[[0, *range(2, shape[0])]] == 127).all())  # symmetric: never -128
    assert torch.equal(steps[1], torch.tensor(1e-5 / 127, dtype=torch.float32))


def test_the_head_and_the_table_get_the_straight_through_gradient():
    torch.manual_seed(0)
    head = layers.LAYER_CLASSES[("int8", nn.Linear)](12, 5, bias=True)
    x = torch.randn(3, 4, 12, requires_grad=True)
    g = torch.randn(3, 4, 5)
    (head(x) * g).sum().backward()
    w_q = head.quantized_weight().detach()
    assert not torch.equal(w_q, head.weight.detach())  # the quantizer does change the weight
    reference = w_q.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref, reference, head.bias.detach()) * g).sum().backward()
    assert torch.equal(head.weight.grad, reference.grad)  # dL/dW = dL/dW_q: identity STE, scale constant
    assert torch.equal(x.grad, x_ref.grad)

    table = layers.QuantizedEmbedding(10, 6, padding_idx=0)
    idx = torch.tensor([[0, 3, 3, 9], [1, 3, 0, 2]])
    g = torch.randn(2, 4, 6)
    (table(idx) * g).sum().backward()
    reference = table.quantized_weight().detach().clone().requires_grad_()
    (F.embedding(idx, reference, padding_idx=0) * g).sum().backward()
    assert torch.equal(table.weight.grad, reference.grad)
    assert torch.equal(table.weight.grad[0], torch.zeros(6))  # padding row: no gradient
    assert torch.equal(table.weight.grad[4], torch.zeros(6))  # a row not looked up: no gradient
    assert table.weight.grad[3].abs().sum() > 0


def test_the_table_reads_the_quantized_rows_and_loads_a_float_state_dict():
    torch.manual_seed(0)
    float_table = nn.Embedding(9, 5)
    table = layers.QuantizedEmbedding(9, 5)
    table.load_state_dict(float_table.state_dict())
    idx = torch.tensor([4, 0, 8])
    codes, steps = table.weight_quantizer.codes(table.weight)
    assert torch.equal(table(idx), (codes * steps.unsqueeze(1))[idx])
    assert table.weight_bits == 8 and table.method == "int8"
    with pytest.raises(ValueError, match="max_norm"):
        layers.QuantizedEmbedding(9, 5, max_norm=1.0)
    with pytest.raises(ValueError, match="not a method for embedding tables"):
        layers.QuantizedEmbedding(9, 5, method="ternary")


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)

    def forward(self, idx):
        return self.head(self.body(self.tok(idx)))


def test_quantize_model_swaps_embeddings_only_when_asked():
    default = qat.quantize_model(TinyLM(), {"method": "bitnet158", "keep_fp": ["last"]})
    assert type(default.tok) is nn.Embedding and type(default.head) is nn.Linear  # today's behaviour
    model = qat.quantize_model(TinyLM(), {"method": "bitnet158", "keep_fp": [], "embeddings": "int8",
                                          "overrides": {"last": {"method": "int8"}}})
    assert isinstance(model.tok, layers.QuantizedEmbedding) and model.head.method == "int8"
    assert model.body.method == "bitnet158"
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 16)
    with pytest.raises(ValueError, match="not a method for embedding tables; valid: fp"):
        qat.quantize_model(TinyLM(), {"method": "bitnet158", "embeddings": "ternary"})
