"""trainer.init_from: a new run starts from another run's weights only (qat.train.init_from)."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, SMOKE_OVERRIDES
from qat.train.checkpoint import CheckpointError, load_checkpoint, trained_model_path
from qat.train.trainer import Trainer

SMALL = [*SMOKE_OVERRIDES, "model=resnet20", "data.image_size=8", "optim=adam"]


def source_run(compose, tmp_path, *overrides, name="source"):
    """A finished 1-step run; returns its directory."""
    Trainer(compose([*SMALL, *overrides]), tmp_path / name).fit()
    return tmp_path / name


def test_a_run_directory_means_its_best_pt_else_its_last_pt(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("best.pt", "last.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert trained_model_path(tmp_path) == tmp_path / "checkpoints" / "best.pt"
    (tmp_path / "checkpoints" / "best.pt").unlink()
    assert trained_model_path(tmp_path) == tmp_path / "checkpoints" / "last.pt"
    assert trained_model_path(tmp_path / "checkpoints" / "last.pt") == tmp_path / "checkpoints" / "last.pt"
    (tmp_path / "checkpoints" / "last.pt").unlink()
    with pytest.raises(CheckpointError, match="no best.pt or last.pt in run directory"):
        trained_model_path(tmp_path)


def test_float_weights_load_into_a_binary_run_without_the_optimizer_state(compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp")
    weights = load_checkpoint(trained_model_path(source))
    assert weights["optimizer"]["state"]  # Adam moments exist in the source ...
    trainer = Trainer(compose([*SMALL, "quant=xnor", f"trainer.init_from={source}"]), tmp_path / "new")
    state = trainer.model.state_dict()
    assert set(state) == set(weights["model"])
    for key, tensor in weights["model"].items():
        assert torch.equal(state[key], tensor), key
    # ... but the new run starts its own: no moments, step 0, schedule at its start.
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.state.step == 0 and trainer.scheduler.last_epoch == 0
    summary = trainer.fit()
    assert summary["init_from"]["checkpoint"] == str(trained_model_path(source))
    assert summary["init_from"]["source_identity"]["method"] == "fp"
    assert summary["init_from"]["loaded"] == len(state) and summary["steps"] == 1


def test_without_init_from_the_weights_are_a_fresh_initialisation(compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp", "seed=1")
    fresh = Trainer(compose([*SMALL, "quant=xnor"]), tmp_path / "fresh").model.state_dict()
    trained = load_checkpoint(trained_model_path(source))["model"]
    assert not torch.equal(fresh["layers.0.0.conv1.weight"], trained["layers.0.0.conv1.weight"])
    assert json.loads((source / "summary.json").read_text())["init_from"] is None


def test_a_different_class_count_is_one_error_line_unless_tolerated(compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp", "data.num_classes=5")
    strict = compose([*SMALL, "quant=bwn", f"trainer.init_from={source}"])
    with pytest.raises(CheckpointError) as error:
        Trainer(strict, tmp_path / "strict")
    message = str(error.value)
    assert "\n" not in message and "shape mismatches (checkpoint vs model): fc.weight (5, 64) vs (10, 64)" in message
    assert "trainer.init_strict=false" in message

    fresh_fc = Trainer(compose([*SMALL, "quant=bwn"]), tmp_path / "fresh").model.fc.weight
    tolerant = Trainer(compose([*SMALL, "quant=bwn", f"trainer.init_from={source}", "trainer.init_strict=false"]),
                       tmp_path / "tolerant")
    record = tolerant.init_record
    assert [m.split()[0] for m in record["mismatched"]] == ["fc.weight", "fc.bias"]
    assert record["loaded"] == len(tolerant.model.state_dict()) - 2
    assert torch.equal(tolerant.model.fc.weight, fresh_fc)  # kept its (seeded) fresh initialisation
    trained = load_checkpoint(trained_model_path(source))["model"]
    assert torch.equal(tolerant.model.conv1.weight, trained["conv1.weight"])


def test_missing_keys_of_a_method_with_extra_parameters(compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp")
    with pytest.raises(CheckpointError, match=r"missing keys: .*nam"):
        Trainer(compose([*SMALL, "quant=fda", f"trainer.init_from={source}"]), tmp_path / "strict")
    tolerant = Trainer(compose([*SMALL, "quant=fda", f"trainer.init_from={source}", "trainer.init_strict=false"]),
                       tmp_path / "tolerant")
    assert tolerant.init_record["missing"] and all(".nam." in key for key in tolerant.init_record["missing"])


def test_a_source_sharing_nothing_and_a_bad_init_strict_fail_clearly(compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp")
    checkpoint = load_checkpoint(trained_model_path(source))
    checkpoint["model"] = {"other." + k: v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match="shares no key of equal shape with this model"):
        Trainer(compose([*SMALL, f"trainer.init_from={tmp_path / 'renamed.pt'}", "trainer.init_strict=false"]),
                tmp_path / "new")
    with pytest.raises(ValueError, match="trainer.init_strict must be true or false, got 'yes'"):
        Trainer(compose([*SMALL, f"trainer.init_from={source}", "trainer.init_strict=yes"]), tmp_path / "bad")


def test_a_resumed_run_keeps_the_record_without_reading_the_source_again(compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp")
    overrides = [*SMALL, "quant=xnor", f"trainer.init_from={source}", "trainer.epochs=2", "trainer.max_steps=2"]
    first = Trainer(compose(overrides), tmp_path / "run").fit()
    shutil.rmtree(source)  # gone: resuming must not need it
    resumed = Trainer(compose([*overrides, "trainer.max_steps=null", f"trainer.resume={tmp_path / 'run'}"]),
                      tmp_path / "run")
    assert resumed.resume_changes == {}
    summary = resumed.fit()
    assert summary["steps"] == 4 and summary["init_from"] == first["init_from"]


def test_train_py_starts_a_binary_run_from_a_float_run(python, subprocess_env, compose, tmp_path):
    source = source_run(compose, tmp_path, "quant=fp")
    result = subprocess.run([python, str(REPO / "train.py"), *SMALL, "quant=xnor", f"trainer.init_from={source}",
                             f"hydra.run.dir={tmp_path / 'stage2'}"],
                            cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "stage2" / "summary.json").read_text())
    assert summary["method"] == "xnor" and summary["init_from"]["checkpoint"].endswith("best.pt")


def test_reactnet_stage_two_starts_from_stage_one(compose, tmp_path):
    """ReActNet's recipe: stage 1 (binary inputs, float weights) then stage 2 (both binary) from it."""
    block = ["model.block=reactnet"]
    stage1 = source_run(compose, tmp_path, "quant=reactnet_stage1", *block, name="stage1")
    stage2 = Trainer(compose([*SMALL, "quant=reactnet", *block, f"trainer.init_from={stage1}"]), tmp_path / "stage2")
    trained = load_checkpoint(trained_model_path(stage1))["model"]
    assert stage2.init_record["loaded"] == len(trained)  # strict: every key, RSign thresholds included
    thresholds = [k for k in trained if "input_quantizer" in k]
    assert thresholds and all(torch.equal(stage2.model.state_dict()[k], trained[k]) for k in thresholds)
