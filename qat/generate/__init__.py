"""Greedy text generation for the byte-level language model (``qat.models.gpt``) and its timing.

``generate_text(model, prompt, tokens)`` encodes the prompt as UTF-8 bytes, decodes `tokens` new
bytes greedily (``GPT.generate``: argmax, key/value cache while the text fits the context) and
returns the text with the time it took. Any model with that ``generate`` method works: the trained
quantized model, or the packed one ``qat.export.load_packed`` rebuilds from a file. The command line
is ``python -m qat.generate`` (``qat/generate/__main__.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    text: str           # the prompt and the continuation (invalid UTF-8 shown as U+FFFD)
    continuation: str
    tokens: list[int]   # every byte, prompt included
    new_tokens: int
    seconds: float      # the generate call, prompt processing included

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def encode_prompt(prompt: str) -> torch.Tensor:
    data = prompt.encode("utf-8")
    if not data:
        raise ValueError("--prompt is empty: give at least one character to continue")
    return torch.tensor(list(data), dtype=torch.long).unsqueeze(0)


def generate_text(model: nn.Module, prompt: str, tokens: int) -> Generation:
    """Greedy continuation of `prompt` by `tokens` bytes (module docstring)."""
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"{type(model).__name__} is not a language model (it has no generate method); "
                         f"generate from a model=gpt run")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"--tokens must be an int >= 1, got {tokens!r}")
    idx = encode_prompt(prompt)
    model.eval()
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(idx, tokens)
        seconds = time.perf_counter() - started
    values = out[0].tolist()
    prompt_length = idx.shape[1]
    return Generation(text=bytes(values).decode("utf-8", errors="replace"),
                      continuation=bytes(values[prompt_length:]).decode("utf-8", errors="replace"),
                      tokens=values, new_tokens=tokens, seconds=seconds)


__all__ = ["Generation", "encode_prompt", "generate_text"]
