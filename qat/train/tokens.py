"""Byte-level token data for language models (`data=pydoc`, the `language_model` task).

Tokenizer: the UTF-8 bytes of the text, vocabulary 256 (token = byte value), no special tokens. A
model's loss in nats per token is therefore its loss per byte, and

    bits per byte = loss / ln 2,        perplexity (per byte) = exp(loss).

Training (`RandomWindows`): each item is a window of block_size + 1 consecutive bytes of the train
text at a uniformly random offset, split into input x = w[:-1] and target y = w[1:]. An "epoch" is
`data.windows_per_epoch` such windows; their offsets are drawn at the start of epoch e from a
generator seeded with (seed, e) (`resample`, called by `qat.train.loaders.TrainLoader`), so the
windows of a run are a pure function of (run seed, epoch): reproducible, and a run resumed mid-epoch
sees the same remaining windows.

Evaluation (`ContiguousWindows`): the validation / test text cut into consecutive non-overlapping
windows, window j = bytes [j T, j T + T] (T = block_size; the last target byte of a window is the
first input byte of the next), each byte predicted once with between 0 and T - 1 bytes of context;
`data.eval_windows` (null = all) keeps only the first N windows, so per-epoch evaluation has a
bounded cost. The figure is the mean over all predicted bytes.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB_SIZE = 256


def encode(text: str) -> torch.Tensor:
    """The tokens (uint8 byte values) of `text`'s UTF-8 encoding."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens) -> str:
    """The text of byte tokens (invalid UTF-8 sequences become U+FFFD)."""
    values = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


def _check(tokens: torch.Tensor, block_size: int, what: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"data.block_size must be an int >= 1, got {block_size!r}")
    if tokens.numel() < block_size + 1:
        raise ValueError(f"the {what} text has {tokens.numel()} bytes, fewer than data.block_size + 1 = "
                         f"{block_size + 1}; lower data.block_size or use a larger corpus")


class RandomWindows(Dataset):
    """`windows_per_epoch` random (x, y) windows of `tokens` per epoch (module docstring)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, windows_per_epoch: int, seed: int = 0):
        _check(tokens, block_size, "train")
        if isinstance(windows_per_epoch, bool) or not isinstance(windows_per_epoch, int) or windows_per_epoch < 1:
            raise ValueError(f"data.windows_per_epoch must be an int >= 1, got {windows_per_epoch!r}")
        self.tokens, self.block_size, self.windows_per_epoch = tokens, block_size, windows_per_epoch
        self.resample(seed, 0)

    def resample(self, seed: int, epoch: int) -> None:
        """Draw epoch `epoch`'s window offsets, uniform in [0, len - block_size - 1]."""
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 0x5EED)
        self.offsets = torch.randint(0, self.tokens.numel() - self.block_size, (self.windows_per_epoch,),
                                     generator=generator)

    def __len__(self) -> int:
        return self.windows_per_epoch

    def __getitem__(self, index: int):
        start = int(self.offsets[index])
        window = self.tokens[start:start + self.block_size + 1].long()
        return window[:-1], window[1:]


class ContiguousWindows(Dataset):
    """The consecutive non-overlapping (x, y) windows of `tokens`, at most `max_windows` (module docstring)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, max_windows: int | None = None, what: str = "eval"):
        _check(tokens, block_size, what)
        if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                        or max_windows < 1):
            raise ValueError(f"data.eval_windows must be null or an int >= 1, got {max_windows!r}")
        self.tokens, self.block_size = tokens, block_size
        count = (tokens.numel() - 1) // block_size
        self.count = count if max_windows is None else min(count, max_windows)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        start = index * self.block_size
        window = self.tokens[start:start + self.block_size + 1].long()
        return window[:-1], window[1:]
