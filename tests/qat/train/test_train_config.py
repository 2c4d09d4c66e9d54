"""Every experiment composes and runs a step; group swaps, bad values and bad names fail clearly."""
import json

import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

import layers
from conftest import CONFIGS
from qat.train.config import ConfigError
from qat.train.data import DATASETS
from qat.train.trainer import Trainer

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_the_issue_lists_every_required_experiment():
    required = {f"resnet18_{m}" for m in ("fp", "bwn", "xnor", "ternary", "hq", "fda")} | {"mnist_bnn"}
    required |= {f"{arch}_{m}" for arch in ("resnet20", "vgg_small") for m in ("fp", "bwn", "xnor", "ternary", "fda")}
    assert required <= set(EXPERIMENTS)


def missing_quant_config(experiment: str) -> str | None:
    """The quant config an experiment's defaults name when configs/quant/ lacks it (another branch's method)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS / "experiment" / f"{experiment}.yaml")).get("defaults", [])
    for entry in defaults:
        name = entry.get("override /quant") if isinstance(entry, dict) else None
        if name and not (CONFIGS / "quant" / f"{name}.yaml").is_file():
            return name
    return None


def smoke_for(experiment: str, compose, smoke_overrides: list[str], tmp_path) -> list[str]:
    """The smoke overrides for `experiment`: synthetic images, or for a token dataset (language models) a
    tiny corpus in tmp_path and a tiny context."""
    data = compose([f"+experiment={experiment}"]).data
    if DATASETS[data.name].task != "language_model":
        return smoke_overrides
    folder = tmp_path / "corpus" / data.name
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (folder / f"{split}.txt").write_text(f"A tiny {split} text for one step. " * 8)
    kept = [o for o in smoke_overrides if not o.startswith("data")]
    return [*kept, f"data.root={tmp_path / 'corpus'}", "data.block_size=16", "data.batch_size=4",
            "data.eval_windows=2", "model.depth=1", "model.width=16", "model.heads=2"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_trains_one_step(experiment, compose, smoke_overrides, tmp_path):
    missing = missing_quant_config(experiment)
    if missing:
        pytest.skip(f"configs/quant/{missing}.yaml is missing (quant={missing} comes from another branch)")
    cfg = compose([f"+experiment={experiment}", *smoke_for(experiment, compose, smoke_overrides, tmp_path)])
    method = cfg.quant.method
    assert method in layers.METHOD_NAMES and cfg.experiment_name == experiment
    if experiment == "mnist_bnn":
        cfg.data.channels = 1
        cfg.data.image_size = 28
    summary = Trainer(cfg, tmp_path).fit()
    assert summary["steps"] == 1 and summary["method"] == method
    chosen = OmegaConf.to_container(cfg.quant).get("estimator")
    expected = (chosen if isinstance(chosen, str) else chosen["name"]) if chosen else (
        "none" if method == "fp" else layers.METHODS[method].default_estimator)
    assert summary["estimator"] == expected
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == cfg.model.name
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_command_line_quant_wins_over_the_experiment(compose, smoke_overrides, tmp_path):
    cfg = compose(["+experiment=resnet18_ternary", "quant=xnor", "quant.estimator=fourier", *smoke_overrides])
    assert cfg.quant.method == "xnor" and cfg.quant.estimator == "fourier"
    assert list(cfg.quant.keep_fp) == ["first", "last", "downsample"]  # the experiment's choice stays
    assert cfg.model.activation == "hardtanh"  # binary inputs get a sign-keeping activation
    assert "threshold_factor" not in cfg.quant  # ternary's hyperparameters left with it
    summary = Trainer(cfg, tmp_path).fit()
    assert (summary["method"], summary["estimator"], summary["w_bits"], summary["a_bits"]) == ("xnor", "fourier", 1, 1)


def test_estimator_group_writes_a_full_estimator_spec(compose):
    cfg = compose(["quant=fda", "estimator=fourier", "quant.estimator.max_terms=12"])
    assert OmegaConf.to_container(cfg.quant.estimator) == {"name": "fourier", "terms": 9, "max_terms": 12,
                                                           "omega": 0.1, "clip": 1.0}
    assert compose(["quant=xnor"]).quant.estimator is None


def test_model_and_data_swap(compose):
    cfg = compose(["+experiment=resnet20_fda", "model=vgg_small", "data=cifar100"])
    assert cfg.model.name == "vgg_small" and cfg.data.num_classes == 100 and cfg.trainer.epochs == 400


@pytest.mark.parametrize("method, first_layer", [("xnor", "bwn"), ("fda", "bwn"), ("ternary", "ternary"),
                                                 ("bwn", "bwn"), ("fp", "fp")])
def test_mnist_bnn_keeps_its_shape_under_quant_swaps(compose, method, first_layer):
    from qat import models, quantize_model, resolve_layer_specs

    cfg = compose(["+experiment=mnist_bnn", f"quant={method}"])
    spec = OmegaConf.to_container(cfg.quant, resolve=True)
    model = models.build("mnist_cnn", num_classes=10, in_channels=1, activation="hardtanh")
    methods = [s["method"] for s in resolve_layer_specs(model, spec).values()]
    assert methods == [first_layer] + [method] * 4
    quantize_model(model, spec)


def test_mnist_bnn_recipe(compose):
    cfg = compose(["+experiment=mnist_bnn"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.data.batch_size, cfg.trainer.epochs) == ("adam", 1e-3, 64, 6)
    assert (cfg.sched.name, cfg.sched.warmup_epochs, cfg.sched.final_lr_fraction) == ("cosine", 0, 0.0)
    assert list(cfg.quant.keep_fp) == []


def test_misspelled_group_choice_lists_the_valid_ones(compose):
    with pytest.raises(MissingConfigException) as error:
        compose(["quant=xnorr"])
    message = str(error.value)
    assert "xnorr" in message and all(m in message for m in layers.METHOD_NAMES)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be > 0, got 0"),
    ("optim.lr=-0.1", "optim.lr must be > 0, got -0.1"),
    ("trainer.epochs=0", "trainer.epochs must be an int >= 1, got 0"),
    ("trainer.max_steps=0", "trainer.max_steps must be null or an int >= 1, got 0"),
    # A value of the wrong type is named too, not reported as "'>' not supported between 'str' and 'int'".
    ("optim.lr=abc", "optim.lr must be > 0, got 'abc'"),
    ("trainer.epochs=2.5", "trainer.epochs must be an int >= 1, got 2.5"),
    ("seed=x", "seed must be an int, got 'x'"),
    ("data.batch_size=true", "data.batch_size must be an int >= 1, got True"),
])
def test_bad_values_fail_at_start(compose, smoke_overrides, tmp_path, override, message):
    cfg = compose([*smoke_overrides, override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Trainer(cfg, tmp_path)


def test_unknown_estimator_name_is_reported(compose, smoke_overrides, tmp_path):
    cfg = compose([*smoke_overrides, "quant=xnor", "quant.estimator=fourrier"])
    with pytest.raises(ValueError, match="unknown estimator 'fourrier'"):
        Trainer(cfg, tmp_path)


@pytest.mark.parametrize("method", layers.METHOD_NAMES)
def test_every_method_swaps_into_mnist_bnn_and_trains_a_step(method, compose, smoke_overrides, tmp_path):
    """quant=<method> for every row of the method table: the resolvers give binary-input methods a
    sign-keeping activation and the first layer its weights-only counterpart."""
    cfg = compose(["+experiment=mnist_bnn", f"quant={method}", *smoke_overrides])
    cfg.data.channels, cfg.data.image_size = 1, 28
    trainer = Trainer(cfg, tmp_path)
    first = next(m for m in trainer.model.modules() if isinstance(m, (layers.QuantizedLayer, torch.nn.Conv2d)))
    assert getattr(first, "method", "fp") == layers.weights_only_method(method)
    assert trainer.fit()["steps"] == 1
