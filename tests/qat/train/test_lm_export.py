"""`python -m qat.export` on a language-model run: the task's sample (validation token windows) and
check (greedy next bytes, bits per byte of both models), the file generating the checkpoint's greedy
text through `python -m qat.generate --packed`; and train.py's objective (the task's best figure)."""
import importlib.util
import re
from contextlib import contextmanager

import pytest
import torch
from test_lm_data import write_corpus
from test_lm_trainer import lm_overrides

from conftest import CONFIGS, REPO
from qat.export.__main__ import main as export_main
from qat.export.__main__ import trained_run
from qat.generate.__main__ import main as generate_main
from qat.train import cli
from qat.train.tasks import get_task
from qat.train.trainer import Trainer

METHODS = ["ternary", "bitnet158"]


def tiny_lm_run(compose, tmp_path, method):
    if not (CONFIGS / "quant" / f"{method}.yaml").is_file():
        pytest.skip(f"configs/quant/{method}.yaml is missing")
    write_corpus(tmp_path / "data")
    cfg = compose(lm_overrides(tmp_path / "data", f"quant={method}", "trainer.max_steps=3"))
    return Trainer(cfg, tmp_path / "run").fit()


def greedy_text(capsys, *args):
    assert generate_main([*args, "--prompt", "The quick", "--tokens", "16"]) == 0
    return capsys.readouterr().out.split("\n\n[")[0]


@pytest.mark.parametrize("method", METHODS)
def test_export_of_an_lm_run_checks_bits_per_byte_and_generates_the_same_text(compose, tmp_path, capsys, method):
    summary = tiny_lm_run(compose, tmp_path, method)
    out = tmp_path / "lm.safetensors"
    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the first 4 pydoc validation windows" in printed and "identical greedy next bytes: True" in printed
    quantized, packed = map(float, re.search(r"bits per byte: quantized ([\d.]+), packed ([\d.]+)", printed).groups())
    assert quantized == pytest.approx(packed, abs=1e-4)
    assert 0.5 < quantized < 9                          # a 3-step model: near uniform over 256 bytes (8 bits)
    assert summary["best_val_bpb"] is not None
    from_checkpoint = greedy_text(capsys, str(tmp_path / "run"))
    assert from_checkpoint.startswith("The quick") and greedy_text(capsys, "--packed", str(out)) == from_checkpoint


def test_lm_export_sample_is_validation_text_and_its_bits_per_byte_is_the_task_loss(compose, tmp_path):
    tiny_lm_run(compose, tmp_path, "ternary")
    model, _, cfg = trained_run(tmp_path / "run")
    task = get_task("language_model")
    sample = task.export_sample(cfg.data)
    assert sample.inputs.dtype == torch.long and sample.inputs.shape == (4, 16)
    val = (tmp_path / "data" / "pydoc" / "val.txt").read_bytes()
    assert bytes(sample.inputs[1].tolist()) == val[16:32] and bytes(sample.targets[1].tolist()) == val[17:33]
    check = task.export_check(model, model, sample)
    assert check.passed and "max |logit difference| 0 " in check.text
    broken = task.export_check(model, lambda x: -model(x), sample)  # a packed model that decides otherwise
    assert not broken.passed and "identical greedy next bytes: False" in broken.text


def test_lm_export_without_the_corpus_compares_on_random_tokens(compose, tmp_path, capsys):
    tiny_lm_run(compose, tmp_path, "ternary")
    code = export_main([str(tmp_path / "run"), "--out", str(tmp_path / "lm.safetensors"),
                        "--data-root", str(tmp_path / "elsewhere")])
    printed = capsys.readouterr().out
    assert code == 0 and "4 random token windows" in printed and "bits per byte:" not in printed


def test_export_benchmark_of_an_lm_run_is_a_one_line_error(compose, tmp_path, capsys):
    tiny_lm_run(compose, tmp_path, "ternary")
    code = cli.guard(lambda: export_main([str(tmp_path / "run"), "--out", str(tmp_path / "x.safetensors"),
                                          "--benchmark"]), "python -m qat.export")
    assert code == 2 and "benchmarks/lm_generate.py" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, summary, expected", [
    ("language_model", {"task": "language_model", "best_val_bpb": 2.5, "best_val_acc1": None}, 2.5),
    ("classification", {"task": "classification", "best_val_acc1": 91.0}, 91.0),
    ("classification", {"best_val_acc1": 91.0}, 91.0),                 # summaries from before the task key
])
def test_train_py_returns_the_tasks_best_validation_figure(monkeypatch, tmp_path, task, summary, expected):
    script = load_train_script()

    @contextmanager
    def job():
        yield tmp_path

    import qat.train.trainer

    monkeypatch.setattr(script.cli, "hydra_job", job)
    monkeypatch.setattr(qat.train.trainer, "train", lambda cfg, run_dir: summary)
    assert script.main.__wrapped__(None) == expected
