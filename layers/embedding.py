"""A quantized embedding table: a drop-in ``nn.Embedding`` whose lookups read the quantized table.

    y = Q_w(E)[idx],    dL/dE = est'(E) * dL/dQ_w(E)   (identity STE: the gradient of the rows looked up)

with Q_w a weight quantizer of the method table (``layers.methods``) applied to the table E
[num_embeddings, embedding_dim] row by row: one row is one token's (or position's) vector, the
"output channel" of the quantizer's per-row scale. The methods an embedding takes are those whose
quantizer is defined per row and whose stored form ``qat.export`` can gather row by row
(``EMBEDDING_METHODS``: ``int8``, ``layers.int8``). ``qat.quantize_model`` swaps every exact
``nn.Embedding`` for one when the quantization spec says ``embeddings: int8``. A float
``nn.Embedding``'s state_dict loads as is; ``padding_idx`` keeps its meaning (that row gets no
gradient); ``max_norm`` (which rewrites the table during lookups) and sparse gradients are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import estimators

from .methods import get_method
from .quantized import computing_weights, mark_weight_side

#: methods a quantized embedding takes (per-row weight quantizers with a row-gatherable packed format)
EMBEDDING_METHODS = ("int8",)


def check_embedding_method(method: str) -> None:
    """ValueError unless ``method`` names an embedding method (or ``fp``, float tables)."""
    if method != "fp" and method not in EMBEDDING_METHODS:
        raise ValueError(f"embeddings: {method!r} is not a method for embedding tables; "
                         f"valid: fp (float tables), {', '.join(EMBEDDING_METHODS)}")


class QuantizedEmbedding(nn.Embedding):
    """``nn.Embedding`` arguments plus ``method`` (one of ``EMBEDDING_METHODS``) and ``estimator``
    (default: the method's); the lookup reads ``quantized_weight()`` (module docstring)."""

    input_bits = 32  # token ids are not quantized; for the summary's "A bits" column
    input_quantizer = None

    def __init__(self, *args, method: str = "int8", estimator=None, **kwargs):
        super().__init__(*args, **kwargs)
        if method not in EMBEDDING_METHODS:
            raise ValueError(f"QuantizedEmbedding: {method!r} is not a method for embedding tables; "
                             f"valid: {', '.join(EMBEDDING_METHODS)} (a float table is a plain nn.Embedding)")
        if self.max_norm is not None or self.sparse:
            raise ValueError("QuantizedEmbedding: max_norm and sparse=True are not supported "
                             "(max_norm rewrites the latent table during lookups); leave them at None / False")
        self.method_spec = get_method(method)
        self.weight_quantizer = self.method_spec.weight_quantizer(
            estimators.get(estimator or self.method_spec.default_estimator))

    @property
    def method(self) -> str:
        return self.method_spec.name

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @classmethod
    def from_float(cls, embedding: nn.Embedding, method: str, estimator=None) -> "QuantizedEmbedding":
        """The drop-in replacement of ``embedding`` (same arguments and device/dtype, weights copied)."""
        weight = embedding.weight
        new = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                  max_norm=embedding.max_norm, norm_type=embedding.norm_type,
                  scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse,
                  device=weight.device, dtype=weight.dtype, method=method, estimator=estimator)
        new.load_state_dict(embedding.state_dict())
        new.train(embedding.training)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The table the lookups read (differentiable w.r.t. the latent ``self.weight``)."""
        with computing_weights():
            return mark_weight_side(self.weight_quantizer(self.weight))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.quantized_weight(), self.padding_idx, None, self.norm_type,
                           self.scale_grad_by_freq, False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method}"
