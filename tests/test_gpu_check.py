"""benchmarks/gpu_check.py: its CPU dry run end to end, its bad-input handling, and the pieces the
GPU run depends on that a CPU can check (recipe reading, goal verdicts, GPU-side augmentation,
sanitizer / pytest report parsing); benchmarks/make_gpu_data.py on a small ImageFolder tree.

The dry run is the same command a GPU machine runs, on tiny shapes with the CUDA-only parts
skipped; these tests hold it to that: every section ran or names why not, and no GPU goal is
ever judged from CPU figures.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
MAKE_DATA = REPO / "benchmarks" / "make_gpu_data.py"
BUDGET_S = 300


def load_script(name: str, path):
    """Import a benchmarks/ script as a module (it is no package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load_script("gpu_check", SCRIPT)


def run(args, env, timeout=BUDGET_S + 60):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run once, on synthetic images: (completed process, output folder, wall seconds)."""
    import os

    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.perf_counter()
    done = run([SCRIPT, out, "--dry-run", "--no-data", "--budget", BUDGET_S], env)
    return done, out, time.perf_counter() - started


def test_dry_run_runs_every_section_or_names_why_not(dry_run):
    done, out, wall = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["wall_s"] < BUDGET_S
    sections = report["sections"]
    assert list(sections) == gpu_check.SECTION_NAMES
    for name, result in sections.items():
        assert result["status"] in ("ok", "skipped"), (name, result)
    for name in ("sanitizer", "kernel_bench"):
        assert "needs CUDA" in sections[name]["reason"]
    for name in ("kernel_launches", "gpu_tests", "e2e", "train_throughput"):
        assert sections[name]["status"] == "ok" and sections[name]["skipped"], name  # ran, and says what it left out
    assert sections["kernel_launches"]["figures"]["mismatches"] == []
    assert sections["gpu_tests"]["figures"]["tests"] == sections["gpu_tests"]["figures"]["skipped"] > 0


def test_dry_run_measures_the_cpu_figures_it_can(dry_run):
    _, out, _ = dry_run
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    throughput = sections["train_throughput"]["figures"]
    for method in gpu_check.TRAIN_METHODS:
        assert throughput[method]["images_per_second"] > 0 and throughput[method]["amp_bf16"] is False
    assert throughput["data"] == "synthetic images"
    assert [r["batch"] for r in sections["e2e"]["figures"]["rows"]] == list(gpu_check.DRY.e2e_batches)
    short = sections["short_run"]["figures"]
    assert [e["epoch"] for e in short["epochs"]] == [1, 2] == list(range(1, short["planned_epochs"] + 1))
    assert all(0 <= e["val_acc1"] <= 1 and np.isfinite(e["train_loss"]) for e in short["epochs"])


def test_dry_run_never_judges_a_gpu_goal(dry_run):
    done, out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert len(report["goals"]) == len(gpu_check.GOALS)
    assert {g["verdict"] for g in report["goals"]} == {"not measured"}
    summary = (out / "summary.md").read_text()
    assert "Dry run" in summary and "| goal | verdict | figure |" in summary
    assert " met |" not in summary.replace("not met |", "")
    assert "## Skipped parts" in summary and summary in done.stdout


def test_dry_run_wall_time(dry_run):
    """The brief: under about a minute on 2 cores (generous bound for a shared machine)."""
    _, _, wall = dry_run
    assert wall < 150


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: out"),
    (["{out}", "--bogus"], "unrecognized arguments: --bogus"),
    (["{out}", "--only", "kernels"], "--only: unknown section kernels"),
    (["{out}", "--budget", "0"], "--budget must be a positive number"),
    (["{file}"], "exists and is not a folder"),
    (["{out}", "--data", "{out}/missing.npz"], "missing.npz does not exist"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    args = [a.format(out=tmp_path / "out", file=tmp_path / "file") for a in args]
    done = run([SCRIPT, *args], None, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_check.py: error: ")
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- data
def fake_cifar_tree(root, per_class: int, test_per_class: int):
    """A CIFAR-10-like ImageFolder tree: 10 classes of 32x32 PNGs named by a made-up official index."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label in range(10):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                index = i * 10 + label
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index:05d}.png")


def test_make_gpu_data_then_dry_run_on_it(tmp_path):
    import os

    fake_cifar_tree(tmp_path / "tree", per_class=4, test_per_class=1)
    data = tmp_path / "data"
    done = run([MAKE_DATA, "--source", tmp_path / "tree", "--out", data, "--per-class", "3", "--val", "6"], None,
               timeout=120)
    assert done.returncode == 0, done.stderr
    arrays = np.load(data / "cifar10_subset.npz")
    assert arrays["train_images"].shape == (30, 3, 32, 32) and arrays["train_images"].dtype == np.uint8
    assert np.bincount(arrays["train_labels"]).tolist() == [3] * 10
    assert np.all(np.diff(arrays["train_indices"]) > 0) and arrays["train_indices"].max() == 29  # first 3 per class
    assert arrays["test_images"].shape == (10, 3, 32, 32) and len(arrays["val_positions"]) == 6
    meta = json.loads((data / "meta.json").read_text())
    assert meta["train_images"] == 30 and meta["bytes"] == (data / "cifar10_subset.npz").stat().st_size

    out = tmp_path / "out"
    done = run([SCRIPT, out, "--dry-run", "--data", data, "--only", "short_run"],
               dict(os.environ, OMP_NUM_THREADS="1"), timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    assert list(sections) == ["short_run"]
    assert sections["short_run"]["figures"]["data"] == "CIFAR-10 subset cifar10_subset.npz"
    assert sections["short_run"]["figures"]["train_images"] == gpu_check.DRY.train_images


def test_make_gpu_data_missing_tree_is_one_line(tmp_path):
    done = run([MAKE_DATA, "--source", tmp_path / "nowhere", "--out", tmp_path / "data"], None, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("make_gpu_data.py: error: ") and "nowhere" in done.stderr


def test_make_gpu_data_refuses_a_file_over_the_cap(tmp_path):
    make_gpu_data = load_script("make_gpu_data", MAKE_DATA)
    arrays = {"x": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)}
    with pytest.raises(make_gpu_data.DataError, match="cap"):
        make_gpu_data.write_subset(arrays, tmp_path, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("method", gpu_check.TRAIN_METHODS)
def test_recipe_equals_hydras_composition(compose, method):
    """experiment_recipe reads configs/ without Hydra (absent on the GPU image): same values."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose([f"+experiment=resnet18_{method}"]), resolve=True)
    recipe = gpu_check.experiment_recipe(method)
    for group in ("model", "quant", "optim", "sched"):
        assert recipe[group] == cfg[group], group
    for key in ("batch_size", "eval_batch_size"):
        assert recipe["data"][key] == cfg["data"][key]
    assert recipe["trainer"]["amp"] == cfg["trainer"]["amp"]


def test_crop_flip_is_pad_crop_then_mirror():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 6, 6), generator=g, dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    index, top, left = torch.tensor([2, 0, 1]), torch.tensor([0, 4, 1]), torch.tensor([3, 0, 2])
    flip = torch.tensor([True, False, True])
    got = gpu_check.crop_flip(padded, index, top, left, flip, 6)
    for i in range(3):
        crop = padded[index[i], :, top[i]:top[i] + 6, left[i]:left[i] + 6]
        assert torch.equal(got[i], crop.flip(-1) if flip[i] else crop)


FIGURES = {
    "kernel_bench": {"copy_bandwidth_bytes_per_s": 4.0e12,
                     "gemv": [{"m": 1, "n": 16384, "k": 16384, "fp16_ms": 0.125, "packed_ms": 0.0125,
                               "weight_stream_bytes_per_s": 2.72e12},
                              {"m": 8, "n": 16384, "k": 16384, "fp16_ms": 0.125, "packed_ms": 0.05,
                               "weight_stream_bytes_per_s": 0.7e12}],
                     "gemm": {"size": 8192, "fp32_ms": 20.0, "fp16_ms": 1.4, "bf16_ms": 1.4, "gemm_ms": 12.0,
                              "tc_ms": 0.5}},
    "e2e": {"rows": [{"batch": 1, "packed_ms": 2.0, "fp16_best_ms": 1.0, "speedup_vs_fp16": 0.5}]},
    "train_throughput": {"fp": {"images_per_second": 1000.0}, "xnor": {"images_per_second": 850.0},
                         "ternary": {"images_per_second": 500.0}},
}


def test_goal_verdicts_follow_the_figures():
    """Made-up figures (not measurements) exercising each rule on both sides of its threshold."""
    sections = {name: {"status": "ok", "device": "cuda", "figures": figures} for name, figures in FIGURES.items()}
    verdicts = [g["verdict"] for g in gpu_check.evaluate_goals(sections)]
    assert verdicts == ["met", "not met", "not met", "met", "not met", "met", "not met"]
    gemv = gpu_check.evaluate_goals(sections)[0]["figure"]
    assert gemv == "10.0x fp16; weight stream 68% of copy bandwidth"


def test_goals_are_not_measured_off_the_gpu_or_when_figures_are_missing():
    on_cpu = {name: {"status": "ok", "device": "cpu", "figures": figures} for name, figures in FIGURES.items()}
    assert {g["verdict"] for g in gpu_check.evaluate_goals(on_cpu)} == {"not measured"}
    partial = {"kernel_bench": {"status": "failed", "device": "cuda",
                                "figures": {"copy_bandwidth_bytes_per_s": 4e12,
                                            "gemv": FIGURES["kernel_bench"]["gemv"]}}}
    verdicts = gpu_check.evaluate_goals(partial)
    assert [g["verdict"] for g in verdicts[:4]] == ["met", "not met", "not measured", "not measured"]
    assert "figure missing" in verdicts[2]["figure"] and "did not run" in verdicts[4]["figure"]


def test_kernel_fractions_of_copy_bandwidth_and_bf16_rate():
    rows = gpu_check.kernel_fractions(FIGURES["kernel_bench"])
    assert [r["kernel"] for r in rows] == ["GEMV M=1 N=K=16384", "GEMV M=8 N=K=16384", "CUDA-core GEMM 8192^3",
                                           "tensor-core GEMM 8192^3"]
    tc = rows[-1]
    assert tc["bf16_share"] == pytest.approx(1.4 / 0.5) and tc["speedup"] == "2.80x fp16, 2.80x bf16"


def test_parse_sanitizer_output():
    text = ("========= COMPUTE-SANITIZER\nsanitizer target: 26 launches\n"
            "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
            "========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.parse_sanitizer_output(text) == {
        "errors": 0, "racecheck_summary": "0 hazards displayed (0 errors, 0 warnings)"}
    assert gpu_check.parse_sanitizer_output("========= ERROR SUMMARY: 3 errors\n")["errors"] == 3
    assert gpu_check.parse_sanitizer_output("Device not supported\n")["errors"] is None
    command = gpu_check.sanitizer_command("/cs", "racecheck", ["python", "x.py"])
    assert command[:3] == ["/cs", "--tool", "racecheck"] and command[-2:] == ["python", "x.py"]


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="10">'
                   "</testsuite></testsuites>")
    assert gpu_check.junit_counts(xml) == {"tests": 10, "failed": 2, "errors": 1, "skipped": 3, "passed": 4}


def test_stage_deadlines_leave_later_sections_their_floor():
    sections = {s.name: s for s in gpu_check.SECTIONS}
    now, end = 1000.0, 1000.0 + gpu_check.DEFAULT_BUDGET_S
    later = [s for s in gpu_check.SECTIONS if s.stage > 2]
    deadline = gpu_check.stage_deadline([sections["gpu_tests"], sections["sanitizer"]], later, now, end)
    assert deadline == now + 240 - gpu_check.KILL_GRACE_S
    assert gpu_check.stage_deadline([sections["short_run"]], [], now, end) == end - gpu_check.KILL_GRACE_S
    squeezed = gpu_check.stage_deadline([sections["kernel_bench"]], later[1:], end - 100, end)
    assert squeezed == end - sum(s.floor_s for s in later[1:]) - gpu_check.KILL_GRACE_S
    assert sum(s.floor_s for s in gpu_check.SECTIONS) < gpu_check.DEFAULT_BUDGET_S < 9 * 60


def gpu_context(tmp_path, seconds: float = 60):
    """A real-run (not dry-run) section context, for sections whose CUDA parts are stood in for."""
    return gpu_check.Context(tmp_path, False, time.time() + seconds, None, None, tmp_path / "section.json")


def test_sanitizer_section_with_a_stand_in_tool(tmp_path, monkeypatch):
    """The orchestration around compute-sanitizer: three tools side by side, each one's summary
    parsed, the target's own result read, and any error fails the section."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!{sys.executable}\n" + (
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "tool, result = args[args.index('--tool') + 1], args[args.index('--result') + 1]\n"
        "json.dump({'status': 'ok', 'figures': {'mismatches': []}}, open(result, 'w'))\n"
        "print('========= ERROR SUMMARY: %d errors' % (2 if tool == 'racecheck' else 0))\n"))
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_check, "find_sanitizer", lambda: str(fake))
    monkeypatch.setattr(gpu_check, "cuda_reason", lambda ctx, need_cupy=False: None)
    ctx = gpu_context(tmp_path)
    with pytest.raises(RuntimeError, match="racecheck"):
        gpu_check.section_sanitizer(ctx)
    figures = ctx.figures
    assert [figures[t]["errors"] for t in gpu_check.SANITIZER_TOOLS] == [0, 2, 0]
    assert all(figures[t]["target"] == "ok" and not figures[t]["killed_at_deadline"] for t in gpu_check.SANITIZER_TOOLS)
    assert ctx.result["lines"][0].startswith("| tool | exit | errors |")


def test_kernel_bench_section_with_a_stand_in_benchmark(tmp_path, monkeypatch):
    """What gpu_check adds to benchmarks/kernels.py's gpu_section: the figures it hands back, the
    fractions of copy bandwidth and bf16 rate, and TF32 restored afterwards."""
    class StandIn:
        @staticmethod
        def gpu_section(quick, figures=None):
            torch.backends.cuda.matmul.allow_tf32 = False
            figures.update(json.loads(json.dumps(FIGURES["kernel_bench"])))
            return ["GPU: stand-in"]

    monkeypatch.setattr(gpu_check, "benchmark_module", lambda: StandIn)
    monkeypatch.setattr(gpu_check, "cuda_reason", lambda ctx, need_cupy=False: None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    ctx = gpu_context(tmp_path)
    gpu_check.section_kernel_bench(ctx)
    assert torch.backends.cuda.matmul.allow_tf32 == tf32 and ctx.result["device"] == "cuda"
    assert [f["kernel"] for f in ctx.figures["fractions"]][-1] == "tensor-core GEMM 8192^3"
    assert "GPU: stand-in" in ctx.result["lines"]
    sections = {"kernel_bench": ctx.result}
    assert [g["verdict"] for g in gpu_check.evaluate_goals(sections)[:4]] == ["met", "not met", "not met", "met"]


def test_kernel_attribute_reads_properties_and_methods():
    class Kernel:
        num_regs = 40

        def local_size_bytes(self):
            return 0

    assert gpu_check.kernel_attribute(Kernel(), "num_regs") == 40
    assert gpu_check.kernel_attribute(Kernel(), "local_size_bytes") == 0
    assert gpu_check.kernel_attribute(Kernel(), "shared_size_bytes") is None


def test_a_section_runs_without_hydra_omegaconf_or_wandb(tmp_path):
    """The GPU image has none of them: a training section (recipe, models, swap, optimizer) and the
    packed export must import and run without."""
    import os

    result = tmp_path / "short_run.json"
    code = ("import sys\n"
            "for name in ('hydra', 'omegaconf', 'wandb'):\n"
            "    sys.modules[name] = None\n"
            "import qat.export, runpy\n"
            f"sys.argv = ['gpu_check.py', {str(tmp_path)!r}, '--section', 'short_run', '--dry-run', '--no-data',\n"
            f"            '--result', {str(result)!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(result.read_text())
    assert report["status"] == "ok", report
    assert len(report["figures"]["epochs"]) == report["figures"]["planned_epochs"] == gpu_check.DRY.max_epochs


@pytest.mark.parametrize("method", ["fp", "ternary", "xnor"])
def test_training_step_under_bf16_autocast(method):
    """The GPU run trains under bf16 autocast; CPU autocast takes the same dtype path through the layers."""
    device = torch.device("cpu")
    data = gpu_check.synthetic_data((4, 4, 4), device, size=8)
    data.padded = torch.nn.functional.pad(data.train, (data.pad,) * 4)
    run = gpu_check.build_run(method, steps_per_epoch=1, epochs=1, device=device)
    run.amp = True
    result = gpu_check.train_steps(run, data, batch=4, steps=1, generator=gpu_check.generator_for(device, 0))
    assert np.isfinite(result["loss"])


def test_a_failing_method_does_not_stop_the_others(tmp_path, monkeypatch):
    figures = {"images_per_second": 100.0, "epoch_seconds": 1.0, "epoch_images": 100, "batch_size": 4,
               "optimizer": "SGD", "peak_memory_mib": None}

    def measure(ctx, method, data, device):
        if method == "xnor":
            raise RuntimeError("expected scalar type BFloat16 but found Float")
        return dict(figures)

    monkeypatch.setattr(gpu_check, "measure_training", measure)
    ctx = gpu_check.Context(tmp_path, True, time.time() + 60, None, None, tmp_path / "section.json")
    with pytest.raises(RuntimeError, match="training failed for xnor: RuntimeError: expected scalar type"):
        gpu_check.section_train_throughput(ctx)
    assert ctx.figures["ternary"]["images_per_second"] == 100.0 and "error" in ctx.figures["xnor"]
    assert any(line.startswith("| xnor | failed |") for line in ctx.result["lines"])
    sections = {"train_throughput": {"status": "failed", "device": "cuda", "figures": ctx.figures}}
    verdicts = gpu_check.evaluate_goals(sections)[-2:]
    assert [v["verdict"] for v in verdicts] == ["not measured", "met"]
