"""Training a multi-bit model (qat.train.multibit): the summed per-width loss and its gradient, the
per-width evaluation, the config checks, and a run of experiment=mnist_bnn_multibit exported at a
chosen width by ``python -m qat.export --bits``."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
import qat.multibit as mb
from qat.export import load_packed
from qat.export.__main__ import main as export_main
from qat.export.__main__ import trained_model_from_checkpoint
from qat.train import cli
from qat.train.config import ConfigError
from qat.train.multibit import Widths, min_norm_weights
from qat.train.trainer import Trainer

TINY_RUN = ["data.channels=1", "data.image_size=28", "trainer.max_steps=2"]


def model_and_batch():
    torch.manual_seed(0)
    model = qat.quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)),
                               {"method": "multibit", "keep_fp": []})
    return model, torch.randn(10, 12), torch.randint(0, 3, (10,))


def cross_entropy_step(model, x, y):
    """The trainer's forward_backward for a plain cross-entropy objective."""
    def forward_backward(loss_scale=1.0):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        (loss * loss_scale).backward()
        return loss, logits, {}
    return forward_backward


@pytest.mark.parametrize("weights", [None, [2.0, 0.5, 1.5]], ids=["sum", "loss_weights"])
def test_step_loss_and_gradient_equal_the_weighted_sum_of_separate_forwards(weights):
    model, x, y = model_and_batch()
    widths = Widths.from_config({"train_bits": [8, "ternary", 1], "loss_weights": weights}, model)

    loss, logits, parts = widths.train_step(cross_entropy_step(model, x, y))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    separate = []
    for width in (8, "ternary", 1):
        with mb.bits(model, width):
            separate.append(F.cross_entropy(model(x), y))
    expected = sum(w * part for w, part in zip(weights or [1.0] * 3, separate, strict=True))
    expected.backward()  # one graph through the three widths
    assert torch.allclose(loss, expected.detach(), rtol=1e-6, atol=0)
    assert all(torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7) for g, p in zip(grads, model.parameters(), strict=True))
    assert set(parts) == {"train/loss@8b", "train/loss@ternary", "train/loss@1b"}
    assert float(parts["train/loss@ternary"]) == pytest.approx(float(separate[1].detach()), rel=1e-6)  # unweighted
    assert torch.equal(parts["train/loss@ternary"], separate[1].detach())
    with mb.bits(model, 8):
        assert torch.equal(logits, model(x))  # the first width's logits
    assert mb.active_width(model) == 8


def test_evaluation_reports_every_width_and_the_mean_of_the_trained_ones():
    model, x, y = model_and_batch()
    widths = Widths.from_config({"train_bits": [4, 1], "eval_bits": [8, 4, "ternary"], "bn": "shared"}, model)

    def evaluate_split():
        with torch.no_grad():
            return {"val/loss": float(F.cross_entropy(model(x), y))}

    results = widths.evaluate(evaluate_split)
    separate = {}
    for width in (8, 4, "ternary", 1):
        with mb.bits(model, width):
            separate[width] = evaluate_split()["val/loss"]
    assert set(results) == {"val/loss@8b", "val/loss@4b", "val/loss@ternary", "val/loss"}
    assert results["val/loss@ternary"] == separate["ternary"]
    assert results["val/loss"] == pytest.approx((separate[4] + separate[1]) / 2)
    assert mb.active_width(model) == 4


def test_min_norm_weights_find_the_least_norm_point_of_the_convex_hull():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # |a g1 + (1 - a) g2|^2 = a^2 + 4 (1 - a)^2: least at a = 4/5
    assert torch.allclose(min_norm_weights(g @ g.T), torch.tensor([0.8, 0.2], dtype=torch.float64), atol=1e-9)
    opposed = torch.tensor([[1.0, 1.0], [-2.0, -2.0], [0.5, -3.0]])  # 0 lies on the segment of the first two
    alpha = min_norm_weights(opposed @ opposed.T)
    assert float((alpha.float() @ opposed).norm()) < 1e-6 and abs(float(alpha.sum()) - 1) < 1e-12
    assert torch.allclose(alpha, torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64), atol=1e-9)
    assert torch.equal(min_norm_weights(torch.eye(3) * 0), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_mgda_weighting_combines_the_widths_gradients_with_the_min_norm_alphas(weight):
    model, x, y = model_and_batch()
    widths = Widths.from_config({"train_bits": [8, "ternary", 1], "mgda_weight": weight}, model)

    _, _, parts = widths.train_step(cross_entropy_step(model, x, y))
    combined = [p.grad.clone() for p in model.parameters()]
    separate = []
    for width in (8, "ternary", 1):
        model.zero_grad()
        with mb.bits(model, width):
            F.cross_entropy(model(x), y).backward()
        separate.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    stacked = torch.stack(separate)
    alpha = weight * min_norm_weights(stacked.double() @ stacked.double().T) + (1 - weight) / 3
    assert not torch.allclose(alpha, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)  # not the plain sum
    expected = (alpha.float().unsqueeze(1) * stacked).sum(0) * 3
    assert torch.allclose(torch.cat([g.reshape(-1) for g in combined]), expected, rtol=1e-5, atol=1e-7)
    assert [float(parts[f"train/mgda_alpha@{w}"]) for w in ("8b", "ternary", "1b")] == pytest.approx(
        alpha.tolist(), rel=1e-6)


@pytest.mark.parametrize("block, message", [
    ({"train_bits": [8, 1.58]}, "ternary is written 'ternary'"),
    ({"train_bits": [4, 4]}, "names a width twice"),
    ({"train_bits": []}, "non-empty list"),
    ({"eval_bits": 2}, "non-empty list"),
    ({"train_width": [2]}, "unknown key"),
    ({"mgda_weight": 1.5}, "from 0"),
    ({"mgda_weight": True}, "from 0"),
    ({"train_bits": [8, 1], "loss_weights": [1.0]}, r"2 positive numbers, one per train width \(8b, 1b\)"),
    ({"train_bits": [8, 1], "loss_weights": [1.0, 0]}, "positive numbers"),
    ({"train_bits": [8, 1], "loss_weights": [1.0, True]}, "positive numbers"),
    ({"train_bits": [8, 1], "loss_weights": [2, 1], "mgda_weight": 0.5}, "set one of them"),
])
def test_bad_width_settings_are_config_errors(block, message):
    model, _, _ = model_and_batch()
    with pytest.raises(ConfigError, match=message):
        Widths.from_config(block, model)


def test_a_multibit_block_needs_multibit_layers():
    assert not Widths.from_config(None, nn.Linear(2, 2)).active
    with pytest.raises(ConfigError, match="quant=multibit"):
        Widths.from_config({"train_bits": [2]}, nn.Linear(2, 2))


def test_run_reports_each_width_and_exports_a_chosen_one(compose, smoke_overrides, tmp_path):
    cfg = compose(["+experiment=mnist_bnn_multibit", *smoke_overrides, *TINY_RUN, "logger=csv"])
    trainer = Trainer(cfg, tmp_path)
    summary = trainer.fit()
    evaluation = summary["multibit"]["evaluation"]
    assert summary["multibit"]["train_bits"] == ["8", "4", "2", "ternary", "1"]
    for label in ("8b", "4b", "2b", "ternary", "1b"):
        assert f"val/acc1@{label}" in evaluation and f"test/acc1@{label}" in evaluation
    mean = sum(evaluation[f"val/acc1@{label}"] for label in ("8b", "4b", "2b", "ternary", "1b")) / 5
    assert summary["val_acc1"] == pytest.approx(mean)
    steps = (tmp_path / "epochs.csv").read_text()
    assert "val/acc1@ternary" in steps
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["multibit"]["evaluation"] == pytest.approx(evaluation)

    out = tmp_path / "m2.safetensors"
    assert export_main([str(tmp_path), "--out", str(out), "--bits", "2"]) == 0
    model, _, input_shape = trained_model_from_checkpoint(tmp_path)
    mb.set_bits(model, 2)
    packed = load_packed(out)
    x = torch.randn(4, *input_shape)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))
        mb.set_bits(model, 1)
        assert not torch.equal(packed(x), model(x))
    bad = [str(tmp_path), "--out", str(tmp_path / "bad.safetensors"), "--bits", "3"]
    assert cli.guard(lambda: export_main(bad), "python -m qat.export") == 2  # one line, status 2


def test_private_affine_run_resumes_its_checkpoint_and_exports_a_width(compose, smoke_overrides, tmp_path):
    cfg = compose(["+experiment=mnist_bnn_multibit", *smoke_overrides, *TINY_RUN, "multibit.bn=per_width_affine",
                   "multibit.train_bits=[8,1]"])
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    model, _, input_shape = trained_model_from_checkpoint(tmp_path)
    norms = mb.per_width_batchnorms(model)
    assert norms and all(hasattr(bn, "bias_1b") for bn in norms)
    trained = dict(trainer.model.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):  # the checkpoint holds every width's beta
        assert torch.equal(p, trained[name]), name
    out = tmp_path / "m1.safetensors"
    assert export_main([str(tmp_path), "--out", str(out), "--bits", "1"]) == 0
    mb.set_bits(model, 1)
    x = torch.randn(4, *input_shape)
    with torch.no_grad():
        assert torch.equal(load_packed(out)(x), model(x))


def test_single_width_baseline_trains_and_exports_its_width(compose, smoke_overrides, tmp_path):
    cfg = compose(["+experiment=mnist_bnn_multibit", *smoke_overrides, *TINY_RUN, "multibit.train_bits=[ternary]",
                   "multibit.eval_bits=[ternary]"])
    summary = Trainer(cfg, tmp_path).fit()
    assert set(summary["multibit"]["evaluation"]) == {"val/loss@ternary", "val/acc1@ternary", "val/acc5@ternary",
                                                      "test/loss@ternary", "test/acc1@ternary", "test/acc5@ternary"}
    assert summary["val_acc1"] == summary["multibit"]["evaluation"]["val/acc1@ternary"]
    model, _, _ = trained_model_from_checkpoint(tmp_path)
    assert mb.active_width(model) == "ternary"  # export's default: the run's first train width


@pytest.mark.parametrize("block, message", [
    ({"bn": "private"}, "multibit.bn must be one of per_width, per_width_affine, shared"),
    ({"train_bits": [8, 1], "eval_bits": [8, 2]}, "2b not in multibit.train_bits"),
])
def test_bad_batchnorm_settings_are_config_errors(block, message):
    model, _, _ = model_and_batch()
    with pytest.raises(ConfigError, match=message):
        Widths.from_config(block, model)


def test_per_width_batchnorm_is_the_default_and_shared_installs_nothing():
    model = qat.quantize_model(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)),
                               {"method": "multibit", "keep_fp": []})
    shared_keys = set(model.state_dict())
    Widths.from_config({"train_bits": [4, 1], "bn": "shared"}, model)
    assert set(model.state_dict()) == shared_keys and not mb.per_width_batchnorms(model)
    widths = Widths.from_config({"train_bits": [4, 1]}, model)
    assert widths.eval_bits == [4, 1]  # per_width: the trained widths are the evaluated ones
    assert "1.running_var_ternary" in model.state_dict() and "1.running_var" not in model.state_dict()


MULTIBIT_RESUME = ["+experiment=mnist_bnn_multibit", "data=synthetic", "data.num_train=16", "data.num_test=8",
                   "data.batch_size=8", "data.eval_batch_size=8", "data.channels=1", "data.image_size=28",
                   "logger=none", "trainer.progress_bar=false", "trainer.threads=1", "device=cpu",
                   "trainer.epochs=2", "multibit.train_bits=[8,1]"]


def test_resume_with_per_width_statistics_equals_uninterrupted_training(compose, tmp_path):
    straight = Trainer(compose(MULTIBIT_RESUME), tmp_path / "straight").fit()
    Trainer(compose([*MULTIBIT_RESUME, "trainer.max_steps=2"]), tmp_path / "first").fit()
    resumed = Trainer(compose([*MULTIBIT_RESUME, f"trainer.resume={tmp_path / 'first'}"]), tmp_path / "resumed").fit()
    assert straight["multibit"]["evaluation"] == resumed["multibit"]["evaluation"]
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    # calibrated before the last evaluation: the 16 training images' 2 batches (not the 4 training steps)
    assert "features.2.num_batches_tracked_1b" in a and int(a["features.2.num_batches_tracked_1b"]) == 2
    assert int(a["features.2.num_batches_tracked_4b"]) == 0  # neither trained nor calibrated: never updated
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_training_steps_are_the_same_with_per_width_or_shared_statistics():
    """Training-mode BatchNorm normalizes with the batch's statistics, so the BN setting changes only
    which running statistics the steps update (and evaluation reads), not the gradients."""
    def model_with_bn():
        torch.manual_seed(0)
        return qat.quantize_model(nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
                                  {"method": "multibit", "keep_fp": []})

    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    grads, stats = {}, {}
    for bn in ("per_width", "shared"):
        model = model_with_bn()
        widths = Widths.from_config({"train_bits": [8, "ternary", 1], "bn": bn}, model)
        widths.train_step(cross_entropy_step(model, x, y))
        grads[bn] = [p.grad for p in model.parameters()]
        stats[bn] = model[1]
    assert all(torch.equal(a, b) for a, b in zip(grads["per_width"], grads["shared"], strict=True))
    assert int(stats["shared"].num_batches_tracked) == 3 and int(stats["per_width"].num_batches_tracked_1b) == 1


def test_init_from_a_per_width_run_loads_every_width_statistics(compose, tmp_path):
    """trainer.init_from builds the model whole (per-width BatchNorms included) before loading, so a
    per-width run's checkpoint (keys running_mean_<w>) loads key for key into a new per-width run."""
    Trainer(compose([*MULTIBIT_RESUME, "trainer.epochs=1"]), tmp_path / "source").fit()
    source = torch.load(tmp_path / "source" / "checkpoints" / "last.pt", weights_only=True)["model"]
    trainer = Trainer(compose([*MULTIBIT_RESUME, f"trainer.init_from={tmp_path / 'source'}"]), tmp_path / "new")
    assert trainer.init_record["loaded"] == len(source) and not trainer.init_record["missing"]
    own = trainer.model.state_dict()
    assert set(own) == set(source) and all(torch.equal(own[key], source[key]) for key in source)
    assert int(own["features.2.num_batches_tracked_1b"]) > 0  # the source's statistics, not fresh ones


def test_run_calibrates_batchnorm_before_evaluating_and_trains_the_same_weights(compose, tmp_path):
    """multibit.bn_calibration_batches: the checkpoint's per-width statistics are those of
    qat.multibit.calibrate_batchnorm on the run's calibration batches at the final weights; the
    training steps, and so every weight, are those of the run without calibration."""
    overrides = [*MULTIBIT_RESUME, "data.num_train=24"]  # 3 batches of 8 per epoch, 2 epochs
    plain = Trainer(compose([*overrides, "multibit.bn_calibration_batches=0"]), tmp_path / "plain").fit()
    calibrated = Trainer(compose([*overrides, "multibit.bn_calibration_batches=2"]), tmp_path / "calibrated").fit()
    assert plain["multibit"]["bn_calibration_batches"] == 0 and calibrated["multibit"]["bn_calibration_batches"] == 2
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "calibrated" / "checkpoints" / "last.pt", weights_only=True)["model"]
    statistics = {key for key in a if ".running_" in key or ".num_batches_tracked" in key}
    assert all(torch.equal(a[key], b[key]) for key in set(a) - statistics)  # weights, gamma, beta
    assert int(a["features.2.num_batches_tracked_1b"]) == 6 and int(b["features.2.num_batches_tracked_1b"]) == 2
    assert not torch.equal(a["features.2.running_var_1b"], b["features.2.running_var_1b"])

    model, _, _ = trained_model_from_checkpoint(tmp_path / "plain")
    cfg = compose(overrides)
    from qat.train.data import build_data
    from qat.train.multibit import calibration_inputs

    inputs = list(itertools.islice(calibration_inputs(build_data(cfg.data).train, 8, int(cfg.seed)), 2))
    mb.calibrate_batchnorm(model, inputs, [8, 1])
    by_library = model.state_dict()
    assert all(torch.equal(by_library[key], b[key]) for key in statistics)
    assert int(b["features.2.num_batches_tracked_4b"]) == 0  # not a train width: not calibrated
