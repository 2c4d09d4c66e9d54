"""Checkpoints: weights_only loading, exact resume (epoch boundary and Ctrl-C mid-epoch), clear errors."""
import contextlib
import csv
import json
import logging
import os
import shutil
import signal

import pytest
import torch

import qat.latent
import qat.train.checkpoint
from qat.train.checkpoint import CheckpointError, load_checkpoint
from qat.train.trainer import Trainer

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


@contextlib.contextmanager
def ctrl_c_during_step(monkeypatch, step: int, presses: int):
    """Send `presses` real SIGINTs to this thread right after step `step`'s update (inside the step)."""
    clip, calls = qat.latent.clip_latent_weights, {"n": 0}

    def clip_then_press_ctrl_c(model):
        clip(model)
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(presses):
                # raise_signal delivers to this (the main) thread, where Python runs the handler before
                # the next press; os.kill(getpid()) may land on a worker thread (torch, the native
                # engine), and two presses pending at once reach the handler as one
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(qat.latent, "clip_latent_weights", clip_then_press_ctrl_c)
    # The second press goes to the handler installed before training (Python's default, which raises
    # KeyboardInterrupt). In a full run some earlier test leaves another SIGINT handler installed,
    # and the second press then did nothing: start from the default one.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.setattr(qat.latent, "clip_latent_weights", clip)


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
    with pytest.raises(KeyboardInterrupt), ctrl_c_during_step(monkeypatch, 6, presses=1):  # epoch 2, batch 2 of 4
        run(compose, tmp_path, "interrupted", "quant=bwn")
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


def epoch_rows(run_dir, epoch):
    with open(run_dir / "epochs.csv") as handle:
        return {row["metric"]: float(row["value"]) for row in csv.DictReader(handle)
                if row["epoch"] == str(epoch) and row["metric"] != "train/seconds"}


def test_a_max_steps_cap_does_not_change_the_first_steps_evaluation_or_checkpoint(compose, tmp_path, monkeypatch):
    # HQ with prune_end 0.75 reinitialises its latent weights at step 6 of 8. A run capped at step 4
    # must train, evaluate and save exactly what the uncapped run has at step 4: not a network
    # pushed to progress 1.0 (which would prune fully and reinitialise at step 4).
    save = qat.train.checkpoint.save_checkpoint

    def save_and_keep_step_4(path, payload):
        save(path, payload)
        if path.name == "last.pt" and payload["step"] == 4:
            shutil.copy(path, path.with_name("step4.pt"))

    monkeypatch.setattr(qat.train.checkpoint, "save_checkpoint", save_and_keep_step_4)
    quant = ["quant=hq", "quant.prune_end=0.75", "logger=csv"]
    _, straight_dir = run(compose, tmp_path, "straight", *quant)
    _, capped_dir = run(compose, tmp_path, "capped", *quant, "trainer.max_steps=4")
    at_4, capped = load_checkpoint(straight_dir / "checkpoints" / "step4.pt"), final_state(capped_dir)
    for key, tensor in at_4["model"].items():
        assert torch.equal(tensor, capped["model"][key]), key
    assert not any(v for k, v in capped["model"].items() if k.endswith("reinitialized"))
    assert capped["best_val_acc1"] == at_4["best_val_acc1"]
    assert epoch_rows(capped_dir, 1) == epoch_rows(straight_dir, 1)


def test_ctrl_c_twice_reports_and_records_the_step_last_pt_really_holds(compose, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="qat")
    straight, straight_dir = run(compose, tmp_path, "straight", "quant=bwn")
    overrides = ["quant=bwn", "logger=csv", "logger.log_every=1"]
    # during step 6 (epoch 2): the second Ctrl-C aborts at once, mid-step
    with pytest.raises(KeyboardInterrupt), ctrl_c_during_step(monkeypatch, 6, presses=2):
        run(compose, tmp_path, "aborted", *overrides)
    aborted_dir = tmp_path / "aborted"
    last = aborted_dir / "checkpoints" / "last.pt"
    # saved at the end of epoch 1; step 5 and the half-done step 6 are lost
    assert final_state(aborted_dir)["step"] == 4
    messages = [r.getMessage() for r in caplog.records
                if r.name == "qat.train.trainer" and r.levelno == logging.WARNING]
    assert messages == [f"aborted after step 5 without saving it: {last} holds step 4 (step 5 will be trained again); "
                        f"continue with trainer.resume={last}"]
    summary = json.loads((aborted_dir / "summary.json").read_text())
    assert (summary["steps"], summary["epochs"], summary["checkpoint_step"],
            summary["aborted_after_step"]) == (4, 1.0, 4, 5)
    assert summary["checkpoint"] == str(last) and summary["interrupted"] is True
    assert summary["best_val_acc1"] == final_state(aborted_dir)["best_val_acc1"]
    # Resumed in its own directory: the same training as without the abort, each step logged once.
    resumed, _ = run(compose, tmp_path, "aborted", *overrides, f"trainer.resume={aborted_dir}")
    assert_same_training(straight_dir, aborted_dir, straight, resumed)
    with open(aborted_dir / "steps.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["metric"] == "train/step_loss"]
    assert steps == list(range(1, 9))


def test_resume_into_its_own_run_dir_with_changed_settings_warns_and_records_them(compose, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qat")
    _, run_dir = run(compose, tmp_path, "run", "quant=xnor", "trainer.max_steps=1", "logger=csv")
    with open(run_dir / "epochs.csv") as handle:
        first_rows = handle.read().splitlines()
    caplog.clear()
    summary, _ = run(compose, tmp_path, "run", "quant=xnor", "quant.estimator=fourier", "optim.lr=0.01",
                     "trainer.max_steps=2", "trainer.progress_log_interval=5", "logger=csv",
                     f"trainer.resume={run_dir}")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    last = run_dir / "checkpoints" / "last.pt"
    assert warnings == [f"resuming {last} with settings that differ from the checkpoint's (its steps used the "
                        f"checkpoint's, the rest of this run uses these): optim.lr: 0.001 -> 0.01; "
                        f"quant.estimator: None -> 'fourier'"]
    assert summary["resume_config_changes"] == {"optim.lr": {"checkpoint": 0.001, "run": 0.01},
                                                "quant.estimator": {"checkpoint": None, "run": "fourier"}}
    assert (summary["estimator"], summary["steps"], summary["resumed_from"]) == ("fourier", 2, str(last))
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["resume_config_changes"] == summary["resume_config_changes"]
    with open(run_dir / "epochs.csv") as handle:  # appended to, not replaced
        rows = handle.read().splitlines()
    assert rows[: len(first_rows)] == first_rows and len(rows) == 2 * len(first_rows) - 1


def test_resume_with_the_same_settings_does_not_warn(compose, tmp_path, caplog):
    _, run_dir = run(compose, tmp_path, "run", "quant=ternary", "trainer.max_steps=1")
    caplog.clear()
    run(compose, tmp_path, "again", "quant=ternary", "trainer.max_steps=2", "trainer.progress_interval=1",
        "data.eval_batch_size=8", "trainer.progress_bar=true", f"trainer.resume={run_dir}")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_exact_mode_trains_bit_identically_and_int2_resumes_exactly(compose, tmp_path):
    """Whole runs (8 steps of a ResNet-20 XNOR): `exact` reaches the very same weights as `none`
    (the same loss curve); an int2 run stopped after 4 steps and resumed equals an uninterrupted
    one (the stochastic rounding draws from the RNG the checkpoint restores)."""
    def train(name, *overrides):
        summary = Trainer(compose([*RESUME_OVERRIDES, "quant=xnor", *overrides]), tmp_path / name).fit()
        return summary, final_state(tmp_path / name)["model"]

    none, none_state = train("none")
    exact, exact_state = train("exact", "trainer.act_compression=exact")
    assert exact["act_compression"]["mode"] == "exact" and none["act_compression"]["mode"] == "none"
    assert none["test_acc1"] == exact["test_acc1"]
    for key, tensor in none_state.items():
        assert torch.equal(tensor, exact_state[key]), key
    _, straight = train("int2", "trainer.act_compression=int2")
    train("int2-first", "trainer.act_compression=int2", "trainer.max_steps=4")
    checkpoint = tmp_path / "int2-first" / "checkpoints" / "last.pt"
    _, resumed = train("int2-resumed", "trainer.act_compression=int2", f"trainer.resume={checkpoint}")
    for key, tensor in straight.items():
        assert torch.equal(tensor, resumed[key]), key
    assert any(not torch.equal(t, none_state[k]) for k, t in straight.items() if t.is_floating_point())
