"""The README works as written: every ```python block runs, in order, in one namespace (as a
reader pasting them into one session would), in a scratch directory; every `python train.py`
command of its ```bash blocks composes a valid config, and the smoke run it offers really runs."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import REPO, compose_config

README = REPO / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The shell commands of a bash block (line continuations joined, `&&` chains split, leading
    `NAME=value` environment assignments dropped)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words.pop(0)
            if words:
                out.append(words)
    return out


def train_commands() -> list[list[str]]:
    """The arguments of every `python train.py ...` in the README's bash blocks."""
    return [cmd[2:] for block in blocks("bash") for cmd in commands(block) if cmd[:2] == ["python", "train.py"]]


def test_the_readme_has_the_blocks_this_test_expects():
    assert len(blocks("python")) >= 3 and len(train_commands()) >= 4


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__readme__"}
    try:
        for number, code in enumerate(blocks("python"), 1):
            try:
                exec(compile(code, f"README.md python block {number}", "exec"), namespace)
            except Exception as error:  # noqa: BLE001 - name the block that failed
                pytest.fail(f"README python block {number} failed: {type(error).__name__}: {error}\n{code}")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize("args", train_commands(), ids=lambda a: " ".join(a))
def test_every_train_command_composes(args):
    """Hydra accepts each command's overrides (a multirun's comma lists: every value)."""
    overrides = [a for a in args if not a.startswith("-")]
    sweeps = [(i, o.split("=", 1)) for i, o in enumerate(overrides) if "," in o.split("=", 1)[-1]]
    variants = [overrides]
    for i, (key, values) in sweeps:
        variants = [v[:i] + [f"{key}={value}"] + v[i + 1:] for v in variants for value in values.split(",")]
    for variant in variants:
        cfg = compose_config(variant)
        assert cfg.experiment_name


def test_the_smoke_run_runs(tmp_path, subprocess_env, python):
    """The README's smoke command, exactly as written (plus a scratch run directory), with this
    environment's interpreter as the README's activated venv's `python`."""
    smoke = [a for a in train_commands() if "data=synthetic" in a]
    assert smoke, "the README offers no synthetic smoke run"
    run = tmp_path / "run"
    result = subprocess.run([python, "train.py", *smoke[0], f"hydra.run.dir={run}"], cwd=REPO, env=subprocess_env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "summary.json").is_file()


def test_the_readme_modules_exist():
    """`python -m <module>` in the README names modules that exist."""
    import importlib.util
    modules = {cmd[2] for block in blocks("bash") for cmd in commands(block) if cmd[:2] == ["python", "-m"]}
    assert {"qat.train.report", "pytest"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
