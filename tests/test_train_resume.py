"""Checkpoints: weights_only loading, exact resume (epoch boundary and Ctrl-C mid-epoch), clear errors."""
import json
import os
import signal

import pytest
import torch

import qat.latent
from qat.checkpoint import CheckpointError, load_checkpoint
from qat.trainer import Trainer

# 32 train images in batches of 8: 4 steps per epoch.
RESUME_OVERRIDES = ["data=synthetic", "data.num_train=32", "data.num_test=16", "data.batch_size=8",
                    "data.eval_batch_size=16", "data.image_size=16", "model=resnet20", "logger=none",
                    "trainer.progress_bar=false", "trainer.threads=1", "device=cpu", "trainer.epochs=2",
                    "optim=adam", "optim.weight_decay=1e-4"]


def run(compose, tmp_path, name, *overrides):
    cfg = compose([*RESUME_OVERRIDES, *overrides])
    summary = Trainer(cfg, tmp_path / name).fit()
    return summary, tmp_path / name


def final_state(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_same_training(straight_dir, resumed_dir, straight, resumed):
    for key in ("test_acc1", "test_acc5", "best_val_acc1", "steps"):
        assert straight[key] == resumed[key], key
    a, b = final_state(straight_dir), final_state(resumed_dir)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]


# fda: Fourier terms and noise weight follow progress; hq: pruned and reinitialised at p = 0.25,
# before the resume point, so a resumed run must not reinitialise its latent weights again.
@pytest.mark.parametrize("quant", [["quant=xnor"], ["quant=fda"], ["quant=hq", "quant.prune_end=0.25"]])
def test_resume_at_an_epoch_boundary_equals_uninterrupted_training(compose, tmp_path, quant):
    straight, straight_dir = run(compose, tmp_path, "straight", *quant)
    first, first_dir = run(compose, tmp_path, "first", *quant, "trainer.max_steps=4")
    assert first["steps"] == 4 and first["epochs"] == 1.0
    resumed, resumed_dir = run(compose, tmp_path, "resumed", *quant,
                               f"trainer.resume={first_dir / 'checkpoints' / 'last.pt'}")
    assert_same_training(straight_dir, resumed_dir, straight, resumed)
    # epochs-long schedule: the lr at the end follows `epochs`, not the max_steps of the first part.
    assert final_state(resumed_dir)["scheduler"]["last_epoch"] == 8


def test_ctrl_c_mid_epoch_saves_last_pt_and_resume_equals_uninterrupted(compose, tmp_path, monkeypatch):
    straight, straight_dir = run(compose, tmp_path, "straight", "quant=bwn")
    calls = {"n": 0}
    clip = qat.latent.clip_latent_weights

    def clip_then_press_ctrl_c(model):
        clip(model)
        calls["n"] += 1
        if calls["n"] == 6:  # during epoch 2, batch 2 of 4: a real SIGINT to this process
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(qat.latent, "clip_latent_weights", clip_then_press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run(compose, tmp_path, "interrupted", "quant=bwn")
    monkeypatch.setattr(qat.latent, "clip_latent_weights", clip)
    interrupted_dir = tmp_path / "interrupted"
    saved = final_state(interrupted_dir)
    assert (saved["epoch"], saved["step"], saved["batch_in_epoch"]) == (1, 6, 2)
    assert json.loads((interrupted_dir / "summary.json").read_text())["interrupted"] is True
    resumed, resumed_dir = run(compose, tmp_path, "resumed", "quant=bwn", f"trainer.resume={interrupted_dir}")
    assert_same_training(straight_dir, resumed_dir, straight, resumed)


def test_resuming_a_finished_run_reports_its_accuracy_without_training(compose, tmp_path):
    done, done_dir = run(compose, tmp_path, "done", "quant=xnor")
    again, _ = run(compose, tmp_path, "again", "quant=xnor", f"trainer.resume={done_dir}")
    assert again["steps"] == done["steps"] == 8 and again["test_acc1"] == done["test_acc1"]


def test_checkpoint_loads_with_weights_only_and_holds_config_and_rng(compose, tmp_path):
    _, run_dir = run(compose, tmp_path, "run", "quant=ternary", "trainer.max_steps=1")
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "method: ternary" in payload["config_yaml"] and isinstance(payload["rng"]["torch"], torch.Tensor)
    assert payload["identity"] == {"model": "resnet20", "method": "ternary", "data": "synthetic", "num_classes": 10}
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_checkpoint_of_another_model_is_refused(compose, tmp_path):
    _, run_dir = run(compose, tmp_path, "run", "quant=xnor", "trainer.max_steps=1")
    cfg = compose([*RESUME_OVERRIDES, "quant=xnor", "model=vgg_small", f"trainer.resume={run_dir}"])
    with pytest.raises(CheckpointError, match="model: checkpoint has 'resnet20', this run has 'vgg_small'"):
        Trainer(cfg, tmp_path / "other")
    # Same names but different shapes (another width) are caught by the state-dict check.
    payload = load_checkpoint(run_dir)
    payload["model"]["fc.weight"] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "tampered.pt")
    cfg = compose([*RESUME_OVERRIDES, "quant=xnor", f"trainer.resume={tmp_path / 'tampered.pt'}"])
    with pytest.raises(CheckpointError, match=r"shape mismatches.*fc\.weight \(3, 3\) vs \(10, 64\)"):
        Trainer(cfg, tmp_path / "tampered")


def test_corrupt_or_missing_checkpoint_fails_clearly(tmp_path):
    corrupt = tmp_path / "last.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {corrupt}: it is corrupt"):
        load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="no last.pt in run directory"):
        load_checkpoint(tmp_path / "empty_run")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this framework"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format_version": 1, "evil": Payload()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
