"""Bad input on the command line: one line naming the bad value, status 2, no traceback, no run
directory left behind; HYDRA_FULL_ERROR=1 gives the traceback; Ctrl-C exits with 130.

Each case is a real `python train.py` / `python -m qat.export` / `python -m qat.train.report` process, run
without HYDRA_FULL_ERROR (conftest's `subprocess_env` sets it) and with QAT_RUNS in tmp_path.
"""
import json
import signal
import subprocess
import time

import pytest
from PIL import Image

from conftest import REPO

# Tiny and fast: the errors under test happen before (or at) the first step.
BASE = ["logger=none", "trainer.max_steps=1", "trainer.progress_bar=false", "trainer.threads=1", "device=cpu"]
SYNTHETIC = ["data=synthetic", "data.num_train=16", "data.num_test=8", "data.batch_size=8",
             "data.eval_batch_size=8", "data.image_size=8", "model=resnet20", *BASE]


@pytest.fixture
def env(subprocess_env, tmp_path):
    env = dict(subprocess_env, QAT_RUNS=str(tmp_path / "runs"))
    env.pop("HYDRA_FULL_ERROR")
    return env


def launch(python, env, args, module=None, timeout=180):
    command = [python, "-m", module, *args] if module else [python, str(REPO / "train.py"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, prog, *expected):
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 2, output
    assert "Traceback" not in result.stderr + result.stdout, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def assert_no_run_directory_left(tmp_path):
    runs = tmp_path / "runs"
    assert not runs.exists() or not list(runs.iterdir()), sorted(runs.rglob("*"))


def image_tree(root, broken=False):
    for index, name in enumerate(("cat", "dog")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * index + i, 0, 0)).save(root / "train" / name / f"{i:05d}.png")
    if broken:
        path = root / "train" / "dog" / "00001.png"
        path.write_bytes(path.read_bytes()[:40])
        return path


def cifar_tree(root):
    return ["data=cifar10", f"data.imagefolder={root}", "data.num_classes=2", "data.image_size=8",
            "data.val_split=0", "data.batch_size=2", "data.eval_batch_size=2", "data.num_workers=0",
            "model=resnet20", *BASE]


CASES = {
    "bad config value": (["optim.lr=abc"], ["optim.lr must be > 0, got 'abc'"]),
    "unknown estimator": (["quant=xnor", "quant.estimator=fourrier"],
                          ["unknown estimator 'fourrier'", "fourier"]),
    "unknown method": (["quant.method=xnorr"], ["unknown quantization method 'xnorr'", "ternary"]),
    "bad hyperparameter": (["quant=ternary", "quant.threshold_factor=-1"],
                           ["threshold_factor must be >= 0, got -1"]),
    "bad estimator hyperparameter": (["quant=xnor", "estimator=fourier", "quant.estimator.terms=0"],
                                     ["fourier: terms must be an integer >= 1, got 0"]),
    "unknown estimator hyperparameter": (["quant=xnor", "estimator=fourier", "+quant.estimator.termz=3"],
                                         ["estimator 'fourier' got invalid hyperparameters", "termz"]),
    "unknown group choice": (["quant=xnorr"], ["Could not find 'quant/xnorr'", "ternary", "xnor"]),
    "unknown override key": (["trainer.epoch=3"], ["Could not override 'trainer.epoch'. To append"]),
    "unparsable override": (["quant=["], ["cannot parse the override 'quant=['"]),
    "run name escapes the output root": (["experiment_name=../../../tmp/x"],
                                         ["experiment_name='../../../tmp/x' is not allowed", "letters, digits"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_input_prints_one_line_and_exits_2(python, env, tmp_path, case):
    overrides, expected = CASES[case]
    result = launch(python, env, [*SYNTHETIC, *overrides])
    assert_one_line_error(result, "train.py", *expected)
    assert_no_run_directory_left(tmp_path)


def test_missing_dataset(python, env, tmp_path):
    result = launch(python, env, ["data=mnist", f"data.root={tmp_path / 'nowhere'}", "data.source=null",
                                  "data.download=false", "model=mnist_cnn", *BASE])
    assert_one_line_error(result, "train.py", f"dataset 'mnist' not found in {tmp_path / 'nowhere' / 'MNIST'}",
                          "data.source=")
    assert_no_run_directory_left(tmp_path)


def test_empty_dataset(python, env, tmp_path):
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    result = launch(python, env, cifar_tree(tmp_path / "tree"))
    assert_one_line_error(result, "train.py", f"data.imagefolder {tmp_path / 'tree' / 'train'} holds no images",
                          "<class>/<image>")
    assert_no_run_directory_left(tmp_path)


def test_unreadable_image(python, env, tmp_path):
    broken = image_tree(tmp_path / "tree", broken=True)
    result = launch(python, env, [*cifar_tree(tmp_path / "tree"), "data.cache=true"])
    assert_one_line_error(result, "train.py", f"cannot read image {broken}")
    assert_no_run_directory_left(tmp_path)


def test_corrupt_checkpoint(python, env, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = launch(python, env, [*SYNTHETIC, f"trainer.resume={bad}"])
    assert_one_line_error(result, "train.py", f"cannot read checkpoint {bad}")
    assert_no_run_directory_left(tmp_path)


def test_corrupt_checkpoint_of_a_run_keeps_that_run_as_it_was(python, env, tmp_path):
    run = tmp_path / "runs" / "old" / "run1"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- quant=xnor\n")
    (run / "summary.json").write_text("{}\n")
    (run / "checkpoints" / "last.pt").write_bytes(b"truncated")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = launch(python, env, [*SYNTHETIC, f"trainer.resume={run}"])
    assert_one_line_error(result, "train.py", f"cannot read checkpoint {run / 'checkpoints' / 'last.pt'}")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no .hydra/resume-*/ left
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- quant=xnor\n"


def test_unwritable_run_directory(python, env, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = launch(python, dict(env, QAT_RUNS=str(tmp_path / "a_file" / "runs")), SYNTHETIC)
    assert_one_line_error(result, "train.py", "cannot write the run directory", str(tmp_path / "a_file"),
                          "QAT_RUNS")


def test_hydra_full_error_shows_the_traceback(python, env, tmp_path):
    for args, text in ((["optim.lr=abc"], "optim.lr must be > 0"), (["quant=xnorr"], "Could not find 'quant/xnorr'")):
        result = launch(python, dict(env, HYDRA_FULL_ERROR="1"), [*SYNTHETIC, *args])
        assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("train.py: error: ") and text in result.stderr


def test_ctrl_c_exits_with_130(python, env, tmp_path):
    process = subprocess.Popen([python, str(REPO / "train.py"), *SYNTHETIC, "trainer.max_steps=null",
                                "trainer.epochs=100000", "hydra.run.dir=" + str(tmp_path / "run")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / "run" / "checkpoints" / "last.pt").exists():  # training is under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "train.py: interrupted" in stderr


def test_export_of_a_corrupt_checkpoint(python, env, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"\x00" * 100)
    result = launch(python, env, [str(bad), "--out", str(tmp_path / "m.safetensors")], module="qat.export")
    assert_one_line_error(result, "python -m qat.export", f"cannot read checkpoint {bad}")
    assert not (tmp_path / "m.safetensors").exists()


def test_report_of_a_missing_directory_and_of_a_broken_summary(python, env, tmp_path):
    result = launch(python, env, [str(tmp_path / "nothing")], module="qat.train.report")
    assert_one_line_error(result, "python -m qat.train.report", f"{tmp_path / 'nothing'} is not a directory of runs")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "summary.json").write_text('{"method": ')
    result = launch(python, env, [str(tmp_path / "runs")], module="qat.train.report")
    assert_one_line_error(result, "python -m qat.train.report",
                          f"{tmp_path / 'runs' / 'a' / 'summary.json'} is not valid JSON")


def test_report_of_a_summary_that_is_not_an_object(tmp_path, capsys):
    from qat.train import cli, report

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps([1, 2]))
    assert cli.guard(lambda: report.main([str(tmp_path)]), "python -m qat.train.report", full_error=False) == 2
    assert capsys.readouterr().err.strip() == (f"python -m qat.train.report: error: {tmp_path / 'a' / 'summary.json'} "
                                               f"holds a list, not a run summary (a JSON object); delete it or "
                                               f"rerun that run")


# ------------------------------------------------------------------ the shared wrapper, in-process
def test_a_dataloader_workers_unreadable_image_is_one_line_naming_the_file(tmp_path):
    import torch

    from qat.train import cli
    from qat.train.data import UnreadableImageError, load_imagefolder

    broken = image_tree(tmp_path, broken=True)
    loader = torch.utils.data.DataLoader(load_imagefolder(tmp_path, "train", required=True), num_workers=1,
                                         collate_fn=lambda batch: batch)
    with pytest.raises(UnreadableImageError) as error:
        list(loader)
    assert "DataLoader worker" in str(error.value) and cli.is_user_error(error.value)
    assert cli.describe(error.value) == (f"cannot read image {broken} (not an image format PIL can identify); "
                                         f"replace or delete the file")


def test_hydra_style_messages_become_one_line():
    from qat.train.cli import one_line

    text = "In 'config': Could not find 'quant/xnorr'\n\nAvailable options in 'quant':\n\tbwn\n\tfda\nNext."
    assert one_line(text) == "In 'config': Could not find 'quant/xnorr'; Available options in 'quant': bwn, fda; Next."
    assert (one_line("Could not override 'a.b'.\nTo append use +a.b=1")
            == "Could not override 'a.b'. To append use +a.b=1")


def test_a_bug_keeps_its_traceback_and_exits_1(capsys):
    import torch

    from qat.train import cli

    def bug():  # a ValueError raised inside a library, not by the project's own checks
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))

    def project_check():
        from qat.train.data import split_indices

        split_indices(10, 10, seed=0)

    assert cli.guard(bug, "prog", full_error=False) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert cli.guard(project_check, "prog", full_error=False) == 2
    assert capsys.readouterr().err == ("prog: error: data.val_split=10 leaves no training images "
                                       "(train set has 10)\n")

    def interrupted():
        raise KeyboardInterrupt

    assert cli.guard(interrupted, "prog", full_error=False) == 130


def test_a_failed_launch_removes_only_what_hydra_wrote(tmp_path, monkeypatch):
    from qat.train.cli import remove_failed_run_dir

    monkeypatch.setenv("QAT_RUNS", str(tmp_path / "runs"))

    def hydra_files(run, subdir=".hydra", log=""):
        (run / subdir).mkdir(parents=True)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (run / subdir / name).write_text("x: 1\n")
        (run / "train.log").write_text(log)
        return run

    failed = hydra_files(tmp_path / "runs" / "exp" / "sub" / "20240101-000000-fp-s0")
    (tmp_path / "runs" / "other").mkdir()
    assert remove_failed_run_dir(failed, ".hydra", "train")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]  # exp/sub/ went with it
    for extra in ("checkpoints/last.pt", "summary.json"):
        run = hydra_files(tmp_path / "runs" / extra.replace("/", "_"))
        (run / extra).parent.mkdir(exist_ok=True)
        (run / extra).write_text("")
        assert not remove_failed_run_dir(run, ".hydra", "train") and (run / extra).exists()
    logged = hydra_files(tmp_path / "runs" / "logged", log="epoch 1/2 | ...\n")
    assert not remove_failed_run_dir(logged, ".hydra", "train") and (logged / "train.log").exists()
    outside = hydra_files(tmp_path / "elsewhere" / "run")
    assert remove_failed_run_dir(outside, ".hydra", "train") and (tmp_path / "elsewhere").is_dir()
    sweep = tmp_path / "runs" / "multirun" / "exp" / "stamp"
    job = hydra_files(sweep / "0-fp-s0")
    (sweep / "multirun.yaml").write_text("")
    assert remove_failed_run_dir(job, ".hydra", "train", sweep) and not (tmp_path / "runs" / "multirun").exists()


def test_run_names_may_not_leave_the_output_root():
    from qat.train.config import ConfigError, check_run_name

    for name in ("default", "mnist_bnn", "cifar/resnet20-try.2", "a+b"):
        assert check_run_name(name) == name
    for name in ("../x", "../../../tmp/x", "/tmp/x", "a/../../b", ".hidden", "a//b", "", "a b", "x/..", None):
        with pytest.raises(ConfigError, match="is not allowed"):
            check_run_name(name)


def test_resume_names_the_run_directory_it_continues(tmp_path, monkeypatch):
    from qat.train.config import hydra_output_subdir, resume_run_dir

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "exp" / "run1"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    for name in ("last.pt", "best.pt"):
        (run / "checkpoints" / name).write_bytes(b"")
    (tmp_path / "loose.pt").write_bytes(b"")
    for resume in (str(run), "runs/exp/run1", str(run / "checkpoints" / "last.pt"),
                   "runs/exp/run1/checkpoints/best.pt"):
        assert resume_run_dir(resume, "new") == str(run)
        assert hydra_output_subdir(resume, "20240101-000000") == ".hydra/resume-20240101-000000"
    for resume in (None, "", str(tmp_path / "loose.pt"), str(tmp_path / "missing.pt")):
        assert resume_run_dir(resume, "new") == "new" and hydra_output_subdir(resume, "t") == ".hydra"
