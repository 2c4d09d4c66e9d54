"""What the command-line entry points do with errors: one line for a user error, a traceback for a bug.

Used by `train.py`, `python -m qat.export` and `python -m qat.train.report`:

  - a user error prints one line, `<prog>: error: <message>`, on stderr and exits with status 2;
  - Ctrl-C exits with status 130 (`<prog>: interrupted`);
  - anything else is a bug: Python's full traceback, status 1;
  - HYDRA_FULL_ERROR=1 (Hydra's convention, honoured by all three) prints the full traceback of a
    user error too, then the line, and still exits with 2.

User errors (`is_user_error`) are the exceptions that describe the input, not the code:
  ConfigError / CheckpointError / DatasetNotFoundError (project), any OSError (missing, unreadable or
  unwritable files and folders, unreadable images, Hydra's MissingConfigException), Hydra's own
  errors (unknown group choice, unparsable override), OmegaConf's (missing mandatory value, unknown
  key, failed interpolation), and a ValueError raised by the project's own code (its checks of
  methods, estimators, hyperparameters and data name the bad value and the valid ones). A ValueError
  raised inside a third-party library is treated as a bug and keeps its traceback.

Hydra normally prints its own report of an exception and exits with status 1. `run_hydra` sets
HYDRA_FULL_ERROR=1 while Hydra runs, so Hydra re-raises instead, and decides here what to print from
the caller's own HYDRA_FULL_ERROR. Inside the job, `hydra_job()` carries exceptions past Hydra's job
runner (which would print an extra "Error executing job" line) and removes the run directory of a
launch that failed before it wrote anything but Hydra's own files.
"""
from __future__ import annotations

import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from qat.train.config import RESUME_SUBDIR_PREFIX

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The files Hydra writes into every run directory before the job starts (under hydra.output_subdir).
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def full_error_requested() -> bool:
    """HYDRA_FULL_ERROR=1, tested as Hydra tests it."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


class _JobFailed(BaseException):
    """Carries an exception out of a Hydra job: Hydra's runner only catches `Exception`."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def _raised_in_project(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is this project's code (not a library)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return PROJECT_ROOT in path.parents and "site-packages" not in path.parts


def _wrapped(error: BaseException) -> BaseException | None:
    """The exception OmegaConf / Hydra wrapped (OmegaConf keeps it only as `__context__`)."""
    inner = error.__cause__ or error.__context__
    return inner if inner is not None and inner is not error else None


def _innermost_user_error(error: BaseException) -> BaseException:
    """Past OmegaConf / Hydra wrappers to the exception that states the problem (e.g. a resolver's)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    while isinstance(error, (OmegaConfBaseException, HydraException)):
        inner = _wrapped(error)
        if inner is None or isinstance(inner, (OmegaConfBaseException, HydraException)) or not is_user_error(inner):
            break
        error = inner
    return error


def is_user_error(error: BaseException) -> bool:
    """Whether `error` describes bad input (one line, status 2) rather than a bug (see module doc)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qat.train.checkpoint import CheckpointError
    from qat.train.config import ConfigError

    if isinstance(error, (ConfigError, CheckpointError, OSError, HydraException, OmegaConfBaseException)):
        return True
    return isinstance(error, ValueError) and _raised_in_project(error)


def one_line(text: str) -> str:
    """A multi-line message on one line: a header ending in ':' is followed by its indented items
    joined with ', '; other lines are joined with '; '. A DataLoader worker's re-raised error
    ("Caught X in DataLoader worker process 0. Original Traceback ...") keeps only its last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1].strip()
        return last.split(": ", 1)[1] if ": " in last and "." in last.split(": ", 1)[0] else last
    out, in_list = "", False
    for raw in lines:
        line = raw.strip()
        if not out:
            out = line
        elif out.endswith(":"):
            out, in_list = f"{out} {line}", raw[:1].isspace()
        elif in_list and raw[:1].isspace():
            out = f"{out}, {line}"
        else:
            out, in_list = f"{out}{' ' if out.endswith('.') else '; '}{line}", False
    return out


def describe(error: BaseException, run_dir_setup: bool = False) -> str:
    """The one-line message for a user error: what is wrong, with which value, and the fix."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    error = _innermost_user_error(error)
    if isinstance(error, OmegaConfBaseException):
        lines = str(error).splitlines()
        key = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("full_key:")), "")
        text = lines[0].strip() if lines else type(error).__name__
        if " raised while resolving interpolation: " in text:
            text = text.split(" raised while resolving interpolation: ", 1)[1]
        return text + (f" (config key {key})" if key and key not in text else "")
    if isinstance(error, HydraException):
        text = one_line(str(error).split("\nConfig search path:")[0])
        override = getattr(error, "override", None)  # OverrideParseException: the override it could not parse
        if override and override not in text:
            text = f"cannot parse the override {override!r}: {text}"
        return text[len("In 'config': "):] if text.startswith("In 'config': ") else text
    if isinstance(error, OSError) and error.strerror and type(error).__str__ is OSError.__str__:
        where = " -> ".join(f"'{name}'" for name in (error.filename, error.filename2) if name is not None)
        text = f"{error.strerror}: {where}" if where else error.strerror
        if run_dir_setup:
            return (f"cannot write the run directory ({text}); point QAT_RUNS or hydra.run.dir at a "
                    f"writable folder")
        return text
    return one_line(str(error)) or type(error).__name__


def _in_hydra_job_setup(error: BaseException) -> bool:
    """Raised by Hydra while it created / wrote the run directory (before the job function ran)."""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "run_job" and code.co_filename.endswith(os.path.join("hydra", "core", "utils.py")):
            return True
        tb = tb.tb_next
    return False


def report(error: BaseException, prog: str, full_error: bool | None = None) -> int:
    """Print what `error` deserves (see module doc) and return the exit status."""
    full_error = full_error_requested() if full_error is None else full_error
    if not is_user_error(error):
        traceback.print_exception(error)
        return 1
    if full_error:
        traceback.print_exception(error)
    print(f"{prog}: error: {describe(error, run_dir_setup=_in_hydra_job_setup(error))}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def guard(function: Callable[[], Any], prog: str, full_error: bool | None = None) -> int:
    """Run `function()` and return the process exit status: its int result (else 0), 2 for a user
    error, 130 for Ctrl-C, 1 for a bug. SystemExit (argparse, --help) passes through."""
    try:
        result = function()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except _JobFailed as failed:
        return report(failed.error, prog, full_error)
    except Exception as error:
        return report(error, prog, full_error)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_hydra(hydra_main: Callable[[], Any], prog: str) -> int:
    """`guard` for a `@hydra.main` function, Hydra's composition errors included (see module doc)."""
    full_error, previous = full_error_requested(), os.environ.get(FULL_ERROR_ENV)
    os.environ[FULL_ERROR_ENV] = "1"  # Hydra re-raises instead of printing its report and exiting 1
    try:
        return guard(hydra_main, prog, full_error)
    finally:
        if previous is None:
            os.environ.pop(FULL_ERROR_ENV, None)
        else:
            os.environ[FULL_ERROR_ENV] = previous


# ----------------------------------------------------------------------------- run directories
def holds_only_hydra_files(run_dir: Path, output_subdir: str | None, job_name: str) -> bool:
    """Whether `run_dir` holds nothing but what Hydra writes before a job starts: the three yaml files
    under `output_subdir` and an empty `<job_name>.log`."""
    allowed = {Path(output_subdir) / name for name in HYDRA_FILES} if output_subdir else set()
    allowed_dirs = {parent for path in allowed for parent in path.parents if parent != Path(".")}
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if path.is_dir() and not path.is_symlink():
            if relative not in allowed_dirs:
                return False
        elif relative == Path(f"{job_name}.log"):
            if path.stat().st_size:
                return False
        elif relative not in allowed:
            return False
    return True


def remove_failed_run_dir(run_dir: Path, output_subdir: str | None, job_name: str,
                          sweep_dir: Path | None = None) -> bool:
    """Remove what a launch that failed before writing anything created: the whole `run_dir` when it
    holds only Hydra's files, else (a resumed run's existing directory) only the launch's own
    `.hydra/resume-<time>` folder; then a multirun's `sweep_dir` left holding only multirun.yaml.
    Returns whether the run directory was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    removed = holds_only_hydra_files(run_dir, output_subdir, job_name)
    if removed:
        shutil.rmtree(run_dir, ignore_errors=True)
        _remove_empty_parents(run_dir)
    elif output_subdir and Path(output_subdir).name.startswith(RESUME_SUBDIR_PREFIX):
        # An existing run this launch tried to resume: take back only the launch's own files.
        own = run_dir / output_subdir
        if own.is_dir() and {p.name for p in own.iterdir()} <= set(HYDRA_FILES):
            shutil.rmtree(own, ignore_errors=True)
        log = run_dir / f"{job_name}.log"
        if log.is_file() and not log.stat().st_size:
            log.unlink()
    if sweep_dir is not None and Path(sweep_dir).is_dir():
        if [p.name for p in Path(sweep_dir).iterdir()] == ["multirun.yaml"]:
            shutil.rmtree(sweep_dir, ignore_errors=True)
            _remove_empty_parents(Path(sweep_dir))
    return removed


def _remove_empty_parents(path: Path) -> None:
    """Remove the now empty folders between `path` and the output root (`runs/<experiment>/`), never
    the root itself nor anything outside it."""
    from qat.train.config import as_path, runs_root

    root = as_path(runs_root()).resolve()
    parent = Path(path).resolve().parent
    while root in parent.parents:
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            return
        parent = parent.parent


@contextmanager
def hydra_job() -> Iterator[Path]:
    """Inside a `@hydra.main` function: yields the run directory; on any exception removes the run
    directory if the launch left nothing in it but Hydra's files (rank 0 only) and carries the
    exception past Hydra's job runner to `run_hydra`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        yield run_dir
    except BaseException as error:
        if int(os.environ.get("RANK", "0")) == 0:
            sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
            remove_failed_run_dir(run_dir, hydra_cfg.output_subdir, hydra_cfg.job.name, sweep_dir)
        if isinstance(error, Exception):
            raise _JobFailed(error) from None
        raise
