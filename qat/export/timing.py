"""Side-by-side inference timing of a packed model against its float counterpart."""
from __future__ import annotations

import time

import torch
from torch import nn


def time_inference(models: dict[str, nn.Module], input_shape, batch_sizes=(1, 64), rounds: int = 10,
                   seed: int = 0) -> list[dict]:
    """Min-of-``rounds`` forward time (ms) of each model per batch size, candidates interleaved
    within each round so that load on a shared machine hits them alike. Returns one row per batch
    size: ``{"batch": b, "<name>_ms": t, ...}``."""
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=generator)
        best = {name: float("inf") for name in models}
        with torch.inference_mode():
            for model in models.values():
                model.eval()(x)  # warm-up: first-call allocations, thread pools, packed-weight caches
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(x)
                    best[name] = min(best[name], time.perf_counter() - start)
        rows.append({"batch": batch, **{f"{name}_ms": 1e3 * t for name, t in best.items()}})
    return rows
