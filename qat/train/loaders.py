"""DataLoaders for training (DistributedSampler, resumable mid-epoch) and sharded evaluation.

Training order is a pure function of (seed, epoch): DistributedSampler(shuffle=True, seed) with
set_epoch(epoch); the worker seeds come from a generator seeded with (seed, epoch). A resumed run can
therefore skip the batches an interrupted epoch had already done and see the same remaining batches.
A dataset whose items are drawn anew each epoch (`qat.train.tokens.RandomWindows`) has a
`resample(seed, epoch)` method, called before the epoch's loader is iterated (so workers, started
then, get the epoch's items), which keeps the same property.
"""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from qat.train.distributed import DistributedContext


class ResumableSampler(Sampler[int]):
    """DistributedSampler whose first `skip` samples of the current epoch can be skipped."""

    def __init__(self, dataset: Dataset, context: DistributedContext, seed: int, drop_last: bool):
        self.inner = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                        shuffle=True, seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


class TrainLoader:
    """A train DataLoader plus the bookkeeping to start epoch `e` at batch `b` reproducibly."""

    def __init__(self, dataset: Dataset, cfg, context: DistributedContext, seed: int, pin_memory: bool):
        self.seed, self.batch_size, self.dataset = seed, int(cfg.batch_size), dataset
        self.drop_last = bool(cfg.get("drop_last", True))
        self.sampler = ResumableSampler(dataset, context, seed, self.drop_last)
        self.generator = torch.Generator()
        workers = int(cfg.get("num_workers", 0))
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self.sampler,
                                 num_workers=workers, pin_memory=pin_memory, drop_last=self.drop_last,
                                 generator=self.generator, persistent_workers=False)
        self.steps_per_epoch = self._batches(len(self.sampler.inner))
        if self.steps_per_epoch < 1:
            raise ValueError(f"train set of {len(dataset)} images gives no batch of "
                             f"data.batch_size={self.batch_size} per process; lower the batch size")

    def _batches(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0):
        """An iterator over epoch `epoch`'s batches from batch `start_batch` on."""
        resample = getattr(self.dataset, "resample", None)
        if callable(resample):
            resample(self.seed, epoch)
        self.sampler.set_epoch(epoch, skip=start_batch * self.batch_size)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        return iter(self.loader)


def eval_loader(dataset: Dataset, cfg, context: DistributedContext, pin_memory: bool) -> DataLoader:
    """Evaluation loader over this rank's shard `rank::world_size` (no padding, no duplicates)."""
    if context.enabled:
        dataset = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    return DataLoader(dataset, batch_size=int(cfg.eval_batch_size), shuffle=False,
                      num_workers=int(cfg.get("num_workers", 0)), pin_memory=pin_memory)
