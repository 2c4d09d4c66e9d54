"""One command that proves or disproves every GPU claim of the design card in one short run.

    python benchmarks/make_gpu_data.py                 # once, where ../shared is (CIFAR-10 -> .gpu_data/)
    python benchmarks/gpu_check.py OUT                 # on the GPU machine; stops by itself (--budget)
    python benchmarks/gpu_check.py OUT --dry-run       # every step on tiny shapes, on CPU

Sections, each run in its own process, so that a crash or a poisoned CUDA context costs only that
section: a failure or a timeout is recorded and the rest still runs.

=================  =================================================================================
environment        versions, device, compute-sanitizer, data file
kernel_launches    a small launch of every CUDA kernel (all GEMV variants, CUDA-core and tensor-core
                   GEMM, ternary, both epilogues, binary conv), twice, equal to the CPU path; the
                   registers and local memory of every loaded kernel (CuPy num_regs/local_size_bytes)
gpu_tests          tests/kernels/test_kernels_gpu.py with CuPy's in-memory kernel cache (CUPY_CACHE_IN_MEMORY=1)
sanitizer          the same small launches under compute-sanitizer memcheck, racecheck, synccheck
kernel_bench       benchmarks/kernels.py's ``gpu_section`` (imported): GEMV M = 1, 8 (and 16-64) at
                   N = K = 16384 vs cuBLAS fp16, CUDA-core and tensor-core GEMM at 8192^3 vs fp32
                   (TF32 off), fp16 and bf16, copy bandwidth and bf16 rate measured in the same run;
                   here each kernel also as a fraction of that bandwidth and of that rate
e2e                packed ResNet-18 (XNOR) vs the fp16 eager model, batch 1 and 64
train_throughput   CIFAR ResNet-18 fp / xnor / ternary with the experiments' recipes (bf16 AMP as the
                   trainer, channels_last), images held on the GPU, random crop + flip done there
short_run          xnor for as many epochs as the budget allows; validation accuracy per epoch
=================  =================================================================================

gpu_tests and sanitizer run side by side (neither is timed); everything else runs alone.
The training steps use the library as ``qat/train/trainer.py`` does: ``qat.models.build``,
``qat.quantize_model``, ``qat.set_progress``, ``qat.latent.param_groups`` /
``clip_latent_weights``, ``qat.train.optim.build_optimizer`` / ``build_scheduler``, with the recipe of
``configs/experiment/resnet18_<method>.yaml`` read by :func:`experiment_recipe` (Hydra and OmegaConf
are not on the GPU image; tests/test_gpu_check.py checks the reading against Hydra's composition).

Time: ``--budget`` seconds (default 520, under 9 minutes) for everything.  Each stage gets a
deadline that leaves every later stage its minimum; a section still running at its deadline is
killed and recorded as ``timeout``; the short run picks its number of epochs from the time left.

Output in OUT (rewritten after every stage, so an interrupted run still leaves what it measured):
``gpu_check.json`` (every figure), ``summary.md`` (goals met / not met with their figures, then
each section's tables), ``gpu_check.log`` (each section's full output).  Goals are judged only on
figures measured in this run; a goal whose figures are missing says "not measured" and why.

``--dry-run``: the same sections and code on CPU with tiny shapes (synthetic images, or a slice
of .gpu_data/ when it exists); what needs CUDA is skipped, and each skip says so in the summary.

Exit status: 0 when every section ran or was skipped with its reason, 1 when one failed or ran
out of time, 2 for bad input (one line ``gpu_check.py: error: ...``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
# This folder holds kernels.py and layers.py, named like the packages: keep it off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != THIS.parent]
sys.path.insert(0, str(REPO))

PROG = "gpu_check.py"
CONFIGS = REPO / "configs"
DEFAULT_DATA = REPO / ".gpu_data" / "cifar10_subset.npz"
DEFAULT_BUDGET_S = 520.0
KILL_GRACE_S = 5.0
OUTPUT_FILES = ("gpu_check.json", "summary.md", "gpu_check.log")
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
TRAIN_METHODS = ("fp", "xnor", "ternary")


# =============================================================================== sizes and plan
@dataclass(frozen=True)
class Sizes:
    """Problem sizes of a real run and of the dry-run (None: the recipe's or the data's own)."""
    image_size: int
    e2e_batches: tuple[int, ...]
    e2e_reps: int
    train_images: int | None
    val_images: int | None
    test_images: int | None
    batch_size: int | None
    eval_batch_size: int | None
    warmup_steps: int
    probe_steps: int
    max_epochs: int
    synthetic_counts: tuple[int, int, int]


REAL = Sizes(image_size=32, e2e_batches=(1, 64), e2e_reps=50, train_images=None, val_images=None, test_images=None,
             batch_size=None, eval_batch_size=None, warmup_steps=20, probe_steps=20, max_epochs=40,
             synthetic_counts=(18000, 2000, 1000))
DRY = Sizes(image_size=16, e2e_batches=(1, 2), e2e_reps=2, train_images=8, val_images=4, test_images=4,
            batch_size=4, eval_batch_size=4, warmup_steps=1, probe_steps=1, max_epochs=2,
            synthetic_counts=(8, 4, 4))


@dataclass(frozen=True)
class Section:
    """One section: its stage (sections of a stage run side by side), the most seconds it may take
    (None: whatever is left) and the least it needs (reserved while earlier stages run)."""
    name: str
    stage: int
    cap_s: float | None
    floor_s: float


SECTIONS = [Section("environment", 0, 60, 10), Section("kernel_launches", 1, 150, 25),
            Section("gpu_tests", 2, 240, 45), Section("sanitizer", 2, 240, 45),
            Section("kernel_bench", 3, 150, 40), Section("e2e", 4, 120, 25),
            Section("train_throughput", 5, 180, 45), Section("short_run", 6, None, 60)]
SECTION_NAMES = [s.name for s in SECTIONS]


def stages(only: list[str]) -> list[list[Section]]:
    """The sections to run, grouped by stage, in order."""
    chosen = [s for s in SECTIONS if s.name in only]
    return [[s for s in chosen if s.stage == n] for n in sorted({s.stage for s in chosen})]


def stage_deadline(stage: list[Section], later: list[Section], now: float, end: float) -> float:
    """When ``stage`` must be done: its largest cap, but leaving every later section its floor
    and the kill grace."""
    caps = [s.cap_s for s in stage]
    cap = end if any(c is None for c in caps) else now + max(caps)
    return min(cap, end - sum(s.floor_s for s in later)) - KILL_GRACE_S


# =============================================================================== CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, the project's convention (qat/train/cli.py)
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, summary.md and gpu_check.log")
    parser.add_argument("--dry-run", action="store_true", help="every step on tiny shapes, on CPU")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--data", type=Path, default=None,
                        help="the CIFAR-10 subset (.npz or its folder; default .gpu_data/ if it exists)")
    parser.add_argument("--no-data", action="store_true", help="synthetic images even where .gpu_data/ exists")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on the short run's epochs")
    parser.add_argument("--only", default=",".join(SECTION_NAMES),
                        help="comma-separated sections to run (default: all): " + ", ".join(SECTION_NAMES))
    parser.add_argument("--section", help=argparse.SUPPRESS)   # internal: run one section in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.max_epochs is not None and args.max_epochs < 1:
        parser.error(f"--max-epochs must be >= 1, got {args.max_epochs}")
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in SECTION_NAMES]
    if unknown or not args.only:
        parser.error(f"--only: unknown section {', '.join(unknown) or '(none given)'}; "
                     f"valid: {', '.join(SECTION_NAMES)}")
    if args.section is not None and args.section not in SECTION_FUNCTIONS:
        parser.error(f"unknown section {args.section!r}")
    if args.no_data and args.data is not None:
        parser.error("--data and --no-data exclude each other")
    args.data = None if args.no_data else resolve_data(parser, args.data)
    if args.section is None and args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} exists and is not a folder")
    args.out = args.out.resolve()
    return args


def resolve_data(parser: _Parser, data: Path | None) -> Path | None:
    """The subset file: the one given (a folder means its cifar10_subset.npz), else the default if present."""
    if data is None:
        return DEFAULT_DATA if DEFAULT_DATA.is_file() else None
    path = data / DEFAULT_DATA.name if data.is_dir() else data
    if not path.is_file():
        parser.error(f"--data: {path} does not exist (build it with python benchmarks/make_gpu_data.py)")
    return path.resolve()  # the sections run in the repository root


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return run_section(args)
    try:
        return supervise(args)
    except KeyboardInterrupt:  # the running sections were ended in run_stage; what was measured is written
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


# =============================================================================== supervisor
def supervise(args: argparse.Namespace) -> int:
    """Run the stages as subprocesses within the budget; write the report after each stage."""
    started = time.time()
    end = started + args.budget
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = new_report(args, started)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    plan = stages(args.only)
    try:
        with open(out / "gpu_check.log", "w") as log:
            for number, stage in enumerate(plan):
                later = [s for rest in plan[number + 1:] for s in rest]
                deadline = stage_deadline(stage, later, time.time(), end)
                for name, result in run_stage(stage, deadline, args, scratch, log).items():
                    report["sections"][name] = result
                    print(progress_line(name, result, time.time() - started), flush=True)
                finish_report(report, started)
                write_report(out, report)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["nvidia_smi_after"] = nvidia_smi()
    finish_report(report, started)
    write_report(out, report)
    print()
    print((out / "summary.md").read_text())
    bad = [n for n, r in report["sections"].items() if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


def new_report(args: argparse.Namespace, started: float) -> dict:
    return {"command": " ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]]),
            "dry_run": bool(args.dry_run), "budget_s": args.budget,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "data": str(args.data) if args.data else None,
            "nvidia_smi_before": nvidia_smi(), "sections": {}}


def section_command(name: str, args: argparse.Namespace, result: Path, deadline: float) -> list[str]:
    command = [sys.executable, str(THIS), str(args.out), "--section", name, "--result", str(result),
               "--deadline", f"{deadline:.3f}", "--budget", str(args.budget)]
    if args.dry_run:
        command.append("--dry-run")
    command += ["--data", str(args.data)] if args.data else ["--no-data"]
    if args.max_epochs:
        command += ["--max-epochs", str(args.max_epochs)]
    return command


def section_env(scratch: Path, dry_run: bool) -> dict:
    """Environment of the section processes: the repo importable, output unbuffered, one CuPy
    disk cache private to this run (compiled once by kernel_launches, reused later; the GPU tests
    and the sanitizer use the in-memory cache instead); in a dry run no visible GPU and one CPU
    thread (tiny shapes gain nothing from more, and a shared machine's spinning threads cost)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["CUPY_CACHE_DIR"] = str(scratch / "cupy_cache")
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def run_stage(stage: list[Section], deadline: float, args, scratch: Path, log) -> dict[str, dict]:
    """Start the stage's sections together, wait until each ends or the deadline, collect results."""
    if deadline - time.time() < min(s.floor_s for s in stage) / 2:
        why = f"skipped: {deadline - time.time() + KILL_GRACE_S:.0f} s left in the budget"
        return {s.name: {"status": "skipped", "reason": why, "seconds": 0.0} for s in stage}
    running = {}
    for section in stage:
        result_path, output_path = scratch / f"{section.name}.json", scratch / f"{section.name}.out"
        with open(output_path, "w") as output:
            process = subprocess.Popen(section_command(section.name, args, result_path, deadline),
                                       stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
                                       env=section_env(scratch, args.dry_run), start_new_session=True)
        running[section.name] = (process, result_path, output_path, time.time())
    try:
        ended = wait_all({name: entry[0] for name, entry in running.items()}, deadline + KILL_GRACE_S)
    except BaseException:  # Ctrl-C: the sections run in sessions of their own and would outlive us
        for process, *_ in running.values():
            kill_group(process)
        raise
    results = {}
    for name, (process, result_path, output_path, began) in running.items():
        timed_out, finished = ended[name]
        results[name] = collect(name, process.returncode, timed_out, result_path, finished - began)
        log.write(f"\n===== {name}: {results[name]['status']} ({results[name]['seconds']:.1f} s) =====\n")
        log.write(output_path.read_text(errors="replace"))
        log.flush()
    return results


def wait_all(processes: dict[str, subprocess.Popen], until: float, grace: float = 5.0) -> dict[str, tuple[bool, float]]:
    """Wait for every process, noting when each ends; past ``until`` kill the rest (each started a
    session of its own), allowing ``grace`` seconds after SIGTERM.  Returns name -> (killed, end time)."""
    ended = {}
    while len(ended) < len(processes) and time.time() < until:
        for name, process in processes.items():
            if name not in ended and process.poll() is not None:
                ended[name] = (False, time.time())
        time.sleep(0.05)
    for name, process in processes.items():
        if name not in ended:
            killed = process.poll() is None
            if killed:
                kill_group(process, grace)
            ended[name] = (killed, time.time())
    return ended


def kill_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``process`` and its children: its process group (it started a session of its own)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def collect(name: str, returncode: int, timed_out: bool, result_path: Path, seconds: float) -> dict:
    """The section's result file (possibly partial) with its status decided here."""
    result = {}
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = {}
    if timed_out:
        result["status"] = "timeout"
        result["reason"] = "still running at its deadline: killed (its figures so far are kept)"
    elif not result:
        result = {"status": "failed", "reason": f"exited with status {returncode} before writing a result "
                                                f"(see gpu_check.log)"}
    result["seconds"] = seconds
    result["exit_code"] = returncode
    return result


def progress_line(name: str, result: dict, elapsed: float) -> str:
    reason = result.get("reason") or result.get("error") or ""
    return (f"[{elapsed:5.0f} s] {name}: {result['status']} ({result['seconds']:.1f} s)"
            f"{' - ' + reason if reason else ''}")


def nvidia_smi() -> str | None:
    """Clocks, temperature and power as nvidia-smi reads them (None where it is missing)."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    query = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu"
    try:
        done = subprocess.run([tool, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                              timeout=10)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi failed: {error}"


# =============================================================================== report
def finish_report(report: dict, started: float) -> None:
    report["wall_s"] = time.time() - started
    report["goals"] = evaluate_goals(report["sections"])


def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and summary.md, each written to a temp file and renamed into place."""
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str) + "\n"),
                       ("summary.md", summary_markdown(report))):
        partial = out / (name + ".partial")
        partial.write_text(text)
        os.replace(partial, out / name)


def summary_markdown(report: dict) -> str:
    sections = report["sections"]
    device = sections.get("environment", {}).get("figures", {}).get("device", "unknown device")
    title = "GPU check: dry run on CPU" if report["dry_run"] else f"GPU check on {device}"
    lines = [f"# {title}", "", f"Command: `{report['command']}`, started {report['started']}, "
             f"{report.get('wall_s', 0):.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    if report["dry_run"]:
        lines += ["Dry run: tiny shapes on CPU; no figure here is a GPU figure and no goal can be met.", ""]
    lines += ["## Goals (ratios measured in this run)", "", "| goal | verdict | figure |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['verdict']} | {g['figure']} |" for g in report.get("goals", [])]
    lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, result in sections.items():
        note = result.get("reason") or result.get("error") or ""
        lines.append(f"| {name} | {result['status']} | {result.get('seconds', 0):.1f} | {note} |")
    skipped = [f"- {name}: {what}" for name, result in sections.items() for what in result.get("skipped", [])]
    if skipped:
        lines += ["", "## Skipped parts", "", *skipped]
    for name, result in sections.items():
        if result.get("lines"):
            lines += ["", f"## {name}", "", *result["lines"]]
    for key in ("nvidia_smi_before", "nvidia_smi_after"):
        if report.get(key):
            lines += ["", f"{key.replace('_', ' ')}:", "", "```", report[key], "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- goals
@dataclass(frozen=True)
class Goal:
    """A goal of the issue: ``judge(figures)`` returns (met, figure text) from one section's figures,
    raising KeyError / IndexError when a figure it needs was not measured."""
    text: str
    section: str
    judge: Callable[[dict], tuple[bool, str]]


def _gemv_row(figures: dict, m: int) -> dict:
    return next(row for row in figures["gemv"] if row["m"] == m)


def _judge_gemv_m1(figures: dict) -> tuple[bool, str]:
    row = _gemv_row(figures, 1)
    speedup = row["fp16_ms"] / row["packed_ms"]
    share = row["weight_stream_bytes_per_s"] / figures["copy_bandwidth_bytes_per_s"]
    return speedup >= 8 and share >= 0.6, f"{speedup:.1f}x fp16; weight stream {share:.0%} of copy bandwidth"


def _judge_gemv_m8(figures: dict) -> tuple[bool, str]:
    row = _gemv_row(figures, 8)
    speedup = row["fp16_ms"] / row["packed_ms"]
    return speedup >= 3, f"{speedup:.1f}x fp16"


def _judge_gemm(kernel: str, baseline: str, target: float) -> Callable[[dict], tuple[bool, str]]:
    def judge(figures: dict) -> tuple[bool, str]:
        gemm = figures["gemm"]
        ratio = gemm[f"{baseline}_ms"] / gemm[f"{kernel}_ms"]
        return ratio >= target, (f"{ratio:.2f}x {baseline} "
                                 f"({gemm[f'{kernel}_ms']:.3f} ms vs {gemm[f'{baseline}_ms']:.3f} ms)")
    return judge


def _judge_e2e(figures: dict) -> tuple[bool, str]:
    row = next(r for r in figures["rows"] if r["batch"] == 1)
    return row["speedup_vs_fp16"] > 1, (f"{row['speedup_vs_fp16']:.2f}x ({row['packed_ms']:.2f} ms packed vs "
                                        f"{row['fp16_best_ms']:.2f} ms fp16)")


def _judge_training(method: str) -> Callable[[dict], tuple[bool, str]]:
    def judge(figures: dict) -> tuple[bool, str]:
        ratio = figures[method]["images_per_second"] / figures["fp"]["images_per_second"]
        return ratio >= 0.8, (f"{ratio:.2f}x ({figures[method]['images_per_second']:.0f} vs "
                              f"{figures['fp']['images_per_second']:.0f} img/s)")
    return judge


GOALS = [
    Goal("GEMV M=1, N=K=16384: >= 8x cuBLAS fp16 and >= 60% of copy bandwidth", "kernel_bench", _judge_gemv_m1),
    Goal("GEMV M=8, N=K=16384: >= 3x cuBLAS fp16", "kernel_bench", _judge_gemv_m8),
    Goal("CUDA-core GEMM 8192^3: >= 2x cuBLAS fp32 (TF32 off)", "kernel_bench", _judge_gemm("gemm", "fp32", 2.0)),
    Goal("tensor-core GEMM 8192^3: >= 2x cuBLAS fp16", "kernel_bench", _judge_gemm("tc", "fp16", 2.0)),
    Goal("packed ResNet-18, batch 1: faster than fp16 eager", "e2e", _judge_e2e),
    Goal("xnor training throughput (AMP): >= 0.8x float", "train_throughput", _judge_training("xnor")),
    Goal("ternary training throughput (AMP): >= 0.8x float", "train_throughput", _judge_training("ternary")),
]


def evaluate_goals(sections: dict) -> list[dict]:
    """Each goal met / not met with its figure, or not measured with the reason.  A dry run's
    figures are CPU figures: they never meet or miss a GPU goal."""
    verdicts = []
    for goal in GOALS:
        result = sections.get(goal.section)
        verdict, figure = "not measured", ""
        if result is None:
            figure = f"{goal.section} did not run"
        elif result.get("device") != "cuda":
            figure = f"{goal.section}: {result.get('reason') or 'ran on CPU, not a GPU figure'}"
        else:
            try:
                met, figure = goal.judge(result.get("figures", {}))
                verdict = "met" if met else "not met"
            except (KeyError, IndexError, StopIteration, ZeroDivisionError):
                figure = f"{goal.section} {result.get('status')}: figure missing"
        verdicts.append({"goal": goal.text, "verdict": verdict, "figure": figure})
    return verdicts


# =============================================================================== section processes
class Skip(Exception):
    """The whole section cannot run here; the message says why."""


@dataclass
class Context:
    """What a section process knows: its options, its deadline and the result it builds."""
    out: Path
    dry_run: bool
    deadline: float
    data: Path | None
    max_epochs: int | None
    result_path: Path
    result: dict = field(default_factory=lambda: {"status": "ok", "figures": {}, "skipped": [], "lines": []})

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else REAL

    @property
    def figures(self) -> dict:
        return self.result["figures"]

    def left(self) -> float:
        return self.deadline - time.time()

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.result["lines"].append(text)

    def skip(self, what: str, why: str) -> None:
        print(f"skipped {what}: {why}", flush=True)
        self.result["skipped"].append(f"{what}: {why}")

    def save(self) -> None:
        partial = self.result_path.with_suffix(".partial")
        partial.write_text(json.dumps(self.result, default=str))
        os.replace(partial, self.result_path)


def run_section(args: argparse.Namespace) -> int:
    """Run one section in this process and write its result file (also after a failure)."""
    ctx = Context(args.out, args.dry_run, args.deadline or time.time() + args.budget, args.data,
                  args.max_epochs, args.result or args.out / f"{args.section}.json")
    try:
        SECTION_FUNCTIONS[args.section](ctx)
    except Skip as reason:
        ctx.result.update(status="skipped", reason=str(reason))
        print(f"skipped: {reason}", flush=True)
    except Exception as error:  # recorded, so that the other sections still run
        traceback.print_exc()
        first_line = str(error).splitlines()[0] if str(error) else ""
        ctx.result.update(status="failed", error=f"{type(error).__name__}: {first_line}")
    ctx.save()
    return 0


def cuda_reason(ctx: Context, need_cupy: bool = False) -> str | None:
    """Why this section cannot use CUDA here, or None."""
    if ctx.dry_run:
        return "dry run: CPU only"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if need_cupy:
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "CuPy is not installed (pip install cupy-cuda13x)"
    return None


def section_device(ctx: Context, need_cupy: bool = False):
    """CUDA when usable; CPU in a dry run; else the section is skipped."""
    import torch

    reason = cuda_reason(ctx, need_cupy)
    if reason is None:
        ctx.result["device"] = "cuda"
        return torch.device("cuda")
    if ctx.dry_run:
        ctx.result["device"] = "cpu"
        return torch.device("cpu")
    raise Skip(reason)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def benchmark_module():
    """benchmarks/kernels.py, imported under another name (its own name is the package's)."""
    import importlib.util

    module = sys.modules.get("benchmark_kernels")
    if module is None:
        spec = importlib.util.spec_from_file_location("benchmark_kernels", THIS.parent / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmark_kernels"] = module
        spec.loader.exec_module(module)
    return module


def median_ms(fn: Callable[[], object], reps: int, device) -> float:
    """Median time of ``fn`` in ms: CUDA events (benchmarks/kernels.py) on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        return benchmark_module()._cuda_median_ms(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


# ------------------------------------------------------------------------------- environment
def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else in the CUDA toolkit's usual bin folders."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for folder in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if folder and os.access(Path(folder) / "bin" / "compute-sanitizer", os.X_OK):
            return str(Path(folder) / "bin" / "compute-sanitizer")
    return None


def section_environment(ctx: Context) -> None:
    import platform

    import numpy
    import torch

    fig = ctx.figures
    fig.update(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
               torch_cuda=torch.version.cuda, cpus=os.cpu_count(), compute_sanitizer=find_sanitizer())
    try:
        import torchvision
        fig["torchvision"] = torchvision.__version__
    except ImportError:
        fig["torchvision"] = None
    fig.update(cupy_environment())
    fig["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fig.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                   l2_bytes=getattr(props, "L2_cache_size", None), cudnn=torch.backends.cudnn.version())
    else:
        ctx.skip("device properties", "no CUDA device")
    fig["data"] = data_description(ctx.data)
    ctx.result["device"] = "cuda" if torch.cuda.is_available() and not ctx.dry_run else "cpu"
    ctx.line(f"python {fig['python']}, torch {fig['torch']} (CUDA {fig['torch_cuda']}), torchvision "
             f"{fig['torchvision']}, numpy {fig['numpy']}, CuPy {fig.get('cupy')}, {fig['cpus']} CPUs")
    ctx.line(f"device: {fig.get('device', 'no CUDA device')}; compute-sanitizer: "
             f"{fig['compute_sanitizer'] or 'not on PATH (nor in CUDA_HOME/bin, /usr/local/cuda/bin)'}")
    ctx.line(f"data: {fig['data']}")


def cupy_environment() -> dict:
    """CuPy's version, NVRTC's, and which stream interop the launcher will use (kernels.md §10.4)."""
    try:
        import cupy
    except ImportError:
        return {"cupy": None}
    facts = {"cupy": cupy.__version__,
             "stream_interop": "Stream.from_external" if hasattr(cupy.cuda.Stream, "from_external")
             else "ExternalStream"}
    try:
        facts["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as error:  # no driver / library: a fact, not a failure
        facts["nvrtc"] = f"unavailable ({type(error).__name__})"
    return facts


def data_description(path: Path | None) -> str:
    if path is None:
        return "no CIFAR-10 subset (.gpu_data/ missing): synthetic images; the short run needs the subset"
    return f"{path} ({path.stat().st_size / 2**20:.1f} MiB)"


# ------------------------------------------------------------------------------- kernels
def kernel_cases(device) -> list[tuple[str, Callable[[], Any], Any]]:
    """(label, run, expected): a small launch of every CUDA kernel and its CPU-path result.

    GEMV: every row variant (1, 2, 4, 8, 16) with an odd (8-byte loads) and an even (16-byte
    loads) word count, binary and ternary; the tiled GEMMs (CUDA-core binary and ternary, tensor
    cores with its row popcount) on a shape with partial tiles; both epilogues; a binary conv.
    On CPU (dry run) the same calls take the CPU path."""
    import torch

    import kernels
    from kernels.sources import GEMV_ROW_VARIANTS

    gen = torch.Generator().manual_seed(0)
    on_cuda = device.type == "cuda"

    def to_device(operand):
        return tuple(p.to(device) for p in operand) if isinstance(operand, tuple) else operand.to(device)

    def matmul(label, op, a, b, k, path):
        return (label, lambda: op(to_device(a), to_device(b), k, path=path if on_cuda else "auto"), op(a, b, k))

    def ternary(rows, k):
        return kernels.pack_ternary(torch.randint(-1, 2, (rows, k), generator=gen).float())

    cases = []
    for rows in GEMV_ROW_VARIANTS:
        for k in (192, 256):
            vec = 2 if (k // 64) % 2 == 0 else 1
            a, b = torch.randn(rows, k, generator=gen), torch.randn(67, k, generator=gen)
            cases.append(matmul(f"packed_gemv<1, {rows}, {vec}>", kernels.binary_matmul,
                                kernels.pack_bits(a), kernels.pack_bits(b), k, "gemv"))
            cases.append(matmul(f"packed_gemv<2, {rows}, {vec}>", kernels.ternary_matmul,
                                ternary(rows, k), ternary(67, k), k, "gemv"))
    m, n, k = 130, 131, 300
    a_bits = kernels.pack_bits(torch.randn(m, k, generator=gen))
    b_bits = kernels.pack_bits(torch.randn(n, k, generator=gen))
    cases.append(matmul("packed_gemm<1>", kernels.binary_matmul, a_bits, b_bits, k, "gemm"))
    cases.append(matmul("row_popcount + packed_gemm_tc", kernels.binary_matmul, a_bits, b_bits, k, "tc"))
    cases.append(matmul("packed_gemm<2>", kernels.ternary_matmul, ternary(m, k), ternary(n, k), k, "gemm"))
    acc = torch.randint(-300, 300, (37, 200), generator=gen, dtype=torch.int32)
    mul, add = torch.randn(200, generator=gen).double(), torch.randn(200, generator=gen).double()
    for name, sign_pack in (("epilogue_affine", False), ("epilogue_sign_pack", True)):
        cases.append((name, lambda s=sign_pack: kernels.epilogue(acc.to(device), mul_add=(mul, add), sign_pack=s),
                      kernels.epilogue(acc, mul_add=(mul, add), sign_pack=sign_pack)))
    x = torch.randn(2, 70, 9, 9, generator=gen)
    w_bits = kernels.pack_conv_weight(torch.randn(5, 70, 3, 3, generator=gen))
    cases.append(("binary_conv2d (zero padding)", lambda: kernels.binary_conv2d(x.to(device), w_bits.to(device), 3,
                                                                                stride=2, padding=1),
                  kernels.binary_conv2d(x, w_bits, 3, stride=2, padding=1)))
    return cases


def check_launches(device, runs: int) -> tuple[int, list[str]]:
    """Run every kernel case ``runs`` times: (number of cases, labels whose results differ between
    runs or from the CPU path)."""
    import torch

    cases, bad = kernel_cases(device), []
    for label, run, expected in cases:
        results = [run() for _ in range(runs)]
        synchronize(device)
        if not all(torch.equal(r.cpu(), expected) for r in results):
            bad.append(label)
    return len(cases), bad


def kernel_resources(device_index: int) -> list[dict]:
    """Registers, local (spill) memory and static shared memory of every declared kernel, loaded."""
    from kernels import cuda_runtime
    from kernels.sources import KERNEL_SOURCES

    rows = []
    for source, names in KERNEL_SOURCES.items():
        for name in names:
            fn = cuda_runtime.get_kernel(source, name, device_index)
            rows.append({"source": source, "kernel": name,
                         **{key: kernel_attribute(fn, key) for key in KERNEL_ATTRIBUTES}})
    return rows


KERNEL_ATTRIBUTES = ("num_regs", "local_size_bytes", "shared_size_bytes", "max_threads_per_block")


def kernel_attribute(fn, name: str):
    """A CuPy kernel attribute: a property of RawKernel (a method in some CuPy versions), or None."""
    try:
        value = getattr(fn, name)
        return value() if callable(value) else value
    except Exception:  # an attribute this CuPy lacks is a gap in the table, not a failed check
        return None


def section_kernel_launches(ctx: Context) -> None:
    device = section_device(ctx, need_cupy=True)
    cases, bad = check_launches(device, runs=2)
    ctx.figures.update(launches=cases, mismatches=bad)
    where = "CUDA kernels" if device.type == "cuda" else "CPU path (dry run)"
    ctx.line(f"{cases} small launches on the {where}, each twice: "
             + (f"{len(bad)} differ from the CPU path or between runs: {', '.join(bad)}" if bad
                else "all equal the CPU path, both runs identical"))
    if device.type != "cuda":
        ctx.skip("CUDA kernel launches, registers and local memory", "needs CUDA (the CPU path ran the same shapes)")
    else:
        rows = kernel_resources(device.index or 0)
        ctx.figures["resources"] = rows
        spilling = [r["kernel"] for r in rows if r["local_size_bytes"] != 0]
        ctx.figures["kernels_with_local_memory"] = spilling
        ctx.line()
        for text in table(["source", "kernel", "registers", "local bytes", "static shared bytes", "max threads/block"],
                          [[r["source"], f"`{r['kernel']}`", r["num_regs"], r["local_size_bytes"],
                            r["shared_size_bytes"], r["max_threads_per_block"]] for r in rows]):
            ctx.line(text)
    if bad:
        raise RuntimeError(f"{len(bad)} kernel launches differ: {', '.join(bad)}")


def section_sanitizer_target(ctx: Context) -> None:
    """What compute-sanitizer runs: every kernel case once on CUDA."""
    import torch

    cases, bad = check_launches(torch.device("cuda"), runs=1)
    ctx.figures.update(launches=cases, mismatches=bad)
    print(f"sanitizer target: {cases} launches, {len(bad)} differ from the CPU path", flush=True)


def sanitizer_command(tool_path: str, tool: str, args_for_target: list[str]) -> list[str]:
    return [tool_path, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20", *args_for_target]


def parse_sanitizer_output(text: str) -> dict:
    """The error count of compute-sanitizer's ``ERROR SUMMARY: N error(s)`` line (None if absent)
    and racecheck's hazard summary."""
    import re

    errors = re.findall(r"ERROR SUMMARY:\s*(\d+)\s+error", text)
    hazards = re.findall(r"RACECHECK SUMMARY:\s*([^\n]*)", text)
    return {"errors": int(errors[-1]) if errors else None,
            "racecheck_summary": hazards[-1].strip() if hazards else None}


def section_sanitizer(ctx: Context) -> None:
    tool_path = find_sanitizer()
    if ctx.dry_run:
        raise Skip("needs CUDA (compute-sanitizer instruments GPU launches)" +
                   ("" if tool_path else "; also compute-sanitizer is not on PATH"))
    if tool_path is None:
        raise Skip("compute-sanitizer is not on PATH (nor in CUDA_HOME/bin, /usr/local/cuda/bin)")
    if cuda_reason(ctx, need_cupy=True):
        raise Skip(cuda_reason(ctx, need_cupy=True))
    scratch = ctx.result_path.parent
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", CUPY_CACHE_IN_MEMORY="1")
    processes = {}
    for tool in SANITIZER_TOOLS:
        target = [sys.executable, str(THIS), str(ctx.out), "--section", "sanitizer_target",
                  "--result", str(scratch / f"sanitizer_{tool}.json"), "--deadline", f"{ctx.deadline:.3f}"]
        output = open(scratch / f"sanitizer_{tool}.out", "w")
        processes[tool] = (subprocess.Popen(sanitizer_command(tool_path, tool, target), stdout=output,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True),
                           output, time.time())
    # before the supervisor's kill at the deadline (+ grace), which would not reach these sessions
    ended = wait_all({tool: entry[0] for tool, entry in processes.items()}, ctx.deadline - 1, grace=1.0)
    rows = []
    for tool, (process, output, began) in processes.items():
        output.close()
        text = (scratch / f"sanitizer_{tool}.out").read_text(errors="replace")
        print(f"----- compute-sanitizer --tool {tool} (exit {process.returncode}) -----\n{text}", flush=True)
        target = scratch / f"sanitizer_{tool}.json"
        target_result = json.loads(target.read_text()) if target.is_file() else {}
        parsed = parse_sanitizer_output(text)
        ctx.figures[tool] = {"exit_code": process.returncode, "killed_at_deadline": ended[tool][0],
                             "seconds": ended[tool][1] - began, **parsed,
                             "target": target_result.get("status", "no result"),
                             "mismatches": target_result.get("figures", {}).get("mismatches")}
        rows.append([tool, process.returncode, parsed["errors"] if parsed["errors"] is not None else "no summary",
                     parsed["racecheck_summary"] or "", ctx.figures[tool]["target"]])
    for text in table(["tool", "exit", "errors", "racecheck summary", "launches"], rows):
        ctx.line(text)
    failed = [t for t in SANITIZER_TOOLS if ctx.figures[t]["errors"] != 0 or ctx.figures[t]["target"] != "ok"]
    if failed:
        raise RuntimeError(f"compute-sanitizer reported errors or could not run: {', '.join(failed)} "
                           f"(see gpu_check.log)")


def section_gpu_tests(ctx: Context) -> None:
    """tests/kernels/test_kernels_gpu.py in a pytest subprocess with CuPy's in-memory kernel cache."""
    report = ctx.result_path.parent / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={report}",
               "tests/kernels/test_kernels_gpu.py"]
    env = dict(os.environ, CUPY_CACHE_IN_MEMORY="1")
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(1.0, ctx.left()))
    except subprocess.TimeoutExpired as error:
        print(error.stdout or "", flush=True)
        raise RuntimeError("pytest did not finish before the deadline") from None
    print(done.stdout + done.stderr, flush=True)
    if not report.is_file():
        last = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
        raise RuntimeError(f"pytest exited with status {done.returncode} without a report: {last[-1]}")
    counts = junit_counts(report)
    ctx.figures.update(counts, exit_code=done.returncode, cupy_cache_in_memory=True)
    ctx.result["device"] = "cpu" if ctx.dry_run or counts["skipped"] == counts["tests"] else "cuda"
    ctx.line(f"tests/kernels/test_kernels_gpu.py: {counts['tests']} tests, {counts['passed']} passed, "
             f"{counts['failed']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
             f"(CUPY_CACHE_IN_MEMORY=1)")
    if counts["skipped"] == counts["tests"]:
        ctx.skip("GPU test bodies", "needs a CUDA device and CuPy (pytest skipped every test)")
    if done.returncode not in (0, 5) or counts["failed"] or counts["errors"]:
        raise RuntimeError(f"pytest exit status {done.returncode}: {counts['failed']} failed, "
                           f"{counts['errors']} errors")


def junit_counts(path: Path) -> dict:
    """Test counts from pytest's JUnit XML report."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = counts.pop("failures")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def section_kernel_bench(ctx: Context) -> None:
    """benchmarks/kernels.py's GPU rows, with every kernel also as a fraction of the copy
    bandwidth and of the bf16 GEMM rate measured in the same run."""
    import inspect

    bench = benchmark_module()
    if "figures" not in inspect.signature(bench.gpu_section).parameters:
        raise RuntimeError("benchmarks/kernels.py's gpu_section takes no figures dict to fill")
    figures = ctx.figures
    reason = cuda_reason(ctx, need_cupy=True)
    if reason:
        raise Skip(f"needs CUDA ({reason}): the gemv/gemm/tc kernels and CUDA events exist only there")
    ctx.result["device"] = "cuda"
    import torch

    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        lines = bench.gpu_section(quick=False, figures=figures)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for text in ["```", *lines, "```", ""]:
        ctx.line(text)
    figures["fractions"] = kernel_fractions(figures)
    for text in table(["kernel", "time (ms)", "speedup", "bytes/s as share of copy",
                       "binary ops/s as share of bf16 rate"],
                      [[f["kernel"], f"{f['ms']:.4f}", f["speedup"], f"{f['copy_share']:.0%}", f"{f['bf16_share']:.2f}"]
                       for f in figures["fractions"]]):
        ctx.line(text)


def kernel_fractions(figures: dict) -> list[dict]:
    """Each measured kernel against this run's copy bandwidth (bytes moved: packed operands and the
    int32 output) and bf16 rate (binary ops 2MNK against bf16 FLOP/s at 8192^3)."""
    copy_bw = figures["copy_bandwidth_bytes_per_s"]
    gemm = figures["gemm"]
    s = gemm["size"]
    bf16_rate = 2 * s**3 / (gemm["bf16_ms"] * 1e-3)
    rows = []
    for row in figures.get("gemv", []):
        m, n, k = row["m"], row["n"], row["k"]
        moved = (m + n) * math.ceil(k / 64) * 8 + 4 * m * n
        rows.append({"kernel": f"GEMV M={m} N=K={n}", "ms": row["packed_ms"],
                     "speedup": f"{row['fp16_ms'] / row['packed_ms']:.1f}x fp16",
                     "copy_share": moved / (row["packed_ms"] * 1e-3) / copy_bw,
                     "bf16_share": 2 * m * n * k / (row["packed_ms"] * 1e-3) / bf16_rate})
    moved = 2 * s * math.ceil(s / 64) * 8 + 4 * s * s
    for kernel, baselines in (("gemm", ("fp32", "fp16")), ("tc", ("fp16", "bf16"))):
        if f"{kernel}_ms" in gemm:
            ms = gemm[f"{kernel}_ms"]
            rows.append({"kernel": f"{'CUDA-core' if kernel == 'gemm' else 'tensor-core'} GEMM {s}^3", "ms": ms,
                         "speedup": ", ".join(f"{gemm[f'{b}_ms'] / ms:.2f}x {b}" for b in baselines),
                         "copy_share": moved / (ms * 1e-3) / copy_bw, "bf16_share": 2 * s**3 / (ms * 1e-3) / bf16_rate})
    return rows


# ------------------------------------------------------------------------------- recipes
RECIPE_GROUPS = ("model", "data", "quant", "optim", "sched", "trainer")


class ConfigGroup(dict):
    """A config group as qat.train.optim reads it: keys as attributes, plus dict's ``get``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def experiment_recipe(method: str) -> dict:
    """``python train.py +experiment=resnet18_<method>`` as Hydra composes it, for the groups a
    training step needs (model, data, quant, optim, sched, trainer), read with PyYAML: the GPU
    image has no Hydra or OmegaConf.  The one interpolation these groups use,
    ``${activation_for:${quant.method}}``, is hardtanh for binary-input methods (1-bit activations
    in ``qat.method_bits``), else relu, as qat.train.config.activation_for."""
    import yaml

    import qat

    def load(*parts) -> dict:
        return yaml.safe_load(CONFIGS.joinpath(*parts).read_text()) or {}

    choices = {g: c for entry in load("config.yaml")["defaults"] if isinstance(entry, dict) for g, c in entry.items()}
    experiment = load("experiment", f"resnet18_{method}.yaml")
    for entry in experiment.get("defaults", []):
        for key, choice in (entry.items() if isinstance(entry, dict) else ()):
            group = key.removeprefix("override ").lstrip("/")
            if group not in RECIPE_GROUPS:
                raise ValueError(f"experiment resnet18_{method} overrides {group!r}, "
                                 f"which experiment_recipe cannot read")
            choices[group] = choice
    recipe = {group: load(group, f"{choices[group]}.yaml") for group in RECIPE_GROUPS}
    _merge(recipe, {k: v for k, v in experiment.items() if k in RECIPE_GROUPS})
    model = recipe["model"]
    if str(model.get("activation", "")).startswith("${activation_for:"):
        model["activation"] = "hardtanh" if qat.method_bits(recipe["quant"]["method"])[1] == 1 else "relu"
    for group in ("model", "quant", "optim", "sched"):
        if "${" in json.dumps(recipe[group]):
            raise ValueError(f"unresolved interpolation in {group} of resnet18_{method}: {recipe[group]}")
    return recipe


def architecture(recipe: dict, num_classes: int = 10, in_channels: int = 3) -> dict:
    """The ``qat.models.build`` arguments of a recipe's model."""
    options = dict(recipe["model"])
    return {"name": options.pop("name"), "num_classes": num_classes, "in_channels": in_channels, **options}


def build_quantized(recipe: dict):
    """The recipe's float model built by ``qat.models.build`` and swapped by ``qat.quantize_model``."""
    import qat
    from qat import models

    return qat.quantize_model(models.build(**architecture(recipe)), dict(recipe["quant"]))


# ------------------------------------------------------------------------------- packed inference
def section_e2e(ctx: Context) -> None:
    """Packed ResNet-18 (the xnor recipe's layers) against the float model in fp16, eager."""
    import copy

    import torch

    import qat
    from qat import models
    from qat.export import pack_model

    device = section_device(ctx, need_cupy=True)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    recipe = experiment_recipe("xnor")
    torch.manual_seed(0)
    quantized = build_quantized(recipe)
    qat.set_progress(quantized, 1.0)
    packed = pack_model(quantized.eval()).to(device)
    quantized.to(device)
    fp16 = models.build(**architecture(recipe)).half().to(device).eval()
    fp16_cl = copy.deepcopy(fp16).to(memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        for batch in ctx.sizes.e2e_batches:
            x = torch.randn(batch, 3, ctx.sizes.image_size, ctx.sizes.image_size, device=device)
            x16 = x.half()
            x16_cl = x16.contiguous(memory_format=torch.channels_last)
            reps = ctx.sizes.e2e_reps
            t = {"packed_ms": median_ms(lambda: packed(x), reps, device),
                 "fp16_ms": median_ms(lambda: fp16(x16), reps, device),
                 "fp16_channels_last_ms": median_ms(lambda: fp16_cl(x16_cl), reps, device)}
            same = float((packed(x).argmax(1) == quantized(x).argmax(1)).float().mean())
            best = min(t["fp16_ms"], t["fp16_channels_last_ms"])
            rows.append({"batch": batch, **t, "fp16_best_ms": best, "speedup_vs_fp16": best / t["packed_ms"],
                         "top1_agreement_with_training_model": same})
    ctx.figures.update(rows=rows, quant=recipe["quant"], cudnn_benchmark=device.type == "cuda")
    ctx.line(f"packed ResNet-18 (xnor, keep_fp {recipe['quant']['keep_fp']}) vs the same model in fp16, eager, "
             f"{'CUDA events' if device.type == 'cuda' else 'CPU perf_counter'}, median of {ctx.sizes.e2e_reps}:")
    ctx.line()
    for text in table(["batch", "packed (ms)", "fp16 NCHW (ms)", "fp16 channels_last (ms)", "packed vs best fp16",
                       "top-1 = training model"],
                      [[r["batch"], f"{r['packed_ms']:.3f}", f"{r['fp16_ms']:.3f}", f"{r['fp16_channels_last_ms']:.3f}",
                        f"{r['speedup_vs_fp16']:.2f}x", f"{r['top1_agreement_with_training_model']:.0%}"]
                       for r in rows]):
        ctx.line(text)
    if device.type != "cuda":
        ctx.skip("packed inference on the GPU kernels", "needs CUDA (timed the CPU path on tiny batches)")


# ------------------------------------------------------------------------------- data on the GPU
@dataclass
class GpuData:
    """uint8 images [N, 3, H, W] and int64 labels held on the device, the train images also
    zero-padded once for the random crop; ``mean``/``std`` [1, 3, 1, 1] for normalisation."""
    train: Any
    train_labels: Any
    val: Any
    val_labels: Any
    test: Any
    test_labels: Any
    mean: Any
    std: Any
    source: str
    synthetic: bool
    padded: Any = None
    pad: int = 4


def load_data(ctx: Context, device) -> GpuData:
    """The CIFAR-10 subset (in a dry run a few images, centre-cropped to its image size), or
    synthetic images when the subset is missing."""
    import numpy as np
    import torch

    sizes = ctx.sizes
    if ctx.data is None:
        data = synthetic_data(sizes.synthetic_counts, device, sizes.image_size)
    else:
        arrays = np.load(ctx.data)
        val_positions = arrays["val_positions"]
        keep = np.ones(len(arrays["train_labels"]), dtype=bool)
        keep[val_positions] = False

        def part(images, labels, count):
            cut = (images.shape[-1] - sizes.image_size) // 2
            images = images[:count, :, cut:cut + sizes.image_size, cut:cut + sizes.image_size]
            return (torch.from_numpy(np.ascontiguousarray(images)).to(device),
                    torch.from_numpy(labels[:count]).to(device))

        train = part(arrays["train_images"][keep], arrays["train_labels"][keep], sizes.train_images)
        val = part(arrays["train_images"][val_positions], arrays["train_labels"][val_positions], sizes.val_images)
        test = part(arrays["test_images"], arrays["test_labels"], sizes.test_images)
        stats = [torch.from_numpy(arrays[key]).to(device).view(1, 3, 1, 1) for key in ("mean", "std")]
        data = GpuData(*train, *val, *test, *stats, source=f"CIFAR-10 subset {ctx.data.name}", synthetic=False)
    data.padded = torch.nn.functional.pad(data.train, (data.pad,) * 4)
    return data


def synthetic_data(counts: tuple[int, int, int], device, size: int = 32, classes: int = 10) -> GpuData:
    """Seeded uint8 images whose class shifts a per-class pattern (learnable), for runs without the subset."""
    import torch

    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 256, (classes, 3, size, size), generator=gen, dtype=torch.int16)
    parts = []
    for count in counts:
        labels = torch.arange(count) % classes
        noise = torch.randint(0, 256, (count, 3, size, size), generator=gen, dtype=torch.int16)
        parts += [((patterns[labels] + noise) // 2).to(torch.uint8).to(device), labels.to(device)]
    train = parts[0].float() / 255
    mean, std = train.mean((0, 2, 3)).view(1, 3, 1, 1), train.std((0, 2, 3)).view(1, 3, 1, 1)
    return GpuData(*parts, mean, std, source="synthetic images", synthetic=True)


def crop_flip(padded, index, top, left, flip, size: int):
    """RandomCrop(size, padding) + RandomHorizontalFlip as one gather on the device: image
    ``index[i]`` of the zero-padded batch cropped at (top[i], left[i]), mirrored where flip[i]."""
    import torch

    offsets = torch.arange(size, device=padded.device)
    rows = top[:, None] + offsets
    cols = left[:, None] + torch.where(flip[:, None], offsets.flip(0), offsets)
    channels = torch.arange(padded.shape[1], device=padded.device)
    return padded[index[:, None, None, None], channels[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def augmented_batch(data: GpuData, index, generator):
    """A training batch: random crop + flip drawn on the device, normalised, channels_last."""
    import torch

    n, size = index.numel(), data.train.shape[-1]
    device = data.padded.device
    top = torch.randint(0, 2 * data.pad + 1, (n,), device=device, generator=generator)
    left = torch.randint(0, 2 * data.pad + 1, (n,), device=device, generator=generator)
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    return normalize(crop_flip(data.padded, index, top, left, flip, size), data)


def normalize(images_u8, data: GpuData):
    """ToTensor + Normalize of uint8 images, in channels_last."""
    import torch

    x = (images_u8.float() / 255 - data.mean) / data.std
    return x.contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------- training
@dataclass
class TrainRun:
    """A model with the trainer's optimizer, schedule and latent-weight policy."""
    method: str
    model: Any
    optimizer: Any
    scheduler: Any
    amp: bool
    total_steps: int
    step: int = 0


def build_run(method: str, steps_per_epoch: int, epochs: int, device, seed: int = 0) -> TrainRun:
    """The resnet18_<method> experiment's model, optimizer and schedule, as qat/train/trainer.py builds
    them (weight-decay groups from qat.latent.param_groups, per-step LambdaLR), on ``device`` in
    channels_last; bf16 autocast on CUDA when the recipe's trainer.amp is bf16."""
    import torch

    import qat.latent
    from qat.train.optim import build_optimizer, build_scheduler

    recipe = experiment_recipe(method)
    torch.manual_seed(seed)
    model = build_quantized(recipe).to(device, memory_format=torch.channels_last)
    optim, sched = ConfigGroup(recipe["optim"]), ConfigGroup(recipe["sched"])
    groups = qat.latent.param_groups(model, float(optim.get("weight_decay", 0.0)))
    optimizer = build_optimizer(optim, groups)
    total = epochs * steps_per_epoch
    scheduler = build_scheduler(sched, optimizer, steps_per_epoch, total)
    amp = device.type == "cuda" and recipe["trainer"].get("amp", "bf16") == "bf16"
    return TrainRun(method, model, optimizer, scheduler, amp, total)


def train_step(run: TrainRun, images, labels):
    """One optimizer step as the trainer takes it; returns (loss, correct) as device tensors."""
    import torch
    import torch.nn.functional as F

    import qat

    qat.set_progress(run.model, min(1.0, run.step / run.total_steps))
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=run.amp):
        logits = run.model(images)
    loss = F.cross_entropy(logits.float(), labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    qat.latent.clip_latent_weights(run.model)
    run.step += 1
    return loss.detach(), (logits.argmax(1) == labels).sum()


def train_steps(run: TrainRun, data: GpuData, batch: int, steps: int, generator) -> dict:
    """``steps`` steps over shuffled batches (a new permutation each pass, incomplete batches
    dropped); loss and accuracy summed on the device and read once at the end."""
    import torch

    device = data.train.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    per_pass = data.train.shape[0] // batch
    done = 0
    while done < steps:
        order = torch.randperm(data.train.shape[0], device=device, generator=generator)
        for i in range(min(per_pass, steps - done)):
            index = order[i * batch:(i + 1) * batch]
            loss, hits = train_step(run, augmented_batch(data, index, generator), data.train_labels[index])
            loss_sum += loss
            correct += hits
        done += min(per_pass, steps - done)
    return {"loss": float(loss_sum) / steps, "acc1": int(correct) / (steps * batch)}


def evaluate(run: TrainRun, images, labels, data: GpuData, batch: int) -> dict:
    """Loss and top-1 of the model in eval mode, at the progress the run has reached (as the trainer)."""
    import torch
    import torch.nn.functional as F

    import qat

    qat.set_progress(run.model, min(1.0, run.step / run.total_steps))
    run.model.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            x, y = normalize(images[start:start + batch], data), labels[start:start + batch]
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=run.amp):
                logits = run.model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    run.model.train()
    return {"loss": float(loss_sum) / images.shape[0], "acc1": int(correct) / images.shape[0]}


def batch_sizes(ctx: Context, method: str) -> tuple[int, int]:
    data = experiment_recipe(method)["data"]
    return (ctx.sizes.batch_size or int(data["batch_size"]), ctx.sizes.eval_batch_size or int(data["eval_batch_size"]))


def generator_for(device, seed: int):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def measure_training(ctx: Context, method: str, data: GpuData, device) -> dict:
    """Images per second and seconds of one full epoch, after warm-up steps on the same model."""
    import torch

    batch, _ = batch_sizes(ctx, method)
    steps = data.train.shape[0] // batch
    if steps < 1:
        raise ValueError(f"{data.train.shape[0]} training images make no batch of {batch}")
    run = build_run(method, steps, epochs=1 + math.ceil(ctx.sizes.warmup_steps / steps), device=device)
    generator = generator_for(device, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_steps(run, data, batch, ctx.sizes.warmup_steps, generator)
    synchronize(device)
    started = time.perf_counter()
    epoch = train_steps(run, data, batch, steps, generator)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": steps * batch / seconds, "epoch_seconds": seconds, "epoch_images": steps * batch,
            "batch_size": batch, "steps": steps, "warmup_steps": ctx.sizes.warmup_steps, "amp_bf16": run.amp,
            "optimizer": type(run.optimizer).__name__, "train_loss": epoch["loss"],
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def configure_training_device(ctx: Context):
    import torch

    device = section_device(ctx)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def section_train_throughput(ctx: Context) -> None:
    """Each method measured on its own: one that fails is recorded and the others still run."""
    import torch

    device = configure_training_device(ctx)
    data = load_data(ctx, device)
    failed = []
    for method in TRAIN_METHODS:
        try:
            ctx.figures[method] = measure_training(ctx, method, data, device)
        except Exception as error:
            traceback.print_exc()
            ctx.figures[method] = {"error": f"{type(error).__name__}: {error}"}
            failed.append(method)
        ctx.save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ctx.figures.update(data=data.source, channels_last=True, cudnn_benchmark=device.type == "cuda")
    amp = "on" if device.type == "cuda" else "off (CPU, as the trainer)"
    ctx.line(f"CIFAR ResNet-18, {data.source}, {data.train.shape[0]} training images held on the {device.type}, "
             f"random crop + flip there; bf16 autocast {amp}, channels_last; one full epoch timed after "
             f"{ctx.sizes.warmup_steps} warm-up steps:")
    ctx.line()
    for text in table(["method", "optimizer", "batch", "img/s", "s/epoch", "vs fp", "peak memory (MiB)"],
                      [throughput_row(m, ctx.figures) for m in TRAIN_METHODS]):
        ctx.line(text)
    if device.type != "cuda":
        ctx.skip("AMP and GPU-resident training", "needs CUDA (ran the same loop on CPU, AMP off as the trainer does)")
    if failed:
        raise RuntimeError(f"training failed for {', '.join(failed)}: {ctx.figures[failed[0]]['error']}")


def throughput_row(method: str, figures: dict) -> list:
    f = figures[method]
    if "error" in f:
        return [method, "failed", "", "", "", "", f["error"][:120]]
    fp = figures["fp"].get("images_per_second")
    return [method, f["optimizer"], f["batch_size"], f"{f['images_per_second']:.0f}",
            f"{f['epoch_seconds']:.2f} ({f['epoch_images']} images)",
            f"{f['images_per_second'] / fp:.2f}x" if fp else "-",
            f"{f['peak_memory_mib']:.0f}" if f["peak_memory_mib"] else "-"]


def plan_epochs(ctx: Context, data: GpuData, device, batch: int, eval_batch: int) -> tuple[int, float]:
    """How many xnor epochs fit before the deadline, from steps and an evaluation timed on a
    throw-away model (so the real run starts untouched). Returns (epochs, seconds per epoch)."""
    steps = data.train.shape[0] // batch
    probe = build_run("xnor", steps, 1, device, seed=1)
    generator = generator_for(device, 1)
    train_steps(probe, data, batch, ctx.sizes.warmup_steps, generator)
    synchronize(device)
    started = time.perf_counter()
    train_steps(probe, data, batch, ctx.sizes.probe_steps, generator)
    synchronize(device)
    per_step = (time.perf_counter() - started) / ctx.sizes.probe_steps
    started = time.perf_counter()
    evaluate(probe, data.val, data.val_labels, data, eval_batch)
    evaluate(probe, data.test, data.test_labels, data, eval_batch)
    per_epoch = per_step * steps + time.perf_counter() - started
    margin = 10.0 if device.type == "cuda" else 2.0
    cap = ctx.max_epochs or ctx.sizes.max_epochs
    return max(0, min(cap, int((ctx.left() - margin) / (1.15 * per_epoch)))), per_epoch


def section_short_run(ctx: Context) -> None:
    """xnor from scratch for the epochs that fit; validation and test accuracy after every epoch."""
    device = configure_training_device(ctx)
    if ctx.data is None and not ctx.dry_run:
        raise Skip("needs the CIFAR-10 subset: run python benchmarks/make_gpu_data.py and carry .gpu_data/")
    data = load_data(ctx, device)
    batch, eval_batch = batch_sizes(ctx, "xnor")
    epochs, per_epoch = plan_epochs(ctx, data, device, batch, eval_batch)
    ctx.figures.update(planned_epochs=epochs, planning_seconds_per_epoch=per_epoch, data=data.source,
                       batch_size=batch, train_images=data.train.shape[0], val_images=data.val.shape[0],
                       test_images=data.test.shape[0], epochs=[])
    if epochs < 1:
        raise Skip(f"one epoch takes about {per_epoch:.0f} s, {ctx.left():.0f} s left")
    steps = data.train.shape[0] // batch
    run = build_run("xnor", steps, epochs, device)
    generator = generator_for(device, 0)
    for epoch in range(epochs):
        started = time.perf_counter()
        train = train_steps(run, data, batch, steps, generator)
        val = evaluate(run, data.val, data.val_labels, data, eval_batch)
        test = evaluate(run, data.test, data.test_labels, data, eval_batch)
        ctx.figures["epochs"].append({"epoch": epoch + 1, "train_loss": train["loss"], "train_acc1": train["acc1"],
                                      "val_loss": val["loss"], "val_acc1": val["acc1"], "test_acc1": test["acc1"],
                                      "seconds": time.perf_counter() - started})
        ctx.save()
        if epoch + 1 < epochs and ctx.left() < 1.15 * ctx.figures["epochs"][-1]["seconds"] + 2:
            ctx.skip(f"epochs {epoch + 2}-{epochs}", "stopped early: the next epoch would pass the deadline")
            break
    report_short_run(ctx, epochs)


def report_short_run(ctx: Context, epochs: int) -> None:
    fig = ctx.figures
    rows = fig["epochs"]
    fig["best_val_acc1"] = max(r["val_acc1"] for r in rows)
    fig["final_test_acc1"] = rows[-1]["test_acc1"]
    ctx.line(f"xnor (resnet18_xnor recipe, cosine over {epochs} epochs) on {fig['data']}: {fig['train_images']} "
             f"training images, validation {fig['val_images']} held out of the subset, test {fig['test_images']}; "
             f"{len(rows)} of {epochs} planned epochs ran.")
    ctx.line()
    for text in table(["epoch", "train loss", "train top-1", "val loss", "val top-1", "test top-1", "seconds"],
                      [[r["epoch"], f"{r['train_loss']:.3f}", f"{r['train_acc1']:.1%}", f"{r['val_loss']:.3f}",
                        f"{r['val_acc1']:.1%}", f"{r['test_acc1']:.1%}", f"{r['seconds']:.1f}"] for r in rows]):
        ctx.line(text)


SECTION_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "environment": section_environment, "kernel_launches": section_kernel_launches,
    "gpu_tests": section_gpu_tests, "sanitizer": section_sanitizer, "sanitizer_target": section_sanitizer_target,
    "kernel_bench": section_kernel_bench, "e2e": section_e2e, "train_throughput": section_train_throughput,
    "short_run": section_short_run,
}


if __name__ == "__main__":
    sys.exit(main())
