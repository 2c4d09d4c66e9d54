"""Bop (qat.train.bop): the flip rule, which weights it trains, exact resume, the flip ratio in the logs."""
import csv
import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

import qat.latent
from conftest import REPO, SMOKE_OVERRIDES
from layers import BWNConv2d
from qat.train.bop import Bop, bop_methods
from qat.train.checkpoint import load_checkpoint
from qat.train.config import ConfigError
from qat.train.optim import CaseOptimizer
from qat.train.trainer import Trainer

# 32 train images in batches of 8: 4 steps per epoch.
SMALL = ["data=synthetic", "data.num_train=32", "data.num_test=8", "data.batch_size=8", "data.eval_batch_size=8",
         "data.image_size=8", "model=resnet20", "logger=none", "trainer.progress_bar=false", "trainer.threads=1",
         "device=cpu", "trainer.epochs=2", "quant=xnor", "optim=bop"]


def larq_bop(w, grads, gamma, tau):
    """Larq's Bop, element by element in Python floats: m += gamma (g - m); w = sign(-sign(w m - tau) w)."""
    w, m = list(w), [0.0] * len(w)
    for g in grads:
        for i in range(len(w)):
            m[i] = m[i] + gamma * (g[i] - m[i])
            s = w[i] * m[i] - tau
            w[i] = -w[i] if s > 0 else w[i]  # sign(-sign(s) w): -w for s > 0, w for s < 0 (s == 0 avoided below)
    return w, m


def test_bop_flips_where_the_averaged_gradient_agrees_with_the_sign_and_exceeds_tau():
    w0 = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    # step 1: m = g / 2; flips at 0 (m=0.4>0.1, w=+1) and 3 (m=-0.3, w=-1); 1, 2 are of opposite sign,
    # 4 (m=0.05) and 5 (m=-0.04) stay under tau. Later steps flip some back, some again.
    grads = [[0.8, 0.6, -0.5, -0.6, 0.1, -0.08],
             [0.8, 0.6, -0.5, 0.9, 0.5, -0.5],
             [-0.9, 0.6, -0.5, 0.9, 0.5, -0.5]]
    weight = torch.nn.Parameter(torch.tensor(w0))
    bop = Bop([weight], gamma=0.5, threshold=0.1)
    history = []
    for g in grads:
        weight.grad = torch.tensor(g)
        bop.step()
        history.append(weight.detach().clone())
    assert history[0].tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]
    expected_w, expected_m = larq_bop(w0, grads, 0.5, 0.1)
    assert weight.tolist() == expected_w
    assert torch.allclose(bop.state[weight]["momentum"], torch.tensor(expected_m), atol=1e-7)
    assert weight.abs().eq(1).all()


def test_bop_matches_larq_on_random_gradients_with_its_defaults():
    torch.manual_seed(0)
    w0 = torch.where(torch.randn(200) >= 0, 1.0, -1.0)
    grads = [(torch.randn(200) * 1e-3).tolist() for _ in range(5)]
    weight = torch.nn.Parameter(w0.clone())
    bop = Bop([weight])  # gamma 1e-4, threshold 1e-8
    flipped = 0
    for g in grads:
        before = weight.detach().clone()
        weight.grad = torch.tensor(g)
        bop.step()
        flipped = int((weight != before).sum())
        assert bop.step_metrics()["train/bop_flip_ratio"] == pytest.approx(flipped / 200)
    assert weight.tolist() == larq_bop(w0.tolist(), grads, 1e-4, 1e-8)[0]
    assert 0 < flipped < 200


def test_bad_gamma_or_threshold_is_one_error_line():
    weight = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigError, match=r"optim.gamma must be in \(0, 1\], got 0"):
        Bop([weight], gamma=0)
    with pytest.raises(ConfigError, match="optim.threshold must be >= 0, got -1"):
        Bop([weight], threshold=-1)


def test_binary_weights_go_to_bop_at_plus_minus_one_and_the_rest_to_adam(compose, tmp_path):
    trainer = Trainer(compose([*SMALL, "optim.lr=0.002", "optim.gamma=0.001"]), tmp_path)
    optimizer = trainer.optimizer
    assert isinstance(optimizer, CaseOptimizer)
    adam, bop = optimizer.optimizers
    assert isinstance(adam, torch.optim.Adam) and isinstance(bop, Bop)
    binary = [m.weight for m in trainer.model.modules() if getattr(m, "weight_bits", 32) == 1]
    assert len(binary) == 18  # the binary convs of ResNet-20; first conv, shortcuts and fc stay float
    bop_ids = {id(p) for g in bop.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adam.param_groups for p in g["params"]}
    assert bop_ids == {id(w) for w in binary}
    assert adam_ids == {id(p) for p in trainer.model.parameters()} - bop_ids
    assert all(w.abs().eq(1).all() for w in binary)
    assert optimizer.param_groups[0]["lr"] == 0.002 and bop.param_groups[0]["lr"] == 0.001  # gamma
    assert all(qat.latent.is_latent_free(w) for w in binary)
    assert not qat.latent.is_latent_free(trainer.model.conv1.weight)


def test_the_gradient_bop_averages_is_the_gradient_wrt_the_binary_weight(compose, tmp_path):
    trainer = Trainer(compose(SMALL), tmp_path)
    layer = trainer.model.layers[1][0].conv1
    x = torch.randn(2, layer.in_channels, 4, 4)
    layer(x).square().sum().backward()
    binary = layer.weight.detach().clone().requires_grad_(True)  # +-1: what the layer computes with
    F.conv2d(torch.where(x >= 0, 1.0, -1.0), binary, None, layer.stride, layer.padding).square().sum().backward()
    # alpha = mean|W| = 1 and detached: no (1/n) sign(W_i) sum_j G_j sign(W_j) term from the scale
    assert torch.allclose(layer.weight.grad, binary.grad, rtol=1e-5, atol=1e-5)


def test_latent_clipping_leaves_latent_free_weights_alone():
    conv = BWNConv2d(2, 2, 1)
    with torch.no_grad():
        conv.weight.fill_(3.0)
    qat.latent.clip_latent_weights(conv)
    assert conv.weight.max() == 1.0
    with torch.no_grad():
        conv.weight.fill_(3.0)
    qat.latent.mark_latent_free(conv.weight)
    qat.latent.clip_latent_weights(conv)
    assert conv.weight.max() == 3.0


@pytest.mark.parametrize("overrides, message", [
    (["quant=ternary"], "optim=bop found no layer with 1-bit sign(W) weights to train (quantized methods in this "
                        "model: ternary); use quant= one of bwn, xnor, reactnet, or another optim"),
    (["quant=fda"], "optim=bop cannot train layer 'layers.0.0.conv1' (method fda): its 1-bit code is not sign(W)"),
    (["quant.estimator=approx_sign"], "optim=bop: layer 'layers.0.0.conv1': weight estimator 'approx_sign' has "
                                      "derivative [0.0, 0.0] at w = -1, +1"),
    (["optim.gamma=2"], "optim.gamma must be in (0, 1], got 2"),
])
def test_what_bop_cannot_train_is_one_clear_error(compose, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        Trainer(compose([*SMALL, *overrides]), tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bop_methods_come_from_the_method_table():
    # the rows whose weights are alpha_c sign(W); Libra-PB / IMB code sign(W^) and FDA adds noise
    assert bop_methods() == ["bwn", "xnor", "reactnet"]


def test_resume_restores_the_bop_momentum_exactly(compose, tmp_path):
    straight = Trainer(compose(SMALL), tmp_path / "straight").fit()
    Trainer(compose([*SMALL, "trainer.max_steps=4"]), tmp_path / "first").fit()
    resumed = Trainer(compose([*SMALL, f"trainer.resume={tmp_path / 'first'}"]), tmp_path / "resumed").fit()
    assert straight["steps"] == resumed["steps"] == 8
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "resumed"))
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    bop_a, bop_b = a["optimizer"]["members"][1], b["optimizer"]["members"][1]
    assert len(bop_a["state"]) == 18
    for index, state in bop_a["state"].items():
        assert state["momentum"].abs().sum() > 0
        assert torch.equal(state["momentum"], bop_b["state"][index]["momentum"]), index
    assert a["scheduler"] == b["scheduler"]
    assert straight["test_acc1"] == resumed["test_acc1"]


def test_the_flip_ratio_of_bop_runs_is_logged(compose, tmp_path):
    trainer = Trainer(compose([*SMALL, "trainer.max_steps=2", "logger=csv", "logger.log_every=1",
                               "logger.diagnostics_every=1"]), tmp_path)
    layer, name = trainer.model.layers[1][0].conv1, "layers.1.0.conv1"
    snapshots = [layer.weight.detach().clone()]
    bop = trainer.optimizer.optimizers[1]
    step = bop.step

    def step_and_remember(*args, **kwargs):
        out = step(*args, **kwargs)
        snapshots.append(layer.weight.detach().clone())
        return out

    bop.step = step_and_remember
    trainer.fit()
    with open(tmp_path / "steps.csv") as handle:
        rows = [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(handle)]
    # diagnostics at step 2: the share of this layer's weights whose sign changed since step 1
    # (then the end-of-epoch diagnostics, at the same step: nothing changed since)
    logged = [v for s, k, v in rows if s == 2 and k == f"diag/{name}/flip_ratio"]
    flipped = (snapshots[2] != snapshots[1]).float().mean().item()
    assert logged == [pytest.approx(flipped), 0.0] and flipped > 0
    # the optimizer's own per-step figure, over all binary weights
    assert [s for s, k, _ in rows if k == "train/bop_flip_ratio"] == [1, 2]
    assert not any(k == f"diag/{name}/clip_fraction" for _, k, _ in rows)  # no latent to clip


def test_train_py_runs_mnist_bnn_with_bop(python, subprocess_env, tmp_path):
    result = subprocess.run([python, str(REPO / "train.py"), "+experiment=mnist_bnn", "optim=bop", *SMOKE_OVERRIDES,
                             "data.channels=1", "data.image_size=28", "trainer.max_steps=2", "logger=csv",
                             "logger.log_every=1", f"hydra.run.dir={tmp_path}"],
                            cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "xnor"
    weights = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert weights["features.0.weight"].abs().eq(1).all()  # mnist_bnn's first layer is binary (bwn) too
    assert "train/bop_flip_ratio" in (tmp_path / "steps.csv").read_text()
