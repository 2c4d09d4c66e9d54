"""Optimizers and schedules: the formulas of qat.train.optim, weight-decay groups, seed repeatability."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from qat.train.checkpoint import load_checkpoint
from qat.train.optim import build_optimizer, lr_multiplier
from qat.train.trainer import Trainer


def sched(**values):
    return OmegaConf.create(values)


def test_cosine_with_warmup_follows_its_formula():
    f = lr_multiplier(sched(name="cosine", warmup_epochs=1, final_lr_fraction=0.0), steps_per_epoch=10, total_steps=110)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)                      # halfway through the cosine part
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_and_final_fraction():
    f = lr_multiplier(sched(name="step", milestones=[2, 3], gamma=0.1), steps_per_epoch=5, total_steps=25)
    assert [f(9), f(10), f(14), f(15)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    g = lr_multiplier(sched(name="cosine", final_lr_fraction=0.1), steps_per_epoch=5, total_steps=10)
    assert g(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown sched.name 'linear'; valid: cosine, step, constant"):
        lr_multiplier(sched(name="linear"), 1, 1)


def test_unknown_optimizer_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown optim.name 'lamb'; valid: adam, adamw, sgd"):
        build_optimizer(OmegaConf.create({"name": "lamb", "lr": 0.1}),
                        [{"params": [torch.nn.Parameter(torch.ones(1))]}])


SMALL = ["data=synthetic", "data.num_train=16", "data.num_test=8", "data.batch_size=8", "data.image_size=16",
         "model=resnet20", "logger=none", "trainer.progress_bar=false", "trainer.threads=1", "device=cpu",
         "trainer.epochs=1"]


def test_binary_latent_weights_get_no_weight_decay_but_ternary_ones_do(compose, tmp_path):
    for method, latent_decay in (("xnor", 0.0), ("ternary", 5e-4)):
        trainer = Trainer(compose([*SMALL, f"quant={method}", "optim.weight_decay=5e-4"]), tmp_path / method)
        latent = trainer.model.layers[1][0].conv1.weight
        group = next(g for g in trainer.optimizer.param_groups if any(p is latent for p in g["params"]))
        assert group["weight_decay"] == latent_decay
        fp_first = trainer.model.conv1.weight  # the float first conv keeps weight decay
        first_group = next(g for g in trainer.optimizer.param_groups if any(p is fp_first for p in g["params"]))
        assert first_group["weight_decay"] == 5e-4


def test_xnor_latent_weights_stay_clipped_after_training(compose, tmp_path):
    trainer = Trainer(compose([*SMALL, "quant=xnor", "optim=sgd", "optim.lr=50"]), tmp_path)
    trainer.fit()
    assert trainer.model.layers[1][0].conv1.weight.abs().max() <= 1.0


def test_same_seed_repeats_and_another_seed_differs(compose, tmp_path):
    def weights(seed, name):
        Trainer(compose([*SMALL, "quant=bwn", f"seed={seed}"]), tmp_path / name).fit()
        return load_checkpoint(tmp_path / name)["model"]["layers.1.0.conv1.weight"]

    assert torch.equal(weights(3, "a"), weights(3, "b"))
    assert not torch.equal(weights(3, "a2"), weights(4, "c"))
