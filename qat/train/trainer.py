"""The training loop behind `train.py`: config in, trained model, checkpoints and summary.json out.

One run = build data -> float model -> `qat.quantize_model` -> [trainer.init_from: another run's
weights, qat.train.init_from] -> optimizer (`qat.train.optim.optimizer_for`: latent binary weights
without weight decay, `qat.latent.param_groups`; or Bop for binary weights) -> per-step schedule ->
epochs of
  set_progress(step / total_steps) -> forward (bf16 autocast on CUDA) -> loss (cross-entropy, or
  distillation from a teacher: qat.train.distill; for a language model the token-level
  cross-entropy, qat.train.tasks) -> backward -> [clip the global gradient norm to
  trainer.grad_clip] -> step ->
  clip latent weights -> log
with `trainer.act_compression` (none | exact | int8 | int4 | int2, qat.act_compression) compressing
what the forward saves for backward, evaluation (loss, top-1, top-5; loss, bits per byte and
perplexity for a language model: the dataset row's task, qat.train.tasks; a multi-bit model at every
width, its BatchNorm statistics calibrated first: qat.train.multibit) on validation and test after
every epoch, `last.pt` / `best.pt` checkpoints, W&B / CSV logging, and `summary.json` at the end
(also after max_steps or Ctrl-C).

Progress. Step s (0-based) trains at p = s / total_steps, total_steps = epochs x steps per epoch:
max_steps only stops the run, it never changes p, the lr schedule or anything else of the first
max_steps steps. Before each evaluation p is set to step / total_steps, the value the next step
would set anyway (so evaluating changes nothing of the trajectory, HQ's reinitialisation
included): the evaluated, checkpointed network is the one the run has reached. At the end of the
planned run that is exactly 1.0, so progress-driven modules (FDA's noise weight, HQ's sparsity)
are at their end values there; a run stopped early by max_steps is evaluated at its real progress,
so its evaluations and checkpoints equal those of the uncapped run at the same step.

summary.json describes the checkpoint a run can be continued from (last.pt; after a second
Ctrl-C, the one saved before it) and the trained network's size (qat.summary at the end; HQ's
sparsity grows while training). On resume, settings that differ from the checkpoint's config are
warned about and recorded (`resume_config_changes`). Text lines go to the `qat` logger
(qat.train.loggers.console_logging), progress to qat.train.run_progress.RunProgress.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import qat
import qat.latent
from qat import models
from qat.train import checkpoint as ckpt
from qat.train import distributed
from qat.train.allocator import HUGE_PAGES_TUNABLE, malloc_huge_pages, return_freed_memory
from qat.train.config import ConfigError, as_path, to_plain, validate
from qat.train.data import build_data
from qat.train.diagnostics import LayerDiagnostics
from qat.train.init_from import init_from
from qat.train.interrupt import DeferredInterrupt, StopRequested
from qat.train.loaders import TrainLoader, eval_loader
from qat.train.loggers import build_logger, console_logging
from qat.train.multibit import Widths, calibration_inputs
from qat.train.optim import build_scheduler, optimizer_for, step_metrics
from qat.train.run_progress import RunProgress
from qat.train.tasks import finite_or_none, get_task

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0           # completed epochs
    step: int = 0            # completed optimizer steps
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch resume)
    best_val: float = -math.inf  # the task's best validation figure (top-1; bits per byte: starts at +inf)
    train_seconds: float = 0.0


@dataclass
class SavedPoint:
    """What the newest last.pt this run can be continued from holds (the resumed checkpoint until
    this run saves one): its path, the training state in it and the evaluation that preceded it."""
    path: Path
    state: TrainState
    evaluation: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def estimator_label(estimator: Any, method: str) -> str:
    """The estimator's registry name: the method's default for None (`none` for fp), else the name
    of a string or a mapping {name: ...}."""
    if estimator is None:
        from layers import get_method

        return "none" if method == "fp" else get_method(method).default_estimator
    if isinstance(estimator, dict):
        return str(estimator.get("name", "custom"))
    return str(estimator)


def summary_facts(model_summary) -> dict[str, Any]:
    facts = {}
    for key in ("params", "fp32_bytes", "quantized_bytes", "compression", "binary_mac_share",
                "entropy_coded_bytes"):
        value = getattr(model_summary, key, None)
        facts[key] = value.item() if torch.is_tensor(value) else value
    return facts


def layer_rows(model_summary) -> list[dict]:
    try:
        as_dict = model_summary.to_dict()
    except AttributeError:
        return []
    rows = as_dict.get("layers", []) if isinstance(as_dict, dict) else []
    return [row for row in rows if isinstance(row, dict)]


class Trainer:
    """Holds everything one run builds; `fit()` trains and returns the summary dict."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        validate(cfg)
        act_mode, act_overrides = act_compression_settings(cfg)
        console_logging()
        log_interval = cfg.trainer.get("progress_log_interval", 30.0)
        if isinstance(log_interval, bool) or not isinstance(log_interval, (int, float)) or not log_interval >= 0:
            raise ConfigError(f"trainer.progress_log_interval must be a number of seconds >= 0, got {log_interval!r}")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.context = distributed.setup(cfg.get("device", "auto"))
        self.device = self.context.device
        if cfg.trainer.get("threads"):
            torch.set_num_threads(int(cfg.trainer.threads))
        seed_everything(int(cfg.seed))
        self.method = cfg.quant.method
        self.w_bits, self.a_bits = qat.method_bits(self.method)

        self.data = build_data(cfg.data)
        # What the run trains for (qat.train.tasks), decided by the dataset's registry row.
        self.task = get_task(self.data.task)
        self.grad_clip = grad_clip_setting(cfg)
        float_model = models.build_architecture(
            models.architecture(cfg.model, self.data.num_classes, self.data.channels))
        self.model = qat.quantize_model(float_model, to_plain(cfg.quant))
        # Multi-bit models: the losses of every trained width summed, every width evaluated, BatchNorm
        # statistics per width (qat.train.multibit); before init_from, so that the model it loads into
        # has every key (running_mean_<w>) a per-width run's checkpoint holds.
        self.widths = Widths.from_config(cfg.get("multibit"), self.model)
        # trainer.init_from: another run's weights, before anything reads them (a resumed run's
        # checkpoint holds them already, and the record of where they came from).
        self.init_record: dict[str, Any] | None = None
        if cfg.trainer.get("init_from") and not cfg.trainer.get("resume"):
            self.init_record = init_from(self.model, as_path(cfg.trainer.init_from),
                                         strict=cfg.trainer.get("init_strict", True))
        # The start-of-run figures; fit() reports those of the trained network (HQ prunes while training).
        self.model_summary = qat.summary(self.model, self.data.input_size, self.data.input_dtype)
        self.model.to(self.device)
        # Compressed saved-for-backward tensors (qat.act_compression); `none` without overrides
        # installs nothing, so the default run is exactly PyTorch's.
        self.act_compression = None
        self.act_saved_bytes: dict | None = None
        if act_mode != "none" or act_overrides:
            try:
                self.act_compression = qat.set_act_compression(self.model, act_mode, act_overrides)
            except ValueError as error:
                raise ConfigError(f"trainer.act_compression_overrides: {error}") from None
        # glibc keeps freed activation buffers resident unless told otherwise (qat.train.allocator);
        # a trade of step time for peak memory, so only on request
        release = cfg.trainer.get("return_freed_memory", False) and self.device.type == "cpu"
        self.returns_freed_memory = bool(release) and return_freed_memory()
        self.malloc_huge_pages = malloc_huge_pages()
        if self.returns_freed_memory and not self.malloc_huge_pages:
            log.warning("trainer.return_freed_memory=true without huge pages: every large allocation faults in "
                        "4 KiB pages and steps slow down; start the run with GLIBC_TUNABLES=%s "
                        "(qat/train/allocator.py)", HUGE_PAGES_TUNABLE)

        self.amp = self.device.type == "cuda" and cfg.trainer.get("amp", "bf16") == "bf16"
        # The training loss: the task's cross-entropy, or distillation from a frozen teacher (qat.train.distill).
        self.objective = self.task.objective(cfg.get("distill"), self.model, self.data.num_classes,
                                             self.data.input_size, self.device, self.amp)

        pin = self.device.type == "cuda" and bool(cfg.data.get("pin_memory", True))
        self.train_loader = TrainLoader(self.data.train, cfg.data, self.context, int(cfg.seed), pin)
        self.eval_loaders = {}
        if self.data.val is not None:
            self.eval_loaders["val"] = eval_loader(self.data.val, cfg.data, self.context, pin)
        if self.data.test is not None:
            self.eval_loaders["test"] = eval_loader(self.data.test, cfg.data, self.context, pin)
        # Without a validation split the test split stands in for it (as the CIFAR papers do).
        self.val_source = "val" if "val" in self.eval_loaders else ("test" if self.eval_loaders else None)
        if self.val_source == "test" and self.context.is_main:
            log.warning("no validation split (data.val_split=0): best.pt is chosen on the test set, so the "
                        "test figure is no longer an unbiased estimate; set data.val_split to hold out images")

        self.steps_per_epoch = self.train_loader.steps_per_epoch
        # Progress and the lr schedule follow the planned epochs; max_steps only stops early, so a
        # run stopped by max_steps and resumed follows the same trajectory as an uninterrupted one.
        self.total_steps = planned = int(cfg.trainer.epochs) * self.steps_per_epoch
        self.optimizer = optimizer_for(cfg.optim, self.model)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, self.steps_per_epoch, planned)
        self.state = TrainState(best_val=-math.inf if self.task.higher_is_better else math.inf)
        self.resumed_sums: list[float] | None = None
        self.saved: SavedPoint | None = None
        self.resumed_from: Path | None = None
        self.resume_changes: dict[str, dict[str, Any]] = {}
        if cfg.trainer.get("resume"):
            self._resume(as_path(cfg.trainer.resume))
        # Different augmentation noise per rank, same model init (DDP also broadcasts rank 0's).
        if self.context.enabled and not cfg.trainer.get("resume"):
            seed_everything(int(cfg.seed) + self.context.rank)

        self.ddp_model = self.model
        if self.context.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.diagnostics = LayerDiagnostics(self.model)
        self.logger = self._build_logger()
        self.last_eval: dict[str, float] = {}
        self.progress = RunProgress(0, enabled=False)  # fit() shows the run's; evaluate() alone shows none

    # ----------------------------------------------------------------------------- set-up helpers
    def _identity(self) -> dict[str, Any]:
        return {"model": self.cfg.model.name, "method": self.method, "data": self.cfg.data.name,
                "num_classes": self.data.num_classes}

    def _build_logger(self):
        cfg = self.cfg
        config = {"method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits,
                  "estimator": estimator_label(to_plain(cfg.quant).get("estimator"), self.method),
                  **to_plain(cfg)}
        group = cfg.get("experiment_name", "default")
        name = f"{group}-{self.method}-{config['estimator']}-s{cfg.seed}"
        tags = [self.method, cfg.model.name, cfg.data.name, f"w{self.w_bits}a{self.a_bits}"]
        return build_logger(cfg.logger, self.run_dir, config, group, name, tags, self.context.is_main,
                            resume_step=self.state.step if self.resumed_from else None)

    def _resume(self, path: Path) -> None:
        """Load the checkpoint (fully, before this run writes anything: resuming into the run's own
        directory overwrites its last.pt only later), warn about changed settings, restore the state."""
        path = ckpt.resolve_checkpoint_path(path)
        payload = ckpt.load_checkpoint(path)
        ckpt.check_identity(payload, self._identity(), path)
        self.resume_changes = ckpt.config_differences(payload.get("config_yaml"), to_plain(self.cfg))
        if self.resume_changes and self.context.is_main:
            log.warning(f"resuming {path} with settings that differ from the checkpoint's (its steps used the "
                        f"checkpoint's, the rest of this run uses these): " + "; ".join(
                            f"{key}: {change['checkpoint']!r} -> {change['run']!r}"
                            for key, change in self.resume_changes.items()))
        ckpt.load_model_state(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = TrainState(epoch=int(payload["epoch"]), step=int(payload["step"]),
                                batch_in_epoch=int(payload["batch_in_epoch"]),
                                best_val=float(payload[self._best_key()]),
                                train_seconds=float(payload["train_seconds"]))
        self.resumed_sums = payload.get("train_sums")
        self.init_record = payload.get("init_from")
        self.resumed_from = path
        self.saved = SavedPoint(path, dataclasses.replace(self.state), {})
        if self.context.enabled:
            seed_everything(int(self.cfg.seed) + self.context.rank + 7919 * self.state.step)
        else:
            ckpt.restore_rng_state(payload["rng"])
        if self.context.is_main:
            log.info(f"resumed from {path}: epoch {self.state.epoch}, step {self.state.step}"
                     + (f", batch {self.state.batch_in_epoch} of the epoch" if self.state.batch_in_epoch else ""))

    def _save(self, name: str, evaluation: dict[str, float], train_sums: list[float] | None = None) -> None:
        """Write checkpoints/`name`; for last.pt, remember what it holds once it is on disk."""
        path = self.run_dir / "checkpoints" / name
        if self.context.is_main:
            self._write_checkpoint(path, train_sums)
        if name == "last.pt":
            self.saved = SavedPoint(path, dataclasses.replace(self.state), dict(evaluation))

    def _write_checkpoint(self, path: Path, train_sums: list[float] | None) -> None:
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.state.epoch,
            "step": self.state.step, "batch_in_epoch": self.state.batch_in_epoch,
            "train_sums": train_sums, self._best_key(): self.state.best_val,
            "train_seconds": self.state.train_seconds,
            "config_yaml": OmegaConf.to_yaml(self.cfg, resolve=True),
            "identity": self._identity(), "rng": ckpt.capture_rng_state(),
            "init_from": self.init_record,
        }
        ckpt.save_checkpoint(path, payload)

    def _best_key(self) -> str:
        """best_val_acc1 / best_val_bpb: the name of the best validation figure in checkpoints and logs."""
        return f"best_val_{self.task.best_metric}"

    # ------------------------------------------------------------------------------- the loop
    def _clip_gradients(self) -> torch.Tensor | None:
        """trainer.grad_clip = c > 0: scale all gradients by min(1, c / ||g||) (one global L2 norm over
        every parameter, torch.nn.utils.clip_grad_norm_) and return ||g|| before clipping; else None."""
        if not self.grad_clip:
            return None
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def _set_progress(self, progress: float) -> None:
        qat.set_progress(self.model, min(1.0, max(0.0, progress)))

    @contextlib.contextmanager
    def _saving(self):
        """The forward's saved-tensor compression; the first step of the process is also counted
        (`act_compression.saved_bytes_first_step` in summary.json)."""
        compression = self.act_compression
        if compression is None:
            yield
            return
        if self.act_saved_bytes is not None:
            with compression.saving():
                yield
            return
        with compression.record() as stats, compression.saving():
            yield
        self.act_saved_bytes = stats.as_dict()

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], list[float]]:
        """Train epoch `epoch` from batch `batch_in_epoch` on, stopping early at max_steps.

        Returns (metrics, this rank's metric sums)."""
        cfg, state = self.cfg, self.state
        self.ddp_model.train()
        sums = self.task.metric_sums(self.device)
        if state.batch_in_epoch and self.resumed_sums is not None:
            sums.sums += torch.tensor(self.resumed_sums, dtype=torch.float64, device=self.device)
        self.resumed_sums = None
        batches = self.train_loader.epoch(epoch, state.batch_in_epoch)
        self.progress.set_description(f"epoch {epoch + 1}/{cfg.trainer.epochs}")
        log_every = int(cfg.logger.get("log_every", 50))
        diag_every = int(cfg.logger.get("diagnostics_every", 200))
        started, max_steps = time.perf_counter(), cfg.trainer.get("max_steps")
        samples_seen = 0
        try:
            for images, labels in batches:
                if state.batch_in_epoch >= self.steps_per_epoch:
                    break
                if self.interrupt.requested:
                    raise StopRequested
                self._set_progress(state.step / self.total_steps)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss, logits, loss_parts = self.widths.train_step(
                    functools.partial(self._forward_backward, images, labels))
                grad_norm = self._clip_gradients()
                self.optimizer.step()
                self.scheduler.step()
                qat.latent.clip_latent_weights(self.model)
                sums.update(loss, logits, labels)
                state.step += 1
                state.batch_in_epoch += 1
                samples_seen += self.task.samples(labels)
                postfix = {}
                if state.step % log_every == 0 and self.context.is_main:
                    elapsed = time.perf_counter() - started
                    metrics = {"train/step_loss": loss.item(),
                               "train/lr": self.optimizer.param_groups[0]["lr"],
                               "train/progress": state.step / self.total_steps,
                               f"train/{self.task.sample_unit}_per_second":
                                   samples_seen * self.context.world_size / max(elapsed, 1e-9),
                               **({"train/grad_norm": grad_norm.item()} if grad_norm is not None else {}),
                               **{key: part.item() for key, part in loss_parts.items()},
                               **step_metrics(self.optimizer)}
                    postfix = {"loss": f"{metrics['train/step_loss']:.3f}", "lr": f"{metrics['train/lr']:.2e}"}
                    self.logger.log_step(state.step, metrics)
                self.progress.update(self.task.samples(labels) * self.context.world_size, **postfix)
                if state.step % diag_every == 0 and self.context.is_main:
                    self.logger.log_step(state.step, self.diagnostics.collect())
                if max_steps and state.step >= max_steps:
                    break
        except StopRequested:  # at a batch boundary: the state is consistent, save it
            state.train_seconds += time.perf_counter() - started
            self._save("last.pt", self.last_eval, train_sums=sums.sums.tolist())
            raise
        state.train_seconds += time.perf_counter() - started
        local_sums = sums.sums.tolist()
        distributed.all_reduce_sum(sums.sums, self.context)
        return sums.result("train"), local_sums

    def _forward_backward(self, images, labels, loss_scale: float = 1.0):
        """(loss, logits, loss parts) of one forward, objective and backward of loss x loss_scale
        (gradients accumulate; a multi-bit run's per-width weights, qat.train.multibit)."""
        with self._saving(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp), \
                self.objective.student_forward():
            logits = self.ddp_model(images)
        loss, loss_parts = self.objective(logits, labels, images)
        (loss if loss_scale == 1.0 else loss * loss_scale).backward()
        return loss, logits, loss_parts

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Loss, top-1 and top-5 of the (unwrapped) model on `split`, summed over all ranks."""
        if self.context.enabled:  # BN statistics drift apart per rank; evaluate rank 0's.
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        self.model.eval()
        sums = self.task.metric_sums(self.device)
        with self.progress.paused():
            for images, labels in self.progress.wrap(self.eval_loaders[split], split):
                images, labels = images.to(self.device), labels.to(self.device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.model(images)
                sums.update(self.task.loss(logits, labels), logits, labels)
        self.model.train()
        distributed.all_reduce_sum(sums.sums, self.context)
        return sums.result(split)

    def _calibrate_batchnorm(self) -> None:
        """multibit.bn_calibration_batches: re-estimate the multi-bit model's BatchNorm statistics at
        its current weights (qat.train.multibit: Widths.calibrate, calibration_inputs; the global random
        state seeded by the run's seed, so the batches and their augmentation are the same every time),
        the run's random state restored after it: the training steps are those of a run without calibration."""
        if not self.widths.calibration_batches:
            return
        rng = ckpt.capture_rng_state()
        try:
            seed_everything(int(self.cfg.seed))  # random augmentation of the batches: a function of the seed
            inputs = calibration_inputs(self.data.train, int(self.cfg.data.batch_size), int(self.cfg.seed),
                                        int(self.cfg.data.get("num_workers", 0)), self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                self.widths.calibrate(inputs)
        finally:
            ckpt.restore_rng_state(rng)

    def _evaluate_reached(self) -> dict[str, float]:
        """Every evaluation split, with the network at the progress the run has reached (a multi-bit
        model's BatchNorm statistics calibrated at it first)."""
        self._set_progress(self.state.step / self.total_steps)
        self._calibrate_batchnorm()
        return {k: v for split in self.eval_loaders
                for k, v in self.widths.evaluate(functools.partial(self.evaluate, split)).items()}

    def run_total_steps(self) -> int:
        """The step this run stops at: the planned total, or max_steps when that comes first."""
        max_steps = self.cfg.trainer.get("max_steps")
        return min(self.total_steps, int(max_steps)) if max_steps else self.total_steps

    def fit(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        if self.context.is_main:
            log.info(str(self.model_summary))
            self.logger.log_summary(summary_facts(self.model_summary), layer_rows(self.model_summary))
        self.last_eval = {}
        interrupted = False
        self.interrupt = DeferredInterrupt()
        self.progress = RunProgress(
            self.run_total_steps(), state.step,
            enabled=self.context.is_main and bool(cfg.trainer.get("progress_bar", True)),
            refresh_interval=float(cfg.trainer.get("progress_interval", 0.5)),
            log_interval=float(cfg.trainer.get("progress_log_interval", 30.0)), unit=self.task.progress_unit)
        try:
            self.interrupt.__enter__()
            max_steps = cfg.trainer.get("max_steps")
            while state.epoch < cfg.trainer.epochs and not (max_steps and state.step >= max_steps):
                epoch = state.epoch
                train_metrics, train_sums = self._train_epoch(epoch)
                completed = state.batch_in_epoch >= self.steps_per_epoch
                if completed:
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                self.last_eval = self._evaluate_reached()
                val = self.last_eval.get(f"{self.val_source}/{self.task.best_metric}") if self.val_source else None
                improved = val is not None and self.task.better(val, state.best_val)
                if improved:
                    state.best_val = val
                metrics = {**train_metrics, **self.last_eval, self._best_key(): state.best_val,
                           "train/seconds": state.train_seconds}
                self.logger.log_epoch(epoch + 1, state.step, metrics)
                if self.context.is_main:
                    self.logger.log_step(state.step, self.diagnostics.collect())
                    log.info(self._epoch_line(epoch, metrics))
                self._save("last.pt", self.last_eval, None if completed else train_sums)
                if improved:
                    self._save("best.pt", self.last_eval, None if completed else train_sums)
            if not self.last_eval and self.eval_loaders:  # resumed a finished run: evaluate it once
                self.last_eval = self._evaluate_reached()
        except KeyboardInterrupt:
            interrupted = True
            if self.context.is_main:
                log.warning(self._interrupt_message())
        finally:
            self.interrupt.__exit__()
            self.progress.close()
        # The trained network's figures (HQ's sparsity grows while training); after an abort, the
        # network in memory at the abort.
        self.trained_summary = qat.summary(self.model, self.data.input_size, self.data.input_dtype) \
            if self.context.is_main \
            else self.model_summary
        summary = self._write_summary(interrupted)
        if self.context.is_main:
            log.info(f"trained model: quantized size {summary['quantized_bytes']:,} B (entropy-coded "
                     f"{summary['entropy_coded_bytes']:,.0f} B) | compression {summary['compression']:.2f}x")
        self.logger.log_summary(summary, layer_rows(self.trained_summary))
        self.logger.finish()
        distributed.barrier(self.context)
        distributed.teardown(self.context)
        if interrupted:
            raise KeyboardInterrupt
        return summary

    def _act_compression_facts(self) -> dict[str, Any]:
        allocator = {"return_freed_memory": self.returns_freed_memory, "malloc_huge_pages": self.malloc_huge_pages}
        if self.act_compression is None:
            return {"mode": "none", "overrides": {}, "saved_bytes_first_step": None, **allocator}
        return {**self.act_compression.describe(), "saved_bytes_first_step": self.act_saved_bytes, **allocator}

    def _interrupt_message(self) -> str:
        """What a Ctrl-C left behind, naming the step the checkpoint really holds."""
        state, saved = self.state, self.saved
        if saved is None:
            return f"interrupted at step {state.step} before the first checkpoint: nothing to resume from"
        resume = f"continue with trainer.resume={saved.path}"
        if saved.state.step == state.step:
            return f"interrupted at step {state.step}, saved in {saved.path}; {resume}"
        lost = saved.state.step + 1, state.step
        again = f"step {lost[0]}" if lost[0] == lost[1] else f"steps {lost[0]}-{lost[1]}"
        return (f"aborted after step {state.step} without saving it: {saved.path} holds step {saved.state.step} "
                f"({again} will be trained again); {resume}")

    def _epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        parts = [f"epoch {epoch + 1}/{self.cfg.trainer.epochs}", f"step {self.state.step}",
                 self.task.metrics_text(metrics, "train")]
        for split in self.eval_loaders:
            parts.append(self.task.metrics_text(metrics, split))
        parts.append(f"{self.state.train_seconds:.1f}s train")
        return " | ".join(parts)

    def _write_summary(self, interrupted: bool) -> dict[str, Any]:
        """summary.json: the state and evaluation of the checkpoint the run can be continued from.

        Normally that is the state the run ended in. After an abort (a second Ctrl-C) past the last
        checkpoint, the steps, times, accuracies are those of that checkpoint and `aborted_after_step`
        says how far training had got; with no checkpoint at all, the state at the abort."""
        cfg, saved = self.cfg, self.saved
        aborted = interrupted and saved is not None and saved.state.step != self.state.step
        state, evaluation = (saved.state, saved.evaluation) if aborted else (self.state, self.last_eval)
        epochs_trained = state.step / self.steps_per_epoch
        summary = {
            "experiment": cfg.get("experiment_name", "default"),
            "method": self.method,
            "estimator": estimator_label(to_plain(cfg.quant).get("estimator"), self.method),
            "w_bits": self.w_bits, "a_bits": self.a_bits,
            "model": cfg.model.name, "data": cfg.data.name, "task": self.task.name, "seed": int(cfg.seed),
            "epochs": round(epochs_trained, 4), "epochs_planned": int(cfg.trainer.epochs),
            "steps": state.step,
            **self.task.summary_metrics(finite_or_none(state.best_val), self.val_source, evaluation),
            "test_size": len(self.data.test) if self.data.test is not None else None,
            "seconds_per_epoch": state.train_seconds / epochs_trained if epochs_trained else None,
            "train_seconds": state.train_seconds,
            **summary_facts(self.trained_summary),
            "world_size": self.context.world_size, "device": str(self.device),
            "interrupted": interrupted,
            "aborted_after_step": self.state.step if aborted else None,
            "checkpoint": str(saved.path) if saved else None,
            "checkpoint_step": saved.state.step if saved else None,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            # settings changed on resume: {key: {"checkpoint": value, "run": value}}; the steps
            # before `resumed_from` used the checkpoint's values, the rest this run's
            "resume_config_changes": self.resume_changes,
            # trainer.init_from: the checkpoint the weights came from, and which keys loaded
            "init_from": self.init_record,
            "act_compression": self._act_compression_facts(),
            # distill=kd: the teacher's source and the loss settings (qat.train.distill)
            "distill": self.objective.describe(),
            # quant=multibit: the widths trained and evaluated, and each width's figures (qat.train.multibit)
            "multibit": self.widths.describe(evaluation),
        }
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary


def grad_clip_setting(cfg: DictConfig) -> float | None:
    """trainer.grad_clip: None (also for 0, null or absent: no clipping) or the max global norm > 0."""
    value = cfg.trainer.get("grad_clip")
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"trainer.grad_clip must be null/0 (off) or the max global gradient norm > 0, got {value!r}")
    return float(value)


def act_compression_settings(cfg: DictConfig) -> tuple[str, dict[str, str]]:
    """(trainer.act_compression, trainer.act_compression_overrides), checked: ConfigError names a bad one."""
    from qat.act_compression import MODES

    mode = cfg.trainer.get("act_compression", "none")
    if not isinstance(mode, str) or mode not in MODES:
        raise ConfigError(f"trainer.act_compression must be one of {', '.join(MODES)}, got {mode!r}")
    overrides = to_plain(cfg.trainer.get("act_compression_overrides")) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"trainer.act_compression_overrides must be a mapping of module-name globs to "
                          f"modes ({', '.join(MODES)}), got {overrides!r}")
    for glob, value in overrides.items():
        if not isinstance(value, str) or value not in MODES:
            raise ConfigError(f"trainer.act_compression_overrides.{glob} must be one of {', '.join(MODES)}, "
                              f"got {value!r}")
    return mode, overrides


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the training described by `cfg`, writing into `run_dir`; returns the summary dict."""
    return Trainer(cfg, run_dir).fit()
