"""A GPT-style causal language model (Radford et al. 2019, GPT-2's pre-norm block) for byte tokens.

    h_0 = E_tok[x_t] + E_pos[t]                                  (learned token and position embeddings)
    h_l = h_{l-1}' + MLP(LN(h_{l-1}')),  h_{l-1}' = h_{l-1} + Attn(LN(h_{l-1}))      l = 1..depth
    logits = W_head LN(h_depth)                                   ([B, T, vocab])

Attn is multi-head causal self-attention, softmax(q k^T / sqrt(d_head) + causal mask) v through
`F.scaled_dot_product_attention`, with one `qkv` Linear (width -> 3 width) and an output `proj`
Linear (``separate_qkv=True``: three Linears `q`, `k`, `v` (width -> width) instead of `qkv`, as
LLaMA's and so BitNet b1.58's attention has them: quantized, each then has its own absmean scale,
where the fused `qkv` shares one scale between queries, keys and values); MLP is
Linear(width -> mlp_ratio width), GELU, Linear(back). Initialisation as GPT-2: every weight
N(0, 0.02), the residual projections (attn.proj, mlp.fc2) N(0, 0.02 / sqrt(2 depth)), biases 0;
``scaled_residual_init=False`` gives the residual projections N(0, 0.02) too, as LLaMA's (and so
BitNet b1.58's) initialisation does. The scaling keeps a float residual stream's variance; an absmean
quantized weight's output scale is mean |W| whatever its init, but a latent weight 1/sqrt(2 depth)
smaller is that much smaller against the optimizer's steps (its codes flip that much more often).

Quantization: `qat.quantize_model` swaps the block Linears (qkv or q, k, v; proj, fc1, fc2); the embeddings are
not Linear and stay float unless the spec says `embeddings: int8` (8-bit rows, `layers.embedding`),
and the head is the model's last Linear, kept float by `keep_fp: [last]` (the LM experiments'
setting; `first` would name blocks.0.attn.qkv) or made 8-bit by `overrides: {last: {method: int8}}`
(lm_bitnet158_int8emb does both). Softmax and LayerNorms stay float.

`num_classes` is the vocabulary size; `in_channels` must be 1 (a token stream) and is taken only so
the builder has the registry's signature. `generate` decodes greedily with a key/value cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KeyValueCache:
    """One attention layer's keys and values of the positions decoded so far, for generation:
    buffers of ``capacity`` positions allocated at the first call and filled in place, so a new
    token costs a write of one position instead of a copy of all earlier ones (``torch.cat``)."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys = self.values = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, H, T, d] after the earlier positions; the keys and values of all
        positions so far (views of the buffers)."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"key/value cache: {end} positions, more than its capacity {self.capacity}")
        if self.keys is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, separate_qkv: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        if separate_qkv:
            self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, H, T, d] of `x` [B, T, W]."""
        batch, length, width = x.shape
        if hasattr(self, "qkv"):
            # [B, T, 3 W] -> views of qkv's output in two ops (at batch 1 each torch call costs
            # microseconds, a split and six views/transposes ten more per block)
            return self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(linear(x).view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                     for linear in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor, cache: KeyValueCache | None = None) -> torch.Tensor:
        """`cache` (generation): the keys and values of the earlier positions, to which this call's
        are appended. With earlier positions, `x` must be one position."""
        batch, length, width = x.shape
        q, k, v = self.queries_keys_values(x)
        causal = True
        if cache is not None:
            if cache.length:
                if length != 1:
                    raise ValueError("a cached attention call takes one new position at a time")
                causal = False  # the one new query sees every cached position
            k, v = cache.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and length > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


def train_dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module.drop(x)` while `module` trains; in eval mode dropout is the identity, and skipping the
    module call saves microseconds per call at batch 1 (generation)."""
    return module.drop(x) if module.training else x


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float, separate_qkv: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout, separate_qkv)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, mlp_ratio * width))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KeyValueCache | None = None) -> torch.Tensor:
        x = x + train_dropout(self, self.attn(self.ln1(x), cache))
        return x + train_dropout(self, self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, depth: int, width: int, heads: int, mlp_ratio: int = 4,
                 dropout: float = 0.0, scaled_residual_init: bool = True, separate_qkv: bool = False):
        super().__init__()
        for key, value in (("block_size", block_size), ("depth", depth), ("width", width), ("heads", heads),
                           ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gpt: {key} must be an int >= 1, got {value!r}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, separate_qkv) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self._init_weights(depth if scaled_residual_init else None)

    def _init_weights(self, depth: int | None) -> None:
        """N(0, 0.02) weights, the residual projections' divided by sqrt(2 depth) unless depth is None."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = depth is not None and name.endswith(("attn.proj", "mlp.fc2"))
                std = 0.02 / math.sqrt(2 * depth) if residual else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, caches: list[KeyValueCache] | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] of token ids `idx` [B, T] at positions start .. start + T - 1 (with
        `last_only`, [B, 1, vocab] of the last position only: what greedy decoding reads)."""
        length = idx.shape[1]
        if start + length > self.block_size:
            raise ValueError(f"gpt: {start + length} positions, more than block_size={self.block_size}")
        positions = torch.arange(start, start + length, device=idx.device)
        x = train_dropout(self, self.tok_emb(idx) + self.pos_emb(positions))
        for index, block in enumerate(self.blocks):
            x = block(x, caches[index] if caches is not None else None)
        return self.head(self.ln_f(x[:, -1:] if last_only else x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """`idx` [B, T] followed by `new_tokens` greedily decoded ones (argmax of the next-token logits).

        While the sequence fits the context, a key/value cache makes each new token cost one
        position; past block_size tokens the window slides, and since the position embeddings are
        absolute, each further token is computed afresh from the last block_size tokens."""
        out = idx
        caches: list[KeyValueCache] | None = None
        for _ in range(new_tokens):
            length = out.shape[1]
            if length > self.block_size:  # sliding window: no cache
                logits = self(out[:, -self.block_size:], last_only=True)
                caches = None
            elif caches is None:  # the prompt (or a window that just stopped sliding)
                caches = [KeyValueCache(self.block_size) for _ in self.blocks]
                logits = self(out, caches, last_only=True)
            else:
                logits = self(out[:, -1:], caches, start=length - 1, last_only=True)
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
            out = torch.cat([out, next_token], dim=1)
            if out.shape[1] > self.block_size:
                caches = None
        return out


def gpt(num_classes: int = 256, in_channels: int = 1, block_size: int = 256, depth: int = 4, width: int = 256,
        heads: int = 4, mlp_ratio: int = 4, dropout: float = 0.0, scaled_residual_init: bool = True,
        separate_qkv: bool = False) -> GPT:
    """A GPT of `depth` blocks of `width` (default: 4 x 256, context 256, 3.3M parameters for 256 tokens)."""
    if in_channels != 1:
        raise ValueError(f"gpt reads a token stream: in_channels must be 1, got {in_channels}")
    for key, value in (("scaled_residual_init", scaled_residual_init), ("separate_qkv", separate_qkv)):
        if not isinstance(value, bool):
            raise ValueError(f"gpt: {key} must be true or false, got {value!r}")
    return GPT(num_classes, block_size, depth, width, heads, mlp_ratio, dropout, scaled_residual_init, separate_qkv)
