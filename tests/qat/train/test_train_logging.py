"""Logging: W&B offline without a key, CSV files, per-layer diagnostics, summary.json, qat.train.report."""
import csv
import json
import subprocess
import time

import pytest
import torch

from conftest import REPO, SMOKE_OVERRIDES
from qat import models, quantize_model, set_progress
from qat import summary as qat_summary
from qat.train.diagnostics import LayerDiagnostics
from qat.train.loggers import wandb_mode
from qat.train.report import load_runs, write_report
from qat.train.trainer import Trainer

SUMMARY_KEYS = {"method", "estimator", "w_bits", "a_bits", "model", "data", "epochs", "best_val_acc1",
                "test_acc1", "seconds_per_epoch", "train_seconds", "params", "fp32_bytes", "quantized_bytes",
                "compression"}


def test_wandb_mode_is_offline_without_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"


def test_wandb_offline_run_writes_its_summary(compose, smoke_overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    overrides = [o for o in smoke_overrides if not o.startswith("logger=")]
    cfg = compose([*overrides, "+experiment=resnet20_fda", "logger=wandb", "logger.log_every=1",
                   "logger.diagnostics_every=1", "trainer.max_steps=2", "data.image_size=16"])
    summary = Trainer(cfg, tmp_path).fit()
    assert SUMMARY_KEYS <= set(json.loads((tmp_path / "summary.json").read_text()))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    # W&B 0.31 keeps an offline run in one protobuf record file (what `wandb sync` uploads);
    # its strings are stored verbatim, so the logged keys can be checked without a W&B server.
    # wandb-core may still be flushing the file right after finish() on a loaded machine: wait a bit.
    keys = (b"w_bits", b"a_bits", b"resnet20_fda", b"epoch/test/acc1", b"test_acc1", b"compression",
            b"model_summary", b"layers.0.0.conv1/flip_ratio", b"/noise_weight", b"/terms", b"clip_fraction")
    deadline = time.monotonic() + 30
    while True:
        records = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
        missing = [key for key in keys if key not in records]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing
    assert summary["test_acc1"] is not None


def test_csv_logger_writes_steps_epochs_and_layers(compose, smoke_overrides, tmp_path):
    cfg = compose([*smoke_overrides, "logger=csv", "logger.log_every=1", "quant=ternary", "trainer.max_steps=2",
                   "model=resnet20"])
    Trainer(cfg, tmp_path).fit()
    with open(tmp_path / "epochs.csv") as handle:
        rows = {row["metric"]: float(row["value"]) for row in csv.DictReader(handle)}
    assert {"train/loss", "test/acc1", "test/acc5", "best_val_acc1"} <= set(rows)
    steps = (tmp_path / "steps.csv").read_text()
    assert "train/step_loss" in steps and "zero_fraction" in steps
    with open(tmp_path / "steps.csv") as handle:
        throughput = [float(r["value"]) for r in csv.DictReader(handle) if r["metric"] == "train/images_per_second"]
    assert len(throughput) == 2 and all(t > 0 for t in throughput)  # progress bar off: still counted
    layer_table = (tmp_path / "layers.csv").read_text()
    assert "XNORConv2d" not in layer_table and "TernaryConv2d" in layer_table


def test_diagnostics_flip_ratio_zero_fraction_and_clip_boundary():
    model = quantize_model(models.build("resnet20", num_classes=10), {"method": "bwn"})
    diagnostics = LayerDiagnostics(model)
    first = diagnostics.collect()
    assert not any(k.endswith("flip_ratio") for k in first)  # no previous snapshot yet
    layer = model.layers[0][0].conv1
    with torch.no_grad():
        layer.weight.copy_(torch.full_like(layer.weight, 0.5))
        flat = layer.weight.view(-1)
        flat[: flat.numel() // 4] = -1.0  # a quarter flips sign and sits at the clip boundary
    metrics = diagnostics.collect()
    name = "diag/layers.0.0.conv1"
    assert metrics[f"{name}/clip_fraction"] == pytest.approx(0.25)
    assert 0 < metrics[f"{name}/flip_ratio"] <= 1
    assert metrics["diag/layers.0.1.conv1/flip_ratio"] == 0.0

    hq = quantize_model(models.build("resnet20", num_classes=10), {"method": "hq", "target_sparsity": 0.5})
    set_progress(hq, 1.0)
    hq_metrics = LayerDiagnostics(hq).collect()
    assert hq_metrics["diag/layers.1.0.conv1/zero_fraction"] == pytest.approx(0.5, abs=0.01)
    assert 0 < hq_metrics["diag/layers.1.0.conv1/cosine_similarity"] <= 1


def fake_run(directory, **values):
    directory.mkdir(parents=True)
    summary = dict(method="xnor", estimator="default", w_bits=1, a_bits=1, model="resnet20", data="cifar10",
                   seed=0, epochs=1.0, best_val_acc1=80.0, test_acc1=79.5, quantized_bytes=40_000,
                   compression=20.0, seconds_per_epoch=12.0)
    summary.update(values)
    (directory / "summary.json").write_text(json.dumps(summary))


def test_report_writes_markdown_and_png(tmp_path):
    fake_run(tmp_path / "runs" / "a")
    fake_run(tmp_path / "runs" / "b", method="fp", w_bits=32, a_bits=32, test_acc1=91.25, quantized_bytes=1_000_000)
    markdown, image = write_report(tmp_path / "runs", tmp_path / "out")
    text = markdown.read_text()
    assert "| b | resnet20 | cifar10 | fp | default | 32/32 |" in text and "91.25" in text
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [run["run"] for run in load_runs(tmp_path / "runs")] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="no summary.json found"):
        write_report(tmp_path / "out")


def test_summary_reports_the_trained_hq_network_not_the_initial_one(compose, tmp_path):
    # HQ prunes while training (sparsity 0 -> 0.9 by the end): the entropy-coded size shrinks.
    cfg = compose(["data=synthetic", "data.num_train=32", "data.num_test=16", "data.batch_size=8",
                   "data.eval_batch_size=16", "data.image_size=16", "model=resnet20", "logger=csv",
                   "trainer.progress_bar=false", "trainer.threads=1", "device=cpu", "trainer.epochs=1",
                   "quant=hq", "quant.target_sparsity=0.9"])
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.fit()
    trained, initial = qat_summary(trainer.model, trainer.data.input_size), trainer.model_summary
    assert summary["entropy_coded_bytes"] == trained.entropy_coded_bytes < initial.entropy_coded_bytes
    for key in ("quantized_bytes", "compression", "fp32_bytes", "params", "binary_mac_share"):
        assert summary[key] == getattr(trained, key), key
    assert json.loads((tmp_path / "summary.json").read_text())["entropy_coded_bytes"] == trained.entropy_coded_bytes
    with open(tmp_path / "layers.csv") as handle:  # the per-layer table is the trained network's too
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    for layer in trained.layers:
        assert float(rows[layer.name]["entropy_coded_bytes"]) == pytest.approx(layer.entropy_coded_bytes, rel=1e-12)


def test_train_log_holds_the_epoch_lines_and_the_console_shows_them_once(python, subprocess_env, tmp_path):
    result = subprocess.run(
        [python, str(REPO / "train.py"), "+experiment=resnet20_fp", "quant=bwn", *SMOKE_OVERRIDES,
         "data.image_size=16", "trainer.epochs=1", "trainer.max_steps=null", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log_text = (tmp_path / "train.log").read_text()
    epoch_line = "epoch 1/1 | step 2 | train loss"
    assert epoch_line in log_text and "BWNConv2d" in log_text and "trained model: quantized size" in log_text
    assert (result.stdout + result.stderr).count(epoch_line) == 1


@pytest.mark.parametrize("num_val, warned", [(0, True), (8, False)])
def test_choosing_best_pt_on_the_test_set_is_warned_about(compose, smoke_overrides, tmp_path, caplog, num_val, warned):
    cfg = compose([*smoke_overrides, "model=mnist_cnn", "data.channels=1", "data.image_size=18",
                   f"data.num_val={num_val}", "quant=bwn"])
    with caplog.at_level("WARNING", logger="qat"):
        trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.val_source == ("test" if warned else "val")
    assert any("best.pt is chosen on the test set" in r.getMessage() for r in caplog.records) == warned
