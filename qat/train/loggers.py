"""Run loggers: W&B (online, or offline when no API key), CSV files, or nothing.

All share one interface: log_step(step, metrics), log_epoch(epoch, step, metrics),
log_summary(summary, layer_rows), finish(). `build_logger(cfg.logger, ...)` picks one; ranks other
than 0 always get NullLogger.

W&B mode: `logger.mode` = online | offline | disabled | auto (default). auto honours an explicit
WANDB_MODE, else runs online when WANDB_API_KEY is set and offline otherwise, so a machine without
a key never prompts or waits; upload an offline run later with `wandb sync <run dir>/wandb/offline-*`.

Text lines (the model summary, epoch lines, resume / interrupt messages, progress lines off a
terminal) go to the `qat` logger (`console_logging()`), so Hydra's handlers print them once on the
console and write them to the run's `train.log`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

LOGGERS = ("wandb", "csv", "none")


def console_logging() -> logging.Logger:
    """The `qat` logger, at INFO unless a level was set for it.

    Where the application configured logging (Hydra: a console handler and the run's train.log on
    the root logger) the records propagate there and are shown once. Where nothing is configured
    (the library used directly) one stdout handler printing the bare message is attached, so the
    lines still show; it is attached once per process, however many runs follow.
    """
    logger = logging.getLogger("qat")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


class NullLogger:
    def log_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None: ...
    def log_summary(self, summary: dict[str, Any], layer_rows: list[dict]) -> None: ...
    def finish(self) -> None: ...


class CsvLogger(NullLogger):
    """steps.csv / epochs.csv (long format: step, epoch, metric, value) and layers.csv in the run dir.

    Rows are appended, so a run resumed into its own directory continues the same files. With
    `resume_step` set, rows of steps after it (logged by a run aborted past its last checkpoint,
    and about to be trained again) are dropped first, so each step appears once.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume_step = resume_step
        self.files = {}

    def _drop_rows_after_resume_step(self, path: Path) -> None:
        if self.resume_step is None or not path.is_file():
            return
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= self.resume_step]
        if len(kept) != len(rows):
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerows(kept)

    def _writer(self, name: str):
        if name not in self.files:
            self._drop_rows_after_resume_step(self.run_dir / name)
            handle = open(self.run_dir / name, "a", newline="")
            writer = csv.writer(handle)
            if handle.tell() == 0:
                writer.writerow(["step", "epoch", "metric", "value"])
            self.files[name] = (handle, writer)
        return self.files[name][1]

    def _write(self, name: str, step: int, epoch: Any, metrics: dict[str, float]) -> None:
        writer = self._writer(name)
        for key, value in metrics.items():
            writer.writerow([step, epoch, key, value])
        self.files[name][0].flush()

    def log_step(self, step, metrics):
        self._write("steps.csv", step, "", metrics)

    def log_epoch(self, epoch, step, metrics):
        self._write("epochs.csv", step, epoch, metrics)

    def log_summary(self, summary, layer_rows):
        if layer_rows:
            with open(self.run_dir / "layers.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(layer_rows[0]))
                writer.writeheader()
                writer.writerows(layer_rows)

    def finish(self):
        for handle, _ in self.files.values():
            handle.close()
        self.files = {}


def wandb_mode(requested: str) -> str:
    """The W&B mode for `logger.mode` (see the module docstring)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbLogger(NullLogger):
    def __init__(self, cfg: Any, run_dir: Path, config: dict, group: str, name: str, tags: list[str]):
        import wandb

        self.wandb = wandb
        mode = wandb_mode(cfg.get("mode", "auto"))
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.project, entity=cfg.get("entity"), group=group, name=name,
                              tags=tags, config=config, dir=str(run_dir), mode=mode,
                              job_type=cfg.get("job_type", "train"), reinit="finish_previous")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def log_step(self, step, metrics):
        self.run.log(metrics, step=step)

    def log_epoch(self, epoch, step, metrics):
        self.run.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in metrics.items()}}, step=step)

    def log_summary(self, summary, layer_rows):
        for key, value in summary.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                self.run.summary[key] = value
        if layer_rows:
            columns = list(layer_rows[0])
            table = self.wandb.Table(columns=columns,
                                     data=[[_table_cell(row.get(c)) for c in columns] for row in layer_rows])
            self.run.log({"model_summary": table})

    def finish(self):
        self.run.finish()


def _table_cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value, default=str)


def build_logger(cfg: Any, run_dir: Path, config: dict, group: str, name: str, tags: list[str],
                 is_main: bool, resume_step: int | None = None):
    """The logger named by `cfg.name` (NullLogger on ranks other than 0); `resume_step`: the step
    a resumed run continues from (see CsvLogger)."""
    if cfg.name not in LOGGERS:
        raise ValueError(f"unknown logger.name {cfg.name!r}; valid: {', '.join(LOGGERS)}")
    if not is_main or cfg.name == "none":
        return NullLogger()
    if cfg.name == "csv":
        return CsvLogger(run_dir, resume_step)
    return WandbLogger(cfg, run_dir, config, group, name, tags)
