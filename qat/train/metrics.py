"""Classification and language-model metrics kept as sums, so they all-reduce exactly across DDP ranks.

top-k accuracy = 100 * #{i : label_i in the k highest logits_i} / N;  loss = sum_i CE_i / N.
Language models (`TokenMetricSums`): the same loss per token, bits per byte and perplexity.
"""
from __future__ import annotations

import math

import torch


def correct_top_k(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Per k, the number of samples whose label is among the k highest logits (k capped at C)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


class MetricSums:
    """Running sums of loss, top-1 / top-5 hits and sample count, on one device.

    Kept as a float64 tensor [loss_sum, correct1, correct5, count] so `all_reduce` is one call and no
    host sync happens per batch.
    """

    def __init__(self, device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        correct1, correct5 = correct_top_k(logits.detach(), labels)
        batch = labels.shape[0]
        self.sums += torch.stack([loss.detach().double() * batch, correct1.double(),
                                  correct5.double(), torch.tensor(batch, dtype=torch.float64,
                                                                  device=self.sums.device)])

    def result(self, prefix: str) -> dict[str, float]:
        loss, correct1, correct5, count = self.sums.tolist()
        count = max(count, 1.0)
        return {f"{prefix}/loss": loss / count, f"{prefix}/acc1": 100 * correct1 / count,
                f"{prefix}/acc5": 100 * correct5 / count}


class TokenMetricSums:
    """Language-model metrics as sums: [loss_sum, token count], loss in nats per token.

    With tokens = bytes (qat.train.tokens): loss = sum_i CE_i / N, bits per byte = loss / ln 2,
    perplexity = exp(loss)."""

    def __init__(self, device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        count = targets.numel()
        self.sums += torch.stack([loss.detach().double() * count,
                                  torch.tensor(count, dtype=torch.float64, device=self.sums.device)])

    def result(self, prefix: str) -> dict[str, float]:
        loss, count = self.sums.tolist()
        loss /= max(count, 1.0)
        return {f"{prefix}/loss": loss, f"{prefix}/bpb": loss / math.log(2),
                f"{prefix}/ppl": math.exp(min(loss, 700.0))}
