"""train.py as users run it: a Hydra multirun, a command-line swap, and DDP with 2 CPU processes."""
import json
import subprocess

import pytest
import torch

from conftest import REPO, SMOKE_OVERRIDES, compose_config
from qat import models, quantize_model
from qat.train.checkpoint import load_checkpoint
from qat.train.config import to_plain
from qat.train.data import build_data
from qat.train.metrics import MetricSums


def train_py(python, env, *args, timeout=240):
    result = subprocess.run([python, str(REPO / "train.py"), *args], cwd=REPO, env=env, timeout=timeout,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_job_multirun_gives_each_job_its_own_run(python, subprocess_env, tmp_path):
    train_py(python, subprocess_env, "-m", "+experiment=resnet20_fp", "quant=bwn,xnor", *SMOKE_OVERRIDES,
             "logger=csv", f"hydra.sweep.dir={tmp_path}")
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0-bwn-s0", "1-xnor-s0"]
    methods = [json.loads(p.read_text())["method"] for p in summaries]
    assert methods == ["bwn", "xnor"]
    assert all((p.parent / "epochs.csv").is_file() for p in summaries)


def test_command_line_swap_of_quant_and_estimator(python, subprocess_env, tmp_path):
    result = train_py(python, subprocess_env, "+experiment=resnet18_ternary", "quant=xnor",
                      "quant.estimator=fourier", *SMOKE_OVERRIDES, f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["experiment"], summary["method"], summary["estimator"]) == ("resnet18_ternary", "xnor", "fourier")
    assert "XNORConv2d" in result.stdout  # the model summary is printed at the start


def test_misspelled_choice_on_the_command_line_lists_valid_ones(python, subprocess_env, tmp_path):
    result = subprocess.run([python, str(REPO / "train.py"), "quant=xnorr", f"hydra.run.dir={tmp_path}"],
                            cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Could not find 'quant/xnorr'" in result.stderr and "ternary" in result.stderr


def test_ddp_with_two_cpu_processes_matches_single_process_evaluation(python, subprocess_env, tmp_path):
    overrides = [*SMOKE_OVERRIDES, "model=resnet20", "data.num_train=32", "data.num_test=13",
                 "data.image_size=16", "trainer.max_steps=2", "quant=xnor", "logger=csv"]
    result = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
         *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    # Rank 0's checkpoint, evaluated in this single process on all 13 test images (an odd count,
    # so the shards are uneven), gives the all-reduced numbers the DDP run reported.
    cfg = compose_config(overrides)
    bundle = build_data(cfg.data)
    model = quantize_model(models.build("resnet20", num_classes=10, in_channels=3, activation="hardtanh",
                                        shortcut="A", bireal=False, bn_before_fc=False), to_plain(cfg.quant))
    model.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"])
    model.eval()
    sums = MetricSums("cpu")
    with torch.no_grad():
        images = torch.stack([bundle.test[i][0] for i in range(13)])
        labels = torch.tensor([bundle.test[i][1] for i in range(13)])
        logits = model(images)
        sums.update(torch.nn.functional.cross_entropy(logits, labels), logits, labels)
    assert sums.result("test")["test/acc1"] == pytest.approx(summary["test_acc1"])


def test_resume_continues_in_the_runs_own_directory(python, subprocess_env, tmp_path):
    env = dict(subprocess_env, QAT_RUNS=str(tmp_path / "runs"))
    # 16 images in batches of 8 for 2 epochs: 4 steps; the first launch stops after 1.
    common = [*SMOKE_OVERRIDES, "model=resnet20", "data.image_size=8", "trainer.epochs=2", "experiment_name=exp"]
    train_py(python, env, *common)
    [run] = list((tmp_path / "runs" / "exp").iterdir())
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    train_py(python, env, *common, "trainer.max_steps=null", f"trainer.resume={run / 'checkpoints' / 'last.pt'}")
    assert list((tmp_path / "runs").rglob("summary.json")) == [run / "summary.json"]  # one run, not two
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["epochs"], summary["interrupted"]) == (4, 2.0, False)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    # The first launch's own record stays; the resume's launch files went to .hydra/resume-<time>/.
    assert "trainer.resume" not in (run / ".hydra" / "overrides.yaml").read_text()
    [resumed] = (run / ".hydra").glob("resume-*")
    assert "trainer.resume" in (resumed / "overrides.yaml").read_text()


def test_a_multirun_whose_first_job_fails_leaves_no_directory(python, subprocess_env, tmp_path):
    env = dict(subprocess_env, QAT_RUNS=str(tmp_path / "runs"))
    env.pop("HYDRA_FULL_ERROR")
    result = subprocess.run([python, str(REPO / "train.py"), "-m", *SMOKE_OVERRIDES, "quant=bwn,xnor", "optim.lr=-1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["train.py: error: invalid config: optim.lr must be > 0, got -1"]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*"))  # no sweep dir either
