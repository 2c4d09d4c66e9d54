"""The training loop behind `train.py`: config in, trained model, checkpoints and summary.json out.

One run = build data -> float model -> `qat.quantize_model` -> optimizer (latent binary weights
without weight decay, `qat.latent.param_groups`) -> per-step schedule -> epochs of
  set_progress(step / total_steps) -> forward (bf16 autocast on CUDA) -> backward -> step ->
  clip latent weights -> log
with evaluation (loss, top-1, top-5) on validation and test after every epoch, `last.pt` / `best.pt`
checkpoints, W&B / CSV logging, and `summary.json` at the end (also after max_steps or Ctrl-C).
Before the final evaluation progress is set to 1.0, so progress-driven modules (FDA's noise weight)
are at their end values in the evaluated network.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import qat
import qat.latent
from qat import checkpoint as ckpt
from qat import distributed, models
from qat.config import as_path, to_plain, validate
from qat.data import build_data
from qat.diagnostics import LayerDiagnostics
from qat.interrupt import DeferredInterrupt, StopRequested
from qat.loaders import TrainLoader, eval_loader
from qat.loggers import build_logger
from qat.metrics import MetricSums
from qat.optim import build_optimizer, build_scheduler


@dataclass
class TrainState:
    epoch: int = 0           # completed epochs
    step: int = 0            # completed optimizer steps
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch resume)
    best_val_acc1: float = -math.inf
    train_seconds: float = 0.0


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
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.context = distributed.setup(cfg.get("device", "auto"))
        self.device = self.context.device
        if cfg.trainer.get("threads"):
            torch.set_num_threads(int(cfg.trainer.threads))
        seed_everything(int(cfg.seed))
        self.method = cfg.quant.method
        self.w_bits, self.a_bits = qat.method_bits(self.method)

        self.data = build_data(cfg.data)
        float_model = models.build_architecture(
            models.architecture(cfg.model, self.data.num_classes, self.data.channels))
        self.model = qat.quantize_model(float_model, to_plain(cfg.quant))
        self.model_summary = qat.summary(self.model, self.data.input_size)
        self.model.to(self.device)

        pin = self.device.type == "cuda" and bool(cfg.data.get("pin_memory", True))
        self.train_loader = TrainLoader(self.data.train, cfg.data, self.context, int(cfg.seed), pin)
        self.eval_loaders = {}
        if self.data.val is not None:
            self.eval_loaders["val"] = eval_loader(self.data.val, cfg.data, self.context, pin)
        if self.data.test is not None:
            self.eval_loaders["test"] = eval_loader(self.data.test, cfg.data, self.context, pin)
        # Without a validation split the test split stands in for it (as the CIFAR papers do).
        self.val_source = "val" if "val" in self.eval_loaders else ("test" if self.eval_loaders else None)

        self.steps_per_epoch = self.train_loader.steps_per_epoch
        # Progress and the lr schedule follow the planned epochs; max_steps only stops early, so a
        # run stopped by max_steps and resumed follows the same trajectory as an uninterrupted one.
        self.total_steps = planned = int(cfg.trainer.epochs) * self.steps_per_epoch
        groups = qat.latent.param_groups(self.model, float(cfg.optim.get("weight_decay", 0.0)))
        self.optimizer = build_optimizer(cfg.optim, groups)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, self.steps_per_epoch, planned)
        self.state = TrainState()
        self.resumed_sums: list[float] | None = None
        if cfg.trainer.get("resume"):
            self._resume(as_path(cfg.trainer.resume))
        # Different augmentation noise per rank, same model init (DDP also broadcasts rank 0's).
        if self.context.enabled and not cfg.trainer.get("resume"):
            seed_everything(int(cfg.seed) + self.context.rank)

        self.ddp_model = self.model
        if self.context.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.amp = self.device.type == "cuda" and cfg.trainer.get("amp", "bf16") == "bf16"
        self.diagnostics = LayerDiagnostics(self.model)
        self.logger = self._build_logger()

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
        return build_logger(cfg.logger, self.run_dir, config, group, name, tags, self.context.is_main)

    def _resume(self, path: Path) -> None:
        payload = ckpt.load_checkpoint(path)
        ckpt.check_identity(payload, self._identity(), path)
        ckpt.load_model_state(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = TrainState(epoch=int(payload["epoch"]), step=int(payload["step"]),
                                batch_in_epoch=int(payload["batch_in_epoch"]),
                                best_val_acc1=float(payload["best_val_acc1"]),
                                train_seconds=float(payload["train_seconds"]))
        self.resumed_sums = payload.get("train_sums")
        if self.context.enabled:
            seed_everything(int(self.cfg.seed) + self.context.rank + 7919 * self.state.step)
        else:
            ckpt.restore_rng_state(payload["rng"])
        if self.context.is_main:
            print(f"resumed from {path}: epoch {self.state.epoch}, step {self.state.step}"
                  + (f", batch {self.state.batch_in_epoch} of the epoch" if self.state.batch_in_epoch else ""))

    def _save(self, name: str, train_sums: list[float] | None = None) -> None:
        if not self.context.is_main:
            return
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.state.epoch,
            "step": self.state.step, "batch_in_epoch": self.state.batch_in_epoch,
            "train_sums": train_sums, "best_val_acc1": self.state.best_val_acc1,
            "train_seconds": self.state.train_seconds,
            "config_yaml": OmegaConf.to_yaml(self.cfg, resolve=True),
            "identity": self._identity(), "rng": ckpt.capture_rng_state(),
        }
        ckpt.save_checkpoint(self.run_dir / "checkpoints" / name, payload)

    # ------------------------------------------------------------------------------- the loop
    def _set_progress(self, progress: float) -> None:
        qat.set_progress(self.model, min(1.0, max(0.0, progress)))

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], list[float], bool]:
        """Train epoch `epoch` from batch `batch_in_epoch` on, stopping early at max_steps.

        Returns (metrics, metric sums, whether max_steps stopped it)."""
        cfg, state = self.cfg, self.state
        self.ddp_model.train()
        sums = MetricSums(self.device)
        if state.batch_in_epoch and self.resumed_sums is not None:
            sums.sums += torch.tensor(self.resumed_sums, dtype=torch.float64, device=self.device)
        self.resumed_sums = None
        batches = self.train_loader.epoch(epoch, state.batch_in_epoch)
        remaining = self.steps_per_epoch - state.batch_in_epoch
        bar = tqdm(total=remaining * self.train_loader.batch_size, unit="img", unit_scale=True,
                   desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.context.is_main and cfg.trainer.get("progress_bar", True)),
                   mininterval=float(cfg.trainer.get("progress_interval", 0.5)))
        log_every = int(cfg.logger.get("log_every", 50))
        diag_every = int(cfg.logger.get("diagnostics_every", 200))
        started, max_steps = time.perf_counter(), cfg.trainer.get("max_steps")
        stopped, images_seen = False, 0
        try:
            for images, labels in batches:
                if state.batch_in_epoch >= self.steps_per_epoch:
                    break
                if self.interrupt.requested:
                    raise StopRequested
                self._set_progress(state.step / self.total_steps)
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.ddp_model(images)
                loss = F.cross_entropy(logits.float(), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                qat.latent.clip_latent_weights(self.model)
                sums.update(loss, logits, labels)
                state.step += 1
                state.batch_in_epoch += 1
                images_seen += images.shape[0]
                bar.update(images.shape[0])
                if state.step % log_every == 0 and self.context.is_main:
                    elapsed = time.perf_counter() - started
                    metrics = {"train/step_loss": loss.item(),
                               "train/lr": self.optimizer.param_groups[0]["lr"],
                               "train/progress": state.step / self.total_steps,
                               "train/images_per_second": images_seen * self.context.world_size / max(elapsed, 1e-9)}
                    bar.set_postfix(loss=f"{metrics['train/step_loss']:.3f}", lr=f"{metrics['train/lr']:.2e}")
                    self.logger.log_step(state.step, metrics)
                if state.step % diag_every == 0 and self.context.is_main:
                    self.logger.log_step(state.step, self.diagnostics.collect())
                if max_steps and state.step >= max_steps:
                    stopped = True
                    break
        except StopRequested:  # at a batch boundary: the state is consistent, save it
            state.train_seconds += time.perf_counter() - started
            bar.close()
            self._save("last.pt", train_sums=sums.sums.tolist())
            raise
        state.train_seconds += time.perf_counter() - started
        bar.close()
        local_sums = sums.sums.tolist()
        distributed.all_reduce_sum(sums.sums, self.context)
        return sums.result("train"), local_sums, stopped

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Loss, top-1 and top-5 of the (unwrapped) model on `split`, summed over all ranks."""
        if self.context.enabled:  # BN statistics drift apart per rank; evaluate rank 0's.
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        self.model.eval()
        sums = MetricSums(self.device)
        loader = self.eval_loaders[split]
        for images, labels in tqdm(loader, desc=split, leave=False, unit="batch", dynamic_ncols=True,
                                   disable=not (self.context.is_main and self.cfg.trainer.get("progress_bar", True))):
            images, labels = images.to(self.device), labels.to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(images)
            sums.update(F.cross_entropy(logits.float(), labels), logits, labels)
        self.model.train()
        distributed.all_reduce_sum(sums.sums, self.context)
        return sums.result(split)

    def fit(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        if self.context.is_main:
            print(self.model_summary)
            self.logger.log_summary(summary_facts(self.model_summary), layer_rows(self.model_summary))
        last_eval: dict[str, float] = {}
        interrupted = False
        self.interrupt = DeferredInterrupt()
        try:
            self.interrupt.__enter__()
            max_steps = cfg.trainer.get("max_steps")
            while state.epoch < cfg.trainer.epochs and not (max_steps and state.step >= max_steps):
                epoch = state.epoch
                train_metrics, train_sums, stopped = self._train_epoch(epoch)
                completed = state.batch_in_epoch >= self.steps_per_epoch
                if completed:
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                final = stopped or state.epoch >= cfg.trainer.epochs
                if final:
                    self._set_progress(1.0)
                last_eval = {k: v for split in self.eval_loaders for k, v in self.evaluate(split).items()}
                val_acc1 = last_eval.get(f"{self.val_source}/acc1") if self.val_source else None
                improved = val_acc1 is not None and val_acc1 > state.best_val_acc1
                if improved:
                    state.best_val_acc1 = val_acc1
                metrics = {**train_metrics, **last_eval, "best_val_acc1": state.best_val_acc1,
                           "train/seconds": state.train_seconds}
                self.logger.log_epoch(epoch + 1, state.step, metrics)
                if self.context.is_main:
                    self.logger.log_step(state.step, self.diagnostics.collect())
                    print(self._epoch_line(epoch, metrics), flush=True)
                self._save("last.pt", None if completed else train_sums)
                if improved:
                    self._save("best.pt", None if completed else train_sums)
            if not last_eval and self.eval_loaders:  # resumed a finished run: evaluate it once
                self._set_progress(1.0)
                last_eval = {k: v for split in self.eval_loaders for k, v in self.evaluate(split).items()}
        except KeyboardInterrupt:
            interrupted = True
            if self.context.is_main:
                last = self.run_dir / "checkpoints" / "last.pt"
                print(f"interrupted at step {state.step}; continue with trainer.resume={last}"
                      if last.exists() else "interrupted before the first checkpoint", flush=True)
        finally:
            self.interrupt.__exit__()
        summary = self._write_summary(last_eval, interrupted)
        self.logger.log_summary(summary, [])
        self.logger.finish()
        distributed.barrier(self.context)
        distributed.teardown(self.context)
        if interrupted:
            raise KeyboardInterrupt
        return summary

    def _epoch_line(self, epoch: int, metrics: dict[str, float]) -> str:
        parts = [f"epoch {epoch + 1}/{self.cfg.trainer.epochs}", f"step {self.state.step}",
                 f"train loss {metrics['train/loss']:.4f} acc1 {metrics['train/acc1']:.2f}"]
        for split in self.eval_loaders:
            parts.append(f"{split} loss {metrics[f'{split}/loss']:.4f} acc1 {metrics[f'{split}/acc1']:.2f} "
                         f"acc5 {metrics[f'{split}/acc5']:.2f}")
        parts.append(f"{self.state.train_seconds:.1f}s train")
        return " | ".join(parts)

    def _write_summary(self, last_eval: dict[str, float], interrupted: bool) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        epochs_trained = state.step / self.steps_per_epoch
        summary = {
            "experiment": cfg.get("experiment_name", "default"),
            "method": self.method,
            "estimator": estimator_label(to_plain(cfg.quant).get("estimator"), self.method),
            "w_bits": self.w_bits, "a_bits": self.a_bits,
            "model": cfg.model.name, "data": cfg.data.name, "seed": int(cfg.seed),
            "epochs": round(epochs_trained, 4), "epochs_planned": int(cfg.trainer.epochs),
            "steps": state.step,
            "best_val_acc1": state.best_val_acc1 if state.best_val_acc1 > -math.inf else None,
            "val_source": self.val_source,
            "val_acc1": last_eval.get("val/acc1"),
            "test_acc1": last_eval.get("test/acc1"), "test_acc5": last_eval.get("test/acc5"),
            "test_size": len(self.data.test) if self.data.test is not None else None,
            "seconds_per_epoch": state.train_seconds / epochs_trained if epochs_trained else None,
            "train_seconds": state.train_seconds,
            **summary_facts(self.model_summary),
            "world_size": self.context.world_size, "device": str(self.device),
            "interrupted": interrupted,
        }
        if self.context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the training described by `cfg`, writing into `run_dir`; returns the summary dict."""
    return Trainer(cfg, run_dir).fit()
