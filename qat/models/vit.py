"""A Vision Transformer (Dosovitskiy et al. 2021) for small images such as CIFAR-10's 32x32.

    x        (B, C, H, W)
    tokens   = PatchEmbed(x) + pos           PatchEmbed: Conv2d(C, width, patch, stride=patch);
                                             (H/patch)*(W/patch) tokens (64 at patch 4 on 32x32),
                                             pos: a learned (1, tokens, width) embedding
    tokens   = tokens + Attn(LN1(tokens))    per block (pre-norm, as ViT):
    tokens   = tokens + MLP(LN2(tokens))       Attn = proj(softmax(q k^T / sqrt(d_head)) v) over
                                               `heads` heads, q, k, v = split(qkv(.)),
                                               MLP = fc2(GELU(fc1(.))), fc1: width -> mlp_ratio*width
    logits   = head(mean_tokens(LN(tokens)))  global average pooling over the tokens, then a linear

Global average pooling of the tokens, not a class token: on small data it trains at least as well
(Beyer et al. 2022, "Better plain ViT baselines for ImageNet-1k", use it), it leaves 64 tokens
instead of 65, and every token then reaches the head through the same quantized blocks.

Quantization (``qat.quantize_model``) swaps modules by type, so which parts can be quantized follows
from how they are written: the block linears ``qkv``, ``proj``, ``fc1``, ``fc2`` are ``nn.Linear``;
softmax is inside ``F.scaled_dot_product_attention`` and LayerNorm is ``nn.LayerNorm``, neither of
which is swapped, so both stay float. The patch embedding is the first Conv2d/Linear in registration
order and the head the last, so the default ``keep_fp: [first, last]`` keeps them float.

Defaults (depth 6, width 256, 4 heads of 64, MLP ratio 4) give 4,770,570 parameters with a 10-way
head: 6 * (12 * 256^2 + 13 * 256) in the blocks, 48 * 256 + 256 patch embedding, 64 * 256 positions,
2 * 256 final norm, 256 * 10 + 10 head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(concat_h softmax(q_h k_h^T / sqrt(d)) v_h)``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, width)))


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))`` with an ``mlp_ratio`` times wider hidden layer."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding + learned positions -> pre-norm blocks -> LayerNorm -> token mean -> linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch: int, depth: int, width: int,
                 heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        # registration order matters: patch_embed is the model's first swappable layer, head its last
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, width))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT's initialisation (timm / big_vision): truncated-normal(0.02) positions, Xavier-uniform
        linears with zero biases, the patch embedding initialised as the linear map it is."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (``qat.latent.param_groups``): the position
        embedding, as timm's and big_vision's ViT recipes do (decay would pull it towards zero)."""
        return {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, tokens, width)
        tokens = self.blocks(self.pos_drop(tokens + self.pos_embed))
        return self.head(self.norm(tokens).mean(dim=1))


def vit(num_classes=10, in_channels=3, image_size=32, patch=4, depth=6, width=256, heads=4, mlp_ratio=4.0,
        dropout=0.0) -> VisionTransformer:
    """ViT for ``image_size`` x ``image_size`` inputs (module docstring); about 4.8M parameters by default."""
    for name, value in (("image_size", image_size), ("patch", patch), ("depth", depth), ("width", width),
                        ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"vit: {name} must be a positive int, got {value!r}")
    if image_size % patch:
        raise ValueError(f"vit: patch={patch} must divide image_size={image_size}")
    if width % heads:
        raise ValueError(f"vit: heads={heads} must divide width={width}")
    if not mlp_ratio > 0:
        raise ValueError(f"vit: mlp_ratio must be > 0, got {mlp_ratio!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"vit: dropout must be in [0, 1), got {dropout!r}")
    return VisionTransformer(num_classes, in_channels, image_size, patch, depth, width, heads, mlp_ratio, dropout)
