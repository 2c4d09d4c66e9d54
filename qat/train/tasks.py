"""What a run trains for, decided by its dataset's registry row (`DatasetSpec.task`): one object the
trainer, summary.json and `qat.train.report` ask instead of branching on the dataset.

  classification   logits [B, C], labels [B]:    loss = CE, metrics loss / acc1 / acc5 (`MetricSums`);
                   best.pt = highest validation top-1; summary: best_val_acc1, val_acc1, test_acc1/5.
  language_model   logits [B, T, V], targets [B, T]: loss = token-level CE, mean over the B T tokens;
                   metrics loss / bpb / ppl (`TokenMetricSums`: bits per byte = loss / ln 2 for byte
                   tokens); best.pt = lowest validation bits per byte; summary: best_val_bpb,
                   val_bpb, val_ppl, test_bpb, test_ppl. No distillation (distill must be none).

Export (`python -m qat.export`) asks the task for its inputs and its check of the packed model against
the quantized one (`input_spec`, `export_sample`, `export_check`):
  classification   8 random float inputs (C, H, W); check: identical top-1, max |logit difference|.
  language_model   the first 4 validation windows (int64 token ids, (block_size,)), random token ids
                   when the run's val text is not on this machine; check: identical greedy next byte
                   at every position, max |logit difference|, and both models' bits per byte on the
                   windows (when they are validation text).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qat.train.errors import ConfigError
from qat.train.metrics import MetricSums, TokenMetricSums


@dataclass
class ExportSample:
    """Inputs on which export compares the packed model with the quantized one."""
    inputs: torch.Tensor
    targets: torch.Tensor | None  # the true next tokens where the inputs are real text, else None
    source: str                   # what the inputs are, for the check's line ("8 random inputs")


@dataclass
class ExportCheck:
    passed: bool   # False: the packed model decides differently (export exits with status 1)
    text: str      # one line: the figures compared


def _max_difference(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((reference.float() - output.float()).abs().max())


class Classification:
    name = "classification"
    best_metric = "acc1"          # chooses best.pt on the validation split
    higher_is_better = True
    sample_unit = "images"        # the step log's train/<unit>_per_second
    progress_unit = "img"         # the progress line's <unit>/s
    #: (report column title, summary key) of the figures `qat.train.report` shows, and its plot's axis
    report_columns = (("best val top-1", "best_val_acc1"), ("test top-1", "test_acc1"))
    report_axis = "top-1 accuracy (%) (test, else best validation)"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def metric_sums(self, device):
        return MetricSums(device)

    def samples(self, targets: torch.Tensor) -> int:
        return targets.shape[0]

    def objective(self, distill_cfg: Any, model, num_classes: int, input_size, device, amp: bool):
        from qat.train.distill import build_objective

        return build_objective(distill_cfg, model, num_classes, input_size, device, amp)

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)

    def metrics_text(self, metrics: dict[str, float], split: str) -> str:
        text = f"{split} loss {metrics[f'{split}/loss']:.4f} acc1 {metrics[f'{split}/acc1']:.2f}"
        return text if split == "train" else text + f" acc5 {metrics[f'{split}/acc5']:.2f}"

    def summary_metrics(self, best: float | None, val_source: str | None, evaluation: dict) -> dict[str, Any]:
        return {"best_val_acc1": best, "val_source": val_source, "val_acc1": evaluation.get("val/acc1"),
                "test_acc1": evaluation.get("test/acc1"), "test_acc5": evaluation.get("test/acc5")}

    def headline(self, run: dict[str, Any]) -> float | None:
        """The figure a report plots for a run: test top-1, else best validation top-1."""
        return run.get("test_acc1") if run.get("test_acc1") is not None else run.get("best_val_acc1")

    def input_spec(self, data_cfg: Any) -> tuple[tuple[int, ...], torch.dtype | None]:
        """(one input's shape without batch dim, its dtype where it is not the model's) for a data config."""
        size = int(data_cfg.image_size)
        return (int(data_cfg.channels), size, size), None

    def export_sample(self, data_cfg: Any, count: int = 8) -> ExportSample:
        """`count` random N(0, 1) inputs, seeded (the check needs no data files)."""
        shape, _ = self.input_spec(data_cfg)
        inputs = torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))
        return ExportSample(inputs, None, f"{count} random inputs")

    def export_check(self, reference: torch.nn.Module, packed: torch.nn.Module, sample: ExportSample) -> ExportCheck:
        """Passes when the packed model's top-1 equals the quantized model's on every input."""
        with torch.inference_mode():
            expected, output = reference(sample.inputs), packed(sample.inputs)
        same = bool(torch.equal(expected.argmax(1), output.argmax(1)))
        return ExportCheck(same, f"max |logit difference| {_max_difference(expected, output):.3g} on "
                                 f"{sample.source}, identical top-1: {same}")


class _TokenCrossEntropy:
    """The language model's training objective (no distillation)."""

    def __init__(self, task: LanguageModel):
        self.task = task

    def student_forward(self):
        return contextlib.nullcontext()

    def __call__(self, logits, targets, inputs):
        return self.task.loss(logits, targets), {}

    def describe(self) -> None:
        return None


class LanguageModel(Classification):
    name = "language_model"
    best_metric = "bpb"
    higher_is_better = False
    sample_unit = "tokens"
    progress_unit = "tok"
    report_columns = (("best val bits/byte", "best_val_bpb"), ("test bits/byte", "test_bpb"))
    report_axis = "bits per byte (test, else best validation; lower is better)"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())

    def metric_sums(self, device):
        return TokenMetricSums(device)

    def samples(self, targets: torch.Tensor) -> int:
        return targets.numel()

    def objective(self, distill_cfg: Any, model, num_classes: int, input_size, device, amp: bool):
        if distill_cfg is not None and distill_cfg.get("name", "none") != "none":
            raise ConfigError(f"distill={distill_cfg.get('name')} is not available for language models; "
                              f"use distill=none")
        return _TokenCrossEntropy(self)

    def metrics_text(self, metrics: dict[str, float], split: str) -> str:
        return (f"{split} loss {metrics[f'{split}/loss']:.4f} bpb {metrics[f'{split}/bpb']:.4f} "
                f"ppl {metrics[f'{split}/ppl']:.3f}")

    def summary_metrics(self, best: float | None, val_source: str | None, evaluation: dict) -> dict[str, Any]:
        return {"best_val_bpb": best, "val_source": val_source, "val_loss": evaluation.get("val/loss"),
                "val_bpb": evaluation.get("val/bpb"), "val_ppl": evaluation.get("val/ppl"),
                "test_loss": evaluation.get("test/loss"), "test_bpb": evaluation.get("test/bpb"),
                "test_ppl": evaluation.get("test/ppl")}

    def headline(self, run: dict[str, Any]) -> float | None:
        return run.get("test_bpb") if run.get("test_bpb") is not None else run.get("best_val_bpb")

    def input_spec(self, data_cfg: Any) -> tuple[tuple[int, ...], torch.dtype | None]:
        return (int(data_cfg.block_size),), torch.long

    def export_sample(self, data_cfg: Any, count: int = 4) -> ExportSample:
        """The first `count` validation windows of the run's corpus; `count` seeded random token-id
        windows when its text is not on this machine (then no bits per byte)."""
        from qat.train.data import DatasetNotFoundError, build_data

        try:
            val = build_data(data_cfg).val
        except DatasetNotFoundError as error:
            (length,), _ = self.input_spec(data_cfg)
            inputs = torch.randint(0, int(data_cfg.num_classes), (count, length),
                                   generator=torch.Generator().manual_seed(0))
            return ExportSample(inputs, None, f"{count} random token windows ({error}; no bits per byte)")
        windows = [val[i] for i in range(min(count, len(val)))]
        inputs, targets = (torch.stack(part) for part in zip(*windows, strict=True))
        return ExportSample(inputs, targets, f"the first {len(windows)} {data_cfg.name} validation windows")

    def export_check(self, reference: torch.nn.Module, packed: torch.nn.Module, sample: ExportSample) -> ExportCheck:
        """Passes when the packed model's greedy next byte equals the quantized model's at every position;
        reports both models' bits per byte on validation windows."""
        with torch.inference_mode():
            expected, output = reference(sample.inputs), packed(sample.inputs)
        same = bool(torch.equal(expected.argmax(-1), output.argmax(-1)))
        text = (f"max |logit difference| {_max_difference(expected, output):.3g} on {sample.source}, "
                f"identical greedy next bytes: {same}")
        if sample.targets is not None:
            bpb = [float(self.loss(logits, sample.targets)) / math.log(2) for logits in (expected, output)]
            text += f"; bits per byte: quantized {bpb[0]:.4f}, packed {bpb[1]:.4f}"
        return ExportCheck(same, text)


TASKS = {task.name: task for task in (Classification(), LanguageModel())}


def get_task(name: str | None) -> Classification:
    """The task called `name` (None: classification, what summaries without a `task` key are)."""
    name = name or "classification"
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
