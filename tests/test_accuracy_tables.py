"""benchmarks/accuracy.py's tables: one column set per task (summary.json `task`): top-1 for
classification (unchanged), bits per byte for a language model, in the plain and --by-recipe tables,
and the LM goal (bitnet158 within 0.1 bits per byte of fp)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO


def load_script(name, path):
    """Import a benchmarks/ script as a module (it is no package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = load_script("accuracy_script", REPO / "benchmarks" / "accuracy.py")

CLASSIFICATION_HEADER = ("| model | data | method | W/A | epochs | seeds | test top-1 (mean ± sd) | per seed | "
                         "best val top-1 | s/epoch | × fp time (uncontrolled) | accuracy goal |")


def run_summary(method, seed, task=None, experiment="e", **figures):
    summary = {"method": method, "seed": seed, "model": "gpt" if task == "language_model" else "mnist_cnn",
               "data": "pydoc" if task == "language_model" else "mnist", "w_bits": 32 if method == "fp" else 1.58,
               "a_bits": 32 if method == "fp" else 8, "epochs": 4, "epochs_planned": 4, "seconds_per_epoch": 10.0,
               "val_source": "val", "experiment": experiment, "distill": None, "interrupted": False, **figures}
    if task is not None:
        summary["task"] = task
    return summary


def write_runs(root, summaries):
    for index, summary in enumerate(summaries):
        folder = root / "sweep" / f"{index}-{summary['method']}-s{summary['seed']}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    return root


LM_RUNS = [run_summary("fp", 0, "language_model", "lm_fp", best_val_bpb=2.1, test_bpb=2.2),
           run_summary("fp", 1, "language_model", "lm_fp", best_val_bpb=2.3, test_bpb=2.4),
           run_summary("bitnet158", 0, "language_model", "lm_bitnet158", best_val_bpb=2.35, test_bpb=2.3851),
           run_summary("bitnet158", 1, "language_model", "lm_bitnet158", best_val_bpb=2.45, test_bpb=2.45)]
CLASSIFICATION_RUNS = [run_summary("fp", 0, best_val_acc1=99.0, test_acc1=99.1),
                       run_summary("xnor", 0, "classification", best_val_acc1=98.0, test_acc1=98.25)]


def lines_of(text, marker):
    return [line for line in text.splitlines() if marker in line]


def test_lm_runs_are_tabulated_in_bits_per_byte(tmp_path):
    text = accuracy.table(accuracy.load(write_runs(tmp_path, LM_RUNS)))
    header = text.splitlines()[0]
    assert "test bits/byte (mean ± sd)" in header and "best val bits/byte" in header and "top-1" not in header
    (bitnet,) = lines_of(text, "| bitnet158 |")
    cells = [cell.strip() for cell in bitnet.split("|")[1:-1]]
    assert cells[6] == "2.418 ± 0.046" and cells[7] == "2.385 / 2.450" and cells[8] == "2.400 ± 0.071"
    # goal: bitnet158's mean test bits per byte (2.418) within 0.1 of fp's (2.300): +0.118, not met
    assert cells[11] == "≤ fp + 0.1: not met (+0.118, 2 vs 2 seeds)"
    (fp,) = lines_of(text, "| fp |")
    assert fp.split("|")[7].strip() == "2.300 ± 0.141" and fp.split("|")[12].strip() == ""


def test_lm_goal_is_met_within_the_gap(tmp_path):
    runs = [*LM_RUNS[:2], run_summary("bitnet158", 0, "language_model", best_val_bpb=2.3, test_bpb=2.35)]
    (bitnet,) = lines_of(accuracy.table(accuracy.load(write_runs(tmp_path, runs))), "| bitnet158 |")
    assert "≤ fp + 0.1: met (+0.050, 1 vs 2 seeds)" in bitnet


def test_mixed_runs_give_one_table_per_task_classification_unchanged_first(tmp_path):
    text = accuracy.table(accuracy.load(write_runs(tmp_path, CLASSIFICATION_RUNS + LM_RUNS)))
    classification, language_model = text.split("\n\n")
    assert classification.splitlines()[0] == CLASSIFICATION_HEADER
    assert ("| mnist_cnn | mnist | xnor | 1.58/8 | 4 | 0 | 98.25 | 98.25 | 98.00 | 10.0 | 1.00 | "
            "≥ 98.5 over 3 seeds: open |") in classification
    assert "gpt" not in classification and "mnist_cnn" not in language_model
    assert "test bits/byte" in language_model.splitlines()[0] and len(language_model.splitlines()) == 4


def test_by_recipe_table_of_lm_runs(tmp_path, capsys):
    accuracy.main(["table", str(write_runs(tmp_path, LM_RUNS)), "--by-recipe"])
    text = capsys.readouterr().out
    assert "test bits/byte (mean ± sd)" in text.splitlines()[0]
    (bitnet,) = lines_of(text, "bitnet158 (lm_bitnet158)")
    assert "| 2.418 ± 0.046 | 2.385 / 2.450 | 2.400 ± 0.071 |" in bitnet
    assert bitnet.endswith("| ≤ fp + 0.1: not met (+0.118, 2 vs 2 seeds) |")  # the method's goal, any recipe
    assert lines_of(text, "| fp (lm_fp) |")


def test_a_real_lm_run_summary_is_tabulated(compose, tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "qat" / "train"))
    from test_lm_data import write_corpus
    from test_lm_trainer import lm_overrides

    from qat.train.trainer import Trainer

    write_corpus(tmp_path / "data")
    summary = Trainer(compose(lm_overrides(tmp_path / "data", "quant=ternary", "trainer.epochs=1")),
                      tmp_path / "runs" / "sweep" / "run").fit()
    (row,) = lines_of(accuracy.table(accuracy.load(tmp_path / "runs")), "| ternary |")
    assert f"| {summary['test_bpb']:.3f} | {summary['test_bpb']:.3f} | {summary['best_val_bpb']:.3f} |" in row


@pytest.mark.parametrize("by_recipe", [False, True])
def test_no_runs_still_give_a_header(by_recipe):
    assert accuracy.table([], by_recipe=by_recipe).splitlines()[0] == CLASSIFICATION_HEADER
