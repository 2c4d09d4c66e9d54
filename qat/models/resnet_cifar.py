"""CIFAR-form ResNets: ResNet-18 (3x3 stem, no max-pool) and ResNet-20 (He et al. 2016, 16-32-64).

Stem conv -> BN -> `activation`, stages of two-conv blocks, global average pool, (BN1d), linear.
Three options wire the blocks (`block_layout` checks them, the one place that does):

``shortcut``: where the real-valued identity shortcuts go (``down`` is the downsample below):
    per_block (He et al.)   out = act(bn2(conv2(act(bn1(conv1(x))))) + down(x))
    per_conv  (Bi-Real Net, Liu et al. ECCV 2018; IR-Net's ResNet-20 1w1a code)
                            h   = act(bn1(conv1(x)) + down(x))
                            out = act(bn2(conv2(h)) + h)
  A binary conv sees only sign(h); per_conv adds each conv's real-valued input h to its output, so
  the real values pass from block to block past every sign() (Bi-Real's point).
``downsample``: the shortcut where the shape changes (stride s, C_in -> C_out; identity elsewhere):
    A        x[:, :, ::s, ::s] zero-padded to C_out channels, no parameters (He et al. option A)
    B        bn(conv1x1_stride_s(x))
    avgpool  bn(conv1x1(avgpool_s(x)))  (Bi-Real / ReActNet: the 1x1 conv sees every pixel, not
             one in s*s; `keep_fp: [downsample]` keeps it real-valued, as theirs is)
``block``:
    basic     the wirings above with act = `activation`
    reactnet  ReActNet's ResNet block (Liu et al. ECCV 2020, its Bi-Real-based ResNet code): per_conv
              with act = RPReLU (`activations.RPReLU`), each conv -> BN -> + shortcut -> RPReLU. The
              learnable shift before each binary conv's sign (RSign) is the activation quantizer of
              the `reactnet` quantization method, not part of the float model. `activation` is then
              the stem's only.

Defaults follow the papers: ResNet-20 downsamples with A (per_block and per_conv, as IR-Net's
1w1a code), ResNet-18 with B per block and avgpool per conv (Bi-Real); reactnet uses avgpool;
`shortcut` defaults to per_block, and to per_conv for reactnet (which has no other wiring).
Bi-Real's and ReActNet's ResNets are written as one-conv blocks; two of them are one two-conv block
here (the first carries the downsample), the same network.

Older configs and packed files spell the options ``shortcut: A | B`` (now ``downsample``) and
``bireal: true | false`` (now ``shortcut: per_conv | per_block``, keeping the downsample those
models had: A for ResNet-20, B for ResNet-18); both still build the same networks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat.models.activations import make_activation

BLOCKS = ("basic", "reactnet")
SHORTCUTS = ("per_block", "per_conv")
DOWNSAMPLES = ("A", "B", "avgpool")
LEGACY_SHORTCUTS = ("A", "B")  # the old spelling of `downsample`


@dataclass(frozen=True)
class BlockLayout:
    """How every block of a CifarResNet is wired (the module docstring gives the formulas)."""

    shortcut: str                   # per_block | per_conv
    downsample: str                 # A | B | avgpool
    activation: str | None = None   # the blocks' activation where it is not the model's (reactnet)


def block_layout(block: str, shortcut: str | None, downsample: str | None, default_downsample: dict[str, str],
                 bireal: bool | None = None) -> BlockLayout:
    """The checked layout of `block`/`shortcut`/`downsample` (None: the default).

    `default_downsample` maps "per_block", "per_conv" and "reactnet" to the model's downsample for
    that wiring. `bireal` and `shortcut` = "A"/"B" are the older spellings (module docstring).
    Raises ValueError naming the bad value and the valid ones.
    """
    if shortcut in LEGACY_SHORTCUTS:
        if downsample is not None:
            raise ValueError(f"shortcut={shortcut!r} is the old spelling of downsample={shortcut!r}; "
                             f"give only downsample (got also downsample={downsample!r})")
        shortcut, downsample = None, shortcut
    if bireal is not None:
        if not isinstance(bireal, bool):
            raise ValueError(f"bireal must be true or false, got {bireal!r} (it is the old spelling of "
                             f"shortcut: per_conv | per_block)")
        if shortcut is not None:
            raise ValueError(f"bireal is the old spelling of shortcut=per_conv; give only shortcut "
                             f"(got bireal={bireal!r}, shortcut={shortcut!r})")
        shortcut = "per_conv" if bireal else "per_block"
        downsample = downsample or default_downsample["per_block"]  # what bireal models were built with
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; valid: {', '.join(BLOCKS)}")
    if shortcut is None:
        shortcut = "per_conv" if block == "reactnet" else "per_block"
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
    if block == "reactnet" and shortcut != "per_conv":
        raise ValueError(f"block='reactnet' has a shortcut around every conv: shortcut must be 'per_conv' "
                         f"(or null), got {shortcut!r}")
    if downsample is None:
        downsample = default_downsample["reactnet" if block == "reactnet" else shortcut]
    if downsample not in DOWNSAMPLES:
        raise ValueError(f"unknown downsample {downsample!r}; valid: {', '.join(DOWNSAMPLES)}")
    return BlockLayout(shortcut, downsample, "rprelu" if block == "reactnet" else None)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, zero-pad the channels up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def make_downsample(kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The shortcut of a block from `in_channels` to `out_channels` at `stride` (`kind`: A | B |
    avgpool, see the module docstring); the identity when the shape does not change."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return OptionAShortcut(in_channels, out_channels, stride)
    projection = [nn.Conv2d(in_channels, out_channels, 1, stride if kind == "B" else 1, bias=False),
                  nn.BatchNorm2d(out_channels)]
    if kind == "avgpool" and stride > 1:
        # ceil_mode: an odd side gives ceil(H/s), as the stride-s 3x3 conv beside it (even sides:
        # the same as Bi-Real's AvgPool2d(2)); the partial window averages its valid pixels only.
        projection.insert(0, nn.AvgPool2d(stride, ceil_mode=True))
    return nn.Sequential(*projection)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with per-block or per-conv shortcuts (see the module docstring)."""

    def __init__(self, in_channels, out_channels, stride, activation, shortcut="per_block", downsample="B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = make_activation(activation, out_channels)
        self.per_conv = shortcut == "per_conv"
        self.downsample = make_downsample(downsample, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        if self.per_conv:
            out = self.act1(self.bn1(self.conv1(x)) + identity)
            return self.act2(self.bn2(self.conv2(out)) + out)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + identity)


class CifarResNet(nn.Module):
    """3x3 stem conv -> stages of BasicBlocks -> global average pool -> (BN1d) -> linear."""

    def __init__(self, widths, blocks_per_stage, num_classes, in_channels=3, activation="relu",
                 layout: BlockLayout = BlockLayout("per_block", "B"), bn_before_fc=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = make_activation(activation, widths[0])
        block_activation = layout.activation or activation
        stages, channels = [], widths[0]
        for index, (width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=False)):
            layer = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                layer.append(BasicBlock(channels, width, stride, block_activation, layout.shortcut,
                                        layout.downsample))
                channels = width
            stages.append(nn.Sequential(*layer))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn_fc = nn.BatchNorm1d(channels) if bn_before_fc else nn.Identity()
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool(self.layers(x)).flatten(1)
        return self.fc(self.bn_fc(x))


# The downsample each model uses for each wiring when `downsample` is not given.
RESNET18_DOWNSAMPLE = {"per_block": "B", "per_conv": "avgpool", "reactnet": "avgpool"}
RESNET20_DOWNSAMPLE = {"per_block": "A", "per_conv": "A", "reactnet": "avgpool"}


def resnet18_cifar(num_classes=10, in_channels=3, activation="relu", block="basic", shortcut=None,
                   downsample=None, bn_before_fc=False, bireal=None) -> CifarResNet:
    """ResNet-18, CIFAR form: 64-128-256-512 widths, 2 blocks each; B (1x1 projection) downsample
    per block, Bi-Real's avgpool one per conv."""
    layout = block_layout(block, shortcut, downsample, RESNET18_DOWNSAMPLE, bireal)
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, activation, layout,
                       bn_before_fc)


def resnet20(num_classes=10, in_channels=3, activation="relu", block="basic", shortcut=None,
             downsample=None, bn_before_fc=False, bireal=None) -> CifarResNet:
    """ResNet-20 (He et al.): 16-32-64 widths, 3 blocks each, option-A downsample by default."""
    layout = block_layout(block, shortcut, downsample, RESNET20_DOWNSAMPLE, bireal)
    return CifarResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, activation, layout, bn_before_fc)
