"""Greedy text generation for the byte-level language model (``qat.models.gpt``) and its timing.

``generate_text(model, prompt, tokens)`` encodes the prompt as UTF-8 bytes, decodes `tokens` new
bytes greedily (``GPT.generate``: argmax, key/value cache while the text fits the context) and
returns the text with the time it took. Any model with that ``generate`` method works: the trained
quantized model, or the packed one ``qat.export.load_packed`` rebuilds from a file. The command line
is ``python -m qat.generate`` (``qat/generate/__main__.py``).

``time_generation(models, prompt, tokens, repeats)`` times several models side by side: after one
warm-up generation each, ``repeats`` rounds in which every model generates the same continuation in
turn (interleaved, so load on a shared machine hits them alike); each model's tokens per second is
that of its fastest round (the least disturbed), its median also reported.
"""
from __future__ import annotations

import statistics
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


@dataclass
class GenerationTiming:
    seconds: list[float]   # one generate call per round
    new_tokens: int
    text: str              # the (last round's) generated text, prompt included

    @property
    def best_tokens_per_second(self) -> float:
        return self.new_tokens / min(self.seconds)

    @property
    def median_tokens_per_second(self) -> float:
        return self.new_tokens / statistics.median(self.seconds)


def time_generation(models: dict[str, nn.Module], prompt: str, tokens: int, repeats: int = 5
                    ) -> dict[str, GenerationTiming]:
    """Greedy generation of `tokens` bytes after `prompt` by every model, interleaved (module docstring)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    for model in models.values():
        generate_text(model, prompt, min(tokens, 4))  # warm-up: thread pools, prepacked weights, allocations
    rounds: dict[str, list[Generation]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            rounds[name].append(generate_text(model, prompt, tokens))
    return {name: GenerationTiming([g.seconds for g in runs], tokens, runs[-1].text) for name, runs in rounds.items()}


__all__ = ["Generation", "GenerationTiming", "encode_prompt", "generate_text", "time_generation"]
