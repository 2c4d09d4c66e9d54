"""The language-model task through the trainer (config -> steps -> summary, report), gradient clipping,
BitNet's two-stage schedule, and the lm_* experiments."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from test_lm_data import write_corpus

from conftest import CONFIGS
from qat.train.config import ConfigError
from qat.train.optim import build_scheduler, lr_multiplier, weight_decay_multiplier
from qat.train.report import write_report
from qat.train.trainer import Trainer


def lm_overrides(root, *extra):
    return ["data=pydoc", f"data.root={root}", "data.block_size=16", "data.windows_per_epoch=8", "data.batch_size=4",
            "data.eval_batch_size=8", "data.eval_windows=4", "model=gpt", "model.depth=1", "model.width=16",
            "model.heads=2", "quant.keep_fp=[last]", "optim=adamw", "logger=csv", "trainer.progress_bar=false",
            "trainer.threads=1", "device=cpu", "trainer.epochs=2", *extra]


def test_lm_run_logs_bits_per_byte_everywhere(compose, tmp_path, caplog):
    write_corpus(tmp_path / "data")
    cfg = compose(lm_overrides(tmp_path / "data", "quant=ternary", "logger.log_every=1"))
    with caplog.at_level("INFO", logger="qat"):
        summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["task"] == "language_model" and summary["steps"] == 4
    assert summary["best_val_bpb"] == pytest.approx(min(summary["best_val_bpb"], summary["val_bpb"]))
    assert summary["test_bpb"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["test_ppl"] == pytest.approx(math.exp(summary["test_loss"]))
    assert summary["quantized_bytes"] < summary["fp32_bytes"]  # ternary block linears
    assert "val_acc1" not in summary
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["best_val_bpb"] == summary["best_val_bpb"]
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 2/2")]
    assert epoch_lines and "val loss" in epoch_lines[0] and "bpb" in epoch_lines[0] and "acc1" not in epoch_lines[0]
    epochs_csv = (tmp_path / "run" / "epochs.csv").read_text()
    assert "val/bpb" in epochs_csv and "best_val_bpb" in epochs_csv and "test/ppl" in epochs_csv
    assert "train/tokens_per_second" in (tmp_path / "run" / "steps.csv").read_text()
    markdown, _ = write_report(tmp_path / "run", tmp_path / "report")
    assert "best val bits/byte" in markdown.read_text() and "top-1" not in markdown.read_text()


def test_resumed_lm_run_sees_the_same_windows(compose, tmp_path):
    write_corpus(tmp_path / "data")
    base = lm_overrides(tmp_path / "data", "data.windows_per_epoch=16", "sched=bitnet_two_stage",
                        "optim.weight_decay=0.1")
    whole = Trainer(compose(base), tmp_path / "whole").fit()
    Trainer(compose([*base, "trainer.max_steps=2"]), tmp_path / "part").fit()
    resumed = Trainer(compose([*base, f"trainer.resume={tmp_path / 'part'}"]), tmp_path / "part").fit()
    assert resumed["steps"] == whole["steps"] == 8
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], abs=1e-6)


def test_grad_clip_bounds_the_global_norm(compose, tmp_path, monkeypatch):
    write_corpus(tmp_path / "data")
    norms = {}
    for clip in (None, 0.01):
        trainer = Trainer(compose(lm_overrides(tmp_path / "data", f"trainer.grad_clip={clip or 'null'}",
                                               "trainer.max_steps=2")), tmp_path / f"run{clip}")
        seen, step = [], trainer.optimizer.step

        def recording_step(*args, step=step, seen=seen, model=trainer.model, **kwargs):
            seen.append(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item())
            return step(*args, **kwargs)

        monkeypatch.setattr(trainer.optimizer, "step", recording_step)
        trainer.fit()
        norms[clip] = seen
    assert min(norms[None]) > 0.01                              # unclipped gradients are larger than the bound
    assert max(norms[0.01]) <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("value", ["-1", "abc", "true"])
def test_bad_grad_clip_is_a_config_error(compose, tmp_path, value):
    with pytest.raises(ConfigError, match="trainer.grad_clip"):
        Trainer(compose(["data=synthetic", "logger=none", "model=resnet20", "device=cpu",
                         f"trainer.grad_clip={value}"]), tmp_path)


def two_stage(**values):
    return OmegaConf.create({"name": "bitnet_two_stage", "warmup_epochs": 1, "stage_split": 0.5,
                             "stage1_final_fraction": 1.0, "stage2_fraction": 2 / 3, "final_lr_fraction": 0.0,
                             **values})


def test_bitnet_two_stage_lr_and_weight_decay_values():
    cfg = two_stage()
    f, g = lr_multiplier(cfg, 10, 100), weight_decay_multiplier(cfg, 10, 100)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])           # warm-up over 10 steps
    assert [f(10), f(30), f(49)] == pytest.approx([1.0, 1.0, 1.0])        # stage 1 keeps the peak
    assert f(50) == pytest.approx(2 / 3)                                  # the drop at half-way
    assert f(75) == pytest.approx(1 / 3) and f(100) == pytest.approx(0.0)  # stage 2: linear to 0
    assert g(0) == 1.0 and g(25) == pytest.approx(0.5) and g(49) == pytest.approx((1 + math.cos(math.pi * 49 / 50)) / 2)
    assert g(50) == 0.0 and g(99) == 0.0
    decaying = lr_multiplier(two_stage(stage1_final_fraction=0.8), 10, 100)
    assert decaying(30) == pytest.approx(0.9)


def test_two_stage_scheduler_sets_weight_decay_and_keeps_undecayed_groups_at_zero():
    weight, bias = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
                                  lr=1.0)
    scheduler = build_scheduler(two_stage(warmup_epochs=0), optimizer, steps_per_epoch=10, total_steps=20)
    decays, lrs = [], []
    for _ in range(20):
        decays.append(optimizer.param_groups[0]["weight_decay"])
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["weight_decay"] == 0.0
        optimizer.step()
        scheduler.step()
    assert decays[0] == pytest.approx(0.1) and decays[5] == pytest.approx(0.05) and decays[10:] == [0.0] * 10
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(2 / 3)
    state = scheduler.state_dict()
    torch.save(state, "/dev/null")                                        # picklable: it goes into last.pt
    fresh = build_scheduler(two_stage(warmup_epochs=0), optimizer, steps_per_epoch=10, total_steps=20)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 20


def test_lm_fp_experiment_composes(compose):
    cfg = compose(["+experiment=lm_fp"])
    assert (cfg.model.name, cfg.data.name, cfg.quant.method, cfg.optim.name) == ("gpt", "pydoc", "fp", "adamw")
    assert cfg.model.block_size == cfg.data.block_size and cfg.trainer.grad_clip == 1.0


def test_lm_experiments_have_equal_steps(compose):
    if not (CONFIGS / "quant" / "bitnet158.yaml").is_file():
        pytest.skip("configs/quant/bitnet158.yaml is missing (quant=bitnet158 comes from branch bitnet)")
    fp, bitnet = compose(["+experiment=lm_fp"]), compose(["+experiment=lm_bitnet158"])
    assert bitnet.quant.method == "bitnet158" and bitnet.sched.name == "bitnet_two_stage"
    for key in ("trainer.epochs", "data.windows_per_epoch", "data.batch_size", "data.block_size", "model"):
        assert OmegaConf.select(fp, key) == OmegaConf.select(bitnet, key), key


def test_generate_command_from_a_run_and_from_its_packed_file(compose, tmp_path, capsys):
    from qat.export import pack_model, save_packed
    from qat.generate.__main__ import main, model_from_checkpoint

    write_corpus(tmp_path / "data")
    Trainer(compose(lm_overrides(tmp_path / "data", "quant=ternary", "trainer.max_steps=2")), tmp_path / "run").fit()
    assert main([str(tmp_path / "run"), "--prompt", "The quick", "--tokens", "12"]) == 0
    from_run = capsys.readouterr().out
    assert from_run.startswith("The quick") and "tokens/s" in from_run and "CPU:" in from_run
    save_packed(pack_model(model_from_checkpoint(tmp_path / "run")), tmp_path / "lm.safetensors")
    assert main(["--packed", str(tmp_path / "lm.safetensors"), "--prompt", "The quick", "--tokens", "12"]) == 0
    from_packed = capsys.readouterr().out
    assert from_packed.split("\n\n[")[0] == from_run.split("\n\n[")[0]     # the same greedy text


@pytest.mark.parametrize("method, latent_decay", [("ternary", 0.1), ("bwn", 0.0)])
def test_adamw_latent_weight_policy_on_the_lm(compose, tmp_path, method, latent_decay):
    write_corpus(tmp_path / "data")
    trainer = Trainer(compose(lm_overrides(tmp_path / "data", f"quant={method}", "optim.weight_decay=0.1",
                                           "sched=bitnet_two_stage")), tmp_path / "run")
    model = trainer.model

    def decay_of(parameter):
        groups = trainer.optimizer.param_groups
        return next(g["weight_decay"] for g in groups if any(p is parameter for p in g["params"]))

    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert decay_of(model.blocks[0].attn.qkv.weight) == latent_decay      # binary latent weights: never decayed
    assert decay_of(model.head.weight) == 0.1 and decay_of(model.tok_emb.weight) == 0.1
    assert decay_of(model.blocks[0].ln1.weight) == 0.0 and decay_of(model.blocks[0].attn.qkv.bias) == 0.0
